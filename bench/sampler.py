"""Decode throughput of our jitted KV-cache sampler vs Hugging Face PyTorch ``generate``, in one run.

    python bench/sampler.py [--vocab 32768] [--new-tokens 128] [--batch 8] [--repeats 3]

Both run the same tiny Qwen3-shaped checkpoint with random weights (4 layers, hidden 256, 4 query / 2 KV
heads of 64, qk-norm, tied embeddings), batch 8, greedy, exactly ``--new-tokens`` new tokens (no stop
token, so neither side stops early), on the same 8 prompts of 32 tokens. The time is wall-clock for the
whole call (prefill + decode) after a warm-up call, best of ``--repeats``; tokens/s = batch * new tokens /
time. Then 100 prompts of mixed lengths (8..250 tokens, batches of 8) go through a fresh sampler to count
the programs it compiles. ``peak_fraction`` = the sampler's model FLOP/s (2 * params per token) over the
FLOP/s of a large jitted matmul measured in the same run. Ends with one JSON line.

Both sides run on the CPU (the reference is a CPU build of PyTorch) with the same number of threads
(``--threads``, default 1: on a shared machine OpenMP thread pools that wait on busy cores make multi-threaded
timings swing by 10x or more, while one thread each gives a stable, like-for-like ratio).
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
    if n == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both sides (1 = single-threaded XLA too)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from medkr_jax.models.hf import load_decoder
    from medkr_jax.sampling import Sampler

    tmp = tempfile.mkdtemp(prefix="bench_sampler_")
    torch_model = make_checkpoint(tmp, args.vocab)
    model, cfg = load_decoder(tmp)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, args.vocab, args.prompt_len).tolist() for _ in range(args.batch)]
    never = cfg.vocab_size  # an id no model can emit: both sides generate exactly new_tokens tokens

    sampler = Sampler(cfg, pad_id=0, stop_ids=(never,))

    def ours():
        return sampler.generate(model, prompts, max_new_tokens=args.new_tokens, batch_size=args.batch)

    ids = torch.tensor(prompts)

    def reference():
        with torch.no_grad():
            return torch_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        do_sample=False, eos_token_id=None, pad_token_id=0)

    t = time.perf_counter()
    out = ours()
    print(f"first call (compile + run): {time.perf_counter() - t:.1f}s", flush=True)
    t = time.perf_counter()
    ref = reference()
    print(f"HF warm-up call: {time.perf_counter() - t:.1f}s", flush=True)
    match = float(np.mean(out.tokens == ref[:, args.prompt_len:].numpy()))
    t_ours, t_ref = float("inf"), float("inf")
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        t = time.perf_counter()
        ours()
        t_ours = min(t_ours, time.perf_counter() - t)
        t = time.perf_counter()
        reference()
        t_ref = min(t_ref, time.perf_counter() - t)
    tokens = args.batch * args.new_tokens
    ours_tps, ref_tps = tokens / t_ours, tokens / t_ref

    counter = Sampler(cfg, pad_id=0, stop_ids=(2,))
    mixed = [rng.integers(3, args.vocab, int(n)).tolist() for n in rng.integers(8, 251, size=100)]
    t = time.perf_counter()
    counter.generate(model, mixed, max_new_tokens=args.new_tokens, batch_size=args.batch)
    print(f"100 mixed prompts: {time.perf_counter() - t:.1f}s", flush=True)

    peak = matmul_flops()
    flops_per_token = 2 * cfg.num_params
    peak_fraction = ours_tps * flops_per_token / peak

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), threads {args.threads} "
          f"(torch {torch.get_num_threads()}), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"model: Qwen3-shaped, 4 layers x 256, vocab {args.vocab}, {cfg.num_params / 1e6:.1f}M params")
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; "
          f"greedy tokens equal to HF: {100 * match:.1f}%")
    print(f"{'':24s}{'time (s)':>10s}{'tokens/s':>12s}")
    print(f"{'ours (jax sampler)':24s}{t_ours:10.3f}{ours_tps:12.1f}")
    print(f"{'HF generate (torch)':24s}{t_ref:10.3f}{ref_tps:12.1f}")
    print(f"ratio ours / HF: {ours_tps / ref_tps:.2f}x")
    print(f"compiled programs over 100 prompts of 8..250 tokens (batch {args.batch}): {counter.num_compiles}")
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; sampler at {100 * peak_fraction:.2f}% of it")
    print(json.dumps({"name": "sampler_decode", "ours": round(ours_tps, 2), "reference": round(ref_tps, 2),
                      "unit": "tokens/s", "ratio": round(ours_tps / ref_tps, 3), "compiles": counter.num_compiles,
                      "peak_fraction": round(peak_fraction, 5), "greedy_match": match}))


if __name__ == "__main__":
    main()
