"""Accuracy per benchmark x split with 95% confidence intervals.

Input rows are per question: ``{"benchmark", "label" ("reasoning"|"knowledge"|None), "correct": [bool]*n,
"pred": [int|None]*n}``. A question's score is the mean over its n samples; a group's accuracy is the mean
of its questions' scores. Splits: "reasoning", "knowledge", "all" (unlabelled questions count in "all"
only). A benchmark called "overall" pools every question.

Confidence intervals (``ci``):
- "wilson": Wilson score interval, treating the group's sum of question scores as successes out of the
  number of questions (exact binomial setting when n = 1).
- "bootstrap": percentile bootstrap over questions (each resample keeps a question's n samples together),
  2000 resamples with a fixed seed, so a table is reproducible.
- "auto" (default): Wilson when every question has one sample, otherwise the bootstrap, because with
  n > 1 the samples of one question are not independent trials.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

SPLITS = ("knowledge", "reasoning", "all")
OVERALL = "overall"
Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (successes / n)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(scores: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-question scores."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = s[rng.integers(0, s.size, size=(resamples, s.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def _label(row: dict) -> str | None:
    lab = row.get("label")
    return lab if lab in ("reasoning", "knowledge") else None


def group_rows(rows: Iterable[dict]) -> dict[tuple[str, str], list[dict]]:
    """Questions per (benchmark, split), including the pooled "overall" benchmark."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        lab = _label(row)
        for bench in (row["benchmark"], OVERALL):
            groups[(bench, "all")].append(row)
            if lab:
                groups[(bench, lab)].append(row)
    return groups


def summarize(rows: Sequence[dict], *, ci: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Accuracy, CI and no-answer rate of one group of question rows."""
    if ci not in ("auto", "wilson", "bootstrap"):
        raise ValueError(f"config.eval.ci={ci!r}: expected 'auto', 'wilson' or 'bootstrap'")
    scores = [float(np.mean(r["correct"])) for r in rows]
    n_samples = [len(r["correct"]) for r in rows]
    no_answer = sum(sum(p is None for p in r["pred"]) for r in rows)
    method = ci if ci != "auto" else ("wilson" if all(k == 1 for k in n_samples) else "bootstrap")
    if method == "wilson":
        lo, hi = wilson_interval(sum(scores), len(scores))
    else:
        lo, hi = bootstrap_interval(scores, seed=seed)
    total = sum(n_samples)
    return {
        "n_questions": len(rows),
        "n_samples": total,
        "accuracy": float(np.mean(scores)) if scores else float("nan"),
        "ci_low": lo,
        "ci_high": hi,
        "ci_method": method,
        "no_answer": no_answer,
        "no_answer_rate": no_answer / total if total else float("nan"),
    }


def accuracy_table(rows: Sequence[dict], *, ci: str = "auto", seed: int = 0) -> list[dict[str, Any]]:
    """One row per (benchmark, split) with accuracy and 95% CI; benchmarks sorted, "overall" last."""
    groups = group_rows(rows)
    benches = sorted({b for b, _ in groups if b != OVERALL}) + [OVERALL]
    table = []
    for bench in benches:
        for split in SPLITS:
            if (bench, split) in groups:
                table.append({"benchmark": bench, "split": split, **summarize(groups[(bench, split)], ci=ci,
                                                                                 seed=seed)})
    return table
