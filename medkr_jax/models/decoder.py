"""One decoder-only transformer covering Llama (incl. Llama-3 RoPE scaling), Qwen2 and Qwen3.

The family differences are all config switches: Qwen2 adds q/k/v biases, Qwen3 adds per-head
RMSNorm on q and k; GQA, SwiGLU, RMSNorm and tied/untied embeddings are shared.

Layers are either a list of per-layer modules (default: fastest to run) or, with
``scan_layers=True``, one module whose parameters carry a leading "layers" axis, run with
``jax.lax.scan`` (compile time independent of depth).

The KV cache is heads-major, keys stored transposed ([B, KV, D, S]) and values as [B, KV, S, D]: both
attention matmuls then read the cache as it lies in the canonical (batched, non-transposed) GEMM form,
so a decode step moves no cache bytes besides the new chunk: each layer writes its chunk into the cache
in place and attends over the cache itself. Per-layer models keep one cache array per layer (a stacked array would
cost a copy of the layer's slice on every read); scanned models keep one stacked array.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from flax.core.spmd import get_logical_axis_rules

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")
# Finite rather than -inf, so a fully masked row (a left-padding query) stays finite.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


class UnsupportedModelError(ValueError):
    """The HF config describes a model this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a Llama / Qwen2 / Qwen3 decoder (mirrors the HF config.json fields)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedModelError(f"architecture {self.architecture!r} is not supported; supported: "
                                        f"{list(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"num_heads={self.num_heads} must be a multiple of "
                                        f"num_kv_heads={self.num_kv_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported; supported: "
                                        f"{list(_ROPE_TYPES)}")
        # Hashable (jit static args, dict keys): freeze the tuple and dict fields.
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, _FrozenDict):
            object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        e, h, kv, hd, m = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        attn = e * h * hd * 2 + e * kv * hd * 2 + (h * hd + 2 * kv * hd if self.qkv_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        layer = attn + 3 * e * m + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_layers * layer + e + head

    @classmethod
    def from_hf(cls, hf: dict) -> "DecoderConfig":
        """Build from an HF ``config.json`` dict (old rope_theta/rope_scaling or new rope_parameters)."""
        archs = hf.get("architectures") or []
        if archs:
            arch = archs[0]
        elif hf.get("model_type") in _MODEL_TYPES:
            arch = _MODEL_TYPES[hf["model_type"]]
        else:
            raise UnsupportedModelError(f"config.json names neither 'architectures' nor a known model_type "
                                        f"(model_type={hf.get('model_type')!r}); supported: {list(ARCHITECTURES)}")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(f"config.json 'architectures' is {archs!r}; supported: "
                                        f"{list(ARCHITECTURES)}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        absent = [k for k in required if k not in hf]
        if absent:
            raise UnsupportedModelError(f"config.json lacks required keys {absent}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"config.json hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
        if arch == "LlamaForCausalLM" and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise UnsupportedModelError("Llama configs with attention_bias or mlp_bias are not supported")
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError("config.json use_sliding_window=true is not supported")

        rope = dict(hf.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = rope or hf.get("rope_scaling")
        if scaling:
            scaling = dict(scaling)
            scaling["rope_type"] = scaling.get("rope_type", scaling.pop("type", "default"))
            scaling.pop("type", None)
            if scaling["rope_type"] == "default":
                scaling = None
        heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rope_theta=theta,
            rope_scaling=scaling or None,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM",
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict:
        """An HF ``config.json`` dict that transformers' Auto classes load."""
        model_type = {v: k for k, v in _MODEL_TYPES.items()}[self.architecture]
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(dict(self.rope_scaling))
        eos = list(self.eos_token_ids)
        out = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # older transformers / vLLM read these two keys
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if self.architecture == "LlamaForCausalLM":
            out["mlp_bias"] = False
        else:
            out["use_sliding_window"] = False
        return out


class _FrozenDict(dict):
    """A hashable read-only dict (DecoderConfig must be hashable to be a static jit argument)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    def _readonly(self, *a, **k):
        raise TypeError("DecoderConfig.rope_scaling is read-only")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _readonly


@struct.dataclass
class KVCache:
    """Per-layer keys/values for incremental decoding.

    k: keys stored transposed, a tuple of num_layers arrays [B, num_kv_heads, head_dim, S_max]
    (per-layer models) or one stacked array [num_layers, B, num_kv_heads, head_dim, S_max]
    (``stacked=True``, for scanned models); v: values likewise, [..., B, num_kv_heads, S_max, head_dim].
    Either representation works with either layer layout, the matching one without extra copies.
    mask: bool[B, S_max] (True = a real token sits in that slot); index: int32 scalar, the next slot to
    write.
    """

    k: Any
    v: Any
    mask: jax.Array
    index: jax.Array

    @property
    def stacked(self) -> bool:
        """Whether k and v are single arrays with a leading layer axis."""
        return not isinstance(self.k, (tuple, list))

    def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
        """Layer i's keys [B, num_kv_heads, head_dim, S_max] and values [B, num_kv_heads, S_max, head_dim]."""
        return self.k[i], self.v[i]


def init_cache(cfg: DecoderConfig, batch: int, max_len: int, dtype=jnp.float32, *,
               stacked: bool = False) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (see KVCache for ``stacked``)."""
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    if stacked:
        k = jnp.zeros((cfg.num_layers, *k_shape), dtype)
        v = jnp.zeros((cfg.num_layers, *v_shape), dtype)
    else:
        k = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(k=k, v=v, mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float32), with the config's RoPE scaling applied."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    inv = inv.astype(np.float32)
    scaling = cfg.rope_scaling or {}
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
    """cos, sin float32[B, T, 1, D] for positions [B, T]; computed once per call, shared by all layers."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x [B, T, H, D] by positions [B, T] (rotate-half layout, as HF Llama/Qwen)."""
    return _rotate(x, *rope_tables(positions, inv_freq))


# ----------------------------------------------------------------------------------------------
# building blocks (parameters may carry a leading stacked-layers axis)


def _constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
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


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] as HF's weight transposed."""

    def __init__(self, din: int, dout: int, axes: tuple, *, bias: bool, dtype, param_dtype,
                 stack: int | None, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = _param(rngs, nnx.initializers.normal(0.02), (din, dout), axes, param_dtype, stack)
        self.bias = (_param(rngs, nnx.initializers.zeros, (dout,), axes[1:], param_dtype, stack)
                     if bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """HF RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, stack: int | None, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype, stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, stack, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
        e, hd = cfg.hidden_size, cfg.head_dim
        self.cfg, self.dtype = cfg, dtype
        self.q_proj = Dense(e, cfg.num_heads * hd, ("embed", "heads"), bias=cfg.qkv_bias, **kw)
        self.k_proj = Dense(e, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.v_proj = Dense(e, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.o_proj = Dense(cfg.num_heads * hd, e, ("heads", "embed"), bias=False, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, **kw)
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

    def attend(self, q, k, v, allowed):
        """q [B,T,H,D]; keys [B,KV,D,S], values [B,KV,S,D]; allowed bool [B,T,S] -> [B,T,E]."""
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
        scores = jax.lax.dot_general(q, k.astype(q.dtype), (((3,), (2,)), ((0, 1), (0, 1))),
                                     preferred_element_type=acc) / math.sqrt(d)
        scores = jnp.where(allowed[:, None, None], scores.reshape(b, kv, groups, t, s), _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype).reshape(b, kv, groups * t, s)
        out = jax.lax.dot_general(probs, v.astype(self.dtype), (((3,), (2,)), ((0, 1), (0, 1))))
        out = out.reshape(b, kv, groups, t, d).transpose(0, 3, 1, 2, 4)
        return self.o_proj(out.reshape(b, t, h * d))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, stack, rngs):
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
        e, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Dense(e, m, ("embed", "mlp"), **kw)
        self.up_proj = Dense(e, m, ("embed", "mlp"), **kw)
        self.down_proj = Dense(m, e, ("mlp", "embed"), **kw)

    def __call__(self, x):
        g = self.gate_proj(x)
        # SiLU as g / (1 + exp(-g)), PyTorch's formula: one rounding fewer than g * sigmoid(g) (SmolLM2
        # fp32 logits: rms error vs a float64 reference 1.78e-5 -> 1.49e-5). The clamp keeps exp finite, so
        # the gradient is not inf/inf = NaN below g = -88; silu there is ~1e-33 either way.
        h = g / (1 + jnp.exp(-jnp.maximum(g, -80.0))) * self.up_proj(x)
        return self.down_proj(_constrain(h, ("batch", "length", "mlp")))


class Block(nnx.Module):
    """Pre-norm transformer layer (attention + SwiGLU MLP); one layer or all layers stacked."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, stack, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, **kw)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, **kw)


def _remat_policy(remat):
    if remat is True:
        return None  # save nothing: recompute the whole layer in the backward pass
    return getattr(jax.checkpoint_policies, remat)


class Decoder(nnx.Module):
    """Causal LM: embeddings -> transformer layers -> final RMSNorm -> LM head.

    Args:
      cfg: model hyper-parameters.
      dtype: compute dtype (activations, matmul inputs); logits are always float32.
      param_dtype: storage dtype of parameters.
      remat: False, True (recompute each layer in the backward pass) or the name of a
        ``jax.checkpoint_policies`` policy (e.g. "dots_with_no_batch_dims_saveable").
      scan_layers: store the layers stacked along a leading "layers" axis and run them with
        ``jax.lax.scan``: compile time independent of depth (worth it for 32-64 layer models on
        pods). Off by default: per-layer arrays decode somewhat faster, since a scan reads each
        layer's cache out of the stacked cache as a copy (about 10% slower sampling for
        SmolLM2-135M on CPU, none for bench/sampler.py's tiny model).
    """

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool | str = False, scan_layers: bool = False, rngs: nnx.Rngs):
        self.cfg, self.dtype, self.remat, self.scan_layers = cfg, dtype, remat, scan_layers
        if remat and remat is not True and not hasattr(jax.checkpoint_policies, remat):
            raise ValueError(f"remat={remat!r}: expected a bool or a jax.checkpoint_policies name")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Without a mesh in scope the logical axis names are kept as metadata only.
        eager = not jax.sharding.get_abstract_mesh().empty
        with nnx.use_eager_sharding(eager):
            self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                   embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02),
                                                                        ("vocab", "embed")), rngs=rngs)
            # Every layer draws from the same key stream, as slices of one stacked draw.
            key = rngs.params()
            n = cfg.num_layers
            layer_kw = dict(dtype=dtype, param_dtype=param_dtype)
            if scan_layers:
                self.layers = Block(cfg, stack=n, rngs=nnx.Rngs(params=key), **layer_kw)
            else:
                self.layers = nnx.List([Block(cfg, stack=(i, n), rngs=nnx.Rngs(params=key), **layer_kw)
                                        for i in range(n)])
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, stack=None, **kw)
            self.lm_head = (None if cfg.tie_word_embeddings else
                            Dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, stack=None,
                                  **kw))

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """An empty cache in the layout this model reads without copies (stacked iff scan_layers)."""
        return init_cache(self.cfg, batch, max_len, dtype, stacked=self.scan_layers)

    def decode_head(self, tile: int = 32) -> jax.Array | None:
        """The LM head re-laid out for one-token steps, or None where the plain product is used anyway.

        On CPU in float32 this is [ceil(V / tile), E, tile]: tile i holds vocabulary rows
        [tile*i, tile*(i+1)) transposed (zero rows pad the last one). A decode loop builds it once and
        passes it as ``head=`` on every step; the logits are then a multiply + reduce over E *down* each
        tile, which XLA:CPU vectorises along the tile while streaming the table once: about 2x faster
        than the multiply-reduce along E of the embedding's own layout and than XLA's skinny GEMM
        (bench/sampler.py's models, 8-16 rows; tile 16 measured 10x slower, 64 slower for E=576).
        """
        weights = self.embed.embedding[...] if self.lm_head is None else self.lm_head.kernel[...]
        if (jax.default_backend() != "cpu" or jnp.dtype(self.dtype) != jnp.float32
                or weights.dtype != jnp.float32):
            return None
        pad, e = -self.cfg.vocab_size % tile, self.cfg.hidden_size
        if self.lm_head is None:  # the embedding [V, E]
            return jnp.pad(weights, ((0, pad), (0, 0))).reshape(-1, tile, e).transpose(0, 2, 1)
        return jnp.pad(weights, ((0, 0), (0, pad))).reshape(e, -1, tile).transpose(1, 0, 2)  # kernel [E, V]

    def __call__(self, tokens: jax.Array, positions: jax.Array, *, attention_mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                 kv_len: int | None = None, head: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Logits float32[B, T, V] and the updated cache (None without one); see module docs.

        ``head``: ``decode_head()``'s re-laid-out LM head, used for one-token calls (decode steps).

        ``kv_len`` (static, with a cache): attend over cache slots [0, kv_len) only, not the whole
        cache; the caller guarantees ``cache.index + T <= kv_len`` (e.g. ``kv_len=T`` for a prompt
        written into an empty cache, which then attends within the chunk as without a cache).
        """
        cfg = self.cfg
        b, t = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        rope = rope_tables(positions, jnp.asarray(rope_inv_freq(cfg)))
        x = _constrain(self.embed(tokens).astype(self.dtype), ("batch", "length", "embed"))

        if cache is None:
            allowed = jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask[:, None, :]  # [B, T, T]
            if segment_ids is not None:
                allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
            index = new_mask = None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
            # Each layer writes the chunk into its cache slots first and then attends over the whole
            # cache: query slot index+i sees slot j iff j <= index+i and a real token sits there.
            index, s = cache.index, cache.mask.shape[1]
            if kv_len is not None and not t <= kv_len <= s:
                raise ValueError(f"kv_len={kv_len} must lie in [T, cache length] = [{t}, {s}]")
            s = s if kv_len is None else kv_len
            new_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, index))
            slots = jnp.arange(s)[None, :] <= index + jnp.arange(t)[:, None]  # [T, S]
            allowed = slots[None] & new_mask[:, None, :s]  # [B, T, S]

        graphdef = nnx.graphdef(self.layers if self.scan_layers else self.layers[0])

        def layer(h, params, store):
            """One layer on its parameter state.

            ``store`` is None (no cache) or (keys, values, i): this layer's cache arrays (see KVCache)
            with i=None, or the stacked arrays with this layer's index i. Returns the new hidden state
            and the store's arrays with this chunk written in place.
            """
            blk = nnx.merge(graphdef, params)
            q, k, v = blk.attn.project(blk.attn_norm(h), rope)
            k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B, KV, D, T], [B, KV, T, D]
            out = None
            if store is not None:
                ks, vs, i = store
                if i is None:
                    ks = jax.lax.dynamic_update_slice(ks, k.astype(ks.dtype), (0, 0, 0, index))
                    vs = jax.lax.dynamic_update_slice(vs, v.astype(vs.dtype), (0, 0, index, 0))
                    keys, values = ks, vs
                else:
                    ks = jax.lax.dynamic_update_slice(ks, k[None].astype(ks.dtype), (i, 0, 0, 0, index))
                    vs = jax.lax.dynamic_update_slice(vs, v[None].astype(vs.dtype), (i, 0, 0, index, 0))
                    keys = jax.lax.dynamic_index_in_dim(ks, i, keepdims=False)
                    values = jax.lax.dynamic_index_in_dim(vs, i, keepdims=False)
                out = (ks, vs)
                if kv_len == t:  # index is 0: the chunk is all there is to attend to, as just computed
                    k, v = k.astype(ks.dtype), v.astype(vs.dtype)
                elif kv_len is not None:
                    k, v = keys[..., :kv_len], values[:, :, :kv_len]
                else:
                    k, v = keys, values
            h = h + blk.attn.attend(q, k, v, allowed)
            h = h + blk.mlp(blk.mlp_norm(h))
            return _constrain(h, ("batch", "length", "embed")), out

        if self.remat:
            layer = jax.checkpoint(layer, policy=_remat_policy(self.remat))

        new_k = new_v = None
        if self.scan_layers and cache is None:
            x, _ = jax.lax.scan(lambda h, p: layer(h, p, None), x, nnx.state(self.layers))
        elif self.scan_layers:
            # The cache rides in the scan carry, so each layer's chunk is written in place. A per-layer
            # cache is stacked for the scan and split again after: correct, not free.
            ks, vs = (cache.k, cache.v) if cache.stacked else (jnp.stack(cache.k), jnp.stack(cache.v))

            def body(carry, xs):
                h, ks, vs = carry
                h, (ks, vs) = layer(h, xs[0], (ks, vs, xs[1]))
                return (h, ks, vs), None

            (x, new_k, new_v), _ = jax.lax.scan(body, (x, ks, vs),
                                                (nnx.state(self.layers), jnp.arange(cfg.num_layers)))
            if not cache.stacked:
                new_k, new_v = tuple(new_k), tuple(new_v)
        elif cache is None:
            for blk in self.layers:
                x, _ = layer(x, nnx.state(blk), None)
        elif cache.stacked:
            new_k, new_v = cache.k, cache.v
            for i, blk in enumerate(self.layers):
                x, (new_k, new_v) = layer(x, nnx.state(blk), (new_k, new_v, i))
        else:
            new_k, new_v = [], []
            for i, blk in enumerate(self.layers):
                x, (k, v) = layer(x, nnx.state(blk), (*cache.layer(i), None))
                new_k.append(k)
                new_v.append(v)
            new_k, new_v = tuple(new_k), tuple(new_v)
        new_cache = None if cache is None else KVCache(k=new_k, v=new_v, mask=new_mask, index=index + t)

        x = self.norm(x)
        acc = jnp.promote_types(self.dtype, jnp.float32)
        emb = self.embed.embedding[...]
        if head is not None and t == 1:
            # [V/tile, B, tile]: the tile index outermost, so each tile of the table is read once for
            # all rows (rows outermost would stream the whole table once per row).
            logits = jnp.sum(x[:, 0][None, :, :, None] * head[:, None], axis=2)
            logits = logits.transpose(1, 0, 2).reshape(b, 1, -1)[:, :, :cfg.vocab_size]
        elif (self.lm_head is None and t == 1 and jax.default_backend() == "cpu"
                and emb.dtype == jnp.float32 and jnp.dtype(self.dtype) == jnp.float32):
            # A float32 decode step against the tied embedding [V, E]: XLA:CPU runs this skinny
            # product as a GEMM well below memory speed, while the same contraction written as a
            # broadcast multiply + reduce over E streams the embedding once in its own layout (1.2-2x
            # faster for 8-128 rows on bench/sampler.py's models; not so in bfloat16).
            logits = jnp.sum(emb[:, None, :] * x[:, 0][None], axis=-1).T[:, None, :]
        elif self.lm_head is None:
            logits = jnp.einsum("bte,ve->btv", x, emb.astype(self.dtype),
                                preferred_element_type=acc)
        else:
            logits = jnp.einsum("bte,ev->btv", x, self.lm_head.kernel[...].astype(self.dtype),
                                preferred_element_type=acc)
        return _constrain(logits.astype(jnp.float32), ("batch", "length", "vocab")), new_cache


def hf_param_mapping(cfg: DecoderConfig, *, scan_layers: bool = False) -> dict[str, tuple]:
    """Our parameter path -> (HF tensor name(s), transpose) for Llama/Qwen2/Qwen3 checkpoints.

    With ``scan_layers`` each layer parameter is stacked, so it maps to the list of per-layer HF
    tensors; otherwise ``layers.{i}.<name>`` maps to ``model.layers.{i}.<hf name>``.
    """
    m: dict[str, tuple] = {
        "embed.embedding": ("model.embed_tokens.weight", False),
        "norm.scale": ("model.norm.weight", False),
    }

    def per_layer(ours: str, theirs: str, transpose: bool) -> None:
        names = [f"model.layers.{i}.{theirs}" for i in range(cfg.num_layers)]
        if scan_layers:
            m[f"layers.{ours}"] = (names, transpose)
        else:
            m.update({f"layers.{i}.{ours}": (n, transpose) for i, n in enumerate(names)})

    per_layer("attn_norm.scale", "input_layernorm.weight", False)
    per_layer("mlp_norm.scale", "post_attention_layernorm.weight", False)
    for ours, theirs in [("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                         ("attn.v_proj", "self_attn.v_proj"), ("attn.o_proj", "self_attn.o_proj"),
                         ("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj"),
                         ("mlp.down_proj", "mlp.down_proj")]:
        per_layer(f"{ours}.kernel", f"{theirs}.weight", True)
    if cfg.qkv_bias:
        for p in ("q_proj", "k_proj", "v_proj"):
            per_layer(f"attn.{p}.bias", f"self_attn.{p}.bias", False)
    if cfg.qk_norm:
        per_layer("attn.q_norm.scale", "self_attn.q_norm.weight", False)
        per_layer("attn.k_norm.scale", "self_attn.k_norm.weight", False)
    if not cfg.tie_word_embeddings:
        m["lm_head.kernel"] = ("lm_head.weight", True)
    return m
