"""BERT encoder and sequence classifier in Flax NNX, numerically matching Hugging Face `BertModel`.

Semantics follow `transformers.BertModel` exactly: word + absolute position + token-type embeddings, then
LayerNorm; post-LN encoder layers (attention -> dense -> dropout -> LayerNorm(x + residual), GELU MLP the same
way); the pooler is tanh(dense(h[:, 0])). The classifier head is pooler -> dropout -> linear, as in
`BertForSequenceClassification`. Parameters carry logical axis names so `medkr_jax.parallel` rules place them
on the mesh; `load_bert` reads a local HF folder straight into sharded arrays and `export_bert_classifier`
writes one back that transformers loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

_ACTIVATIONS = {
    # HF "gelu" is the exact erf form; "gelu_new"/"gelu_pytorch_tanh" are the tanh approximation.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

_SUPPORTED_ARCHITECTURES = ("BertModel", "BertForSequenceClassification", "BertForMaskedLM", "BertForPreTraining")


class BertConfigError(ValueError):
    """A BERT config.json is missing a field or asks for something this implementation does not support."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The subset of a Hugging Face BertConfig that determines the computation (plus the label names)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    pad_token_id: int = 0
    initializer_range: float = 0.02
    num_labels: int = 2
    id2label: tuple[tuple[int, str], ...] = ((0, "LABEL_0"), (1, "LABEL_1"))
    add_pooling_layer: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise BertConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise BertConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
        if len(self.id2label) != self.num_labels:
            raise BertConfigError(f"id2label has {len(self.id2label)} entries but num_labels is {self.num_labels}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def label_names(self) -> list[str]:
        return [name for _, name in sorted(self.id2label)]

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label}

    def with_labels(self, labels: int | list[str] | Mapping[int, str]) -> "BertConfig":
        """A copy with a new label set: a count (names LABEL_i), a list of names, or an id -> name mapping."""
        if isinstance(labels, int):
            pairs = tuple((i, f"LABEL_{i}") for i in range(labels))
        elif isinstance(labels, Mapping):
            pairs = tuple(sorted((int(k), str(v)) for k, v in labels.items()))
        else:
            pairs = tuple((i, str(n)) for i, n in enumerate(labels))
        return dataclasses.replace(self, num_labels=len(pairs), id2label=pairs)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> "BertConfig":
        """Build from a Hugging Face BERT config dict (the contents of config.json)."""
        archs = hf.get("architectures") or []
        if archs and not any(a in _SUPPORTED_ARCHITECTURES for a in archs):
            raise BertConfigError(f"{source}: architectures {archs} is not a BERT model; supported: "
                                  f"{list(_SUPPORTED_ARCHITECTURES)}")
        if hf.get("model_type", "bert") != "bert":
            raise BertConfigError(f"{source}: model_type {hf.get('model_type')!r} is not 'bert'")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise BertConfigError(f"{source}: position_embedding_type {pos!r} is not supported (only 'absolute')")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise BertConfigError(f"{source}: decoder / cross-attention BERT variants are not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in hf]
        if missing:
            raise BertConfigError(f"{source}: missing required field(s) {missing}")
        id2label = hf.get("id2label")
        if id2label:
            pairs = tuple(sorted((int(k), str(v)) for k, v in id2label.items()))
        else:
            n = int(hf.get("num_labels", 2))
            pairs = tuple((i, f"LABEL_{i}") for i in range(n))
        try:
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=int(hf["num_attention_heads"]),
                intermediate_size=int(hf["intermediate_size"]),
                hidden_act=str(hf.get("hidden_act", "gelu")),
                max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
                type_vocab_size=int(hf.get("type_vocab_size", 2)),
                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
                hidden_dropout_prob=float(hf.get("hidden_dropout_prob", 0.1)),
                attention_probs_dropout_prob=float(hf.get("attention_probs_dropout_prob", 0.1)),
                classifier_dropout=(None if hf.get("classifier_dropout") is None
                                    else float(hf["classifier_dropout"])),
                pad_token_id=int(hf.get("pad_token_id") or 0),
                initializer_range=float(hf.get("initializer_range", 0.02)),
                num_labels=len(pairs),
                id2label=pairs,
            )
        except BertConfigError as e:
            raise BertConfigError(f"{source}: {e}") from None

    def to_hf(self, architecture: str = "BertForSequenceClassification") -> dict[str, Any]:
        """The config.json dict transformers expects for this model."""
        return {
            "architectures": [architecture],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "classifier_dropout": self.classifier_dropout,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "position_embedding_type": "absolute",
            "id2label": {str(i): name for i, name in self.id2label},
            "label2id": {name: i for i, name in self.id2label},
            "torch_dtype": "float32",
        }


