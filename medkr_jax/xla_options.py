"""XLA compiler options per kind of jitted program.

On CPU, XLA hands matmuls, elementwise ops and reductions to YNNPACK "library fusions" by default. Its matmul
accumulates each output over the whole contraction in one chain, which costs accuracy on large matmuls
(relative rms error at [1024, 576] x [576, 1536], float32, vs a float64 product: YNNPACK 3.9e-7, XLA's own
Eigen GEMM 3.0e-7, PyTorch's MKL 2.5e-7); it is fastest for the few-row matmuls of decode steps. So:

- "dense" programs, made of large matmuls (training steps, the classifier's forward, full-sequence decoder
  forwards), compile with Eigen GEMMs and keep YNNPACK for reductions only. Measured here: the BERT classifier
  forward (bench/bert_forward.py, 1 thread) 1,636 -> 1,596 ms per batch; a SmolLM2-135M loss + gradient on
  4 x 255 tokens 6.40-6.64 -> 6.29-6.33 s (the tiny model of bench/train_step.py: within its run-to-run
  noise); SmolLM2-135M fp32 logits vs a float64 forward: max 1.26e-4 -> 9.3e-5, rms 1.54e-5 -> 1.19e-5, as
  close as Hugging Face's own fp32 logits (9.3e-5, 1.24e-5; tests/test_gguf.py).
- the sampler's decode steps keep XLA's defaults: YNNPACK is faster for their few-row matmuls (bench/sampler.py
  decode 1,889 tokens/s vs 1,719 with the dense options). The engine's prefills, whole prompts through the model,
  are dense programs (SmolLM2-135M, 8 prompts of 32 tokens in bucket 64, 1 thread: 1.32 -> 1.17 s a one-token
  call); the static path compiles its prefill and decode steps as one program, with the defaults.

Decode steps' LM head (`decode_head_layout`): elsewhere than on CPU, a one-token step's logits are the plain
product `x @ W` of the model's own weights. On CPU, steps of one row or of more than 32 rows multiply by an [E, V]
layout (a tied embedding, [V, E], copied once), which XLA:CPU's few-row GEMM streams faster (bench/sampler.py's
model, V=32768, E=256, 1 thread, ms per step: 4 rows 1.3 vs 2.7, 8 rows 2.0 vs 3.0; equal from 32 rows); steps of
2-32 rows use the packed layout below.

Within a decode step, the head's few-row GEMM [B, E] x [E, V] is faster on XLA's Eigen GEMM than on YNNPACK
(bench/sampler.py's model, 1 thread, ms per product: 8 rows 1.59 vs 2.00, 16 rows 2.49 vs 2.84, 32 rows 3.79
vs 4.59), while the step's other matmuls are faster on YNNPACK. YNNPACK takes a dot only when its left operand is
row-major, so `decode_head_lhs_transposed` hands the head's rows to it transposed (a [E, B] copy behind an
optimisation barrier, read back transposed): whole greedy calls of 128 tokens 1.08x faster at batch 8, 1.02x at
16, 1.11x at 32 (medians of 4 interleaved rounds).

For 2-32 rows (`decode_head_layout` "packed"), the head is instead laid out once as [V / 32, E, 32] (blocks of
32 vocabulary entries, each block's E x 32 weights contiguous; V zero-padded to a multiple of 32), and the logits
are a multiply-reduce over its middle axis: each block's 32 logits accumulate in vector registers while its
weights stream in order, which XLA:CPU (a YNNPACK reduction) runs faster than any GEMM or the reduction over the
embedding as it lies ([V, E], summed over its contiguous axis: what 2-16 rows used before). Measured alone (1
thread, ms per product, hot / after 64 MiB of other reads), V=32768 x E=256:

| rows | packed [V/32, E, 32] | reduce over [V, E] | GEMM x @ [E, V] |
|---:|---:|---:|---:|
| 2 | 1.52 / 1.75 | 3.22 / 3.40 | 3.36 / 3.94 |
| 8 | 2.26 / 2.46 | 3.25 / 3.51 | 3.89 / 4.16 |
| 16 | 3.62 / 3.81 | 4.66 / 4.93 | 5.80 / 5.93 |
| 32 | 6.81 / 6.91 | 7.64 / 7.96 | 9.37 / 9.25 |

SmolLM2-135M's head (49,152 x 576): 8 rows 7.9 vs 11.6-12.5 (reduce over [V, E]) and 13.8-14.0 (GEMM); 16 rows 12.0
vs 19.4 and 20.9; 32 rows 21.9 vs 24.7 and 29.5-30.1. Blocks of 16 lanes ran at 5.1 ms for 8 rows, of 64 at 2.2 (and
fell off a cliff at SmolLM2's shape in the [B, V/64, 64] output order: 39 ms), so 32. At one row every reduction is
far slower (25-28 ms vs the GEMM's 1.2: the cliff that made bench/sampler.py at batch 1 run at 0.11x HF), so one
row keeps the GEMM. Each logit sums its E products in one chain per lane: max error vs float64 9e-6 (E=256) and
2e-5 (E=576), against the GEMM's 5e-6 and 9e-6; float32 either way. The layout is a copy of the LM head (tied
or not), as the [E, V] copy is.

The options apply to the CPU backend only (`None` / False, XLA's defaults, elsewhere). MEDKR_XLA_DEFAULTS=1 in
the environment turns them off, to compare.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax

PACKED_HEAD_MAX_ROWS = 32  # decode steps of 2..32 rows use the packed LM head
PACKED_HEAD_LANES = 32  # vocabulary entries per block of the packed LM head
DENSE_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def _cpu_tuning() -> bool:
    """Whether the CPU-specific choices below apply: on the CPU backend, unless MEDKR_XLA_DEFAULTS=1."""
    return os.environ.get("MEDKR_XLA_DEFAULTS") != "1" and jax.default_backend() == "cpu"


def dense_program_options() -> dict[str, str] | None:
    """`compiler_options` for a jitted program dominated by large matmuls (None = XLA's defaults)."""
    return dict(DENSE_CPU_OPTIONS) if _cpu_tuning() else None


def decode_head_layout(rows: int | None) -> str | None:
    """How one-token steps of ``rows`` rows (None: any number) lay out the LM head (see the module docstring):
    "packed" ([V / PACKED_HEAD_LANES, E, PACKED_HEAD_LANES]) for 2-32 rows on CPU, "transposed" ([E, V]) for other
    row counts on CPU, None (the model's own weights, XLA's choice of product) elsewhere."""
    if not _cpu_tuning():
        return None
    return "packed" if rows is not None and 2 <= rows <= PACKED_HEAD_MAX_ROWS else "transposed"


def decode_head_lhs_transposed() -> bool:
    """Whether a one-token step's LM-head matmul reads its rows from a transposed copy (see the module docstring)."""
    return _cpu_tuning()


def rhs_grad_out_major(k: int, n: int) -> bool:
    """Whether the gradient of a product's right operand b [K, N] (a projection's kernel, attention's values) is
    computed as (dY^T a)^T behind an optimisation barrier instead of a^T dY (`layers.matmul`): on CPU where K > N."""
    return k > n and _cpu_tuning()


def jit_dense(fun: Callable | None = None, **jit_kwargs: Any) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` compiled with `dense_program_options()`, usable as a decorator at import
    time: the options (which depend on the backend) are chosen at the first call, not at import."""
    if fun is None:
        return functools.partial(jit_dense, **jit_kwargs)
    jitted = None

    @functools.wraps(fun)
    def call(*args, **kwargs):
        nonlocal jitted
        if jitted is None:
            jitted = jax.jit(fun, compiler_options=dense_program_options(), **jit_kwargs)
        return jitted(*args, **kwargs)

    return call
