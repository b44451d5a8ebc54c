"""Compiler options per kind of program: the dense-program options pick the more accurate CPU GEMM; a decode
step's LM head runs on Eigen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medkr_jax import xla_options
from medkr_jax.models.hf import load_decoder
from tests.helpers_models import make_tiny_hf_model


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


def _head_product(model, head, rows: int = 32) -> str:
    """The compiled one-token step's instruction (a line of HLO) that makes the logits: [rows, V] (or [V, rows]),
    or, from a packed head of V' blocks of L lanes, [rows, V', L] (or that as [rows, V' * L])."""
    graphdef, state = nnx.split(model)
    vocab = model.cfg.vocab_size

    def step(state, tokens, cache, head):
        return nnx.merge(graphdef, state)(tokens, jnp.zeros_like(tokens), cache=cache, head=head)[0]

    hlo = jax.jit(step).lower(state, jnp.ones((rows, 1), jnp.int32), model.init_cache(rows, 8), head).compile()
    entry = hlo.as_text().split("\nENTRY ")[1].splitlines()
    shapes = [f"= f32[{rows},{vocab}]", f"= f32[{vocab},{rows}]"]
    if head is not None and head.ndim == 3:
        shapes = [f"= f32[{rows},{head.shape[0]},{head.shape[2]}]", f"= f32[{rows},{head.shape[0] * head.shape[2]}]"]
    made = [line for line in entry if any(shape in line for shape in shapes)]
    made = [line for line in made if " dot(" in line or "fusion(" in line]
    assert len(made) == 1, made  # the head is the step's only such product (vocab != the MLP's width)
    return made[0]


def _head_dot_in_ynn(model, head, rows: int = 32) -> bool:
    """Whether the compiled one-token step's LM-head product (the [B, V] logits) runs as a YNNPACK library
    fusion rather than as a plain dot (XLA's Eigen GEMM)."""
    made = _head_product(model, head, rows)
    assert " dot(" in made or "__ynn_fusion" in made, made
    return "__ynn_fusion" in made


def test_decode_head_runs_on_eigen_not_ynnpack(tmp_path, monkeypatch):
    """A one-token step's LM head is handed to XLA's Eigen GEMM (faster for few rows) by transposing its rows;
    with MEDKR_XLA_DEFAULTS=1 YNNPACK takes it; the logits agree."""
    make_tiny_hf_model("qwen3", tmp_path, seed=3, vocab_size=160)
    model, _ = load_decoder(tmp_path)
    assert xla_options.decode_head_lhs_transposed()
    assert not _head_dot_in_ynn(model, model.decode_head())
    tokens = jnp.arange(32)[:, None] + 5
    eigen = model(tokens, jnp.zeros_like(tokens), cache=model.init_cache(32, 8), head=model.decode_head())[0]
    monkeypatch.setenv("MEDKR_XLA_DEFAULTS", "1")
    assert not xla_options.decode_head_lhs_transposed()
    assert _head_dot_in_ynn(model, None)
    ynn = model(tokens, jnp.zeros_like(tokens), cache=model.init_cache(32, 8))[0]
    np.testing.assert_allclose(np.asarray(eigen), np.asarray(ynn), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,rows", [("qwen3", 1), ("qwen3", 2), ("qwen3", 8), ("qwen3", 16), ("qwen3", 17),
                                       ("llama", 8), ("llama", 17)])  # a tied and an untied LM head
def test_decode_head_of_2_to_16_rows_is_packed(kind, rows, tmp_path, monkeypatch):
    """2-16 rows of a one-token step: the LM head laid out in blocks of 32 vocabulary entries (the vocabulary
    zero-padded to a multiple of 32) and the logits a multiply-reduce over it, no dot; equal to XLA's default GEMM's
    within float32 rounding and to the float64 product; 1 and 17+ rows keep the GEMM on an [E, V] head."""
    make_tiny_hf_model(kind, tmp_path, seed=3, vocab_size=150)  # 150 = 4 * 32 + 22: the last block padded
    model, _ = load_decoder(tmp_path)
    tied = model.lm_head is None
    weights = np.asarray(model.embed.embedding[...]).T if tied else np.asarray(model.lm_head.kernel[...])  # [E, V]
    packed = 2 <= rows <= 16
    assert (xla_options.decode_head_layout(rows) == "packed") == packed
    head = model.decode_head(rows)
    if packed:
        lanes = xla_options.PACKED_HEAD_LANES
        assert head.shape == (5, weights.shape[0], lanes)
        flat = np.asarray(head).transpose(1, 0, 2).reshape(weights.shape[0], -1)  # [E, 160]
        np.testing.assert_array_equal(flat[:, :150], weights)
        assert not flat[:, 150:].any()
    elif tied:
        np.testing.assert_array_equal(np.asarray(head), weights)
    else:
        assert head is None  # the untied kernel already is [E, V]
    made = _head_product(model, head, rows)
    assert (" dot(" not in made and "reduce_sum" in made) == packed, made  # a reduction (YNNPACK's), not a GEMM
    tokens = jnp.arange(rows)[:, None] + 5
    hidden = {}

    def capture(x, head):  # the final-normed hidden states, for the float64 reference
        hidden["x"] = np.asarray(x, np.float64)
        return logits_of(x, head)

    logits_of = model._logits
    monkeypatch.setattr(model, "_logits", capture)
    ours = np.asarray(model(tokens, jnp.zeros_like(tokens), cache=model.init_cache(rows, 8), head=head)[0])
    monkeypatch.setenv("MEDKR_XLA_DEFAULTS", "1")
    assert xla_options.decode_head_layout(rows) is None and model.decode_head(rows) is None
    default = np.asarray(model(tokens, jnp.zeros_like(tokens), cache=model.init_cache(rows, 8))[0])
    exact = hidden["x"].reshape(rows, -1) @ weights.astype(np.float64)
    assert ours.shape == default.shape == (rows, 1, 150)
    np.testing.assert_allclose(ours, default, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[:, 0], exact, rtol=1e-5, atol=1e-5)
