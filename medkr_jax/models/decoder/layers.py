"""Decoder building blocks: RoPE, sharding hints, Dense, RMSNorm, attention, SwiGLU MLP, the layer.

Parameters may carry a leading stacked-layers axis (``stack``), for models whose layers run under
``jax.lax.scan``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core.spmd import get_logical_axis_rules

from medkr_jax import xla_options
from medkr_jax.models.decoder.config import DecoderConfig

# Finite rather than -inf, so a fully masked row (a left-padding query) stays finite.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: DecoderConfig, *, local: bool = False) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float32), with the config's RoPE scaling applied.

    ``local``: of the sliding layers, which have their own base and no scaling when the config sets
    ``local_rope_theta`` (Gemma 3), else the same as the global layers'.
    """
    hd = cfg.head_dim
    local = local and cfg.local_rope_theta is not None
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    inv = inv.astype(np.float32)
    scaling = {} if local else (cfg.rope_scaling or {})
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
        # interpolated smoothly (transformers' _compute_llama3_parameters).
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32[B, T, 1, D/2] for positions [B, T]: each angle once (the rotate-half layout uses it for both
    halves; ``_rotate`` widens the tables). Computed once per call, shared by all layers.

    Half-width also decides where XLA:CPU computes them: tables of the full width (cos of ``cat(freqs, freqs)``)
    were fused into, and so recomputed in, every layer's q and k rotation, forward and backward, once per head;
    half-width tables widened by a concatenation are computed once (the SFT step of bench/train_step.py's model,
    1 thread: 489 -> 440 ms; tests/test_decoder.py checks the compiled step computes cosines in one place)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    return jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`` from half-width tables, written as HF writes it."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = (jnp.concatenate([t, t], axis=-1).astype(x.dtype) for t in (cos, sin))
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x [B, T, H, D] by positions [B, T] (rotate-half layout, as HF Llama/Qwen)."""
    return _rotate(x, *rope_tables(positions, inv_freq))


# ----------------------------------------------------------------------------------------------
# building blocks (parameters may carry a leading stacked-layers axis)


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
    """Sharding hint for activations under a mesh + logical rules; a no-op without a mesh.

    Axes whose size does not divide evenly (e.g. a batch of 1 while sampling) stay replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rules = dict(get_logical_axis_rules() or ())
    spec = []
    used: set = set()
    for dim, name in zip(x.shape, logical_axes):
        axis = rules.get(name) if name else None
        axes = tuple(a for a in ((axis,) if isinstance(axis, str) else tuple(axis or ()))
                     if a in mesh.axis_names and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def _param(rngs: nnx.Rngs, init, shape: tuple, axes: tuple, dtype, stack) -> nnx.Param:
    """A parameter; ``stack`` = L (all L layers stacked on a leading "layers" axis), (i, L) (layer i
    alone, drawn as slice i of the stacked initialisation, so both layouts start from the same
    weights for a seed) or None."""
    if isinstance(stack, tuple):
        i, n = stack
        base = init
        init = lambda key, shape, dtype: base(key, (n, *shape), dtype)[i]  # noqa: E731
    elif stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


def _swap(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_out_major_grad(a: jax.Array, b: jax.Array, acc) -> jax.Array:
    """a @ b, whose gradient for b is computed as (dY^T a)^T (see `matmul`)."""
    return jnp.matmul(a, b, preferred_element_type=acc)


def _matmul_out_major_grad_fwd(a, b, acc):
    return jnp.matmul(a, b, preferred_element_type=acc), (a, b)


def _matmul_out_major_grad_bwd(acc, res, dy):
    a, b = res
    # the barrier keeps XLA from folding the transpose back into the dot's contracting dimensions
    db = _swap(jax.lax.optimization_barrier(jnp.matmul(_swap(dy), a, preferred_element_type=acc)))
    return jnp.matmul(dy, _swap(b), preferred_element_type=acc).astype(a.dtype), db.astype(b.dtype)


_matmul_out_major_grad.defvjp(_matmul_out_major_grad_fwd, _matmul_out_major_grad_bwd)


def matmul(a: jax.Array, b: jax.Array, preferred_element_type=None) -> jax.Array:
    """a [..., M, K] @ b [..., K, N] (the same leading batch dims), as a projection's rows @ kernel or attention's
    probabilities @ values.

    The gradient for b is a^T dY, [K, N]. XLA:CPU's GEMM computes that product faster with its output [K, N]
    when K <= N, and as (dY^T a)^T (output [N, K], then transposed) when K > N. Measured on one thread:
    [2,048 x 512]^T [2,048 x 256] (an MLP down projection's kernel) 7.28 -> 5.46 ms, [2,048 x 256]^T
    [2,048 x 128] (k / v) 1.75 -> 1.42 ms, SmolLM2's down projection [1,024 x 1,536]^T [1,024 x 576]
    19.8 -> 17.3 ms; for K < N the transposed form is slower (256 -> 512: 5.31 -> 7.39 ms). So where
    `xla_options.rhs_grad_out_major(K, N)` (CPU, K > N) the gradient takes the second form.
    """
    if xla_options.rhs_grad_out_major(b.shape[-2], b.shape[-1]):
        return _matmul_out_major_grad(a, b, preferred_element_type)
    return jnp.matmul(a, b, preferred_element_type=preferred_element_type)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] as HF's weight transposed."""

    def __init__(self, din: int, dout: int, axes: tuple, *, bias: bool, dtype, param_dtype,
                 stack: int | None, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = _param(rngs, nnx.initializers.normal(0.02), (din, dout), axes, param_dtype, stack)
        self.bias = (_param(rngs, nnx.initializers.zeros, (dout,), axes[1:], param_dtype, stack)
                     if bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        # One 2-D matmul over all leading dims (rows x in @ in x out): XLA's CPU backend runs it, and above all its
        # transposes in the backward pass, faster than the batched einsum (an SFT step ~17% faster); elsewhere
        # the two are the same dot.
        w = self.kernel[...].astype(self.dtype)
        y = matmul(x.astype(self.dtype).reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """HF RMSNorm: normalise in float32, cast back, then scale by w (Llama); or with ``offset`` scale by
    (1 + w) in float32 and cast back after (Gemma: w is stored zero-centred and starts at 0)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, stack: int | None, rngs: nnx.Rngs,
                 offset: bool = False):
        self.eps, self.dtype, self.offset = eps, dtype, offset
        init = nnx.initializers.zeros if offset else nnx.initializers.ones
        self.scale = _param(rngs, init, (dim,), ("norm",), param_dtype, stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma's soft-capping of attention scores and logits); x itself for cap None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def query_blocks(t: int) -> int:
    """Query blocks of a causal attention over T positions: one below 128, else T / 256 clipped to [2, 8].

    Block i of n attends to keys [0, (i + 1) T / n): (n + 1) / 2n of the full score matrix. Measured on the CPU
    (bench/train_step.py's SFT model, 1 thread), one layer's attention forward + backward at 8 x 256 tokens
    25.8 -> 18.9 ms (2 blocks); at 1 x 2,048 tokens 222 -> 117 ms (8 blocks); the whole SFT step at 2 x 1,024
    tokens 846 -> 664 ms (4 blocks), against Hugging Face's 708 ms. More, smaller blocks cost more than they save
    at these lengths (the same step, 8 blocks: 693 ms).
    """
    return 1 if t < 128 else min(8, max(2, t // 256))


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v bias (Qwen2), q/k RMSNorm (Qwen3, Gemma 3), scores scaled
    by query_pre_attn_scalar^-1/2 (else head_dim^-1/2) and optionally soft-capped (Gemma)."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, stack, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
        e, hd = cfg.hidden_size, cfg.head_dim
        self.cfg, self.dtype = cfg, dtype
        self.q_proj = Dense(e, cfg.num_heads * hd, ("embed", "heads"), bias=cfg.qkv_bias, **kw)
        self.k_proj = Dense(e, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.v_proj = Dense(e, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.o_proj = Dense(cfg.num_heads * hd, e, ("heads", "embed"), bias=False, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, offset=cfg.family.norm_offset, **kw)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, offset=cfg.family.norm_offset, **kw)
        else:
            self.q_norm = self.k_norm = None

    def project(self, x, rope):
        """q [B,T,H,D], k/v [B,T,KV,D] with RoPE (the ``rope_tables`` pair) applied."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return _rotate(q, *rope), _rotate(k, *rope), v

    def attend(self, q, k, v, allowed, *, causal: bool = False):
        """q [B,T,H,D]; keys [B,KV,D,S], values [B,KV,S,D]; allowed bool [B,T,S] -> [B,T,E].

        ``causal``: the keys are the queries' own chunk (key slot i holds query i's token, S = T) and ``allowed``
        lies within the causal mask, as in a training forward or a prompt prefilled into an empty cache. The
        queries then run in ``query_blocks(T)`` blocks, each over the keys up to its own last query only: the
        blocks above the diagonal, masked anyway, are never computed. Each row's softmax is over the same
        allowed keys either way (a query row with no allowed key at all, i.e. padding, averages over fewer).
        """
        t = q.shape[1]
        blocks = query_blocks(t) if causal else 1
        if blocks == 1:
            return self.o_proj(self._attend(q, k, v, allowed))
        cuts = [round(i * t / blocks) for i in range(blocks + 1)]
        out = [self._attend(q[:, lo:hi], k[..., :hi], v[:, :, :hi], allowed[:, lo:hi, :hi])
               for lo, hi in zip(cuts, cuts[1:])]
        return self.o_proj(jnp.concatenate(out, axis=1))

    def _attend(self, q, k, v, allowed):
        """``attend`` before the output projection: [B,T,H*D]."""
        cfg = self.cfg
        b, t, h, d = q.shape
        kv, s = cfg.num_kv_heads, k.shape[3]
        groups = h // kv
        # Both matmuls in the canonical batched form [B,KV] x ([G*T, D] @ [D, S]) and ([G*T, S] @ [S, D]),
        # so the CPU backend runs them as plain batched GEMMs on the cache as it lies (for a decode step
        # the query/output transposes are of a single position, i.e. free).
        q = q.reshape(b, t, kv, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, groups * t, d)
        # Scores and softmax in at least float32, whatever the compute dtype.
        acc = jnp.promote_types(self.dtype, jnp.float32)
        scale = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else d
        scores = jax.lax.dot_general(q, k.astype(q.dtype), (((3,), (2,)), ((0, 1), (0, 1))),
                                     preferred_element_type=acc) * (float(scale) ** -0.5)
        scores = softcap(scores, cfg.attn_logit_softcapping)
        scores = jnp.where(allowed[:, None, None], scores.reshape(b, kv, groups, t, s), _MASK_VALUE)
        e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
        denom = e.sum(-1, keepdims=True).reshape(b, kv, groups * t, 1)
        # Normalised after the PV product: divides [.., T, D] instead of the [.., T, S] probabilities (softmax's
        # shift by the row maximum cancels in the ratio, so it carries no gradient).
        out = matmul(e.astype(self.dtype).reshape(b, kv, groups * t, s), v.astype(self.dtype),
                     preferred_element_type=acc) / denom
        out = out.astype(self.dtype).reshape(b, kv, groups, t, d).transpose(0, 3, 1, 2, 4)
        return out.reshape(b, t, h * d)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh-approximated GELU (GeGLU: Gemma)."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, stack, rngs):
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
        e, m = cfg.hidden_size, cfg.intermediate_size
        self.act = cfg.family.mlp_act
        self.gate_proj = Dense(e, m, ("embed", "mlp"), **kw)
        self.up_proj = Dense(e, m, ("embed", "mlp"), **kw)
        self.down_proj = Dense(m, e, ("mlp", "embed"), **kw)

    def __call__(self, x):
        g = self.gate_proj(x)
        if self.act == "gelu_pytorch_tanh":  # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), as PyTorch's
            h = jax.nn.gelu(g, approximate=True) * self.up_proj(x)
            return self.down_proj(constrain(h, ("batch", "length", "mlp")))
        # SiLU as g / (1 + exp(-g)), PyTorch's formula: one rounding fewer than g * sigmoid(g) (SmolLM2
        # fp32 logits: rms error vs a float64 reference 1.78e-5 -> 1.49e-5). The clamp keeps exp finite, so
        # the gradient is not inf/inf = NaN below g = -88; silu there is ~1e-33 either way.
        h = g / (1 + jnp.exp(-jnp.maximum(g, -80.0))) * self.up_proj(x)
        return self.down_proj(constrain(h, ("batch", "length", "mlp")))


class Block(nnx.Module):
    """Pre-norm transformer layer (attention + gated MLP); one layer or all layers stacked.

    With the family's ``sandwich_norms`` (Gemma 3) the attention and MLP outputs are normed too
    (``attn_post_norm``, ``mlp_post_norm``) before each residual add.
    """

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, stack, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.family.norm_offset, **kw)  # noqa: E731
        # (created in this order so that a seed draws the same weights as before the sandwich norms existed)
        self.attn_norm = norm()
        self.attn = Attention(cfg, **kw)
        self.mlp_norm = norm()
        self.mlp = MLP(cfg, **kw)
        sandwich = cfg.family.sandwich_norms
        self.attn_post_norm = norm() if sandwich else None
        self.mlp_post_norm = norm() if sandwich else None

    def attn_out(self, y: jax.Array) -> jax.Array:
        """The attention output as added to the residual."""
        return y if self.attn_post_norm is None else self.attn_post_norm(y)

    def mlp_residual(self, h: jax.Array) -> jax.Array:
        """The MLP branch of the residual stream at h."""
        y = self.mlp(self.mlp_norm(h))
        return y if self.mlp_post_norm is None else self.mlp_post_norm(y)
