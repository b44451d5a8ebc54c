"""The engine's compiled programs over its slot state: an empty state, prompts prefilled into slots, and a
chunk of decode steps.

The state is a dict of per-slot arrays (slot = dim 0, or dim 1 of a scanned model's stacked cache):

* ``cache``: the model's KV cache for every slot (``KVCache`` with one index per slot: each slot writes at its
  own point of its own sequence), full length ``S`` = longest prompt bucket + generation bucket;
* ``tok`` / ``pos``: the token each slot feeds next and its position; ``count``: tokens the slot's row has
  emitted; ``limit``: its max_new_tokens; ``done``: finished or idle; ``keys``: its PRNG key data;
* with a thinking budget, ``thinking.ThinkingBudget.fields``.

A prefill call takes every newly placed prompt of one bucket (left-padded, explicit positions: each row as if
alone). Inside one program it runs them through the model ``width`` at a time into a small cache, and copies
each prompt's rows into the slots that take it (a prompt with n samples fills n slots from one prefill). A
decode chunk runs up to K steps in a ``while_loop`` and stops early once enough slots are done for a refill to be
worth it (``want_done``): the host reads the emitted tokens once per chunk.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from medkr_jax.models.decoder.model import KVCache, init_cache
from medkr_jax.sampling import thinking
from medkr_jax.sampling.ops import sample_next, token_logprob


@dataclasses.dataclass(frozen=True)
class Shape:
    """What one engine state and its programs are specialised on."""

    slots: int
    length: int                 # cache slots per row (S)
    stacked: bool               # the model's layers are scanned: one stacked cache array
    cache_dtype: Any
    budget: thinking.ThinkingBudget | None = None


def state_shardings(placement, shape: Shape, cfg: Any) -> Any:
    """Shardings of the state's arrays (None without a mesh): slots over the batch axes, KV heads over
    "tensor" (``Placement.cache_spec``)."""
    if placement.mesh is None:
        return None
    abstract = jax.eval_shape(lambda: empty_state(cfg, shape))
    cache = abstract["cache"]
    spec = jax.sharding.NamedSharding(placement.mesh, placement.cache_spec(5 if shape.stacked else 4))
    out = jax.tree.map(lambda x: placement.rows(x.ndim), abstract)
    out["cache"] = KVCache(k=jax.tree.map(lambda _: spec, cache.k), v=jax.tree.map(lambda _: spec, cache.v),
                           mask=placement.rows(2), index=placement.rows(1))
    return out


def empty_state(cfg: Any, shape: Shape) -> dict:
    """Every slot idle (done) with an empty cache."""
    b = shape.slots
    cache = init_cache(cfg, b, shape.length, shape.cache_dtype, stacked=shape.stacked)
    cache = dataclasses.replace(cache, index=jnp.zeros((b,), jnp.int32))
    zeros = jnp.zeros((b,), jnp.int32)
    state = {"cache": cache, "tok": zeros, "pos": zeros, "count": zeros, "limit": zeros,
             "done": jnp.ones((b,), bool), "keys": jnp.zeros((b, 2), jnp.uint32)}
    if shape.budget is not None:
        state["thinking"] = jax.tree.map(jnp.asarray, shape.budget.fields(b))
    return state


def _copy_rows(bigs: list, smalls: list, slots: jax.Array, rows: jax.Array, lo: jax.Array, hi: jax.Array, *,
               row_axis: int) -> list:
    """Each of ``bigs`` with its row ``slots[j]`` given row ``rows[j]`` of the matching ``smalls`` array in its first
    cache slots, for j in [lo, hi): one small row copy per taking slot, whatever the number of slots (a gather of
    the small cache into every slot's rows costs as much as the slots, and XLA:CPU lowers it to a chain of selects
    over the small cache's rows)."""

    def one(j, arrays):
        out = []
        for big, small in zip(arrays, smalls):
            row = jax.lax.dynamic_slice_in_dim(small, rows[j], 1, axis=row_axis).astype(big.dtype)
            at = [jnp.int32(0)] * big.ndim
            at[row_axis] = slots[j]
            out.append(jax.lax.dynamic_update_slice(big, row, at))
        return out

    return jax.lax.fori_loop(lo, hi, one, list(bigs))


def prefill(graphdef, shape: Shape, prompt_len: int, width: int):
    """``(params, state, tokens [P, L], positions, mask, src [B], new, calls) -> state``: prompts left-padded to
    ``prompt_len`` into the slots with ``src >= 0`` (slot b takes prompt ``src[b]``, a row of ``tokens``); ``new``
    holds the taking slots' keys, limits (and thinking fields). The model runs ``calls`` times (a runtime value)
    on ``width`` prompts at a time, rows [i * width, (i + 1) * width) on call i, inside one program: a refill of
    many slots is one host call however many prompts it takes."""

    def program(params, state, tokens, positions, mask, src, new, calls):
        model = nnx.merge(graphdef, params)
        big = state["cache"]
        take, src = src >= 0, jnp.maximum(src, 0)
        row_axis = 1 if shape.stacked else 0
        k, v = big.k, big.v
        if prompt_len > 1:
            # The taking slots ordered by the prompt they take: call i's prompts own one contiguous range of them.
            order = jnp.argsort(jnp.where(take, src, jnp.iinfo(jnp.int32).max), stable=True).astype(jnp.int32)
            by_prompt = jnp.where(take[order], src[order], jnp.iinfo(jnp.int32).max)
            leaves_k, tree_k = jax.tree.flatten(k)
            leaves_v, tree_v = jax.tree.flatten(v)
            n = len(leaves_k)

            def one_call(i, arrays):
                # The last prompt token is fed by the first decode step (its logits give the first new token).
                rows = lambda a: jax.lax.dynamic_slice_in_dim(a[:, :-1], i * width, width, axis=0)  # noqa: E731
                small = model.init_cache(width, prompt_len - 1, shape.cache_dtype)
                _, small = model(rows(tokens), rows(positions), attention_mask=rows(mask), cache=small,
                                 kv_len=prompt_len - 1)
                lo, hi = jnp.searchsorted(by_prompt, jnp.stack([i * width, (i + 1) * width])).astype(jnp.int32)
                smalls = jax.tree.leaves(small.k) + jax.tree.leaves(small.v)
                return _copy_rows(arrays, smalls, order, by_prompt - i * width, lo, hi, row_axis=row_axis)

            arrays = jax.lax.fori_loop(0, calls, one_call, leaves_k + leaves_v)
            k, v = jax.tree.unflatten(tree_k, arrays[:n]), jax.tree.unflatten(tree_v, arrays[n:])
        rows_mask = jnp.zeros_like(big.mask).at[:, :prompt_len - 1].set(jnp.take(mask[:, :-1], src, axis=0))
        cache = KVCache(k=k, v=v, mask=jnp.where(take[:, None], rows_mask, big.mask),
                        index=jnp.where(take, prompt_len - 1, big.index))

        def pick(fresh, old):
            return jnp.where(jnp.reshape(take, take.shape + (1,) * (old.ndim - 1)), fresh, old)

        fresh = {"tok": jnp.take(tokens[:, -1], src), "pos": jnp.take(positions[:, -1], src),
                 "count": jnp.zeros_like(state["count"]), "done": jnp.zeros_like(state["done"]), **new}
        out = {k: pick(fresh[k], state[k]) for k in state if k not in ("cache", "thinking")}
        if "thinking" in new:
            out["thinking"] = jax.tree.map(pick, new["thinking"], state["thinking"])
        return {**out, "cache": cache}

    return program


def decode(graphdef, shape: Shape, *, steps: int, pad_id: int, stop_ids: tuple[int, ...], greedy: bool,
           filtered: bool):
    """``(params, head, state, temperature, top_k, top_p, want_done) -> (state, tokens [B, K], logprobs [B, K],
    count [B], done [B], steps)``: up to K = ``steps`` decode steps, fewer once ``want_done`` slots are done
    (``steps``: how many ran). A slot's tokens of this chunk are the first ``count_after - count_before`` entries of
    its row."""
    stops = jnp.asarray(stop_ids, jnp.int32)
    b = shape.slots

    def program(params, head, state, temperature, top_k, top_p, want_done):
        ones = jnp.ones((b, 1), jnp.bool_)

        def cond(carry):
            step, st, _, _ = carry
            return (step < steps) & (jnp.sum(st["done"]) < want_done)

        def body(carry):
            step, st, out_tok, out_lp = carry
            logits, cache = nnx.merge(graphdef, params)(st["tok"][:, None], st["pos"][:, None],
                                                        attention_mask=ones, cache=st["cache"], head=head)
            logits = logits[:, -1].astype(jnp.float32)
            # A row's t-th token draws from fold_in(its key, t): the same draw in any slot, batch or chunk.
            keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(st["keys"]), st["count"])
            tok = sample_next(logits, keys, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                              filtered=filtered)
            live = ~st["done"]
            new = dict(st)
            if "thinking" in st:
                tok, th = thinking.step(shape.budget, st["thinking"], tok)
                new["thinking"] = thinking.keep(live, th, st["thinking"])
            lp = jnp.where(live, token_logprob(logits, tok), 0.0)
            tok = jnp.where(live, tok, pad_id)
            out_tok = jax.lax.dynamic_update_slice(out_tok, tok[:, None], (0, step))
            out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, step))
            count = st["count"] + live.astype(jnp.int32)
            new.update(cache=dataclasses.replace(cache, index=jnp.where(live, cache.index, st["cache"].index)),
                       tok=jnp.where(live, tok, st["tok"]), pos=st["pos"] + live.astype(jnp.int32), count=count,
                       done=st["done"] | jnp.isin(tok, stops) | (count >= st["limit"]))
            return step + 1, new, out_tok, out_lp

        carry = (jnp.int32(0), state, jnp.full((b, steps), pad_id, jnp.int32), jnp.zeros((b, steps), jnp.float32))
        ran, state, out_tok, out_lp = jax.lax.while_loop(cond, body, carry)
        return state, out_tok, out_lp, state["count"], state["done"], ran

    return program
