"""What the static sampler and the continuous-batching engine share: the output rows, argument checks, the
per-row PRNG keys, the mesh placement of rows and KV caches, ahead-of-time compilation, the LM head laid out
for decode steps."""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medkr_jax import xla_options
from medkr_jax.data.pipeline import bucket_length
from medkr_jax.parallel import logical_rules, sharding_context

DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048)


DEFAULT_GEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass
class SampleOutput:
    """Generated rows; row r continues prompt ``prompt_index[r]`` (the n rows of a prompt are contiguous).

    tokens: int32[R, G], pad id after a row's stop. logprobs: float32[R, G], 0 after a row's stop.
    lengths: int32[R], generated tokens including the stop token.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    prompt_index: np.ndarray

    def row_tokens(self, r: int) -> list[int]:
        """The generated tokens of row r (stop token included when there was one)."""
        return self.tokens[r, : self.lengths[r]].tolist()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def signature(tree: Any) -> tuple:
    """(shape, dtype, sharding) of every array of a pytree: what a compiled program is specialised on."""
    return tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in jax.tree.leaves(tree))


def checked_prompts(prompts: Sequence[Sequence[int]], *, max_new_tokens: Any, n: int, temperature: float,
                    top_k: int, top_p: float) -> list[list[int]]:
    """The prompts as lists of ints, after checking the generation arguments (one ValueError naming the bad one).
    ``max_new_tokens``: an int, or one per prompt."""
    limits = np.atleast_1d(np.asarray(max_new_tokens))
    if limits.ndim != 1 or limits.size == 0 or limits.min() < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (one int, or one per prompt), got {max_new_tokens}")
    if limits.size > 1 and limits.size != len(prompts):
        raise ValueError(f"{limits.size} max_new_tokens for {len(prompts)} prompts")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature < 0 or not (0.0 < top_p <= 1.0) or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, "
                         f"{top_k}")
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    return prompts


def row_keys(seed: int, prompt_keys: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
    """Key data [R, 2] of fold_in(fold_in(key(seed), prompt_key), sample_index) per row: what row (p, j) draws
    from, whatever batch or slot it runs in."""
    pk = jax.numpy.asarray(np.mod(prompt_keys, 2**31).astype(np.uint32))
    si = jax.numpy.asarray(sample_index.astype(np.uint32))
    return np.asarray(_row_keys(jax.random.key(seed), pk, si))


@jax.jit
def _row_keys(base, prompt_keys, sample_index):
    """Jitted: run eagerly, this vmap took ~0.1 s on every generate call."""
    keys = jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(base, a), b))(prompt_keys, sample_index)
    return jax.random.key_data(keys)


def host(x: jax.Array) -> np.ndarray:
    """A replicated output as a host array (also on multi-process runs, where it is not fully addressable)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


class Placement:
    """Rows over the ("data", "fsdp") mesh axes (the "batch" logical rule), KV heads over "tensor" when they
    divide it; ahead-of-time compilation under the sharding rules. Without a mesh everything is local."""

    def __init__(self, cfg: Any, mesh: Mesh | None, rules: Any):
        self.cfg, self.mesh, self.rules = cfg, mesh, rules

    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes the rows are split over: the "batch" logical rule, axes of size 1 left out."""
        if self.mesh is None:
            return ()
        axis = dict(logical_rules(self.rules)).get("batch")
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        return tuple(a for a in axes if self.mesh.shape.get(a, 1) > 1)

    def divisor(self) -> int:
        """Row counts are rounded up to a multiple of this (the product of the batch axes)."""
        return 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in self.batch_axes())

    def rows(self, ndim: int) -> NamedSharding | None:
        """Dim 0 over the batch axes, the rest replicated (None without a mesh)."""
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, P(self.batch_axes() or None, *([None] * (ndim - 1))))

    def replicated(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, P())

    def put_rows(self, x: np.ndarray) -> jax.Array:
        """A host array placed with its rows (dim 0) over the batch axes."""
        if self.mesh is None:
            return jax.numpy.asarray(x)
        sharding = self.rows(x.ndim)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def cache_spec(self, ndim: int) -> P:
        """One layer's [B, KV, ...] cache array (ndim 4) or the stacked [L, B, KV, ...] one (ndim 5)."""
        tensor = self.mesh.shape.get("tensor", 1)
        heads = "tensor" if tensor > 1 and self.cfg.num_kv_heads % tensor == 0 else None
        spec = (self.batch_axes() or None, heads, None, None)
        return P(*(spec if ndim == 4 else (None, *spec)))

    def constrain_cache(self, arr: jax.Array) -> jax.Array:
        if self.mesh is None:
            return arr
        return jax.lax.with_sharding_constraint(arr, NamedSharding(self.mesh, self.cache_spec(arr.ndim)))

    def compile(self, jitted, *args):
        """``jitted`` compiled ahead of time for ``args``, under the sharding rules when there is a mesh."""
        if self.mesh is None:
            return jitted.lower(*args).compile()
        with sharding_context(self.mesh, self.rules):
            return jitted.lower(*args).compile()


