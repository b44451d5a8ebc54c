"""Pure loss functions: masked token cross-entropy (SFT) and the GRPO objective, and the RL registries.

RL loss functions and advantage functions are found by name (`rl_loss(config.grpo.loss)`,
`advantage_fn(config.grpo.advantage)`); new ones register with `register_rl_loss` / `register_advantage`.
Registered: loss "grpo" (`grpo_loss`); advantages "grpo" (group-normalised, scaled by the group std) and
"dr_grpo" (Dr. GRPO: r - mean, unscaled).

GRPO follows DeepSeekMath as implemented by TRL / tunix:

    A_i      = (r_i - mean_g r) / (std_g r + eps)        (std scaling optional: Dr. GRPO uses r_i - mean_g r)
    rho_it   = exp(logp_it - logp_old_it)
    pg_it    = -min(rho_it * A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) * A_i)
    kl_it    = exp(ref_it - logp_it) - (ref_it - logp_it) - 1        (k3 estimator, >= 0)
    l_it     = pg_it + beta * kl_it
    loss     = token:    sum_it m_it l_it / sum_it m_it
               sequence: mean_i (sum_t m_it l_it / sum_t m_it)
               constant: sum_it m_it l_it / (num_sequences * max_len)     (Dr. GRPO)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

AGGREGATIONS = ("token", "sequence", "constant")

# name -> fn(logps, old_logps, advantages, mask, *, ref_logps, beta, epsilon_low, epsilon_high, aggregation,
#            max_len) -> (loss, metrics)
RL_LOSSES: dict[str, Callable[..., tuple[jax.Array, dict[str, jax.Array]]]] = {}
# name -> fn(rewards [N * G], group_size) -> advantages [N * G] (NumPy in, NumPy out; jax in, jax out)
ADVANTAGES: dict[str, Callable[..., Any]] = {}


def register_rl_loss(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make an RL loss function selectable as config.grpo.loss=`name`."""
    def add(fn: Callable) -> Callable:
        RL_LOSSES[name] = fn
        return fn
    return add


def register_advantage(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make an advantage function selectable as config.grpo.advantage=`name`."""
    def add(fn: Callable) -> Callable:
        ADVANTAGES[name] = fn
        return fn
    return add


def _registered(table: dict[str, Callable], name: str, key: str) -> Callable:
    if name not in table:
        raise ValueError(f"config.grpo.{key}: unknown {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def rl_loss(name: str) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """The RL loss function registered as `name` (ValueError listing the valid names otherwise)."""
    return _registered(RL_LOSSES, name, "loss")


def advantage_fn(name: str) -> Callable[..., Any]:
    """The advantage function registered as `name` (ValueError listing the valid names otherwise)."""
    return _registered(ADVANTAGES, name, "advantage")


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log p(targets) under softmax(logits / temperature); logits [..., V], targets [...] int."""
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - logz


def token_entropy(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Entropy of softmax(logits / temperature) per position."""
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1)


def token_logprobs_and_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(targets), entropy) per position from one log-normaliser pass; no gradient flows into entropy.

    entropy = logz - sum_v p_v * logit_v, which reuses logz instead of a second log-softmax over the vocab.
    """
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    sg_logits, sg_logz = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(logz)
    probs = jnp.exp(sg_logits - sg_logz[..., None])
    entropy = sg_logz - (probs * sg_logits).sum(-1)
    return picked - logz, entropy


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean token cross-entropy over positions where mask is set; returns (loss, number of target tokens)."""
    mask = mask.astype(jnp.float32)
    nll = -token_logprobs(logits, targets)
    n = mask.sum()
    return (nll * mask).sum() / jnp.maximum(n, 1.0), n


@register_advantage("grpo")
def group_advantages(rewards: jax.Array, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> jax.Array:
    """Group-normalised advantages for rewards [N * G] (rows of a group contiguous) -> [N * G].

    std is the unbiased sample std of each group (as TRL). scale=False gives Dr. GRPO's r - mean.
    NumPy rewards are computed on the host with NumPy (no device round trip), jax arrays with jax.
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 generations per prompt to form a group, got {group_size}")
    xp = np if isinstance(rewards, np.ndarray) else jnp
    r = xp.asarray(rewards, xp.float32).reshape(-1, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale:
        centred = centred / (r.std(axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """Dr. GRPO's advantages: r - mean of the group, not divided by the group std."""
    return group_advantages(rewards, group_size, scale=False)


@register_rl_loss("grpo")
def grpo_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, mask: jax.Array, *,
              ref_logps: jax.Array | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, aggregation: str = "token", max_len: int | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO objective (module docstring) on per-token log-probs [B, T]; returns (loss, metrics).

    `advantages` is [B]; `mask` marks completion tokens. `max_len` is the "constant" normaliser (default T).
    Metrics: kl (mean k3 over tokens), clip_fraction (tokens where the clipped term is the active one),
    ratio_mean, pg_loss.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"config.grpo.loss_aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("grpo_loss: beta != 0 needs ref_logps (the frozen reference model's log-probs)")
    mask = mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)[:, None]
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    per_token = pg
    kl = jnp.zeros_like(logps)
    if ref_logps is not None:
        d = ref_logps - logps
        kl = jnp.exp(d) - d - 1.0
        if beta != 0.0:
            per_token = per_token + beta * kl

    def agg(x):
        if aggregation == "token":
            return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)
        if aggregation == "sequence":
            return ((x * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).mean()
        return (x * mask).sum() / (x.shape[0] * (max_len or x.shape[1]))

    n = jnp.maximum(mask.sum(), 1.0)
    is_clipped = ((ratio < 1.0 - epsilon_low) & (adv < 0)) | ((ratio > 1.0 + epsilon_high) & (adv > 0))
    metrics = {
        "kl": jax.lax.stop_gradient((kl * mask).sum() / n),
        "clip_fraction": (is_clipped * mask).sum() / n,
        "ratio_mean": jax.lax.stop_gradient((ratio * mask).sum() / n),
        "pg_loss": jax.lax.stop_gradient(agg(pg)),
    }
    return agg(per_token), metrics