def _init(cfg: BertConfig, axes: tuple[str | None, ...]):
    """HF's BERT init (normal with std=initializer_range) annotated with logical axes."""
    return nnx.with_partitioning(nnx.initializers.normal(cfg.initializer_range), axes)


def _zeros(axes):
    return nnx.with_partitioning(nnx.initializers.zeros_init(), axes)


def _ones(axes):
    return nnx.with_partitioning(nnx.initializers.ones_init(), axes)


class Dense(nnx.Module):
    """y = x @ kernel + bias with operands in the compute dtype and float32 accumulation and output.

    Mixed precision policy of this module: `dtype` is the matmul operand dtype; accumulation, the residual
    stream, LayerNorm, softmax and GELU stay float32 (bf16 x bf16 -> f32 dots are also the fast path on CPUs
    with AVX512-BF16, TPUs and GPUs).
    """

    def __init__(self, cfg: BertConfig, din: int, dout: int, axes: tuple, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(_init(cfg, axes)(rngs.params(), (din, dout), param_dtype))
        self.bias = nnx.Param(_zeros((axes[1],))(rngs.params(), (dout,), param_dtype))

    def __call__(self, x: Array, *, input_scale: float | None = None, output_scale: float | None = None) -> Array:
        """x @ kernel + bias; `input_scale` computes (s * x) @ kernel + bias and `output_scale` s * (x @ kernel +
        bias), both by scaling the [in, out] kernel (and bias) instead of a [..., in] or [..., out] activation."""
        kernel, bias = self.kernel[...].astype(jnp.float32), self.bias[...].astype(jnp.float32)
        if input_scale is not None:
            kernel = kernel * input_scale
        if output_scale is not None:
            kernel, bias = kernel * output_scale, bias * output_scale
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=jnp.float32)
        return y + bias


