"""The SFT step on an accelerator: our jitted step vs Hugging Face PyTorch's on the same GPU.

    python bench/accelerator_step.py [--dtype bfloat16|float32] [--batch 8] [--seq 1024] [--steps 10]
    python bench/accelerator_step.py --dims tiny --batch 2 --seq 64 --steps 2   # a smoke run (CPU too)

bench/train_step.py measures the CPU; this script runs the same comparison where both frameworks use an
accelerator: jax on its default backend, PyTorch on "cuda" (the CPU when torch sees no GPU). The model has
SmolLM2-135M's shapes (`--dims smollm2-135m`: Llama, 30 layers x 576, 9 query / 3 KV heads of 64, MLP 1,536,
vocab 49,152, tied embeddings) with random weights, so no checkpoint is needed; both sides train it on the same
random token batch (every target counted) with AdamW (lr 1e-4) and global-norm clipping at 1.0. Ours is the
`Trainer` step of medkr_jax.train.trainer with the SFT loss on one device; the reference is transformers'
LlamaForCausalLM with its "sdpa" attention (PyTorch's fused kernels), torch.optim.AdamW and clip_grad_norm_.

`--dtype bfloat16` (the default, how models are trained on GPUs): float32 master weights on both sides, the
compute in bfloat16 (our Decoder's dtype; PyTorch's autocast). `--dtype float32`: float32 throughout, with
TF32 matmuls on both sides (jax's default matmul precision "tensorfloat32", torch's allow_tf32).

Rounds follow bench/harness.py: one untimed round, then `--steps` interleaved rounds of one step per side (each
step ends on its loss read back to the host, as a training loop's NaN check does) and `PEAK_CALLS` matmul-peak
calls per framework (an 8,192^3 product in the compute dtype). `ratio` = the reference's step time over ours
(> 1: ours is faster), the median of the per-round ratios; `peak_fraction` (`reference_peak_fraction`) = a side's
best step's model FLOP/s (harness.sft_step_flops) over the best peak call. The host's load average, then one JSON
line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Timer, accelerator_torch_device, decoder_config, llama_config, load_report,  # noqa: E402
                     peak_flops, peak_timers, ratio_line, ratios, run_rounds, sft_batch, sft_step_flops, sft_trainer,
                     torch_sft_step)

DIMS = {
    "smollm2-135m": dict(vocab=49152, hidden=576, mlp=1536, layers=30, heads=9, kv_heads=3, head_dim=64,
                         rope_theta=100000.0, tied=True),
    "tiny": dict(vocab=1024, hidden=128, mlp=256, layers=2, heads=4, kv_heads=2, head_dim=32, rope_theta=10000.0,
                 tied=True),
}
PEAK_N = 8192
PEAK_CALLS = 5


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", choices=sorted(DIMS), default="smollm2-135m")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed rounds")
    p.add_argument("--peak-n", type=int, default=PEAK_N, help="side of the square matmul timed as the peak")
    return p.parse_args()


def our_step(d: dict, dtype: str, batch: dict):
    """(our SFT step fn, its parameter count, the decoder config) on jax's first device."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from medkr_jax import parallel
    from medkr_jax.models.decoder import Decoder
    from medkr_jax.models.hf import one_device_mesh
    from medkr_jax.train import sft

    cfg = decoder_config(d, max_positions=max(2048, batch["tokens"].shape[1]))
    mesh = one_device_mesh()
    with parallel.sharding_context(mesh):
        model = Decoder(cfg, dtype=jnp.dtype(dtype), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    trainer = sft_trainer(model, mesh)
    scored = sft.scored_positions(batch)

    def step():
        float(trainer.update(scored, jax.random.key(0))["loss"])

    return step, int(n_params), cfg


def reference_step(d: dict, dtype: str, batch: dict, device):
    """transformers' LlamaForCausalLM SFT step on `device` (autocast to bfloat16 when `dtype` is bfloat16)."""
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    tcfg = llama_config(d, max_positions=max(2048, batch["tokens"].shape[1]))
    model = transformers.AutoModelForCausalLM.from_config(tcfg, dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    ids = torch.from_numpy(np.asarray(batch["tokens"], np.int64)).to(device)
    labels = torch.from_numpy(np.asarray(batch["targets"], np.int64)).to(device)
    bf16 = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if dtype == "bfloat16" else None
    return torch_sft_step(model, ids, labels, autocast=bf16)


def main() -> None:
    args = parse_args()
    import jax
    import torch

    device = accelerator_torch_device(args.dtype)
    d = DIMS[args.dims]
    batch = sft_batch(args.batch, args.seq, d["vocab"])
    ours, n_params, cfg = our_step(d, args.dtype, batch)
    reference = reference_step(d, args.dtype, batch, device)
    flops = sft_step_flops(cfg, n_params, args.batch, args.seq, scored=args.batch * args.seq)
    timers = {"ours": Timer(ours, flops=flops), "reference": Timer(reference, flops=flops)}
    peak = peak_timers(args.peak_n, args.dtype, device)
    run_rounds(timers, args.steps, peak=peak, peak_calls=PEAK_CALLS)
    best_peak = peak_flops(peak)[0]
    r = ratios(timers["ours"], timers["reference"])
    tokens = args.batch * args.seq
    print(f"device: jax {jax.devices()[0].device_kind} ({jax.default_backend()}), torch {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}); jax {jax.__version__}, "
          f"torch {torch.__version__}")
    print(f"model {args.dims} ({n_params / 1e6:.1f}M params), batch {args.batch} x {args.seq}, {args.dtype}; "
          f"step model FLOPs {flops / 1e12:.2f} T")
    for name, t in timers.items():
        print(f"{name:9s} best {t.wall * 1e3:8.2f} ms  median {t.median_wall * 1e3:8.2f} ms  "
              f"{tokens / t.wall:10.0f} tokens/s  {flops / t.wall / 1e12:7.1f} TFLOP/s ({flops / t.wall / best_peak:.1%} "
              f"of the peak)")
    print(f"matmul peak {args.dtype} {best_peak / 1e12:.1f} TFLOP/s (jax {peak['jax_mm'].flops / peak['jax_mm'].wall / 1e12:.1f}, "
          f"torch {peak['torch_mm'].flops / peak['torch_mm'].wall / 1e12:.1f})")
    print(ratio_line("SFT step ours / HF", r))
    load = load_report(None)
    print(json.dumps({"name": "accelerator_sft_tokens_per_s", "ours": round(tokens / timers["ours"].wall, 1),
                      "reference": round(tokens / timers["reference"].wall, 1), "unit": "tokens/s", **r,
                      "peak_flops": best_peak, "peak_fraction": round(flops / timers["ours"].wall / best_peak, 4),
                      "reference_peak_fraction": round(flops / timers["reference"].wall / best_peak, 4),
                      "step_model_flops": flops, "dims": args.dims, "dtype": args.dtype, "batch": args.batch,
                      "seq": args.seq, "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                      "jax": jax.__version__, "torch": torch.__version__, **load}))


if __name__ == "__main__":
    main()
