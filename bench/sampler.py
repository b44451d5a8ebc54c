"""Decode throughput of our jitted KV-cache sampler vs Hugging Face PyTorch ``generate``, in one run.

    python bench/sampler.py [--vocab 32768] [--new-tokens 128] [--batch 8] [--repeats 3] [--threads 1]
    python bench/sampler.py --model smollm2-135m --batch 16     # a real checkpoint (folder or preset name)

Both run the same tiny Qwen3-shaped checkpoint with random weights (4 layers, hidden 256, 4 query / 2 KV
heads of 64, qk-norm, tied embeddings), or the ``--model`` checkpoint, batch 8, greedy, exactly
``--new-tokens`` new tokens (no stop token, so neither side stops early), on the same prompts of 32
random tokens. HF runs with its KV cache (use_cache) and, by default, whichever of its dynamic and static
cache implementations is faster on a timed call (``--hf-cache``). Each side's whole call (prefill + decode) and a
call that generates a single token (prefill + first token) are timed after a warm-up call, in ``--repeats``
interleaved rounds alternating with the matmul peak (bench/harness.py: the method); tokens/s = batch * new tokens
/ the best round's time; ``ratio`` is the median of the per-round whole-call ratios (HF time / ours, > 1: ours is
faster), with ``ratio_best`` (best over best) and the CPU-time ``ratio_cpu``. The decode-only rate subtracts the
single-token call from the full call, best rounds, on each side: batch * (new tokens - 1) / (t_full - t_one). Then
(for the tiny model, or with ``--compile-count``) 100 prompts of mixed lengths (8..250 tokens, batches of 8) go
through a fresh sampler to count the programs it compiles. ``peak_fraction`` = the sampler's model FLOP/s (2 *
params per token) over the peak: the best call of a large fp32 matmul (jitted JAX or torch) in the same rounds.
A decode step reads every weight and the whole KV cache to emit ``--batch`` tokens, so the report also gives the
bytes our decode step reads per second (``decode_bytes_per_step`` / the decode step time) against this machine's
streaming read bandwidth, timed in the same rounds as the peak (bench/harness.py): ``bandwidth_fraction`` (a step
whose bytes stay in the CPU's caches can read faster than memory streams: a fraction above 1). Ends with the load
average and one JSON line.

Both sides run on the CPU (the reference is a CPU build of PyTorch), pinned to the same ``--threads`` CPUs
(default 1: on a shared machine OpenMP thread pools that wait on busy cores make multi-threaded timings swing by
10x or more, while one core each gives a stable, like-for-like ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Timer, device_line, load_report, never_stopping, peak_flops, peak_line,  # noqa: E402
                     peak_timers, pin, ratio_line, ratios, run_rounds, stream_bandwidth, stream_line, stream_timers,
                     threads_from_argv)

pin(threads_from_argv())  # before jax is imported: both sides on the same --threads CPUs (bench/harness.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_checkpoint(folder: str, vocab: int):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1,
                                   eos_token_id=2, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(folder)
    return model


def bench_model(model: str | None, vocab: int, *, prefix: str):
    """(HF folder, the PyTorch model, a display name): the tiny random Qwen3-shaped checkpoint written to a temp
    folder when ``model`` is None, else ``model`` as a folder or preset name."""
    import torch
    import transformers

    from medkr_jax.models.presets import resolve_path

    if model is None:
        folder = tempfile.mkdtemp(prefix=prefix)
        return folder, make_checkpoint(folder, vocab), f"Qwen3-shaped, 4 layers x 256, vocab {vocab}"
    folder = model if os.path.isdir(model) else str(resolve_path(model))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, torch_model, os.path.basename(os.path.normpath(folder))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF checkpoint folder or preset name (default: tiny random Qwen3)")
    ap.add_argument("--compile-count", action=argparse.BooleanOptionalAction, default=None,
                    help="count compiled programs over 100 mixed prompts (default: only for the tiny model)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul used for the peak")
    ap.add_argument("--stream-mb", type=int, default=512, help="MiB streamed to time the memory bandwidth")
    ap.add_argument("--hf-cache", choices=("best", "dynamic", "static"), default="best",
                    help="HF generate's KV cache: its default dynamic cache, a static cache, or whichever of the "
                         "two is faster on a timed call after the warm-up (default)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both sides (1 = single-threaded XLA too)")
    return ap.parse_args()


def hf_generate(torch_model, prompts, args):
    """reference(new_tokens, cache): HF generate on `prompts`, greedy, exactly new_tokens tokens; `cache` is
    "dynamic" (HF's default) or "static" (preallocated, as ours); use_cache=True either way."""
    import torch

    ids = torch.tensor(prompts)

    def reference(new_tokens=args.new_tokens, cache="dynamic"):
        with torch.no_grad():
            return torch_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True,
                                        cache_implementation=None if cache == "dynamic" else cache)
    return reference


