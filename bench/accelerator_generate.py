"""Heavy-tailed generation on an accelerator: the engine vs the static-batch path vs HF generate, on the same GPU.

    python bench/accelerator_generate.py [--dtype bfloat16|float32] [--prompts 256] [--batch 128] [--repeats 2]
    python bench/accelerator_generate.py --model /path/to/hf_folder      # a real checkpoint (folder or preset name)
    python bench/accelerator_generate.py --dims tiny --prompts 12 --max-new 24 --batch 4 --repeats 2  # smoke (CPU too)

bench/engine.py measures the CPU; this script runs its workload where both frameworks use an accelerator: jax on
its default backend, PyTorch on "cuda" (the CPU when torch sees no GPU). The workload (bench/harness.py:
heavy_tailed_workload): ``--prompts`` prompts of random tokens, 16..256 long, each with its own max_new_tokens from
a log-normal (median 48, clipped to 512), no stop token any model emits, so every side does the same useful work,
the sum of the per-row counts. The model has SmolLM2-135M's shapes (bench/accelerator_step.py's DIMS; Llama, 30
layers x 576, vocab 49,152, tied) with random weights, or the ``--model`` checkpoint; weights and compute in
``--dtype`` on both sides (bfloat16: how a model is served on a GPU). Three sides, as in bench/engine.py:

* engine: ``Sampler.generate`` with the per-row limits and ``--batch`` slots (a finished row's slot is refilled);
* static: ``StaticSampler`` on the prompts sorted by length in batches of ``--batch``, each batch decoding until its
  longest row's count: the path every caller took before the engine;
* HF: ``generate`` (its default dynamic KV cache, greedy, left padding) on the same sorted batches.

After a warm-up call each, ``--repeats`` interleaved rounds alternate with a matmul peak in ``--dtype`` (an
8,192^3 product per framework; bench/harness.py: the method). tokens/s = useful tokens / the best round's seconds;
``ratio`` (engine vs HF) and ``ratio_static`` (engine vs static) are medians of per-round ratios (> 1: the engine is
faster), with ``_best`` and ``_cpu`` (host CPU seconds) fields. ``greedy_match_*``: the fraction of useful tokens
equal to the engine's; two programs in bfloat16 round differently, and a random-weight model's next-token scores
are close, so a row that differs once goes its own way (token-for-token equality is tested in float32 on the CPU:
tests/test_sampling.py, bench/engine.py). A fresh engine then counts the programs a whole run compiles.
``--compare-cache`` also times, in the same rounds, the engine with a float32 KV cache (the sampler's default before it
kept the cache in the model's dtype): ``ratio_cache`` (> 1: the model-dtype cache is faster) and ``cache_identical``
(tokens and log-probs bit for bit). Prints a table and the host's load average, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accelerator_step import DIMS, PEAK_CALLS, PEAK_N  # noqa: E402
from harness import (Timer, accelerator_torch_device, add_workload_args, count_engine_programs,  # noqa: E402
                     generation_sides, heavy_tailed_workload, llama_config, load_report, never_stopping, peak_flops,
                     peak_line, peak_timers, print_generation_table, ratio_line, ratios, run_rounds, warm_up_generation)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", choices=sorted(DIMS), default="smollm2-135m",
                   help="shapes of the random-weight model (without --model)")
    p.add_argument("--model", default=None, help="HF checkpoint folder or preset name instead of random weights")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    add_workload_args(p, batch=128)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds")
    p.add_argument("--peak-n", type=int, default=PEAK_N, help="side of the square matmul timed as the peak")
    p.add_argument("--compare-cache", action="store_true",
                   help="also time the engine with a float32 KV cache (the sampler's default before it kept the "
                        "cache in the model's dtype) in the same rounds: ratio_cache, cache_identical")
    return p.parse_args()


def models(args, device, max_positions: int):
    """(our Decoder, its config, the PyTorch model on `device`, a display name), weights in ``args.dtype``: the
    ``args.model`` checkpoint, or one random-weight checkpoint of ``args.dims``'s shapes written by transformers."""
    import jax.numpy as jnp
    import torch
    import transformers

    from medkr_jax.models.hf import load_decoder
    from medkr_jax.models.presets import resolve_path

    if args.model is not None:
        folder = args.model if os.path.isdir(args.model) else str(resolve_path(args.model))
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        name = os.path.basename(os.path.normpath(folder))
    else:
        torch.manual_seed(0)
        folder = tempfile.mkdtemp(prefix="bench_accel_gen_")
        ref = transformers.AutoModelForCausalLM.from_config(llama_config(DIMS[args.dims], max_positions=max_positions),
                                                            dtype=torch.float32)
        ref.save_pretrained(folder)
        name = f"{args.dims} shapes (random weights)"
    ours, cfg = load_decoder(folder, dtype=jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.dtype))
    return ours, cfg, ref.to(device=device, dtype=getattr(torch, args.dtype)).eval(), name


