"""The reasoning/knowledge classes and the metrics of a question classifier.

Metrics: confusion matrix, Cohen's kappa, expected calibration error and the summary of one labelled set
(accuracy, macro-F1, per-class precision / recall / F1, log loss, majority-class baseline).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Class ids of the classifiers this project trains (label2id of the exported folder).
LABEL_NAMES = ("knowledge", "reasoning")


class ClassifierError(ValueError):
    """Bad classifier input: missing labels, unknown label names, an unusable classifier folder."""


def reasoning_index(id2label: Sequence[tuple[int, str]], override: int = -1) -> int:
    """Which class id means "reasoning-heavy": config override, else the label whose name mentions reasoning."""
    ids = [i for i, _ in id2label]
    if override >= 0:
        if override not in ids:
            raise ClassifierError(f"config.split.reasoning_index={override} but the classifier has classes {ids}")
        return override
    hits = [i for i, name in id2label if "reason" in name.lower()]
    if len(hits) == 1:
        return hits[0]
    if len(ids) == 2:
        log.warning("classifier labels %s do not name 'reasoning'; taking class 1 as reasoning-heavy "
                    "(set config.split.reasoning_index to change)", dict(id2label))
        return 1
    raise ClassifierError(f"cannot tell which of the labels {dict(id2label)} is 'reasoning'; set "
                          "config.split.reasoning_index")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def cohen_kappa(a: Sequence[int], b: Sequence[int], num_classes: int = 2) -> float:
    """Cohen's kappa between two label sequences (chance-corrected agreement)."""
    cm = confusion_matrix(np.asarray(a), np.asarray(b), num_classes).astype(np.float64)
    n = cm.sum()
    if n == 0:
        return float("nan")
    po = np.trace(cm) / n
    pe = float((cm.sum(0) * cm.sum(1)).sum()) / n ** 2
    return 1.0 if pe == 1.0 else float((po - pe) / (1.0 - pe))


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> tuple[float, list]:
    """ECE of the predicted class's confidence over equal-width bins; also the per-bin table
    [(lo, hi, count, mean confidence, accuracy)] for the reliability diagram."""
    conf = probs.max(-1)
    correct = (probs.argmax(-1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if sel.any():
            gap = abs(conf[sel].mean() - correct[sel].mean())
            ece += sel.mean() * gap
            table.append((float(lo), float(hi), int(sel.sum()), float(conf[sel].mean()), float(correct[sel].mean())))
    return float(ece), table


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, label_names: Sequence[str] = LABEL_NAMES,
                           *, n_bins: int = 15) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix, ECE, log loss, majority baseline."""
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, np.float64)
    k = len(label_names)
    y_pred = probs.argmax(-1)
    cm = confusion_matrix(y_true, y_pred, k)
    per_class, f1s = {}, []
    for c, name in enumerate(label_names):
        tp = cm[c, c]
        prec = tp / cm[:, c].sum() if cm[:, c].sum() else 0.0
        rec = tp / cm[c, :].sum() if cm[c, :].sum() else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1s.append(f1)
        per_class[name] = {"precision": float(prec), "recall": float(rec), "f1": float(f1),
                           "support": int(cm[c, :].sum())}
    ece, bins = expected_calibration_error(probs, y_true, n_bins)
    counts = np.bincount(y_true, minlength=k)
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "macro_f1": float(np.mean(f1s)),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "ece": ece,
        "calibration_bins": bins,
        "log_loss": float(-np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1.0)).mean()),
        "majority_baseline": float(counts.max() / max(len(y_true), 1)),
        "label_names": list(label_names),
    }


def label_agreement(ours: Sequence[int], theirs: Sequence[int]) -> dict[str, Any]:
    """n, agreement and Cohen's kappa of two label sequences of the same questions."""
    ours, theirs = np.asarray(ours, int), np.asarray(theirs, int)
    return {"n": len(ours), "agreement": float((ours == theirs).mean()), "kappa": cohen_kappa(ours, theirs)}
