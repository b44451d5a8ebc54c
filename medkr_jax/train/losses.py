"""Pure loss functions: masked token cross-entropy (SFT) and the GRPO family of RL objectives, and the RL registries.

RL losses and advantage functions are found by name (`rl_loss(config.grpo.loss)`,
`advantage_fn(config.grpo.advantage)`); new ones register with `register_rl_loss` / `register_advantage`. A loss
name stands for a function plus its defaults (aggregation, clip bounds, advantage), named as TRL names them:

    name        ratio rho_it                 aggregation   eps_low / eps_high   advantage   paper
    grpo        token                        sequence      0.2 / 0.2            grpo        DeepSeekMath (TRL "grpo")
    bnpo        token                        token         0.2 / 0.2            grpo        TRL "bnpo"
    dapo        token                        token         0.2 / 0.28           grpo        DAPO (clip-higher)
    dr_grpo     token                        constant      0.2 / 0.2            dr_grpo     Dr. GRPO
    gspo        sequence                     sequence      3e-4 / 4e-4          grpo        GSPO
    gspo_token  sequence value, token grad   sequence      3e-4 / 4e-4          grpo        GSPO-token

The objective, per completion token t of row i (mask m_it):

    A_i      = (r_i - mean_g r) / (std_g r + eps)      advantage "grpo";  "dr_grpo": r_i - mean_g r (no std)
    rho_it   = exp(logp_it - logp_old_it)                                   ratio "token"
             = exp(sum_t m_it (logp_it - logp_old_it) / |y_i|) =: s_i      "sequence" (GSPO: (pi/pi_old)^(1/|y_i|))
             = sg(s_i) * exp(logp_it - sg(logp_it))                         "sequence_token": value s_i, gradient per
                                                                            token (GSPO-token)
    pg_it    = -min(rho_it * A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) * A_i)
    kl_it    = exp(ref_it - logp_it) - (ref_it - logp_it) - 1        (k3 estimator, >= 0)
    l_it     = pg_it + beta * kl_it
    loss     = token:    sum_it m_it l_it / sum_it m_it                           (DAPO; TRL "dapo" / "bnpo")
               sequence: mean over rows with a completion token of sum_t m_it l_it / sum_t m_it    (TRL "grpo")
               constant: sum_it m_it l_it / (rows with a completion token * max_len)     (Dr. GRPO; TRL "dr_grpo")

Rows without a completion token (mask all 0: a group that dynamic sampling left out) count in no denominator.
Differences from TRL: "bnpo" and "dapo" normalise alike here, by the completion tokens of the whole step's batch
(the trainer weights micro-batches by their normaliser), which is TRL's "dapo"; TRL's "bnpo" normalises each
local micro-batch. TRL's "grpo" and "dr_grpo" divide by every row, empty ones included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

AGGREGATIONS = ("token", "sequence", "constant")
RATIO_LEVELS = ("token", "sequence", "sequence_token")
LossOutput = tuple[jax.Array, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class RLLoss:
    """A registered RL loss: its function and the defaults its name stands for (module docstring's table).

    fn(logps, old_logps, advantages, mask, *, ref_logps, beta, epsilon_low, epsilon_high, aggregation, max_len)
    -> (loss, metrics). Calling an RLLoss calls fn with these defaults unless the call names others.
    """

    fn: Callable[..., LossOutput]
    aggregation: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    advantage: str = "grpo"

    def __call__(self, logps, old_logps, advantages, mask, **options) -> LossOutput:
        defaults = {"aggregation": self.aggregation, "epsilon_low": self.epsilon_low,
                    "epsilon_high": self.epsilon_high}
        return self.fn(logps, old_logps, advantages, mask, **{**defaults, **options})


RL_LOSSES: dict[str, RLLoss] = {}
# name -> fn(rewards [N * G], group_size) -> advantages [N * G] (NumPy in, NumPy out; jax in, jax out)
ADVANTAGES: dict[str, Callable[..., Any]] = {}


def register_rl_loss(name: str, **defaults: Any) -> Callable[[Callable], Callable]:
    """Decorator: make an RL loss function selectable as config.grpo.loss=`name`, with `defaults` (RLLoss fields:
    aggregation, epsilon_low, epsilon_high, advantage) that the config keys left unset take."""
    def add(fn: Callable) -> Callable:
        RL_LOSSES[name] = RLLoss(fn, **defaults)
        return fn
    return add


def register_advantage(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make an advantage function selectable as config.grpo.advantage=`name`."""
    def add(fn: Callable) -> Callable:
        ADVANTAGES[name] = fn
        return fn
    return add


def _registered(table: dict[str, Any], name: str, key: str) -> Any:
    if name not in table:
        raise ValueError(f"config.grpo.{key}: unknown {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def rl_loss(name: str) -> RLLoss:
    """The RL loss registered as `name` (ValueError listing the valid names otherwise)."""
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


def nonempty_rows(mask: jax.Array) -> jax.Array:
    """Rows [B, T] with at least one completion token (the "sequence" and "constant" normalisers count these)."""
    return (mask.sum(-1) > 0).sum().astype(jnp.float32)


def aggregation_weight(mask: jax.Array, aggregation: str) -> jax.Array:
    """The count an aggregation divides by: completion tokens ("token") or non-empty rows. The trainer weights
    micro-batches by it, so accumulated micro-batches give the loss of one big batch."""
    return mask.sum() if aggregation == "token" else nonempty_rows(mask)


def aggregate(x: jax.Array, mask: jax.Array, aggregation: str, max_len: int | None = None) -> jax.Array:
    """Per-token values [B, T] -> the scalar loss by `aggregation` (module docstring); max_len defaults to T."""
    mask = mask.astype(jnp.float32)
    if aggregation == "token":
        return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    rows = jnp.maximum(nonempty_rows(mask), 1.0)
    if aggregation == "sequence":
        return ((x * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).sum() / rows
    return (x * mask).sum() / (rows * (max_len or x.shape[1]))


def importance_log_ratio(logps: jax.Array, old_logps: jax.Array, mask: jax.Array, level: str) -> jax.Array:
    """log rho_it [B, T] at ratio level "token", "sequence" (GSPO's length-normalised s_i, the same for every token
    of a row) or "sequence_token" (s_i's value with a per-token gradient path); see the module docstring."""
    log_r = logps - old_logps
    if level == "token":
        return log_r
    seq = (log_r * mask).sum(-1, keepdims=True) / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
    seq = jnp.broadcast_to(seq, log_r.shape)
    if level == "sequence":
        return seq
    return jax.lax.stop_gradient(seq) + logps - jax.lax.stop_gradient(logps)


@register_rl_loss("grpo", aggregation="sequence")
@register_rl_loss("bnpo", aggregation="token")
@register_rl_loss("dapo", aggregation="token", epsilon_high=0.28)
@register_rl_loss("dr_grpo", aggregation="constant", advantage="dr_grpo")
def grpo_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, mask: jax.Array, *,
              ref_logps: jax.Array | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, aggregation: str = "token", max_len: int | None = None,
              ratio_level: str = "token") -> LossOutput:
    """The clipped objective (module docstring) on per-token log-probs [B, T]; returns (loss, metrics).

    `advantages` is [B]; `mask` marks completion tokens. `max_len` is the "constant" normaliser (default T).
    Metrics: kl (mean k3 over tokens), clip_fraction (tokens where the clipped term is the active one),
    ratio_mean, pg_loss.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"config.grpo.loss_aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"grpo_loss: ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("grpo_loss: beta != 0 needs ref_logps (the frozen reference model's log-probs)")
    mask = mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)[:, None]
    ratio = jnp.exp(importance_log_ratio(logps, old_logps, mask, ratio_level))
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    per_token = pg
    kl = jnp.zeros_like(logps)
    if ref_logps is not None:
        d = ref_logps - logps
        kl = jnp.exp(d) - d - 1.0
        if beta != 0.0:
            per_token = per_token + beta * kl

    n = jnp.maximum(mask.sum(), 1.0)
    is_clipped = ((ratio < 1.0 - epsilon_low) & (adv < 0)) | ((ratio > 1.0 + epsilon_high) & (adv > 0))
    metrics = {
        "kl": jax.lax.stop_gradient((kl * mask).sum() / n),
        "clip_fraction": (is_clipped * mask).sum() / n,
        "ratio_mean": jax.lax.stop_gradient((ratio * mask).sum() / n),
        "pg_loss": jax.lax.stop_gradient(aggregate(pg, mask, aggregation, max_len)),
    }
    return aggregate(per_token, mask, aggregation, max_len), metrics


@register_rl_loss("gspo", aggregation="sequence", epsilon_low=3e-4, epsilon_high=4e-4)
def gspo_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, mask: jax.Array,
              **options: Any) -> LossOutput:
    """GSPO: the clipped objective with one importance ratio per sequence, s_i = (pi / pi_old)^(1/|y_i|), clipped
    per sequence (its clip bounds are GSPO paper's 3e-4 / 4e-4: s_i is a geometric mean, close to 1)."""
    return grpo_loss(logps, old_logps, advantages, mask, ratio_level="sequence", **options)


@register_rl_loss("gspo_token", aggregation="sequence", epsilon_low=3e-4, epsilon_high=4e-4)
def gspo_token_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, mask: jax.Array,
                    **options: Any) -> LossOutput:
    """GSPO-token: the ratio's value is s_i, its gradient flows per token (for token-level advantages; with one
    advantage per sequence, as here, its loss and gradient equal GSPO's)."""
    return grpo_loss(logps, old_logps, advantages, mask, ratio_level="sequence_token", **options)
