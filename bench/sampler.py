"""Decode throughput of our jitted KV-cache sampler vs Hugging Face PyTorch ``generate``, in one run.

    python bench/sampler.py [--vocab 32768] [--new-tokens 128] [--batch 8] [--repeats 3] [--threads 1]
    python bench/sampler.py --model smollm2-135m --batch 16     # a real checkpoint (folder or preset name)

Both run the same tiny Qwen3-shaped checkpoint with random weights (4 layers, hidden 256, 4 query / 2 KV
heads of 64, qk-norm, tied embeddings), or the ``--model`` checkpoint, batch 8, greedy, exactly
``--new-tokens`` new tokens (no stop token, so neither side stops early), on the same prompts of 32
random tokens. HF runs with its KV cache (use_cache) and, by default, whichever of its dynamic and static
cache implementations is faster on a timed call (``--hf-cache``). The headline time is wall-clock for the
whole call (prefill + decode) after a warm-up call, best of ``--repeats``; tokens/s = batch * new tokens /
time. The decode-only rate subtracts a call that generates a single token (prefill + first token) from the
full call, on each side: batch * (new tokens - 1) / (t_full - t_one). Then (for the tiny model, or with
``--compile-count``) 100 prompts of mixed lengths (8..250 tokens, batches of 8) go through a fresh sampler
to count the programs it compiles. ``peak_fraction`` = the sampler's model FLOP/s (2 * params per token) over the
FLOP/s of a large jitted matmul measured in the same run. Ends with one JSON line.

Both sides run on the CPU (the reference is a CPU build of PyTorch) on the same number of cores
(``--threads``, default 1: the process is pinned to that many CPUs and torch uses that many threads; on a
shared machine OpenMP thread pools that wait on busy cores make multi-threaded timings swing by 10x or more,
while one core each gives a stable, like-for-like ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _early_threads() -> int:
    """--threads must shape XLA's CPU thread pool before jax is imported."""
    n = 1
    for i, a in enumerate(sys.argv):
        if a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
        elif a == "--threads" and i + 1 < len(sys.argv):
            n = int(sys.argv[i + 1])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # XLA sizes its CPU thread pools (incl. the one its matmul kernels run on) from the CPUs this
    # process may use; the XLA flags alone leave the matmuls on every core. Pinning the process to
    # n CPUs holds both sides to n cores.
    cpus = sorted(os.sched_getaffinity(0))
    if n < len(cpus):
        os.sched_setaffinity(0, cpus[:n])
    if n == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    return n


_early_threads()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


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


