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

Self-consistency (n > 1 samples per question, ``accuracy_table(..., pass_k=...)``):
- maj@n: a question counts as right when the most frequent answer among its samples is the right one (samples
  without an answer do not vote; a tie goes to the answer given first; no answer at all is wrong). Its CI is
  Wilson's (one 0/1 outcome per question) unless ``ci="bootstrap"``.
- pass@k: the unbiased estimator of Chen et al. (2021), per question 1 - C(n - c, k) / C(n, k) for c right
  answers among n samples, averaged over questions; for k <= n only. Its CI is the percentile bootstrap over
  questions unless ``ci="wilson"``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question with c right answers among n samples: 1 - C(n - c, k) / C(n, k), as the
    stable product 1 - prod_{i = n-c+1}^{n} (1 - k / i) (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority(preds: Sequence[int | None]) -> int | None:
    """The most frequent answer (None does not vote; ties go to the answer given first), None without any."""
    votes = Counter(p for p in preds if p is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(p for p in preds if p is not None and votes[p] == top)


def _interval(scores: Sequence[float], method: str, seed: int) -> tuple[float, float]:
    if method == "wilson":
        return wilson_interval(float(np.sum(scores)), len(scores))
    return bootstrap_interval(scores, seed=seed)


def self_consistency(rows: Sequence[dict], n: int, pass_k: Sequence[int], *, ci: str = "auto",
                     seed: int = 0) -> dict[str, Any]:
    """maj@n and pass@k (each k <= n) of one group of question rows, with 95% CIs (see the module docstring).
    A row's "correct" flags its samples; "pred" gives their answers and "answer" the right one."""
    maj = [float(majority(r["pred"]) is not None and majority(r["pred"]) == r["answer"]) for r in rows]
    lo, hi = _interval(maj, "bootstrap" if ci == "bootstrap" else "wilson", seed)
    out: dict[str, Any] = {f"maj@{n}": float(np.mean(maj)) if maj else float("nan"), f"maj@{n}_ci_low": lo,
                           f"maj@{n}_ci_high": hi}
    for k in sorted({int(k) for k in pass_k if 1 <= int(k) <= n}):
        scores = [pass_at_k(len(r["correct"]), int(sum(r["correct"])), k) for r in rows]
        lo, hi = _interval(scores, "wilson" if ci == "wilson" else "bootstrap", seed)
        out.update({f"pass@{k}": float(np.mean(scores)) if scores else float("nan"), f"pass@{k}_ci_low": lo,
                    f"pass@{k}_ci_high": hi})
    return out


def accuracy_table(rows: Sequence[dict], *, ci: str = "auto", seed: int = 0,
                   pass_k: Sequence[int] = ()) -> list[dict[str, Any]]:
    """One row per (benchmark, split) with accuracy and 95% CI; benchmarks sorted, "overall" last. When every
    question has n > 1 samples (and its "answer"), also maj@n and pass@k for each k in ``pass_k`` up to n."""
    groups = group_rows(rows)
    benches = sorted({b for b, _ in groups if b != OVERALL}) + [OVERALL]
    n = min((len(r["correct"]) for r in rows), default=1)
    table = []
    for bench in benches:
        for split in SPLITS:
            if (bench, split) in groups:
                group = groups[(bench, split)]
                row = {"benchmark": bench, "split": split, **summarize(group, ci=ci, seed=seed)}
                if n > 1 and all("answer" in r for r in rows):
                    row.update(self_consistency(group, n, pass_k, ci=ci, seed=seed))
                table.append(row)
    return table


def split_gain_difference(before: Sequence[dict], after: Sequence[dict], *, resamples: int = 2000, seed: int = 0,
                          level: float = 0.95) -> dict[str, Any]:
    """Does a change (e.g. a larger thinking budget) help reasoning-heavy questions more than knowledge-heavy ones?

    ``before`` and ``after`` hold the same questions' rows (matched by "key"; "correct" flags per sample). A
    question's gain is its mean correctness after minus before (paired); per split the gain is the mean over its
    questions, and the difference is reasoning's gain minus knowledge's, with a percentile bootstrap interval that
    resamples questions within each split. Keys: n_/gain_ per split, difference, difference_ci_low / _high."""
    prior = {r["key"]: float(np.mean(r["correct"])) for r in before}
    gains: dict[str, list[float]] = {"knowledge": [], "reasoning": []}
    for r in after:
        lab = _label(r)
        if lab and r["key"] in prior:
            gains[lab].append(float(np.mean(r["correct"])) - prior[r["key"]])
    out: dict[str, Any] = {}
    for lab, g in gains.items():
        out[f"n_{lab}"] = len(g)
        out[f"gain_{lab}"] = float(np.mean(g)) if g else float("nan")
    out["difference"] = out["gain_reasoning"] - out["gain_knowledge"]
    lo = hi = float("nan")
    if gains["knowledge"] and gains["reasoning"]:
        rng = np.random.default_rng(seed)
        k, r = (np.asarray(gains[s]) for s in ("knowledge", "reasoning"))
        diffs = (r[rng.integers(0, r.size, (resamples, r.size))].mean(1)
                 - k[rng.integers(0, k.size, (resamples, k.size))].mean(1))
        lo, hi = (float(q) for q in np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2]))
    out["difference_ci_low"], out["difference_ci_high"] = lo, hi
    return out