def pick_hf_cache(reference, setting: str) -> str:
    """`setting`, or with "best" the faster of HF's dynamic and static caches on two timed calls each."""
    if setting != "best":
        return setting
    reference(cache="static")  # warm-up
    timed = {}
    for c in ("dynamic", "static"):
        t = Timer(lambda c=c: reference(cache=c))
        timed[c] = min(t.round() for _ in range(2))
    best = min(timed, key=timed.get)
    print("HF cache settings, one call each (s): " + ", ".join(f"{c} {v:.3f}" for c, v in timed.items())
          + f"; the reference uses {best}", flush=True)
    return best


def count_compiles(cfg, model, rng, args) -> tuple[int, int]:
    """(programs, LM-head layout programs) a fresh sampler compiles over 100 prompts of 8..250 tokens."""
    from medkr_jax.sampling import Sampler

    counter = Sampler(cfg, pad_id=0, stop_ids=(2,))
    mixed = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(8, 251, size=100)]
    t = time.perf_counter()
    counter.generate(model, mixed, max_new_tokens=args.new_tokens, batch_size=args.batch)
    print(f"100 mixed prompts: {time.perf_counter() - t:.1f}s", flush=True)
    return counter.num_compiles, counter.num_layout_compiles


def main() -> None:
    args = parse_args()
    from medkr_jax.models.hf import load_decoder

    folder, torch_model, name = bench_model(args.model, args.vocab, prefix="bench_sampler_")
    model, cfg = load_decoder(folder)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]

    # Both sides generate exactly new_tokens tokens (HF: no eos; ours: a stop id no model emits). One generation
    # bucket, so the single-token call runs the same prefill as the full one.
    sampler = never_stopping(cfg, gen_buckets=(args.new_tokens,))

    def ours(new_tokens=args.new_tokens):
        return sampler.generate(model, prompts, max_new_tokens=new_tokens, batch_size=args.batch)

    reference = hf_generate(torch_model, prompts, args)
    t = time.perf_counter()
    out = ours()
    print(f"first call (compile + run): {time.perf_counter() - t:.1f}s", flush=True)
    ours(1)
    t = time.perf_counter()
    ref = reference(cache="dynamic" if args.hf_cache == "best" else args.hf_cache)
    print(f"HF warm-up call: {time.perf_counter() - t:.1f}s", flush=True)
    match = float(np.mean(out.tokens == ref[:, args.prompt_len:].numpy()))
    hf_cache = pick_hf_cache(reference, args.hf_cache)

    timers = {"ours": Timer(ours), "ref": Timer(lambda: reference(cache=hf_cache)),
              "ours1": Timer(lambda: ours(1)), "ref1": Timer(lambda: reference(1, cache=hf_cache))}
    peak_t, stream_t = peak_timers(args.peak_n), stream_timers(args.stream_mb)
    run_rounds(timers, args.repeats, {**peak_t, **stream_t})
    compile_count = args.model is None if args.compile_count is None else args.compile_count
    compiles = count_compiles(cfg, model, rng, args) if compile_count else (None, None)
    stats = sampler.last_stats  # the engine's own slots and cache length (every call here has the same)
    report(args, name, cfg, timers, peak_t, stream_t, hf_cache, match, compiles,
           decode_step_bytes(cfg, stats.slots, stats.cache_length))


