"""BERT encoder and sequence classifier in Flax NNX, numerically matching Hugging Face `BertModel`.

Semantics follow `transformers.BertModel` exactly: word + absolute position + token-type embeddings, then
LayerNorm; post-LN encoder layers (attention -> dense -> dropout -> LayerNorm(x + residual), GELU MLP the same
way); the pooler is tanh(dense(h[:, 0])). The classifier head is pooler -> dropout -> linear, as in
`BertForSequenceClassification`. Parameters carry logical axis names so `medkr_jax.parallel` rules place them
on the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medkr_jax.models.bert.config import ACTIVATIONS, BertConfig, BertConfigError

Array = jax.Array


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
        return self.output(ACTIVATIONS[self.cfg.hidden_act](u))

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

