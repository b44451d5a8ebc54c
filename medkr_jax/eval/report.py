"""Readable outputs of an evaluation: CSV, Markdown tables and grouped bar plots (matplotlib, Agg)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medkr_jax.eval.metrics import OVERALL, SPLITS


def pyplot():
    """matplotlib.pyplot with the Agg backend (files only, no display)."""
    # imported only when a plot is drawn: matplotlib is slow to import and the jobs' other work needs none
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Rows (dicts with the same keys) to CSV; floats rounded to 6 digits so reruns compare equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        path.write_text("")
        return
    fields = list(rows[0].keys())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    return f"{_pct(row['accuracy'])} [{_pct(row['ci_low'])}, {_pct(row['ci_high'])}] (n={row['n_questions']})"


def accuracy_markdown(table: Sequence[dict[str, Any]], title: str = "Accuracy (%)") -> str:
    """Benchmarks as rows, knowledge / reasoning / all as columns: accuracy [95% CI] (questions)."""
    by = {(r["benchmark"], r["split"]): r for r in table}
    benches = list(dict.fromkeys(r["benchmark"] for r in table))
    methods = sorted({r["ci_method"] for r in table})
    lines = [f"### {title}", "",
             "| benchmark | " + " | ".join(SPLITS) + " | no answer |",
             "|---|" + "---|" * (len(SPLITS) + 1)]
    for b in benches:
        all_row = by.get((b, "all"))
        na = _pct(all_row["no_answer_rate"]) + "%" if all_row else "–"
        lines.append(f"| {b} | " + " | ".join(_cell(by.get((b, s))) for s in SPLITS) + f" | {na} |")
    lines += ["", f"95% confidence intervals: {', '.join(methods)} "
              "(see medkr_jax/eval/metrics.py). 'no answer' = samples with no extractable option, scored wrong."]
    return "\n".join(lines) + "\n"


def self_consistency_markdown(table: Sequence[dict[str, Any]]) -> str:
    """maj@n and pass@k [95% CI] per benchmark x split ("" when the table has none: one sample per question)."""
    names = [k for k in (table[0] if table else {}) if ("@" in k and not k.endswith(("_ci_low", "_ci_high")))]
    if not names:
        return ""
    splits = [s for s in SPLITS if any(r["split"] == s for r in table)]
    lines = ["", "### Self-consistency (%)", "",
             "| benchmark | split | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in table:
        if r["split"] in splits:
            cells = [f"{_pct(r[m])} [{_pct(r[m + '_ci_low'])}, {_pct(r[m + '_ci_high'])}]" for m in names]
            lines.append(f"| {r['benchmark']} | {r['split']} | " + " | ".join(cells) + " |")
    lines += ["", "maj@n: the most frequent answer of a question's n samples; pass@k: the unbiased estimator of Chen "
              "et al. (2021); 95% CIs as in medkr_jax/eval/metrics.py."]
    return "\n".join(lines) + "\n"


def _bars(ax, groups: list[str], series: dict[str, list[tuple[float, float, float]]]) -> None:
    """Grouped bars with CI error bars; series name -> [(value, lo, hi)] per group."""
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        v = np.array([100 * a for a, _, _ in vals], dtype=float)
        lo = np.array([100 * (a - l) for a, l, _ in vals], dtype=float)
        hi = np.array([100 * (h - a) for a, _, h in vals], dtype=float)
        # NaN bounds (no interval) draw no error bar; rounding can put a bound a hair past the value
        # (Wilson at 0 / n), which matplotlib rejects as a negative error.
        ax.bar(x + (i - (len(series) - 1) / 2) * width, np.nan_to_num(v), width, label=name,
               yerr=np.maximum(np.stack([lo, hi]), 0.0), capsize=3)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.legend()


def plot_knowledge_vs_reasoning(table: Sequence[dict[str, Any]], path: str | os.PathLike,
                                title: str = "Accuracy: knowledge vs reasoning") -> None:
    """Grouped bars per benchmark: knowledge-heavy vs reasoning-heavy accuracy with 95% CIs."""
    plt = pyplot()
    by = {(r["benchmark"], r["split"]): r for r in table}
    benches = list(dict.fromkeys(r["benchmark"] for r in table))
    nan = (float("nan"),) * 3
    # Without any labelled question there is no split to compare; the plot then shows "all".
    splits = [s for s in ("knowledge", "reasoning") if any(r["split"] == s for r in table)] or ["all"]
    series = {s: [(by[(b, s)]["accuracy"], by[(b, s)]["ci_low"], by[(b, s)]["ci_high"]) if (b, s) in by else nan
                  for b in benches] for s in splits}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(benches) + 2), 4.5))
    _bars(ax, benches, series)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def adversarial_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Before / after / drop per benchmark x split for each prefix source."""
    lines = ["### Adversarial evaluation (accuracy %, before -> after prefilled misleading reasoning)", "",
             "| source | benchmark | split | questions | before | after | drop | after spread |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = ("–" if r.get("after_std") is None else
                  f"±{_pct(r['after_std'])} (min {_pct(r['after_min'])}, max {_pct(r['after_max'])})")
        lines.append(f"| {r['source']} | {r['benchmark']} | {r['split']} | {r['n_questions']} | "
                     f"{_pct(r['before'])} | {_pct(r['after'])} | {_pct(r['drop'])} | {spread} |")
    lines += ["", "'after spread': standard deviation, min and max over the released traces (one run per "
              "trace) where a question has several."]
    return "\n".join(lines) + "\n"


