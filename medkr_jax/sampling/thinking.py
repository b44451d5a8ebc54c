"""Thinking budgets for reasoning models, applied inside the engine's decode loop (no host round trip).

A row is *thinking* between a start marker (``<think>``) and an end marker (``</think>``), token id sequences
(the job tokenizes the configured strings); a prompt that ends inside an open block (a chat template that opens
it) starts the row thinking. Per row, on device:

* budget: once a row has emitted ``budget`` tokens inside its block, the engine stops sampling and appends the
  end marker and then the answer cue (``cue``, e.g. "\\n\\nThe answer is"), one forced token per step, and
  lets the row go on sampling its answer from there (up to its max_new_tokens);
* budget forcing (s1, Muennighoff et al. 2025): when a row would end its block early (before the budget, or
  at any time without one), its end marker is replaced by ``wait`` ("Wait"), at most ``max_waits`` times per
  row; this needs a one-token end marker, since the model's marker is caught as it is sampled.

Forced tokens are emitted like sampled ones (their log-probability under the model is recorded) and are fed
back, so the KV cache always holds exactly the text the row shows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NOT_FORCING, CLOSING, WAITING = -1, 0, 1


@dataclasses.dataclass(frozen=True)
class ThinkingBudget:
    """Token ids of the markers and forced texts, and the limits (see the module docstring)."""

    budget: int
    start: tuple[int, ...]
    end: tuple[int, ...]
    cue: tuple[int, ...] = ()
    wait: tuple[int, ...] = ()
    max_waits: int = 0

    def __post_init__(self):
        for name in ("start", "end", "cue", "wait"):
            object.__setattr__(self, name, tuple(int(t) for t in getattr(self, name)))
        if not self.start or not self.end:
            raise ValueError("a thinking budget needs the start and end markers of the thinking block as "
                             f"non-empty token sequences, got {self.start} / {self.end}")
        if self.budget < 0 or self.max_waits < 0:
            raise ValueError(f"thinking budget and max_waits must be >= 0, got {self.budget}, {self.max_waits}")
        if self.max_waits and (len(self.end) != 1 or not self.wait):
            raise ValueError("budget forcing (max_waits > 0) needs a one-token end marker (it is caught as the "
                             f"model samples it) and a non-empty wait text; got end {self.end}, wait {self.wait}")

    @property
    def closing(self) -> tuple[int, ...]:
        """What a row that reaches its budget is made to write: the end marker, then the answer cue."""
        return self.end + self.cue

    @property
    def memory(self) -> int:
        """Last tokens kept per row to recognise a marker."""
        return max(len(self.start), len(self.end))

    def opens(self, prompt: Sequence[int]) -> bool:
        """Whether ``prompt`` ends inside an open thinking block (its last start marker after its last end)."""
        return _last(prompt, self.start) > _last(prompt, self.end)

    def prompt_fields(self, prompt: Sequence[int]) -> dict[str, np.ndarray]:
        """One row's starting values of the per-row fields (see ``fields``)."""
        m = self.memory
        hist = np.full((m,), -1, np.int32)
        tail = np.asarray(prompt[-m:], np.int32)
        hist[m - len(tail):] = tail
        return {"think": np.bool_(self.opens(prompt)), "used": np.int32(0), "waits": np.int32(0),
                "force": np.int32(NOT_FORCING), "at": np.int32(0), "hist": hist}

    def fields(self, rows: int) -> dict[str, np.ndarray]:
        """Per-row state: inside a block, tokens used in it, waits used, what is being forced (and how far), the
        last tokens (for marker matching)."""
        one = self.prompt_fields([])
        return {k: np.broadcast_to(v, (rows, *np.shape(v))).copy() for k, v in one.items()}


def _last(seq: Sequence[int], marker: Sequence[int]) -> int:
    """End position of the last occurrence of ``marker`` in ``seq`` (-1 when absent)."""
    m = len(marker)
    for i in range(len(seq) - m, -1, -1):
        if list(seq[i:i + m]) == list(marker):
            return i + m
    return -1


def _ends_with(hist: jax.Array, marker: tuple[int, ...]) -> jax.Array:
    return jnp.all(hist[:, hist.shape[1] - len(marker):] == jnp.asarray(marker, jnp.int32)[None], axis=1)


def step(spec: ThinkingBudget, th: dict, sampled: jax.Array) -> tuple[jax.Array, dict]:
    """The token each row emits this step (a sampled or forced one) and the rows' new thinking state."""
    seqs = (spec.closing, spec.wait or (0,))
    width = max(map(len, seqs))
    table = jnp.asarray([list(s) + [0] * (width - len(s)) for s in seqs], jnp.int32)
    lengths = jnp.asarray([len(s) for s in seqs], jnp.int32)
    forcing = th["force"] != NOT_FORCING
    kind = jnp.maximum(th["force"], 0)
    tok = jnp.where(forcing, table[kind, jnp.minimum(th["at"], width - 1)], sampled)
    free = ~forcing & th["think"]
    close = free & (spec.budget > 0) & (th["used"] >= spec.budget)
    wait = jnp.zeros_like(close)
    if spec.max_waits:
        early = (th["used"] < spec.budget) if spec.budget > 0 else jnp.ones_like(close)
        wait = free & ~close & (sampled == spec.end[0]) & (th["waits"] < spec.max_waits) & early
    started = jnp.where(close, CLOSING, jnp.where(wait, WAITING, NOT_FORCING))
    tok = jnp.where(close, table[CLOSING, 0], jnp.where(wait, table[WAITING, 0], tok))
    force = jnp.where(forcing, th["force"], started)
    at = jnp.where(forcing, th["at"] + 1, jnp.where(started != NOT_FORCING, 1, 0))
    over = (force != NOT_FORCING) & (at >= lengths[jnp.maximum(force, 0)])
    force, at = jnp.where(over, NOT_FORCING, force), jnp.where(over, 0, at)
    hist = jnp.concatenate([th["hist"][:, 1:], tok[:, None]], axis=1)
    opened = _ends_with(hist, spec.start)
    think = jnp.where(_ends_with(hist, spec.end), False, th["think"] | opened)
    used = th["used"] + (th["think"] & think).astype(jnp.int32)
    return tok, {"think": think, "used": used, "waits": th["waits"] + wait.astype(jnp.int32), "force": force,
                 "at": at, "hist": hist}


def keep(live: jax.Array, new: dict, old: dict) -> dict:
    """``new`` on the live rows, ``old`` elsewhere (a finished row's state stays as it was)."""
    def pick(a, b):
        mask = jnp.reshape(live, live.shape + (1,) * (a.ndim - 1))
        return jnp.where(mask, a, b)
    return jax.tree.map(pick, new, old)
