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

Decode steps' LM head (`transposed_decode_head`): logits of a few rows are the plain product `x @ W` on every
backend. On CPU a tied embedding ([V, E]) is first copied once into an [E, V] layout, which XLA:CPU's few-row GEMM
streams faster (bench/sampler.py's model, V=32768, E=256, 1 thread, ms per step: 4 rows 1.3 vs 2.7, 8 rows 2.0 vs
3.0; equal from 32 rows); the multiply-reduce layouts used before were faster still for 2-16 rows but fell off a
cliff at one row (130-250 ms vs 1.3-2 ms: bench/sampler.py at batch 1 ran at 0.11x HF).

Within a decode step, the head's few-row GEMM [B, E] x [E, V] is faster on XLA's Eigen GEMM than on YNNPACK
(bench/sampler.py's model, 1 thread, ms per product: 8 rows 1.59 vs 2.00, 16 rows 2.49 vs 2.84, 32 rows 3.79
vs 4.59), while the step's other matmuls are faster on YNNPACK. YNNPACK takes a dot only when its left operand is
row-major, so `decode_head_lhs_transposed` hands the head's rows to it transposed (a [E, B] copy behind an
optimisation barrier, read back transposed): whole greedy calls of 128 tokens 1.08x faster at batch 8, 1.02x at
16, 1.11x at 32 (medians of 4 interleaved rounds).

For 2-16 rows and a tied embedding (`decode_head_multiply_reduce`), the logits are instead a multiply-reduce over
the embedding as it lies ([V, E], each row's E products summed per vocabulary entry, the [V, B] result transposed),
which XLA:CPU's reduction emitter streams faster than either GEMM and which needs no [E, V] copy. Measured alone (1
thread, ms per product, hot / after 48-128 MiB of other reads), V=32768 x E=256: 2 rows 2.79 / 2.92 vs the GEMM
2.39-2.65 / 3.22-3.26, 8 rows 3.45 / 3.74 vs 4.26-4.35 / 4.45-4.60, 16 rows 4.80 / 4.92 vs 4.96-5.39 / 5.24-5.74,
32 rows 7.38 / 7.66 vs 7.15 / 7.24; SmolLM2-135M's head (49,152 x 576) at 8 rows 10.8 / 10.9 vs 14.5-15.4 / 14.8-15.5.
At one row the reduction is far slower (21.7 vs 1.2 ms: why the GEMM replaced it for every batch before). It sums
each logit over E in one vectorised pass: 2-6e-6 max error vs float64 here against the GEMM's 4-10e-6.
The options apply to the CPU backend only (`None` / False, XLA's defaults, elsewhere). MEDKR_XLA_DEFAULTS=1 in
the environment turns them off, to compare.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax

MULTIPLY_REDUCE_MAX_ROWS = 16
DENSE_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def _cpu_tuning() -> bool:
    """Whether the CPU-specific choices below apply: on the CPU backend, unless MEDKR_XLA_DEFAULTS=1."""
    return os.environ.get("MEDKR_XLA_DEFAULTS") != "1" and jax.default_backend() == "cpu"


def dense_program_options() -> dict[str, str] | None:
    """`compiler_options` for a jitted program dominated by large matmuls (None = XLA's defaults)."""
    return dict(DENSE_CPU_OPTIONS) if _cpu_tuning() else None


def transposed_decode_head() -> bool:
    """Whether decode steps multiply by an [E, V] copy of a tied embedding (see the module docstring)."""
    return _cpu_tuning()


def decode_head_multiply_reduce(rows: int) -> bool:
    """Whether a one-token step of `rows` rows computes a tied embedding's logits as a multiply-reduce over the
    [V, E] embedding itself instead of a GEMM (see the module docstring): on CPU for 2-16 rows."""
    return 2 <= rows <= MULTIPLY_REDUCE_MAX_ROWS and _cpu_tuning()


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
