"""GRPO's training rows: a rollout's completions laid out for the update, and scored.

`rollout_batch` lays the rows out either as whole rows (prompt + completion, the LM head at the completion
positions only) or with shared prompts (each group's prompt once, its completions on the prompt's KV cache);
`completion_logits` / `completion_logps` score either layout with the same log-probs and gradients
(train/grpo.py builds the layout a step can use and runs the update on it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medkr_jax import xla_options
from medkr_jax.train.losses import token_logprobs

WIDTH_MULTIPLE = 16


def round_up(n: int) -> int:
    """n rounded up to a multiple of WIDTH_MULTIPLE (a few compiled shapes)."""
    return -(-n // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def rollout_batch(prompts: Sequence[Sequence[int]], completions: np.ndarray, lengths: np.ndarray,
                  prompt_index: np.ndarray, *, width: int | None, pad_id: int, completion_width: int | None = None,
                  sampler_logprobs: np.ndarray | None = None, prompt_width: int | None = None) -> dict[str, np.ndarray]:
    """The model inputs of a rollout's rows and their completions' targets.

    Everything scored is in completion coordinates, [R, K] with K = `completion_width` (at most `width`):
    `targets` the row's k-th generated token, `completion_mask` 1 on the row's generated tokens (stop token
    included), `sampler_logps` the sampler's log-probs of them when given. The model inputs, either:

    * rows (``prompt_width`` None): tokens/positions/attention_mask [R, width], prompt + completion right-padded,
      and `completion_at` [R, K], the row position whose logits predict the k-th generated token (the prompt's last
      position for k = 0; positions past the row's end are clipped and masked). Only these K positions per row go
      through the LM head (``Decoder(..., logits_at=)``), not the prompt's.
    * shared prompts (``prompt_width`` given, `completion_logits`): prompt_tokens/prompt_positions/prompt_mask
      [R, prompt_width], the row's prompt left-padded, and completion_inputs/completion_positions/
      completion_attention [R, K - 1], the generated tokens fed back (token k predicts token k + 1), at positions
      len(prompt) + k. The rows of a group repeat their prompt; the model runs it once per group.
    """
    r = len(prompt_index)
    k = completion_width if width is None else min(width, completion_width or width)
    out = {"targets": np.full((r, k), pad_id, np.int32), "completion_mask": np.zeros((r, k), np.float32)}
    if prompt_width is None:
        out.update(tokens=np.full((r, width), pad_id, np.int32), positions=np.zeros((r, width), np.int32),
                   attention_mask=np.zeros((r, width), bool), completion_at=np.zeros((r, k), np.int32))
    else:
        out.update(prompt_tokens=np.full((r, prompt_width), pad_id, np.int32),
                   prompt_positions=np.zeros((r, prompt_width), np.int32),
                   prompt_mask=np.zeros((r, prompt_width), bool),
                   completion_inputs=np.full((r, k - 1), pad_id, np.int32),
                   completion_positions=np.zeros((r, k - 1), np.int32),
                   completion_attention=np.zeros((r, k - 1), bool))
    if sampler_logprobs is not None:
        out["sampler_logps"] = np.zeros((r, k), np.float32)
    for i in range(r):
        p = list(prompts[prompt_index[i]])
        n = int(lengths[i])
        if n > k:
            raise ValueError(f"a completion of {n} tokens does not fit the completion width {k}")
        if prompt_width is None:
            full = p + completions[i, :n].tolist()
            m = len(full) - 1
            if m > width:
                raise ValueError(f"rollout row of {m} tokens does not fit the training width {width}")
            out["tokens"][i, :m] = full[:-1]
            out["positions"][i, :m] = np.arange(m)
            out["attention_mask"][i, :m] = True
            out["completion_at"][i] = np.minimum(len(p) - 1 + np.arange(k), width - 1)
        else:
            if len(p) > prompt_width:
                raise ValueError(f"a prompt of {len(p)} tokens does not fit the prompt width {prompt_width}")
            out["prompt_tokens"][i, prompt_width - len(p):] = p
            out["prompt_positions"][i, prompt_width - len(p):] = np.arange(len(p))
            out["prompt_mask"][i, prompt_width - len(p):] = True
            fed = min(n, k - 1)
            out["completion_inputs"][i, :fed] = completions[i, :fed]
            out["completion_positions"][i] = len(p) + np.arange(k - 1)
            out["completion_attention"][i, :fed] = True
        out["targets"][i, :n] = completions[i, :n]
        out["completion_mask"][i, :n] = 1.0
        if sampler_logprobs is not None:
            out["sampler_logps"][i, :n] = sampler_logprobs[i, :n]
    return out


ROW_INPUTS = ("tokens", "positions", "attention_mask", "completion_at")
SHARED_INPUTS = ("prompt_tokens", "prompt_positions", "prompt_mask", "completion_inputs", "completion_positions",
                 "completion_attention")


def forward_positions(batch: dict, group: int) -> int:
    """Token positions one forward pass over ``batch`` runs: rows x width, or with shared prompts each group's
    prompt once plus every row's fed-back completion."""
    if "prompt_tokens" not in batch:
        return int(np.prod(batch["tokens"].shape))
    rows, width = batch["prompt_tokens"].shape
    return rows // group * width + rows * batch["completion_inputs"].shape[1]


def completion_logits(model: nnx.Module, batch: dict, group: int) -> jax.Array:
    """Float32 logits [R, K, V] predicting each row's K completion tokens (``rollout_batch``'s targets).

    With shared prompts the rows come in groups of ``group`` consecutive rows with one prompt: the model runs each
    group's prompt once into a KV cache (the last prompt position's logits predict the first generated token),
    the cache is repeated over the group's rows, and the completions run on it as one chunk. The same log-probs
    and gradients as running every row's prompt + completion (the keys and values of a prompt do not depend on
    what follows it), for G x prompt + completion positions a group instead of G x (prompt + completion).
    """
    if "prompt_tokens" not in batch:
        logits, _ = model(batch["tokens"], batch["positions"], attention_mask=batch["attention_mask"],
                          logits_at=batch["completion_at"])
        return logits
    prompts = [batch[k][::group] for k in ("prompt_tokens", "prompt_positions", "prompt_mask")]
    n, width = prompts[0].shape
    fed = batch["completion_inputs"].shape[1]
    cache = model.init_cache(n, width + fed, model.dtype)
    first, cache = model(prompts[0], prompts[1], attention_mask=prompts[2], cache=cache, kv_len=width,
                         logits_at=jnp.full((n, 1), width - 1, jnp.int32))
    first = jnp.repeat(first, group, axis=0)
    if fed == 0:
        return first
    axis = 1 if cache.stacked else 0  # the rows' axis of the keys and values
    rows = lambda a: jnp.repeat(a, group, axis=axis)  # noqa: E731
    cache = dataclasses.replace(cache, k=jax.tree.map(rows, cache.k), v=jax.tree.map(rows, cache.v),
                                mask=jnp.repeat(cache.mask, group, axis=0))
    rest, _ = model(batch["completion_inputs"], batch["completion_positions"],
                    attention_mask=batch["completion_attention"], cache=cache)
    return jnp.concatenate([first, rest], axis=1)


@xla_options.jit_dense(static_argnums=(0, 3))
def completion_logps(graphdef, state, inputs: dict, group: int):
    """Log-probs [R, K] of the rows' completion tokens (``inputs``: the model inputs and targets)."""
    return token_logprobs(completion_logits(nnx.merge(graphdef, state), inputs, group), inputs["targets"])