class DecodeHead:
    """``model.decode_head(rows)`` (the LM head laid out for decode steps of that many rows, or None), remade only
    when the LM-head weights change.

    A full copy of the LM head, made outside the generation programs (inside, it would be redone on every
    call). jax arrays are immutable, so while the model holds the same weight array the copy is current (a
    training step replaces the array, and the next call lays out the new one). One copy is kept, the latest: a
    call with a row count of another layout (``xla_options.decode_head_layout``) replaces it. ``num_compiles``
    counts the programs that made a layout (one per model and layout).
    """

    def __init__(self, placement: Placement):
        self.placement = placement
        self._layouts: dict[Any, Any] = {}
        self._none: set = set()
        self._head: tuple[str | None, weakref.ref, jax.Array | None] | None = None  # the latest copy only

    @property
    def num_compiles(self) -> int:
        return len(self._layouts)

    def __call__(self, model: nnx.Module, graphdef, state, rows: int | None = None) -> jax.Array | None:
        """The layout for decode steps of ``rows`` rows (None: any number)."""
        if getattr(model, "decode_head", None) is None:
            return None
        layout = xla_options.decode_head_layout(rows)
        weights = model.head_weights()
        cached = self._head
        if cached is not None and cached[0] == layout and cached[1]() is weights:
            return cached[2]
        key = ("decode_head", layout, graphdef, signature(state))
        if key in self._none:
            return None
        make = self._layouts.get(key)
        if make is None:
            def lay_out(st):
                return nnx.merge(graphdef, st).decode_head(rows)

            if jax.eval_shape(lay_out, state) is None:  # the model's own weights serve: nothing to compile
                self._none.add(key)
                return None
            make = self._layouts[key] = self.placement.compile(jax.jit(lay_out), state)
        self._head = None  # the old copy goes before the new one is made
        head = make(state)
        self._head = (layout, weakref.ref(weights), head)
        return head


class SamplerBase:
    """What both generation paths share: the model config and mesh, pad / stop ids, prompt and generation buckets,
    the KV-cache dtype, the placement of rows and cache, the compiled-program table and the decode LM head."""

    def __init__(self, cfg: Any, *, mesh: Mesh | None, rules: Any, pad_id: int, stop_ids: Sequence[int],
                 prompt_buckets: Sequence[int], gen_buckets: Sequence[int], cache_dtype: Any):
        if not stop_ids:
            raise ValueError("Sampler needs at least one stop id (e.g. the tokenizer's EOS)")
        if min(prompt_buckets) < 1 or min(gen_buckets) < 1:
            raise ValueError(f"buckets must be positive, got {prompt_buckets} / {gen_buckets}")
        self.cfg, self.mesh, self.rules = cfg, mesh, rules
        self.pad_id = int(pad_id)
        self.stop_ids = tuple(int(s) for s in stop_ids)
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.gen_buckets = tuple(sorted(gen_buckets))
        self.cache_dtype = None if cache_dtype is None else jnp.dtype(cache_dtype)
        self.placement = Placement(cfg, mesh, rules)
        self._programs: dict[Any, Any] = {}
        self._head = DecodeHead(self.placement)

    def cache_dtype_for(self, model: nnx.Module) -> jnp.dtype:
        """The KV cache's dtype for ``model``: the sampler's ``cache_dtype``, or with None (the default) the
        model's compute dtype. Keys and values are computed in that dtype and cast to it again before attention,
        so a wider cache would hold the same values in more bytes (a bfloat16 model's float32 cache: twice the
        memory and bytes read per decode step, the same tokens and log-probs)."""
        if self.cache_dtype is not None:
            return self.cache_dtype
        return jnp.dtype(getattr(model, "dtype", jnp.float32))

    @property
    def num_compiles(self) -> int:
        """Programs compiled so far by this sampler (see its module docstring for which)."""
        return len(self._programs)

    @property
    def num_layout_compiles(self) -> int:
        """Programs compiled so far that lay out a model's LM head for decode steps (one per model)."""
        return self._head.num_compiles

    def prompt_bucket(self, length: int) -> int:
        """The padded prompt length a prompt of ``length`` tokens is prefilled at."""
        return bucket_length(length, self.prompt_buckets, past_top="grow")