def decode_step_bytes(cfg, batch: int, cache_len: int) -> dict[str, int]:
    """Bytes one decode step of our sampler reads: every weight once (the input embedding only gathers rows; a tied
    one is read in full as the decode LM head, an untied model reads its LM head) and the keys and values of all
    ``cache_len`` slots of the ``batch`` rows' cache (attention reads the whole cache)."""
    from medkr_jax.models.memory import abstract_mesh, kv_cache_bytes

    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    weights = 4 * (cfg.num_params - embed)
    kv = kv_cache_bytes(cfg, abstract_mesh({}), rows=batch, length=cache_len, pad_rows=False)
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def report(args, name, cfg, timers, peak_t, stream_t, hf_cache, match, compiles, step_bytes) -> None:
    cmp = ratios(timers["ours"], timers["ref"])
    t_ours, t_ref, t_ours1, t_ref1 = (timers[k].wall for k in ("ours", "ref", "ours1", "ref1"))
    tokens = args.batch * args.new_tokens
    ours_tps, ref_tps = tokens / t_ours, tokens / t_ref
    decode_tokens = args.batch * (args.new_tokens - 1)
    ours_dec = decode_tokens / max(t_ours - t_ours1, 1e-9)
    ref_dec = decode_tokens / max(t_ref - t_ref1, 1e-9)
    peak, _ = peak_flops(peak_t)
    peak_fraction = ours_tps * 2 * cfg.num_params / peak
    bandwidth = stream_bandwidth(stream_t)
    step_s = args.batch / ours_dec  # one decode step: the decode-only rate's time per token of the batch
    decode_bytes_per_s = step_bytes["total"] / step_s

    print(device_line(args.threads))
    print(f"model: {name}, {cfg.num_params / 1e6:.1f}M params")
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; "
          f"greedy tokens equal to HF: {100 * match:.1f}%; best of {args.repeats} rounds")
    print(f"{'':24s}{'call (s)':>10s}{'tokens/s':>12s}{'1-token call (s)':>18s}{'decode tokens/s':>17s}")
    print(f"{'ours (jax sampler)':24s}{t_ours:10.3f}{ours_tps:12.1f}{t_ours1:18.3f}{ours_dec:17.1f}")
    print(f"{'HF generate (' + hf_cache + ')':24s}{t_ref:10.3f}{ref_tps:12.1f}{t_ref1:18.3f}{ref_dec:17.1f}")
    print(ratio_line("ratio ours / HF, whole call", cmp) + f"; {ours_dec / ref_dec:.2f}x decode only (best rounds)")
    if compiles[0] is not None:
        print(f"compiled programs over 100 prompts of 8..250 tokens (batch {args.batch}): {compiles[0]} "
              f"(+ {compiles[1]} laying out the LM head for decode steps)")
    print(peak_line(peak_t) + f"; sampler at {100 * peak_fraction:.2f}% of it")
    print(f"decode step: {1e3 * step_s:.2f} ms, reads {step_bytes['total'] / 2**20:.1f} MiB (weights "
          f"{step_bytes['weights'] / 2**20:.1f}, KV cache {step_bytes['kv_cache'] / 2**20:.1f}): "
          f"{decode_bytes_per_s / 1e9:.1f} GB/s, {100 * decode_bytes_per_s / bandwidth:.0f}% of the "
          + stream_line(stream_t))
    load = load_report(args.threads)
    print(json.dumps({"name": "sampler_decode", "ours": round(ours_tps, 2), "reference": round(ref_tps, 2),
                      "unit": "tokens/s", **cmp, "compiles": compiles[0], "layout_compiles": compiles[1],
                      "decode_ours": round(ours_dec, 2), "decode_reference": round(ref_dec, 2),
                      "decode_ratio": round(ours_dec / ref_dec, 3), "round_ratios": cmp["ratio_rounds"],
                      "model": name, "hf_cache": hf_cache, "batch": args.batch, "threads": args.threads,
                      "peak_flops": round(peak), "peak_fraction": round(peak_fraction, 5), "greedy_match": match,
                      "decode_step_s": float(f"{step_s:.6g}"), "decode_bytes_per_step": step_bytes["total"],
                      "stream_bytes_per_s": round(bandwidth),
                      "bandwidth_fraction": round(decode_bytes_per_s / bandwidth, 4),
                      **load}))


if __name__ == "__main__":
    main()