def matmul_flops(n: int = 2048, iters: int = 10) -> float:
    """FLOP/s of a jitted n x n float32 matmul chain on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)

    @jax.jit
    def chain(x):
        for _ in range(iters):
            x = (x @ a) * (1.0 / n)
        return x

    chain(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        chain(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * iters / best


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF checkpoint folder or preset name (default: tiny random Qwen3)")
    ap.add_argument("--compile-count", action=argparse.BooleanOptionalAction, default=None,
                    help="count compiled programs over 100 mixed prompts (default: only for the tiny model)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-cache", choices=("best", "dynamic", "static"), default="best",
                    help="HF generate's KV cache: its default dynamic cache, a static cache, or whichever of the "
                         "two is faster on a timed call after the warm-up (default)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both sides (1 = single-threaded XLA too)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from medkr_jax.models.hf import load_decoder
    from medkr_jax.sampling import Sampler

    folder, torch_model, name = bench_model(args.model, args.vocab, prefix="bench_sampler_")
    count_compiles = args.model is None if args.compile_count is None else args.compile_count
    model, cfg = load_decoder(folder)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
    never = cfg.vocab_size  # an id no model can emit: both sides generate exactly new_tokens tokens

    # One generation bucket, so the single-token call runs the same prefill as the full one.
    sampler = Sampler(cfg, pad_id=0, stop_ids=(never,), gen_buckets=(args.new_tokens,))

    def ours(new_tokens=args.new_tokens):
        return sampler.generate(model, prompts, max_new_tokens=new_tokens, batch_size=args.batch)

    ids = torch.tensor(prompts)

    hf_cache = "dynamic" if args.hf_cache == "best" else args.hf_cache

    def reference(new_tokens=args.new_tokens, cache=None):
        # use_cache=True (the default) either way; "static" preallocates the whole cache as we do.
        kind = {"dynamic": None, "static": "static"}[cache or hf_cache]
        with torch.no_grad():
            return torch_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True,
                                        cache_implementation=kind)

    t = time.perf_counter()
    out = ours()
    print(f"first call (compile + run): {time.perf_counter() - t:.1f}s", flush=True)
    ours(1)
    t = time.perf_counter()
    ref = reference()
    print(f"HF warm-up call: {time.perf_counter() - t:.1f}s", flush=True)
    match = float(np.mean(out.tokens == ref[:, args.prompt_len:].numpy()))

    def best(fn, *a, **kw):
        t = time.perf_counter()
        fn(*a, **kw)
        return time.perf_counter() - t

    if args.hf_cache == "best":
        reference(cache="static")  # warm-up
        timed = {c: min(best(reference, cache=c) for _ in range(2)) for c in ("dynamic", "static")}
        hf_cache = min(timed, key=timed.get)
        print("HF cache settings, one call each (s): " + ", ".join(f"{c} {v:.3f}" for c, v in timed.items())
              + f"; the reference uses {hf_cache}", flush=True)

    t_ours = t_ref = t_ours1 = t_ref1 = float("inf")
    rounds = []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        o, r = best(ours), best(reference)
        o1, r1 = best(ours, 1), best(reference, 1)
        rounds.append(r / o)
        t_ours, t_ref = min(t_ours, o), min(t_ref, r)
        t_ours1, t_ref1 = min(t_ours1, o1), min(t_ref1, r1)
    tokens = args.batch * args.new_tokens
    ours_tps, ref_tps = tokens / t_ours, tokens / t_ref
    decode_tokens = args.batch * (args.new_tokens - 1)
    ours_dec = decode_tokens / max(t_ours - t_ours1, 1e-9)
    ref_dec = decode_tokens / max(t_ref - t_ref1, 1e-9)

    compiles = layouts = None
    if count_compiles:
        counter = Sampler(cfg, pad_id=0, stop_ids=(2,))
        mixed = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(8, 251, size=100)]
        t = time.perf_counter()
        counter.generate(model, mixed, max_new_tokens=args.new_tokens, batch_size=args.batch)
        compiles, layouts = counter.num_compiles, counter.num_layout_compiles
        print(f"100 mixed prompts: {time.perf_counter() - t:.1f}s", flush=True)

    peak = matmul_flops()
    flops_per_token = 2 * cfg.num_params
    peak_fraction = ours_tps * flops_per_token / peak

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), threads {args.threads} "
          f"(torch {torch.get_num_threads()}, CPUs {sorted(os.sched_getaffinity(0))}), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"model: {name}, {cfg.num_params / 1e6:.1f}M params")
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; "
          f"greedy tokens equal to HF: {100 * match:.1f}%")
    print(f"{'':24s}{'call (s)':>10s}{'tokens/s':>12s}{'1-token call (s)':>18s}{'decode tokens/s':>17s}")
    print(f"{'ours (jax sampler)':24s}{t_ours:10.3f}{ours_tps:12.1f}{t_ours1:18.3f}{ours_dec:17.1f}")
    print(f"{'HF generate (' + hf_cache + ')':24s}{t_ref:10.3f}{ref_tps:12.1f}{t_ref1:18.3f}{ref_dec:17.1f}")
    print(f"ratio ours / HF: {ours_tps / ref_tps:.2f}x whole call (per round: "
          f"{', '.join(f'{x:.2f}' for x in rounds)}), {ours_dec / ref_dec:.2f}x decode only")
    if compiles is not None:
        print(f"compiled programs over 100 prompts of 8..250 tokens (batch {args.batch}): {compiles} "
              f"(+ {layouts} laying out the LM head for decode steps)")
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; sampler at {100 * peak_fraction:.2f}% of it")
    print(json.dumps({"name": "sampler_decode", "ours": round(ours_tps, 2), "reference": round(ref_tps, 2),
                      "unit": "tokens/s", "ratio": round(ours_tps / ref_tps, 3), "compiles": compiles,
                      "layout_compiles": layouts, "decode_ours": round(ours_dec, 2),
                      "decode_reference": round(ref_dec, 2),
                      "decode_ratio": round(ours_dec / ref_dec, 3), "round_ratios": [round(x, 3) for x in rounds],
                      "model": name, "hf_cache": hf_cache, "batch": args.batch, "threads": args.threads,
                      "peak_fraction": round(peak_fraction, 5), "greedy_match": match}))


if __name__ == "__main__":
    main()
