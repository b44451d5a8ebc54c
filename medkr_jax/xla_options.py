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
product `x @ W` of the model's own weights. On CPU, steps of one row or of more than 16 rows multiply by an [E, V]
layout (a tied embedding, [V, E], copied once), which XLA:CPU's few-row GEMM streams faster (bench/sampler.py's
model, V=32768, E=256, 1 thread, ms per step: 4 rows 1.3 vs 2.7, 8 rows 2.0 vs 3.0; equal from 32 rows); steps of
2-16 rows use the packed layout below.

Within a decode step whose head is a GEMM (1 or 17+ rows), [B, E] x [E, V] is faster on XLA's Eigen GEMM than on
YNNPACK (bench/sampler.py's model, 1 thread, ms per product: 8 rows 1.59 vs 2.00, 16 rows 2.49 vs 2.84, 32 rows
3.79 vs 4.59: measured before 2-16 rows were packed), while the step's other matmuls are faster on YNNPACK.
YNNPACK takes a dot only when its left operand is row-major, so `decode_head_lhs_transposed` hands the head's rows
to it transposed (a [E, B] copy behind an optimisation barrier, read back transposed): whole greedy calls of 128
tokens 1.08x faster at batch 8, 1.02x at 16, 1.11x at 32 (medians of 4 interleaved rounds).

For 2-16 rows (`decode_head_layout` "packed"), the head is instead laid out once as [V / 32, E, 32] (blocks of 32
vocabulary entries, each block's E x 32 weights contiguous; V zero-padded to a multiple of 32), and the logits are
a multiply-reduce over E into [B, V / 32, 32]: each block's 32 logits of a row accumulate in vector registers while
the block's weights stream in order, which XLA:CPU (a YNNPACK reduction) runs faster than either GEMM or the
reduction over the embedding as it lies ([V, E], summed along its contiguous axis: what 2-16 rows used before).
Measured alone with what a greedy step does next (first_argmax and token_logprob over the logits), 1 thread, ms,
after 64 MiB of other reads, V=32768 x E=256 / SmolLM2-135M's 49,152 x 576:

| rows | packed, [B, V/32, 32] | packed, [V/32, B, 32] | reduce over [V, E] | GEMM, rows transposed |
|---:|---:|---:|---:|---:|
| 2 | 1.81 / 4.83 | 2.60 / 5.07 | 3.54 / 9.59 | 3.64 / 10.82 |
| 8 | 3.21 / 7.28 | 3.30 / 7.50 | 4.58 / 12.25 | 4.92 / 16.20 |
| 16 | 4.91 / 12.63 | 5.03 / 12.58 | 6.20 / 16.89 | 6.60 / 22.02 |
| 32 | 9.84 / 23.62 | 11.12 / 24.33 | 11.47 / 28.93 | 9.66 / 27.11 |

The [V/32, B, 32] order reads each block once for all rows but leaves the logits transposed, and the sampling
ops' select then reads them across rows (0.22 vs 0.06 ms a step in bench/sampler.py's decode loop). Inside that
loop at 32 rows the GEMM is faster (7.2 vs 8.1 ms a step for the head; at 16 rows 3.9 packed vs 5.4), so 17+ rows
keep it. Blocks of 16 lanes are slower (6.3 / 18.1 ms at 8 rows) and of 64 fall off a cliff at SmolLM2's shape
(46 ms), so 32. At one row every reduction is far slower (25-28 ms vs the GEMM's 1.2: the cliff that made
bench/sampler.py at batch 1 run at 0.11x HF), so one row keeps the GEMM. Each logit sums its E products in one
chain per lane: max error vs float64 9e-6 (E=256) and 2e-5 (E=576), against the GEMM's 5e-6 and 9e-6; float32
either way. The layout is a copy of the LM head (tied or not), as the [E, V] copy is.

The options apply to the CPU backend only (`None` / False, XLA's defaults, elsewhere). MEDKR_XLA_DEFAULTS=1 in
the environment turns them off, to compare.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax

PACKED_HEAD_MAX_ROWS = 16  # decode steps of 2..16 rows use the packed LM head
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
    "packed" ([V / PACKED_HEAD_LANES, E, PACKED_HEAD_LANES]) for 2-16 rows on CPU, "transposed" ([E, V]) for other
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