def _dense(cfg, din, dout, axes, *, dtype, param_dtype, rngs) -> Dense:
    return Dense(cfg, din, dout, axes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _layer_norm(cfg, *, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2, for parity at 1e-4.
    # Always float32 (see Dense): the residual stream stays float32 whatever the matmul dtype.
    del dtype
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=param_dtype,
                         use_fast_variance=False, scale_init=_ones(("norm",)), bias_init=_zeros(("norm",)),
                         rngs=rngs)


def _mask_bias(mask: Array) -> Array:
    """HF's additive attention mask, float32[B, T]: 0 for real keys, a huge negative score for padded ones.

    -1e30, not float32's min: its sum with a score stays finite in every summation order and dtype (a fully
    padded row then gets finite, uniform weights, never NaN); exp() makes it exactly 0."""
    return jnp.where(mask, 0.0, -1e30).astype(jnp.float32)


def _hash32(h: Array) -> Array:
    """An integer hash of uint32 values (the "lowbias32" xorshift-multiply mix): every output bit depends on every
    input bit, so consecutive inputs give unrelated outputs."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def dropout_keep_mask(rng: Array, shape: tuple[int, ...], rate: float) -> Array:
    """bool[shape], each True with probability 1 - rate (to within 2^-32), independently across positions and keys.

    One 32-bit seed per call comes from `rng` (jax.random); each position's bits are a counter-based hash of its
    index mixed with that seed. jax.random.bernoulli runs threefry (20 rounds) per element: on the [B, H, T, T]
    attention weights of a training step that was ~1.3 s of a 4.8 s MiniLM step at 16 x 256 on one CPU core
    (bench/bert_train.py); the hash costs about what the select it feeds does.
    """
    size = int(np.prod(shape))
    if size >= 2 ** 32:
        raise ValueError(f"dropout over {size} elements: the position counter is 32-bit")
    seed = jax.random.bits(rng, (), jnp.uint32)
    bits = _hash32(_hash32(jax.lax.iota(jnp.uint32, size).reshape(shape)) ^ seed)
    return bits >= jnp.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))


def _dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout; identity when rng is None (evaluation) or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    return jnp.where(dropout_keep_mask(rng, x.shape, rate), x / (1.0 - rate), jnp.zeros_like(x))


class _Rng:
    """Hands out a fresh key per dropout site from one key (None = deterministic, no dropout)."""

    def __init__(self, key: Array | None):
        self.key, self.n = key, 0

    def __call__(self) -> Array | None:
        if self.key is None:
            return None
        self.n += 1
        return jax.random.fold_in(self.key, self.n)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        emb = lambda n, axes: nnx.Embed(n, cfg.hidden_size, dtype=jnp.float32, param_dtype=param_dtype,
                                        embedding_init=_init(cfg, axes), rngs=rngs)
        self.word_embeddings = emb(cfg.vocab_size, ("vocab", "embed"))
        self.position_embeddings = emb(cfg.max_position_embeddings, (None, "embed"))
        self.token_type_embeddings = emb(cfg.type_vocab_size, (None, "embed"))
        self.LayerNorm = _layer_norm(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, token_type_ids, position_ids, rng: _Rng) -> Array:
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return _dropout(self.LayerNorm(x), self.cfg.hidden_dropout_prob, rng())


class BertLayer(nnx.Module):
    """One post-LN transformer layer: attention block then MLP block, each with residual + LayerNorm."""

    def __init__(self, cfg: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = _dense(cfg, d, d, ("embed", "heads"), **kw)
        self.key = _dense(cfg, d, d, ("embed", "heads"), **kw)
        self.value = _dense(cfg, d, d, ("embed", "heads"), **kw)
        self.attention_output = _dense(cfg, d, d, ("heads", "embed"), **kw)
        self.attention_norm = _layer_norm(cfg, **kw)
        self.intermediate = _dense(cfg, d, f, ("embed", "mlp"), **kw)
        self.output = _dense(cfg, f, d, ("mlp", "embed"), **kw)
        self.output_norm = _layer_norm(cfg, **kw)

    def _attention(self, x: Array, mask: Array, rng: _Rng, first_only: bool) -> Array:
        if first_only:
            return self._first_token_attention(x, mask, rng)
        cfg = self.cfg
        b, t, _ = x.shape
        # Heads-major [B, H, T, Dh] operands: XLA lowers these batched matmuls far better on CPU than the
        # [B, T, H, Dh] layout (about 3x faster attention measured; see bench/bert_forward.py).
        heads = lambda y: y.reshape(b, t, cfg.num_heads, cfg.head_dim).transpose(0, 2, 1, 3)
        # The 1/sqrt(Dh) score scale is folded into the query kernel and bias ([D, D] work, not [B, H, T, T]).
        q = heads(self.query(x, output_scale=1.0 / np.sqrt(cfg.head_dim)))
        k, v = heads(self.key(x)), heads(self.value(x))
        # HF's additive mask (padded keys get a huge negative score) rides inside the QK^T product as one more
        # feature: q gets a constant 1, k the key's bias. XLA:CPU otherwise materialises the mask (and any
        # scale) broadcast to [B, H, T, T] for its fused attention kernel; this way nothing of that size is
        # built.
        ones = jnp.ones(q.shape[:3] + (1,), jnp.float32)
        bias = jnp.broadcast_to(_mask_bias(mask)[:, None, :, None], k.shape[:3] + (1,))
        q = jnp.concatenate([q, ones], axis=-1).astype(self.dtype)
        k = jnp.concatenate([k, bias], axis=-1).astype(self.dtype)
        v = v.astype(self.dtype)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        e = jnp.exp(scores - scores.max(-1, keepdims=True))
        denom = e.sum(-1, keepdims=True)
        # Dropout on the unnormalised weights then dividing by the sum equals HF's dropout(softmax).
        e = _dropout(e, cfg.attention_probs_dropout_prob, rng())
        # Normalise after the PV product: divides [.., T, Dh] instead of the [.., T, T] probabilities.
        ctx = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
        return ctx.transpose(0, 2, 1, 3).reshape(b, t, cfg.hidden_size)

    def _first_token_attention(self, x: Array, mask: Array, rng: _Rng) -> Array:
        """Attention output of position 0 alone, [B, 1, D], without the keys and values of every position.

        With one query per sequence the key and value projections fold into it: q . (x_t Wk + bk) =
        x_t . (Wk q) + q . bk, and the bk term is the same for every key, so softmax drops it; the weighted sum
        of values is (sum_t p_t x_t) Wv + bv since the weights sum to one. That is [B, H, D] x [B, T, D] work
        instead of two [B*T, D] x [D, D] projections: exact in real arithmetic, float32 rounding otherwise.
        """
        cfg = self.cfg
        h, dh, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
        q = self.query(x[:, 0], output_scale=1.0 / np.sqrt(dh)).reshape(-1, h, dh)
        wk = self.key.kernel[...].astype(jnp.float32).reshape(d, h, dh)
        qk = jnp.einsum("bhe,dhe->bhd", q, wk)
        scores = jnp.einsum("bhd,btd->bht", qk.astype(self.dtype), x.astype(self.dtype),
                            preferred_element_type=jnp.float32) + _mask_bias(mask)[:, None, :]
        e = jnp.exp(scores - scores.max(-1, keepdims=True))
        denom = e.sum(-1, keepdims=True)
        e = _dropout(e, cfg.attention_probs_dropout_prob, rng())  # as above: dropout(softmax) = this / denom
        px = jnp.einsum("bht,btd->bhd", e.astype(self.dtype), x.astype(self.dtype),
                        preferred_element_type=jnp.float32) / denom
        wv = self.value.kernel[...].astype(jnp.float32).reshape(d, h, dh)
        ctx = jnp.einsum("bhd,dhe->bhe", px.astype(self.dtype), wv.astype(self.dtype),
                         preferred_element_type=jnp.float32)
        ctx = ctx + self.value.bias[...].astype(jnp.float32).reshape(h, dh)
        return ctx.reshape(-1, 1, d)

    def _mlp(self, x: Array) -> Array:
        u = self.intermediate(x)
        if self.cfg.hidden_act == "gelu":
            # Exact GELU 0.5 * u * (1 + erf(u / sqrt(2))), PyTorch's formula, with the 0.5 folded into the output
            # kernel (exact: a power of two); XLA:CPU would otherwise materialise the 0.5 broadcast to
            # [B, T, intermediate] for the fused output matmul. (The erfc(-u / sqrt(2)) form is ~3% slower.)
            return self.output(u + u * jax.lax.erf(u * np.float32(np.sqrt(0.5))), input_scale=0.5)
        return self.output(_ACTIVATIONS[self.cfg.hidden_act](u))

    def __call__(self, x: Array, mask: Array, rng: _Rng, first_only: bool = False) -> Array:
        """first_only: compute outputs for position 0 only (keys/values still from every position), exact for
        consumers of the first token alone (the pooler); returns [B, 1, D] then."""
        p = self.cfg.hidden_dropout_prob
        h = self.attention_output(self._attention(x, mask, rng, first_only))
        x = self.attention_norm(_dropout(h, p, rng()) + (x[:, :1] if first_only else x))
        return self.output_norm(_dropout(self._mlp(x), p, rng()) + x)


def _remat_body(first_only: bool):
    # A closure, not a default argument: remat traces every argument, and first_only must stay static.
    def body(layer: BertLayer, x: Array, mask: Array, key: Array | None) -> Array:
        return layer(x, mask, _Rng(key), first_only)
    return body


class BertModel(nnx.Module):
    """The BERT encoder (+ pooler). Create it inside `parallel.sharding_context(mesh, rules)`."""

    def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs):
        self.cfg, self.dtype, self.remat = cfg, dtype, remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = BertEmbeddings(cfg, **kw)
        self.layers = nnx.List([BertLayer(cfg, **kw) for _ in range(cfg.num_layers)])
        self.pooler = (_dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), **kw)
                       if cfg.add_pooling_layer else None)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, position_ids: Array | None = None, *,
                 dropout_rng: Array | None = None, pooled_only: bool = False) -> tuple[Array, Array | None]:
        """input_ids int[B, T]; attention_mask [B, T] (1/True = real token). Returns (last_hidden [B,T,D],
        pooled [B,D] or None). Dropout is applied only when `dropout_rng` (a PRNG key) is given.

        pooled_only: the last layer computes position 0 only (what the pooler reads; ~1/L less work, same
        pooled output); last_hidden is then [B, 1, D]."""
        b, t = input_ids.shape
        if t > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        c = _cpu_chunk(b, t) if dropout_rng is None else b
        if c < b:
            # Inference on one CPU device: run the encoder on groups of c sequences in turn (lax.map), so each
            # group's activations stay in cache: the same arithmetic per row, ~20% less time for MiniLM at
            # batch 32 x 256 (bench/bert_forward.py).
            group = lambda a: a.reshape(b // c, c, *a.shape[1:])
            x, pooled = jax.lax.map(lambda a: self._encode(*a, None, pooled_only),
                                    tuple(map(group, (input_ids, mask, token_type_ids, position_ids))))
            return x.reshape(b, *x.shape[2:]), None if pooled is None else pooled.reshape(b, -1)
        return self._encode(input_ids, mask, token_type_ids, position_ids, dropout_rng, pooled_only)

    def _encode(self, input_ids, mask, token_type_ids, position_ids, dropout_rng, pooled_only):
        rng = _Rng(dropout_rng)
        x = self.embeddings(input_ids, token_type_ids, position_ids, rng)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            first_only = pooled_only and i == n - 1
            if self.remat:
                x = nnx.remat(_remat_body(first_only))(layer, x, mask, rng())
            else:  # same keys as under remat: one per layer, split per dropout site inside it
                x = layer(x, mask, _Rng(rng()), first_only)
        pooled = jnp.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return x, pooled


# Tokens per encoder step on CPU (see BertModel.__call__): a group's activations then fit in cache, while its
# matmuls keep enough rows to run near the machine's GEMM peak (measured best for 512-2048).
CPU_CHUNK_TOKENS = 1024


def _cpu_chunk(b: int, t: int) -> int:
    """Sequences per group for a deterministic forward: b (no grouping) unless this runs on a single CPU device
    (a batch sharded over a mesh keeps its layout), else the largest divisor of b with at most
    CPU_CHUNK_TOKENS tokens (at least one sequence)."""
    if jax.default_backend() != "cpu" or b * t <= CPU_CHUNK_TOKENS or jax.sharding.get_abstract_mesh().size > 1:
        return b
    return max(d for d in range(1, b + 1) if b % d == 0 and (d * t <= CPU_CHUNK_TOKENS or d == 1))


class BertForSequenceClassification(nnx.Module):
    """BERT + classification head (pooler -> dropout -> linear), logits in float32."""

    def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs):
        if not cfg.add_pooling_layer:
            raise BertConfigError("BertForSequenceClassification needs the pooler (add_pooling_layer=True)")
        self.cfg = cfg
        self.bert = BertModel(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.classifier = _dense(cfg, cfg.hidden_size, cfg.num_labels, ("embed", "classes"),
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, position_ids: Array | None = None, *,
                 dropout_rng: Array | None = None) -> Array:
        """Logits float32[B, num_labels]."""
        body_rng, head_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids, dropout_rng=body_rng,
                              pooled_only=True)
        p = self.cfg.classifier_dropout if self.cfg.classifier_dropout is not None else self.cfg.hidden_dropout_prob
        return self.classifier(_dropout(pooled, p, head_rng)).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Hugging Face checkpoint names


def hf_names(cfg: BertConfig, *, classifier: bool, prefix: str = "") -> dict[str, tuple[str, bool]]:
    """Our parameter path -> (HF tensor name, transpose?). `prefix` is "bert." for HF task models.

    With `classifier=True` the paths are those of BertForSequenceClassification (under "bert.") plus the
    head ("classifier.weight"/"classifier.bias", never prefixed).
    """
    ours = "bert." if classifier else ""
    names: dict[str, tuple[str, bool]] = {}

    def dense(our: str, hf: str):
        names[f"{ours}{our}.kernel"] = (f"{prefix}{hf}.weight", True)  # torch Linear stores [out, in]
        names[f"{ours}{our}.bias"] = (f"{prefix}{hf}.bias", False)

    def norm(our: str, hf: str):
        names[f"{ours}{our}.scale"] = (f"{prefix}{hf}.weight", False)
        names[f"{ours}{our}.bias"] = (f"{prefix}{hf}.bias", False)

    for e in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        names[f"{ours}embeddings.{e}.embedding"] = (f"{prefix}embeddings.{e}.weight", False)
    norm("embeddings.LayerNorm", "embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        hf = f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            dense(f"layers.{i}.{proj}", f"{hf}.attention.self.{proj}")
        dense(f"layers.{i}.attention_output", f"{hf}.attention.output.dense")
        norm(f"layers.{i}.attention_norm", f"{hf}.attention.output.LayerNorm")
        dense(f"layers.{i}.intermediate", f"{hf}.intermediate.dense")
        dense(f"layers.{i}.output", f"{hf}.output.dense")
        norm(f"layers.{i}.output_norm", f"{hf}.output.LayerNorm")
    if cfg.add_pooling_layer:
        dense("pooler", "pooler.dense")
    if classifier:
        names["classifier.kernel"] = ("classifier.weight", True)
        names["classifier.bias"] = ("classifier.bias", False)
    return names


# Tensors a BERT checkpoint may hold that an encoder/classifier does not use (buffers, pretraining heads).
_IGNORED_PREFIXES = ("cls.", "lm_head.", "bert.cls.")
_IGNORED_SUFFIXES = ("embeddings.position_ids",)


def _random_source(shape: tuple[int, ...], std: float, seed: int):
    """A load_params source that returns HF-style init (normal(0, std), zeros if std == 0) in slices."""
    def read(ckpt, index):
        full = (np.random.default_rng(seed).normal(0.0, std, size=shape) if std > 0
                else np.zeros(shape)).astype(np.float32)
        return full[index] if index else full
    return read


def load_bert(folder: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, rules=None,
              num_labels: int | None = None, id2label: Mapping[int, str] | None = None,
              dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False, seed: int = 0,
              classifier_dropout: float | None = None,
              ) -> tuple[BertModel | BertForSequenceClassification, BertConfig]:
    """Load a local HF BERT folder (config.json + safetensors) straight into sharded arrays.

    Returns (model, cfg). The model is a BertForSequenceClassification when the checkpoint has a classifier
    head or `num_labels`/`id2label` is given (a missing head is initialised randomly, as HF does, with
    `seed`); otherwise a BertModel. Works for plain encoders (MiniLM: no "bert." prefix) and task models
    ("bert." prefix, e.g. the released reasoning/knowledge classifier). `mesh=None` loads on one device.
    `classifier_dropout` overrides the head's dropout rate (config.json's, else hidden_dropout_prob).
    """
    from medkr_jax import parallel
    from medkr_jax.models import hf

    folder = os.fspath(folder)
    cfg = BertConfig.from_hf(hf.read_hf_config(folder), source=os.path.join(folder, "config.json"))
    ckpt = hf.SafetensorsCheckpoint(folder)
    names = set(ckpt.names())
    prefix = "bert." if any(n.startswith("bert.") for n in names) else ""
    has_head = "classifier.weight" in names
    if id2label is not None:
        cfg = cfg.with_labels(dict(id2label))
        if num_labels is not None and num_labels != cfg.num_labels:
            raise BertConfigError(f"num_labels={num_labels} but id2label has {cfg.num_labels} entries")
    elif num_labels is not None and (num_labels != cfg.num_labels or not has_head):
        cfg = cfg.with_labels(num_labels)
    classifier = has_head or num_labels is not None or id2label is not None
    if classifier_dropout is not None:
        cfg = dataclasses.replace(cfg, classifier_dropout=float(classifier_dropout))
    if has_head and ckpt.shape("classifier.weight") != (cfg.num_labels, cfg.hidden_size):
        raise hf.CheckpointError(
            f"classifier.weight in {str(ckpt.file_of('classifier.weight'))!r} has shape "
            f"{ckpt.shape('classifier.weight')}, expected ({cfg.num_labels}, {cfg.hidden_size}) for "
            f"num_labels={cfg.num_labels}")
    if not classifier and f"{prefix}pooler.dense.weight" not in names:
        cfg = dataclasses.replace(cfg, add_pooling_layer=False)  # e.g. a masked-LM checkpoint

    mapping: dict[str, Any] = hf_names(cfg, classifier=classifier, prefix=prefix)
    for path, (name, transpose) in list(mapping.items()):
        if name in names:
            continue
        if name.endswith(".weight") and "LayerNorm" in name and name[:-6] + "gamma" in names:
            mapping[path] = (name[:-6] + "gamma", transpose)  # TF-era checkpoints
        elif name.endswith(".bias") and "LayerNorm" in name and name[:-4] + "beta" in names:
            mapping[path] = (name[:-4] + "beta", transpose)
        elif name.startswith(("classifier.", f"{prefix}pooler.")) and classifier:
            # Task head (or pooler) absent: fresh init like HF (normal(initializer_range), zero bias).
            shape = ((cfg.hidden_size, cfg.num_labels) if name.startswith("classifier.") else
                     (cfg.hidden_size, cfg.hidden_size))
            shape = shape if name.endswith(".weight") else shape[1:]
            std = cfg.initializer_range if name.endswith(".weight") else 0.0
            mapping[path] = _random_source(shape, std, seed + len(path))
    if mesh is None:
        mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    cls = BertForSequenceClassification if classifier else BertModel
    with parallel.sharding_context(mesh, rules):
        abstract = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                              rngs=nnx.Rngs(seed)))
        model = hf.load_params(abstract, ckpt, mapping, param_dtype=param_dtype, mesh=mesh, warn_unused=False)
    used = {src[0] for src in mapping.values() if isinstance(src, tuple)}
    unused = sorted(n for n in names - used
                    if not n.startswith(_IGNORED_PREFIXES) and not n.endswith(_IGNORED_SUFFIXES))
    if unused:
        import warnings
        warnings.warn(f"{len(unused)} tensors in {folder!r} were not used: {unused[:10]}", stacklevel=2)
    return model, cfg


def init_bert_classifier(cfg: BertConfig, *, mesh: jax.sharding.Mesh | None = None, rules=None,
                         dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                         seed: int = 0) -> BertForSequenceClassification:
    """A randomly initialised classifier (for tests and from-scratch training), sharded on `mesh`."""
    from medkr_jax import parallel
    if mesh is None:
        mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    with parallel.sharding_context(mesh, rules):
        return BertForSequenceClassification(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                             rngs=nnx.Rngs(seed))


def _to_host(x: Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def export_bert_classifier(model: BertForSequenceClassification, cfg: BertConfig, out_dir: str | os.PathLike,
                           tokenizer_dir: str | os.PathLike | None = None) -> str:
    """Write an HF BertForSequenceClassification folder (config.json with id2label/label2id,
    model.safetensors in float32, tokenizer files copied from `tokenizer_dir`) that transformers loads.
    Every process must call it (sharded params are gathered); only process 0 writes. Returns out_dir."""
    from safetensors.numpy import save_file

    from medkr_jax.models import hf

    if not isinstance(model, BertForSequenceClassification):
        raise TypeError(f"export_bert_classifier needs a BertForSequenceClassification, got {type(model).__name__}")
    out_dir = os.fspath(out_dir)
    flat = dict((".".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    for path, (name, transpose) in hf_names(cfg, classifier=True, prefix="bert.").items():
        arr = _to_host(flat[path].get_value()).astype(np.float32)
        tensors[name] = np.ascontiguousarray(arr.T if transpose else arr)
    if jax.process_index() != 0:
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf("BertForSequenceClassification"), f, indent=2)
    if tokenizer_dir is not None:
        copied = False
        for name in TOKENIZER_FILES:
            src = os.path.join(os.fspath(tokenizer_dir), name)
            if os.path.isfile(src):
                hf.copy_file(src, os.path.join(out_dir, name))
                copied = True
        if not copied:
            raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir!r}")
    return out_dir
