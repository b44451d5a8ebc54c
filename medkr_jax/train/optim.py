"""The optimizer of every training job: AdamW with warmup + schedule, global-norm clipping, weight decay by name.

`OptimizerSettings` holds config.optimizer as plain values (the job builds it); its defaults are what a missing
key means. Gradient accumulation (`grad_accum`) is not part of the transformation: `trainer.Trainer` scans over
micro-batches inside one jitted step, so one optimizer update = one loop step.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from medkr_jax.train.checkpoint import key_name


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """config.optimizer as plain values (see medkr_jax.config for what each key means)."""

    learning_rate: float = 1e-4
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0 = no clipping
    grad_accum: int = 1
    no_decay_patterns: Sequence[str] = ()  # empty = NO_DECAY_PATTERNS


def make_schedule(opt: OptimizerSettings, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule: linear warmup then cosine / linear / constant."""
    lr = float(opt.learning_rate)
    warmup = int(opt.warmup_steps)
    kind = str(opt.schedule)
    end = lr * float(opt.min_lr_ratio)
    total = max(int(total_steps), warmup + 1)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, total, end)
    if kind == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, end, total - warmup)], [warmup])
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                    [warmup])
    raise ValueError(f"config.optimizer.schedule: expected 'cosine', 'linear' or 'constant', got {kind!r}")


# Parameters whose lower-cased dotted path matches one of these get no weight decay: biases and
# LayerNorm/RMSNorm parameters, the patterns of transformers.Trainer.get_decay_parameter_names (embeddings and
# kernels are decayed, as there). By name, not rank: with stacked layers (scan_layers) a norm scale is
# [layers, hidden], i.e. rank 2.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def param_path(path: Sequence[Any]) -> str:
    """The dotted name of a parameter from its pytree key path (NNX's trailing `.value` dropped)."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return ".".join(key_name(k) for k in keys)


def make_decay_mask(patterns: Sequence[str] = NO_DECAY_PATTERNS) -> Callable[[Any], Any]:
    """An optax `mask` function: True (decay) for each parameter whose dotted path matches none of `patterns`
    (regular expressions, searched in the lower-cased path)."""
    compiled = [re.compile(p) for p in patterns]

    def mask(params: Any) -> Any:
        def decay(path, _):
            name = param_path(path).lower()
            return not any(p.search(name) for p in compiled)
        return jax.tree_util.tree_map_with_path(decay, params)

    return mask


def make_optimizer(opt: OptimizerSettings, total_steps: int) -> optax.GradientTransformation:
    """AdamW with warmup + schedule and global-norm clipping.

    Weight decay skips biases and norm parameters by name (`NO_DECAY_PATTERNS`, or opt.no_decay_patterns),
    whatever the layout of the layers.
    """
    schedule = make_schedule(opt, total_steps)
    parts = []
    clip = float(opt.grad_clip or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(
        schedule,
        b1=float(opt.b1),
        b2=float(opt.b2),
        eps=float(opt.eps),
        weight_decay=float(opt.weight_decay),
        mask=make_decay_mask(tuple(opt.no_decay_patterns or NO_DECAY_PATTERNS)),
    ))
    return optax.chain(*parts)
