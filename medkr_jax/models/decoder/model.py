"""One decoder-only transformer covering Llama (incl. Llama-3 RoPE scaling), Mistral, Qwen2, Qwen3 and Gemma 3.

The family differences are config switches (see ``families``): Qwen2 adds q/k/v biases, Qwen3 adds
per-head RMSNorm on q and k; Mistral attends within a sliding window; Gemma 3 interleaves sliding-window
and global layers (each kind with its own RoPE table), norms with (1 + w) and four norms per layer, GeGLU,
scaled embeddings, a query_pre_attn_scalar and soft-capped logits; GQA, RMSNorm and tied/untied embeddings
are shared.

Sliding layers use the same full-length cache as global ones and mask the slots more than
``sliding_window - 1`` behind the query (``_within_window``); see ``sampling.static`` for this choice
against a ring buffer and the memory it costs.

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

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from medkr_jax import xla_options
from medkr_jax.models.decoder.config import DecoderConfig
from medkr_jax.models.decoder.layers import Block, Dense, RMSNorm, constrain, rope_inv_freq, rope_tables, softcap


@struct.dataclass
class KVCache:
    """Per-layer keys/values for incremental decoding.

    k: keys stored transposed, a tuple of num_layers arrays [B, num_kv_heads, head_dim, S_max]
    (per-layer models) or one stacked array [num_layers, B, num_kv_heads, head_dim, S_max]
    (``stacked=True``, for scanned models); v: values likewise, [..., B, num_kv_heads, S_max, head_dim].
    Either representation works with either layer layout, the matching one without extra copies.
    mask: bool[B, S_max] (True = a real token sits in that slot); index: the next slot to write, an int32
    scalar shared by all rows or int32[B], one per row (a continuous-batching engine's slots, each at its
    own point of its own sequence; ``kv_len`` is then unsupported).
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
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, stack=None, offset=cfg.family.norm_offset, **kw)
            self.lm_head = (None if cfg.tie_word_embeddings else
                            Dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, stack=None,
                                  **kw))

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """An empty cache in the layout this model reads without copies (stacked iff scan_layers)."""
        return init_cache(self.cfg, batch, max_len, dtype, stacked=self.scan_layers)

    def head_weights(self) -> jax.Array:
        """The LM head's weights as stored: the tied embedding [V, E], or the untied kernel [E, V]."""
        return self.embed.embedding[...] if self.lm_head is None else self.lm_head.kernel[...]

    def decode_head(self, rows: int | None = None) -> jax.Array | None:
        """The LM head laid out for one-token steps of ``rows`` rows (None: any number), or None where the model's
        own weights serve (``xla_options.decode_head_layout``).

        A decode loop builds it once and passes it as ``head=`` on every step. "packed": [V', E, L] blocks of L =
        ``xla_options.PACKED_HEAD_LANES`` vocabulary entries (V zero-padded to V' * L), the logits a multiply-reduce
        over E; "transposed": an [E, V] matrix (a tied embedding copied; an untied kernel already is one: None),
        the logits the plain product ``x @ head``.
        """
        layout = xla_options.decode_head_layout(rows)
        if layout is None or (layout == "transposed" and self.lm_head is not None):
            return None
        w = self.head_weights()
        w = w.T if self.lm_head is None else w  # [E, V]
        if layout == "transposed":
            return w
        lanes = xla_options.PACKED_HEAD_LANES
        w = jnp.pad(w, ((0, 0), (0, -w.shape[1] % lanes)))
        return w.reshape(w.shape[0], -1, lanes).transpose(1, 0, 2)

    def __call__(self, tokens: jax.Array, positions: jax.Array, *, attention_mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                 kv_len: int | None = None, head: jax.Array | None = None,
                 logits_at: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Logits float32[B, T, V] and the updated cache (None without one); see module docs.

        ``head``: ``decode_head()``'s re-laid-out LM head, used for one-token calls (decode steps).

        ``logits_at``: int[B, K] positions in [0, T): logits float32[B, K, V] at those positions of each row
        only (Hugging Face's ``logits_to_keep``, per row). The final norm and the LM head then run on K rows
        instead of T: a GRPO update needs its completions' log-probs only, not its prompts'.

        ``kv_len`` (static, with a cache): attend over cache slots [0, kv_len) only, not the whole
        cache; the caller guarantees ``cache.index + T <= kv_len`` (e.g. ``kv_len=T`` for a prompt
        written into an empty cache, which then attends within the chunk as without a cache).
        """
        b, t = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        cfg = self.cfg
        sliding = any(cfg.sliding_layers)
        # (global, local) RoPE tables and key masks; the local ones only when some layer slides.
        ropes = (rope_tables(positions, jnp.asarray(rope_inv_freq(cfg))),
                 rope_tables(positions, jnp.asarray(rope_inv_freq(cfg, local=True)))
                 if sliding and cfg.local_rope_theta is not None else None)
        x = self.embed(tokens).astype(self.dtype)
        if cfg.family.embed_scale:  # sqrt(hidden) rounded to the compute dtype first, as HF
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        allowed, new_mask = _allowed_keys(t, attention_mask, segment_ids, cache, kv_len)
        index = None if cache is None else cache.index
        masks = (allowed, _within_window(allowed, index, cfg.sliding_window) if sliding else None)
        x, new_k, new_v = self._run_layers(x, self._layer_step(ropes, masks, index, kv_len, t), cache)
        new_cache = None if cache is None else KVCache(k=new_k, v=new_v, mask=new_mask, index=index + t)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None].astype(jnp.int32), axis=1, mode="clip")
        return self._logits(self.norm(x), head), new_cache

    def _layer_step(self, ropes: tuple, masks: tuple, index: jax.Array | None, kv_len: int | None, t: int):
        """``layer(h, params, store, local)``: one layer on its parameter state (rematerialised if ``remat``).

        ``store`` is None (no cache) or (keys, values, i): this layer's cache arrays (see KVCache)
        with i=None, or the stacked arrays with this layer's index i. ``local``: whether the layer slides
        (a Python bool, or a traced one under the layer scan), picking from the (global, local) ``ropes``
        and ``masks``. Returns the new hidden state and the store's arrays with this chunk written in place
        at slot ``index``.
        """
        graphdef = nnx.graphdef(self.layers if self.scan_layers else self.layers[0])

        def layer(h, params, store, local):
            blk = nnx.merge(graphdef, params)
            rope, allowed = _pick(ropes, local), _pick(masks, local)
            q, k, v = blk.attn.project(blk.attn_norm(h), rope)
            k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B, KV, D, T], [B, KV, T, D]
            out = None
            if store is not None:
                ks, vs, i = store
                if i is None:
                    ks = _write(ks, k.astype(ks.dtype), index, lambda j: (0, 0, 0, j))
                    vs = _write(vs, v.astype(vs.dtype), index, lambda j: (0, 0, j, 0))
                    keys, values = ks, vs
                else:
                    ks = _write(ks, k[None].astype(ks.dtype), index, lambda j: (i, 0, 0, 0, j), row_axis=1)
                    vs = _write(vs, v[None].astype(vs.dtype), index, lambda j: (i, 0, 0, j, 0), row_axis=1)
                    keys = jax.lax.dynamic_index_in_dim(ks, i, keepdims=False)
                    values = jax.lax.dynamic_index_in_dim(vs, i, keepdims=False)
                out = (ks, vs)
                if kv_len == t:  # index is 0: the chunk is all there is to attend to, as just computed
                    k, v = k.astype(ks.dtype), v.astype(vs.dtype)
                elif kv_len is not None:
                    k, v = keys[..., :kv_len], values[:, :, :kv_len]
                else:
                    k, v = keys, values
            # Without a cache, or a chunk written into an empty one (kv_len == t), the keys are the chunk's own.
            causal = store is None or kv_len == t
            h = h + blk.attn_out(blk.attn.attend(q, k, v, allowed, causal=causal))
            h = h + blk.mlp_residual(h)
            return constrain(h, ("batch", "length", "embed")), out

        if not self.remat:
            return layer
        policy = _remat_policy(self.remat)
        static = jax.checkpoint(layer, policy=policy, static_argnums=(3,))
        traced = jax.checkpoint(layer, policy=policy)
        return lambda h, params, store, local: (static if isinstance(local, bool) else traced)(h, params, store,
                                                                                                local)

    def _run_layers(self, x: jax.Array, layer, cache: KVCache | None):
        """All layers over x: (x, new keys, new values); the keys and values are None without a cache."""
        cfg = self.cfg
        new_k = new_v = None
        kinds = cfg.sliding_layers
        # Under the scan the layer kind is data (a bool per layer), unless all layers are of one kind.
        flags, same = jnp.asarray(kinds), (kinds[0] if len(set(kinds)) == 1 else None)
        if self.scan_layers and cache is None:
            x, _ = jax.lax.scan(lambda h, xs: layer(h, xs[0], None, xs[1] if same is None else same), x,
                                (nnx.state(self.layers), flags))
        elif self.scan_layers:
            # The cache rides in the scan carry, so each layer's chunk is written in place. A per-layer
            # cache is stacked for the scan and split again after: correct, not free.
            ks, vs = (cache.k, cache.v) if cache.stacked else (jnp.stack(cache.k), jnp.stack(cache.v))

            def body(carry, xs):
                h, ks, vs = carry
                h, (ks, vs) = layer(h, xs[0], (ks, vs, xs[1]), xs[2] if same is None else same)
                return (h, ks, vs), None

            (x, new_k, new_v), _ = jax.lax.scan(body, (x, ks, vs),
                                                (nnx.state(self.layers), jnp.arange(cfg.num_layers), flags))
            if not cache.stacked:
                new_k, new_v = tuple(new_k), tuple(new_v)
        elif cache is None:
            for blk, local in zip(self.layers, kinds):
                x, _ = layer(x, nnx.state(blk), None, local)
        elif cache.stacked:
            new_k, new_v = cache.k, cache.v
            for i, blk in enumerate(self.layers):
                x, (new_k, new_v) = layer(x, nnx.state(blk), (new_k, new_v, i), kinds[i])
        else:
            new_k, new_v = [], []
            for i, blk in enumerate(self.layers):
                x, (k, v) = layer(x, nnx.state(blk), (*cache.layer(i), None), kinds[i])
                new_k.append(k)
                new_v.append(v)
            new_k, new_v = tuple(new_k), tuple(new_v)
        return x, new_k, new_v

    def _logits(self, x: jax.Array, head: jax.Array | None) -> jax.Array:
        """Float32 logits [B, T, V] of the final-normed hidden states ``x`` (see ``decode_head`` for ``head``)."""
        cfg = self.cfg
        t = x.shape[1]
        acc = jnp.promote_types(self.dtype, jnp.float32)
        emb = self.embed.embedding[...]
        # One 2-D matmul over the flattened rows, as Dense: XLA:CPU runs its backward faster than the batched
        # einsum's (bench/train_step.py model: the head's weight gradient 19 -> 9-11 ms).
        rows = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        packed = t == 1 and head is not None and head.ndim == 3
        if t == 1 and not packed and xla_options.decode_head_lhs_transposed():
            rows = jax.lax.optimization_barrier(rows.T).T  # see xla_options: the decode step's head GEMM on Eigen
        if packed:  # blocks of the vocabulary, each a multiply-reduce over E (see xla_options)
            blocks = jnp.sum(head.astype(acc)[None] * rows.astype(acc)[:, None, :, None], axis=2)  # [B, V', L]
            logits = blocks.reshape(rows.shape[0], -1)[:, :cfg.vocab_size]
        elif head is not None and t == 1:
            logits = jnp.matmul(rows, head.astype(self.dtype), preferred_element_type=acc)
        elif self.lm_head is None:
            logits = jax.lax.dot_general(rows, emb.astype(self.dtype), (((1,), (1,)), ((), ())),
                                         preferred_element_type=acc)
        else:
            logits = jnp.matmul(rows, self.lm_head.kernel[...].astype(self.dtype), preferred_element_type=acc)
        logits = logits.reshape(*x.shape[:-1], logits.shape[-1])
        logits = softcap(logits.astype(jnp.float32), cfg.final_logit_softcapping)
        return constrain(logits, ("batch", "length", "vocab"))


def _pick(pair: tuple, local):
    """pair[1] on a sliding layer, else pair[0] (pair[1] None: the same for both); ``local`` a Python bool or,
    under the layer scan, a traced one (then both are computed and selected)."""
    if pair[1] is None:
        return pair[0]
    if isinstance(local, bool):
        return pair[1] if local else pair[0]
    return jax.tree.map(lambda a, b: jnp.where(local, a, b), pair[1], pair[0])


def _write(buf: jax.Array, chunk: jax.Array, index: jax.Array, starts, row_axis: int = 0) -> jax.Array:
    """``chunk`` written into ``buf`` at ``starts(index)``; with a per-row index ([B]) each row (axis
    ``row_axis`` of both) at its own slot."""
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(buf, chunk, starts(index))

    def row(b, c, j):
        start = starts(j)
        return jax.lax.dynamic_update_slice(b, c, start[:row_axis] + start[row_axis + 1:])

    return jax.vmap(row, in_axes=(row_axis, row_axis, 0), out_axes=row_axis)(buf, chunk, index)


def _within_window(allowed: jax.Array, index: jax.Array | None, window: int) -> jax.Array:
    """``allowed`` [B, T, S] narrowed to a sliding window: query slot i sees key slot j iff i - j < window.

    Slots, not positions: a left-padded row's tokens sit in consecutive slots, so the slot distance is the
    position distance (transformers' sliding masks count the same way).
    """
    t, s = allowed.shape[1:]
    index = jnp.zeros((1,), jnp.int32) if index is None else jnp.reshape(index, (-1,))
    query = jnp.arange(t)[None, :] + index[:, None]  # [B or 1, T]
    return allowed & (query[:, :, None] - jnp.arange(s)[None, None, :] < window)


def _allowed_keys(t: int, attention_mask: jax.Array, segment_ids: jax.Array | None, cache: KVCache | None,
                  kv_len: int | None) -> tuple[jax.Array, jax.Array | None]:
    """bool[B, T, S]: which key slot each query may attend to; and the cache's new mask (None without one)."""
    if cache is None:
        allowed = jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask[:, None, :]  # [B, T, T]
        if segment_ids is not None:
            allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
        return allowed, None
    if segment_ids is not None:
        raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
    # Each layer writes the chunk into its cache slots first and then attends over the whole
    # cache: query slot index+i sees slot j iff j <= index+i and a real token sits there.
    index, s = cache.index, cache.mask.shape[1]
    if kv_len is not None and not t <= kv_len <= s:
        raise ValueError(f"kv_len={kv_len} must lie in [T, cache length] = [{t}, {s}]")
    if kv_len is not None and index.ndim:
        raise ValueError("kv_len needs one cache index for all rows, got a per-row index")
    s = s if kv_len is None else kv_len
    new_mask = _write(cache.mask, attention_mask, index, lambda j: (0, j))
    query = jnp.reshape(index, (-1,))[:, None] + jnp.arange(t)[None, :]  # [B or 1, T]
    slots = jnp.arange(s)[None, None, :] <= query[:, :, None]  # [B or 1, T, S]
    return slots & new_mask[:, None, :s], new_mask  # [B, T, S]
