"""GRPO's rewards of a completion, on the host in NumPy: the verifiable answer reward (correctness + format) and
DAPO's soft overlong penalty.

    overlong(|y|) = 0                                            |y| <= L_max - L_buf
                  = -penalty * (|y| - (L_max - L_buf)) / L_buf   L_max - L_buf < |y| <= L_max
                  = -penalty                                     |y| > L_max

with L_max = max_new_tokens, L_buf = the buffer and |y| the generated tokens, stop token included (DAPO eq. 13;
TRL's `get_soft_overlong_punishment` with penalty 1). A buffer of 0 is no shaping.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medkr_jax.data.answer import extract_answer, final_statement_answer

ANSWER_SOURCES = ("final", "extract")


def completion_rewards(texts: Sequence[str], options: Sequence[Sequence[str]], answers: Sequence[int], *,
                       format_reward: float = 0.0, answer_source: str = "final"
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reward, correct, well_formatted) per completion.

    well_formatted: the completion ends with "The answer is X." naming one option. correct: with
    answer_source="final", that closing statement names the right option (a verifiable reward that a stray
    letter cannot earn); with "extract", the evaluation's extractor (data.answer) finds the right option
    anywhere by its fallback rules. reward = correct + format_reward * well_formatted.
    """
    if answer_source not in ANSWER_SOURCES:
        raise ValueError(f"config.grpo.answer_source: expected one of {ANSWER_SOURCES}, got {answer_source!r}")
    final = [final_statement_answer(t, o) for t, o in zip(texts, options)]
    formatted = np.array([f is not None and f >= 0 for f in final], np.float32)
    if answer_source == "final":
        correct = np.array([f == a for f, a in zip(final, answers)], np.float32)
    else:
        correct = np.array([extract_answer(t, o) == a for t, o, a in zip(texts, options, answers)], np.float32)
    return correct + format_reward * formatted, correct, formatted


def overlong_penalty(lengths: np.ndarray, *, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong penalty (module docstring) per completion length; <= 0, all 0 when buffer is 0."""
    lengths = np.asarray(lengths, np.float64)
    if buffer <= 0:
        return np.zeros(lengths.shape, np.float32)
    over = np.clip((lengths - (max_new_tokens - buffer)) / buffer, 0.0, 1.0)
    return (-penalty * over).astype(np.float32)
