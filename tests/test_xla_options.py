"""Compiler options per kind of program: the dense-program options pick the more accurate CPU GEMM."""

import jax
import jax.numpy as jnp
import numpy as np

from medkr_jax import xla_options


def _gemm_error(options) -> float:
    """Relative rms error of a jitted float32 [256, 576] x [576, 512] matmul vs the float64 product
    (options="numpy": NumPy's own float32 matmul, the BLAS reference)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 576)).astype(np.float32)
    b = (rng.standard_normal((576, 512)) * 0.05).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.sqrt((a.astype(np.float64) ** 2) @ (b.astype(np.float64) ** 2))
    out = a @ b if options == "numpy" else jax.jit(jnp.matmul, compiler_options=options)(a, b)
    return float(np.sqrt((((np.asarray(out, np.float64) - ref) / scale) ** 2).mean()))


def test_dense_program_options_pick_the_more_accurate_cpu_gemm():
    assert jax.default_backend() == "cpu"
    options = xla_options.dense_program_options()
    assert options == xla_options.DENSE_CPU_OPTIONS
    dense, default = _gemm_error(options), _gemm_error(None)
    # XLA's Eigen GEMM (dense options) vs its default YNNPACK one: 3.0e-7 vs 3.9e-7 at this shape (ratio 0.77 to
    # 0.795 on two machines and four seeds; bit-identical with 1 or 2 threads and without Eigen multi-threading).
    # The 0.9 is deliberately close: if an XLA upgrade closes the gap, the options no longer buy accuracy and
    # xla_options should be revisited.
    assert dense < 0.9 * default, (dense, default)
    # and it is as accurate as NumPy's BLAS float32 matmul (measured 1.00x: 3.05e-7 both; an absolute 3.5e-7
    # left only 1.15x). A sequential fp32 sum is 4.3e-7 here (caught by the line above), bf16 inputs 6e-3.
    assert dense <= 1.5 * _gemm_error("numpy"), (dense, _gemm_error("numpy"))


def test_jit_dense_and_opt_out(monkeypatch):
    @xla_options.jit_dense(static_argnums=0)
    def scaled_matmul(k, a, b):
        return k * (a @ b)

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(np.asarray(scaled_matmul(2, a, a.T)), 2 * a @ a.T)
    monkeypatch.setenv("MEDKR_XLA_DEFAULTS", "1")
    assert xla_options.dense_program_options() is None
