"""Host-side bookkeeping of the engine: which row waits, which slot runs which row, what each row has emitted.

Rows are (prompt, sample) pairs. They wait in a fixed order, the longest first (largest max_new_tokens, then
longest prompt): the long rows start early and the short ones fill the gaps, so the run does not end on one long
row decoding alone. A row's output does not depend on this order (its randomness comes from its own key), only
the wall-clock time does.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class Finished:
    """The n rows of one prompt, once all have stopped: tokens (stop token included) and their log-probs."""

    prompt: int
    tokens: list[list[int]]
    logprobs: list[np.ndarray]


class Scheduler:
    """Waiting rows, slot occupancy and per-row outputs (see the module docstring)."""

    def __init__(self, prompt_lens: Sequence[int], limits: Sequence[int], n: int, slots: int):
        self.n, self.slots = n, slots
        self.limits = np.asarray(limits, np.int64)
        lens = np.asarray(prompt_lens, np.int64)
        rows = np.arange(len(lens) * n)
        prompt = rows // n
        order = np.lexsort((rows, -lens[prompt], -self.limits[prompt]))  # last key is the primary one
        self.queue = collections.deque(int(r) for r in order)
        self.slot_row = np.full((slots,), -1, np.int64)
        self.seen = np.zeros((slots,), np.int64)      # tokens of the slot's row already read back
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.logprobs: list[list[float]] = [[] for _ in rows]
        self.left = np.full((len(lens),), n, np.int64)  # unfinished rows per prompt

    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def busy(self) -> int:
        return int((self.slot_row >= 0).sum())

    def finished(self) -> bool:
        return not self.queue and self.busy == 0

    def assign(self) -> list[tuple[int, int]]:
        """Waiting rows placed into the free slots, in queue order: (slot, row) pairs."""
        out = []
        for slot in np.nonzero(self.slot_row < 0)[0]:
            if not self.queue:
                break
            row = self.queue.popleft()
            self.slot_row[slot], self.seen[slot] = row, 0
            out.append((int(slot), row))
        return out

    def want_done(self, min_refill: int) -> int:
        """Done slots at which a decode chunk should hand back control: the idle ones plus ``min_refill`` more
        while rows wait (so a refill has enough to do), else all of them."""
        if not self.queue:
            return self.slots
        return min(self.slots, self.slots - self.busy + min(min_refill, self.waiting))

    def record(self, tokens: np.ndarray, logprobs: np.ndarray, count: np.ndarray, done: np.ndarray) -> list[int]:
        """Read back one decode chunk (per slot: its tokens [B, K], log-probs, emitted count, done flag); returns
        the prompts whose rows have now all stopped."""
        finished = []
        for slot in np.nonzero(self.slot_row >= 0)[0]:
            row = int(self.slot_row[slot])
            new = int(count[slot] - self.seen[slot])
            self.tokens[row] += tokens[slot, :new].tolist()
            self.logprobs[row] += logprobs[slot, :new].tolist()
            self.seen[slot] = count[slot]
            if done[slot]:
                self.slot_row[slot] = -1
                p = row // self.n
                self.left[p] -= 1
                if self.left[p] == 0:
                    finished.append(p)
        return finished

    def result(self, prompt: int) -> Finished:
        rows = range(prompt * self.n, (prompt + 1) * self.n)
        return Finished(prompt, [self.tokens[r] for r in rows],
                        [np.asarray(self.logprobs[r], np.float32) for r in rows])