def plot_adversarial(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Per split (knowledge, reasoning, all) a panel of bars per benchmark: before, then after for each source
    (error bar: min..max over the released traces)."""
    plt = pyplot()
    splits = [s for s in SPLITS if any(r["split"] == s for r in rows)]
    sources = list(dict.fromkeys(r["source"] for r in rows))
    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    fig, axes = plt.subplots(1, len(splits), figsize=(max(6, 1.1 * len(benches) + 2) * len(splits), 4.5),
                             squeeze=False)
    for ax, split in zip(axes[0], splits):
        by = {(r["source"], r["benchmark"]): r for r in rows if r["split"] == split}
        nan = (float("nan"),) * 3
        def point(r, key):
            return (r[key], float("nan"), float("nan"))

        def spread(r):  # min..max over the released traces, where there are several
            return (r["after"], r["after_min"], r["after_max"]) if r.get("after_min") is not None else point(r, "after")

        series = {"before": [point(by[(sources[0], b)], "before") if (sources[0], b) in by else nan
                             for b in benches]}
        for s in sources:
            series[f"after ({s})"] = [spread(by[(s, b)]) if (s, b) in by else nan for b in benches]
        _bars(ax, benches, series)
        ax.set_title(f"{split}")
        ax.set_ylabel("accuracy (%)")
    fig.suptitle("Accuracy before and after a misleading prefilled answer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def budget_label(budget: int) -> str:
    """A thinking budget as a column / tick label (0 = no budget)."""
    return "none" if int(budget) == 0 else str(int(budget))


def _sweep_benchmarks(table: Sequence[dict[str, Any]]) -> list[str]:
    """The benchmarks of a sweep table to show: "overall" only beside two or more benchmarks (else it repeats one)."""
    benches = list(dict.fromkeys(r["benchmark"] for r in table))
    real = [b for b in benches if b != OVERALL]
    return benches if len(real) > 1 else real


def budget_markdown(table: Sequence[dict[str, Any]], gains: Sequence[dict[str, Any]]) -> str:
    """Accuracy [95% CI] per benchmark x split (rows) and thinking budget (columns), mean generated tokens, and per
    benchmark the reasoning-minus-knowledge gain from the smallest to the largest budget."""
    budgets = list(dict.fromkeys(int(r["budget"]) for r in table))
    by = {(r["benchmark"], r["split"], int(r["budget"])): r for r in table}
    shown = _sweep_benchmarks(table)
    rows = list(dict.fromkeys((r["benchmark"], r["split"]) for r in table if r["benchmark"] in shown))
    lines = ["### Accuracy (%) by thinking budget (tokens)", "",
             "| benchmark | split | " + " | ".join(budget_label(b) for b in budgets) + " |",
             "|---|---|" + "---:|" * len(budgets)]
    for bench, split in rows:
        lines.append(f"| {bench} | {split} | " + " | ".join(
            f"{_pct(c['accuracy'])} [{_pct(c['ci_low'])}, {_pct(c['ci_high'])}]" if (c := by.get((bench, split, b)))
            else "–" for b in budgets) + " |")
    lines += ["", "### Generated tokens per sample (mean over all questions)", "",
              "| benchmark | " + " | ".join(budget_label(b) for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for bench in dict.fromkeys(b for b, _ in rows):
        lines.append(f"| {bench} | " + " | ".join(
            f"{c['mean_tokens']:.1f}" if (c := by.get((bench, "all", b))) else "–" for b in budgets) + " |")
    if gains:
        lines += ["", "### Does thinking longer help reasoning-heavy questions more?", "",
                  "| benchmark | budget | knowledge gain | reasoning gain | reasoning - knowledge [95% CI] |",
                  "|---|---|---:|---:|---|"]
        for g in gains:
            lines.append(f"| {g['benchmark']} | {budget_label(g['from'])} -> {budget_label(g['to'])} | "
                         f"{100 * g['gain_knowledge']:+.1f} (n={g['n_knowledge']}) | "
                         f"{100 * g['gain_reasoning']:+.1f} (n={g['n_reasoning']}) | {100 * g['difference']:+.1f} "
                         f"[{100 * g['difference_ci_low']:+.1f}, {100 * g['difference_ci_high']:+.1f}] |")
        lines += ["", "Gains in accuracy points, paired by question; the interval is a percentile bootstrap over "
                  "questions within each split (medkr_jax/eval/metrics.py split_gain_difference). An interval "
                  "that holds 0 does not show a difference."]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_budget(table: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Per benchmark, accuracy (95% CI) of the knowledge- and reasoning-heavy questions against the thinking
    budget (one tick per budget, in sweep order; "none" = no budget)."""
    plt = pyplot()
    budgets = list(dict.fromkeys(int(r["budget"]) for r in table))
    benches = _sweep_benchmarks(table)
    splits = [s for s in ("knowledge", "reasoning") if any(r["split"] == s for r in table)] or ["all"]
    by = {(r["benchmark"], r["split"], int(r["budget"])): r for r in table}
    fig, axes = plt.subplots(1, len(benches), figsize=(4.2 * len(benches) + 1, 4), squeeze=False)
    x = np.arange(len(budgets))
    for ax, bench in zip(axes[0], benches):
        for split in splits:
            cells = [by.get((bench, split, b)) for b in budgets]
            acc = np.array([100 * c["accuracy"] if c else np.nan for c in cells])
            lo = np.array([100 * c["ci_low"] if c else np.nan for c in cells])
            hi = np.array([100 * c["ci_high"] if c else np.nan for c in cells])
            ax.plot(x, acc, marker="o", label=split)
            ax.fill_between(x, lo, hi, alpha=0.2)
        ax.set_xticks(x)
        ax.set_xticklabels([budget_label(b) for b in budgets])
        ax.set_xlabel("thinking budget (tokens)")
        ax.set_ylim(0, 100)
        ax.set_title(bench)
        ax.legend()
    axes[0][0].set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