def main() -> None:
    args = parse_args()
    device = accelerator_torch_device(args.dtype)
    model, cfg, ref, name = models(args, device, max_positions=2 * (args.max_prompt + args.max_new))
    prompts, limits = heavy_tailed_workload(args, cfg.vocab_size)
    sides, engine, batches = generation_sides(model, cfg, ref, prompts, limits, args.batch, device)
    first, match = warm_up_generation(sides, batches, limits)
    timers = {k: Timer(fn) for k, fn in sides.items()}
    cache = wide_cache_side(args, model, cfg, prompts, limits, first["engine"]) if args.compare_cache else None
    if cache is not None:
        timers["engine_f32_cache"] = Timer(cache["fn"])
    peak = peak_timers(args.peak_n, args.dtype, device)
    run_rounds(timers, args.repeats, peak=peak, peak_calls=PEAK_CALLS)
    counter = count_engine_programs(model, cfg, prompts, limits, args.batch)
    report(args, name, cfg, device, int(limits.sum()), timers, peak, match, counter, engine.last_stats, cache)


def wide_cache_side(args, model, cfg, prompts, limits, default) -> dict:
    """The engine with a float32 KV cache: {"fn": its call (warmed up), "identical": whether its tokens and
    log-probs equal `default`'s, the default engine's output (the cache in the model's dtype), bit for bit}."""
    import numpy as np

    wide = never_stopping(cfg, cache_dtype="float32")

    def fn():
        return wide.generate(model, prompts, max_new_tokens=limits, batch_size=args.batch)

    out = fn()
    same = np.array_equal(default.tokens, out.tokens) and np.array_equal(default.logprobs, out.logprobs)
    return {"fn": fn, "identical": bool(same)}


def report(args, name, cfg, device, useful, timers, peak_t, match, counter, stats, cache=None) -> None:
    import jax
    import torch

    print(f"device: jax {jax.devices()[0].device_kind} ({jax.default_backend()}), torch {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}); {args.dtype}; jax "
          f"{jax.__version__}, torch {torch.__version__}")
    tps, cmp, cmp_static = print_generation_table(args, name, cfg, useful, timers, match, counter, args.dtype)
    peak, _ = peak_flops(peak_t)
    peak_fraction = tps["engine"] * 2 * cfg.num_params / peak
    print(peak_line(peak_t, args.dtype) + f"; engine at {100 * peak_fraction:.3f}% of it")
    print(f"engine: {stats.steps} decode steps of {stats.slots} slots, occupancy {100 * stats.occupancy:.1f}%, "
          f"{1e3 * timers['engine'].wall / stats.steps:.2f} ms a step (prefills included); {stats.prefill_calls} "
          f"prefill calls, {100 * stats.prefill_padding:.1f}% of their positions padding")
    extra = {}
    if cache is not None:
        extra = {**ratios(timers["engine"], timers["engine_f32_cache"], key="ratio_cache"),
                 "cache_identical": cache["identical"]}
        print(ratio_line(f"engine, KV cache {args.dtype} / float32", extra, key="ratio_cache")
              + f"; tokens and log-probs identical: {cache['identical']}")
    load = load_report(None)
    cpu = {k: t.cpu for k, t in timers.items()}
    print(json.dumps({"name": "accelerator_generate", "ours": round(tps["engine"], 2),
                      "reference": round(tps["hf"], 2), "static": round(tps["static"], 2), "unit": "tokens/s",
                      **cmp, **cmp_static, "cpu_time_ratio": round(cpu["hf"] / cpu["engine"], 3),
                      "compiles": counter.num_compiles, "layout_compiles": counter.num_layout_compiles,
                      "useful_tokens": useful, "prompts": args.prompts, "batch": args.batch, "dtype": args.dtype,
                      "model": name, "peak_flops": round(peak), "peak_fraction": round(peak_fraction, 6),
                      "greedy_match_static": round(match["static"], 4), "greedy_match_hf": round(match["hf"], 4),
                      "decode_steps": stats.steps, "occupancy": round(stats.occupancy, 4),
                      "prefill_padding": round(stats.prefill_padding, 4),
                      "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                      "torch_device": str(device), "jax": jax.__version__, "torch": torch.__version__, **extra,
                      **load}))


if __name__ == "__main__":
    main()
