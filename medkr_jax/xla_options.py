"""XLA compiler options per kind of jitted program.

On CPU, XLA hands matmuls, elementwise ops and reductions to YNNPACK "library fusions" by default. Its matmul
accumulates each output over the whole contraction in one chain, which costs accuracy on large matmuls
(relative rms error at [1024, 576] x [576, 1536], float32, vs a float64 product: YNNPACK 3.9e-7, XLA's own
Eigen GEMM 3.0e-7, PyTorch's MKL 2.5e-7); it is fastest for the few-row matmuls of decode steps. So:

- "dense" programs, made of large matmuls (training steps, the classifier's forward, full-sequence decoder
  forwards), compile with Eigen GEMMs and keep YNNPACK for reductions only. Measured on this project's CPU
  benchmarks: BERT classifier forward 1,643 -> 1,574 ms per batch, SFT step 4,879 -> 5,088 tokens/s, and
  SmolLM2-135M fp32 logits 1.08e-4 -> 8.7e-5 from Hugging Face's (vs a float64 forward: 1.22e-5 rms, HF's
  own 1.18e-5).
- the sampler keeps XLA's defaults (YNNPACK's decode-step matmuls: 1,889 vs 1,719 tokens/s with the dense
  options).

The options apply to the CPU backend only (`None`, XLA's defaults, elsewhere). MEDKR_XLA_DEFAULTS=1 in the
environment turns them off, to compare.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax

DENSE_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def dense_program_options() -> dict[str, str] | None:
    """`compiler_options` for a jitted program dominated by large matmuls (None = XLA's defaults)."""
    if os.environ.get("MEDKR_XLA_DEFAULTS") == "1" or jax.default_backend() != "cpu":
        return None
    return dict(DENSE_CPU_OPTIONS)


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
