"""Heavy-tailed generation: the engine (continuous batching) vs the static-batch path vs HF generate, in one run.

    python bench/engine.py [--prompts 256] [--batch 16] [--median-new 48] [--max-new 512] [--repeats 3] [--threads 1]
    python bench/engine.py --model smollm2-135m      # a real checkpoint (folder or preset name)

The workload is what dominates evaluation and GRPO rollouts: ``--prompts`` prompts of random tokens, lengths
uniform in [--min-prompt, --max-prompt] (16..256), each with its own max_new_tokens drawn from a log-normal
(median ``--median-new``, sigma ``--sigma``) clipped to [1, --max-new], so a few rows run ~10x longer than most.
No row stops early (the stop id is one no model emits), so all three sides do the same useful work: the sum of the
per-row counts. The model is bench/sampler.py's tiny Qwen3-shaped checkpoint (random weights) or ``--model``.

* engine: ``Sampler.generate`` with the per-row limits and ``--batch`` slots (a finished row's slot is refilled);
* static: ``StaticSampler``, the prompts sorted by length in batches of ``--batch``, each batch decoding until its
  longest row's count (the rows done earlier idle): the path every caller took before the engine;
* HF: ``generate`` (KV cache, greedy, left padding) on the same sorted batches, each to its longest row's count.

After a warm-up call each (kept for the token comparison), the three sides run in ``--repeats`` interleaved
rounds alternating with the matmul peak, pinned to the same ``--threads`` CPUs (bench/harness.py: the method).
tokens/s = useful tokens / the best round's wall-clock seconds. ``ratio`` (engine vs HF) and ``ratio_static``
(engine vs static) are medians of the per-round ratios (the other side's time / the engine's, > 1: the engine is
faster), each with its ``_best`` (best over best), ``_cpu`` (CPU time) and ``_rounds`` fields. A fresh engine then
counts the programs one whole evaluation over these mixed lengths compiles, and what the engine did
(``Sampler.last_stats``): decode steps of its slots, ``occupancy`` (emitted tokens / slot-steps), the prefill's share
of padding, and the bytes its decode steps read (every weight and the whole cache of every slot, each step) over
the engine's whole call, against this machine's streaming read bandwidth timed in the same rounds (a lower bound on
the decode steps' own rate: the call's time includes its prefills). Prints a table, the load average, then one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Timer, add_workload_args, count_engine_programs, device_line, generation_sides,  # noqa: E402
                     heavy_tailed_workload, load_report, peak_flops, peak_line, peak_timers, pin,
                     print_generation_table, run_rounds, stream_bandwidth, stream_line, stream_timers,
                     threads_from_argv, warm_up_generation)

pin(threads_from_argv())  # before jax is imported: both sides on the same --threads CPUs (bench/harness.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF checkpoint folder or preset name (default: tiny random Qwen3)")
    ap.add_argument("--vocab", type=int, default=32768, help="vocabulary of the tiny random model")
    add_workload_args(ap)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul used for the peak")
    ap.add_argument("--stream-mb", type=int, default=512, help="MiB streamed to time the memory bandwidth")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both sides (1 = single-threaded XLA too)")
    args = ap.parse_args()

    from medkr_jax.models.hf import load_decoder
    from sampler import bench_model, decode_step_bytes

    folder, torch_model, name = bench_model(args.model, args.vocab, prefix="bench_engine_")
    model, cfg = load_decoder(folder)
    prompts, limits = heavy_tailed_workload(args, cfg.vocab_size)
    useful = int(limits.sum())
    sides, engine, batches = generation_sides(model, cfg, torch_model, prompts, limits, args.batch)
    _, match = warm_up_generation(sides, batches, limits)
    timers = {k: Timer(fn) for k, fn in sides.items()}
    peak_t, stream_t = peak_timers(args.peak_n), stream_timers(args.stream_mb)
    run_rounds(timers, args.repeats, {**peak_t, **stream_t})
    counter = count_engine_programs(model, cfg, prompts, limits, args.batch)
    stats = engine.last_stats
    step_bytes = decode_step_bytes(cfg, stats.slots, stats.cache_length)
    report(args, name, cfg, useful, timers, peak_t, match, counter, stats, step_bytes, stream_bandwidth(stream_t),
           stream_line(stream_t))


def report(args, name, cfg, useful, timers, peak_t, match, counter, stats, step_bytes, bandwidth,
           bandwidth_text) -> None:
    print(device_line(args.threads))
    tps, cmp, cmp_static = print_generation_table(args, name, cfg, useful, timers, match, counter)
    peak, _ = peak_flops(peak_t)
    peak_fraction = tps["engine"] * 2 * cfg.num_params / peak
    print(peak_line(peak_t) + f"; engine at {100 * peak_fraction:.2f}% of it")
    read_rate = stats.steps * step_bytes["total"] / timers["engine"].wall
    print(f"engine: {stats.steps} decode steps of {stats.slots} slots, occupancy {100 * stats.occupancy:.1f}%; "
          f"{stats.prefill_calls} prefill calls, {100 * stats.prefill_padding:.1f}% of their positions padding; a "
          f"decode step reads {step_bytes['total'] / 2**20:.1f} MiB (weights {step_bytes['weights'] / 2**20:.1f}, "
          f"KV cache of {stats.cache_length} slots a row {step_bytes['kv_cache'] / 2**20:.1f}): "
          f"{read_rate / 1e9:.1f} GB/s over the whole call, {100 * read_rate / bandwidth:.0f}% of the "
          + bandwidth_text)
    load = load_report(args.threads)
    cpu = {k: t.cpu for k, t in timers.items()}
    print(json.dumps({"name": "engine_heavy_tail", "ours": round(tps["engine"], 2), "reference": round(tps["hf"], 2),
                      "static": round(tps["static"], 2), "unit": "tokens/s", **cmp, **cmp_static,
                      "round_ratios": cmp["ratio_rounds"],
                      "cpu_time_ratio": round(cpu["hf"] / cpu["engine"], 3),
                      "cpu_time_ratio_static": round(cpu["static"] / cpu["engine"], 3),
                      "compiles": counter.num_compiles, "layout_compiles": counter.num_layout_compiles,
                      "useful_tokens": useful, "prompts": args.prompts, "batch": args.batch, "threads": args.threads,
                      "peak_flops": round(peak), "peak_fraction": round(peak_fraction, 5),
                      "greedy_match_static": round(match["static"], 4), "greedy_match_hf": round(match["hf"], 4),
                      "decode_steps": stats.steps, "occupancy": round(stats.occupancy, 4),
                      "prefill_padding": round(stats.prefill_padding, 4), "cache_length": stats.cache_length,
                      "decode_bytes_per_step": step_bytes["total"], "stream_bytes_per_s": round(bandwidth),
                      "bandwidth_fraction": round(read_rate / bandwidth, 4),
                      "model": name, **load}))


if __name__ == "__main__":
    main()
