"""Readable outputs of the classifier jobs: confusion-matrix / calibration / fraction plots (matplotlib, Agg),
the classifier's report section, and the split's JSON summary, metrics.jsonl and split_report.md."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medkr_jax.eval.classification import LABEL_NAMES
from medkr_jax.eval.report import pyplot


def write_json(path: str, obj: Any) -> None:
    """JSON written to a temporary file, then renamed: a killed run never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Markdown table lines; floats to 4 significant digits."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


# -------------------------------------------------------------------------------------------------- plots


def plot_confusion_matrix(cm: Sequence[Sequence[int]], label_names: Sequence[str], path: str, title: str) -> str:
    """Confusion-matrix heat map with counts and row percentages."""
    plt = pyplot()
    cm = np.asarray(cm)
    rows = np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(cm / rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{100 * cm[i, j] / rows[i, 0]:.0f}%", ha="center", va="center",
                    color="white" if cm[i, j] / rows[i, 0] > 0.5 else "black")
    ax.set_xticks(range(len(label_names)), label_names)
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_calibration(bins: Sequence[tuple], path: str, title: str) -> str:
    """Reliability diagram: accuracy vs mean confidence per bin."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=1)
    if bins:
        lo, hi, cnt, conf, acc = map(np.asarray, zip(*bins))
        ax.bar((lo + hi) / 2, acc, width=(hi - lo) * 0.9, alpha=0.6, label="accuracy")
        ax.plot(conf, acc, "o-", c="C1", label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reasoning_fractions(rows: Sequence[tuple[str, float]], overall: float, path: str,
                             title: str = "Reasoning-heavy fraction per benchmark") -> str:
    """Horizontal bars of the reasoning fraction per benchmark, with the pooled fraction as a line."""
    plt = pyplot()
    names = [r[0] for r in rows] + ["overall"]
    vals = [100 * r[1] for r in rows] + [100 * overall]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(names) + 1.3))
    colors = ["C0"] * len(rows) + ["C3"]
    ax.barh(range(len(names)), vals, color=colors)
    for i, v in enumerate(vals):
        ax.text(v + 0.8, i, f"{v:.1f}%", va="center", fontsize=8)
    ax.axvline(100 * overall, ls="--", c="C3", lw=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("reasoning-heavy questions (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ classify


def plot_classifier_metrics(out_dir: str, result: Mapping[str, Any]) -> None:
    """confusion_matrix.png and calibration.png of the final split (test, else validation)."""
    final = result.get("test", result["val"])
    which = "test" if "test" in result else "validation"
    plot_confusion_matrix(final["confusion_matrix"], LABEL_NAMES, os.path.join(out_dir, "confusion_matrix.png"),
                          f"Confusion matrix ({which}, n={final['n']})")
    plot_calibration(final["calibration_bins"], os.path.join(out_dir, "calibration.png"),
                     f"Reliability ({which}), ECE={final['ece']:.3f}")


def append_classifier_report(out_dir: str, result: Mapping[str, Any]) -> None:
    """The classifier's metrics section at the end of report.md."""
    lines = ["", "## Classifier metrics", ""]
    rows = []
    for split in ("val", "test"):
        if split in result:
            m = result[split]
            rows.append([split, m["n"], m["accuracy"], m["macro_f1"], m["ece"], m["majority_baseline"]])
    lines += md_table(["split", "n", "accuracy", "macro-F1", "ECE", "majority class"], rows)
    final = result.get("test", result["val"])
    lines += ["", "Per class (" + ("test" if "test" in result else "validation") + "):", ""]
    lines += md_table(["class", "precision", "recall", "F1", "support"],
                      [[c, v["precision"], v["recall"], v["f1"], v["support"]] for c, v in final["per_class"].items()])
    cm = final["confusion_matrix"]
    lines += ["", "Confusion matrix (rows true, columns predicted):", ""]
    lines += md_table(["true \\ predicted", *LABEL_NAMES], [[n, *row] for n, row in zip(LABEL_NAMES, cm)])
    if "second_labels" in result:
        s = result["second_labels"]
        lines += ["", f"Agreement with the second label set (n={s['n']}): classifier kappa "
                      f"{s['kappa_classifier_vs_second']:.3f} (agreement {s['agreement_classifier_vs_second']:.3f}), "
                      f"gold kappa {s['kappa_gold_vs_second']:.3f}."]
    lines += ["", f"Best validation {result['early_stopping_metric']} at step {result['best_step']}"
                  + (" (early stopped)." if result["early_stopped"] else "."),
              "", f"Exported classifier: `{result['export_dir']}`", "",
              "![confusion matrix](confusion_matrix.png)", "![calibration](calibration.png)"]
    with open(os.path.join(out_dir, "report.md"), "a") as f:
        f.write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------- split


def write_split_outputs(out_dir: str, summary: Mapping[str, Any]) -> None:
    """split_summary.json, metrics.jsonl (one line per group, then "overall"), reasoning_fraction.png and
    split_report.md."""
    rows, overall = summary["per_benchmark"], summary["reasoning_fraction"]
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "split_summary.json"), summary)
    with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps({"benchmark": "overall", "n": summary["questions"], "reasoning_fraction": overall}) + "\n")
    plot_reasoning_fractions([(r["benchmark"], r["reasoning_fraction"]) for r in rows], overall,
                             os.path.join(out_dir, "reasoning_fraction.png"))
    _write_split_report(out_dir, summary)


def _write_split_report(out_dir: str, s: Mapping[str, Any]) -> None:
    lines = ["# Reasoning / knowledge split", "",
             f"Classifier `{s['classifier_path']}`, threshold {s['threshold']}: **{s['reasoning']} of "
             f"{s['questions']} questions ({100 * s['reasoning_fraction']:.1f}%) are reasoning-heavy**.", ""]
    lines += md_table(["benchmark", "questions", "reasoning", "knowledge", "reasoning %", "mean p(reasoning)"],
                      [[r["benchmark"], r["n"], r["reasoning"], r["knowledge"],
                        f"{100 * r['reasoning_fraction']:.1f}", r["mean_reasoning_prob"]] for r in s["per_benchmark"]]
                      + [["**overall**", s["questions"], s["reasoning"], s["questions"] - s["reasoning"],
                          f"{100 * s['reasoning_fraction']:.1f}", ""]])
    if s["agreement_with_released"]:
        lines += ["", "## Agreement with the released labels (`is_reasoning`)", ""]
        rows = [[a["benchmark"], a["n"], f"{100 * a['agreement']:.1f}", a["kappa"],
                 f"{100 * a['released_reasoning_fraction']:.1f}"] for a in s["agreement_with_released"]]
        if "agreement_overall" in s:
            o = s["agreement_overall"]
            rows.append(["**overall**", o["n"], f"{100 * o['agreement']:.1f}", o["kappa"], ""])
        lines += md_table(["benchmark", "n", "agreement %", "Cohen's kappa", "released reasoning %"], rows)
    if s["accuracy_vs_gold_labels"]:
        lines += ["", "## Against gold reasoning/knowledge labels", ""]
        lines += md_table(["benchmark", "n", "accuracy", "Cohen's kappa"],
                          [[a["benchmark"], a["n"], a["accuracy"], a["kappa"]] for a in s["accuracy_vs_gold_labels"]])
    lines += ["", "![reasoning fraction](reasoning_fraction.png)", "",
              "Per-benchmark files: `split/<benchmark>/reasoning.jsonl` and `knowledge.jsonl` "
              "(records with `reasoning_prob` and `is_reasoning`; released values kept in `meta`; a class with "
              "no questions has no file)."]
    with open(os.path.join(out_dir, "split_report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
