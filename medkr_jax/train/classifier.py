"""Training the reasoning/knowledge question classifier (job "classify").

A BERT sequence classifier (PubMedBERT in the paper, MiniLM offline) is fine-tuned on labelled questions
(MedXpertQA's Reasoning/Understanding types, the synthetic world, or any canonical records with `label`) with
the shared training loop, a class-weighted cross-entropy and early stopping on a validation split; the best
validation state is kept and scored on the validation and test questions. The job (medkr_jax.jobs.classify)
exports it as an HF BertForSequenceClassification folder and writes the reports (eval/classifier_report.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medkr_jax.data.readers import load_benchmark_spec
from medkr_jax.data.pipeline import Collator, bucket_length, make_loader
from medkr_jax.data.records import MCQRecord
from medkr_jax.data.splits import holdout_split
from medkr_jax.eval.classification import LABEL_NAMES, ClassifierError, classification_metrics, cohen_kappa
from medkr_jax.eval.split import Predictor, length_buckets, tokenize_records
from medkr_jax.train import loop
from medkr_jax.train.optim import OptimizerSettings

log = logging.getLogger(__name__)

EARLY_STOPPING_METRICS = ("macro_f1", "accuracy", "loss")


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
    """What the classify job decides about training and scoring the classifier (config.classifier)."""
    text: str                       # eval.split.TEXT_MODES
    max_len: int
    batch_size: int
    eval_batch_size: int
    early_stopping_metric: str      # EARLY_STOPPING_METRICS
    early_stopping_patience: int
    second_labels_path: str = ""
    seed: int = 0


@dataclasses.dataclass
class ClassifierData:
    """Training / validation / test questions with their tokenised examples."""
    train: list[MCQRecord]
    val: list[MCQRecord]
    test: list[MCQRecord]
    train_ex: list[dict[str, np.ndarray]]
    val_ex: list[dict[str, np.ndarray]]
    test_ex: list[dict[str, np.ndarray]]

    @property
    def y_train(self) -> list[int]:
        return [int(ex["label"]) for ex in self.train_ex]

    @property
    def y_val(self) -> np.ndarray:
        return np.array([LABEL_NAMES.index(r.label) for r in self.val])


# ------------------------------------------------------------------------------------------------- inputs


def keep_labelled(records: Sequence[MCQRecord], source: str) -> list[MCQRecord]:
    """The records with a label; those without are left out (counted in a warning); none labelled is an error."""
    labelled = [r for r in records if r.label is not None]
    if not labelled:
        raise ClassifierError(f"{source}: none of the {len(records)} records has a 'label' (reasoning/knowledge); "
                              "the classifier needs labelled questions (e.g. MedXpertQA question types)")
    if len(labelled) < len(records):
        log.warning("%s: %d of %d records have no label and are left out", source, len(records) - len(labelled),
                    len(records))
    return labelled


def load_labelled_records(spec: str) -> list[MCQRecord]:
    """Labelled records from a benchmark spec ("medxpertqa:path", a canonical .jsonl/.parquet, ...)."""
    return keep_labelled(list(load_benchmark_spec(spec)), spec)


def read_label_file(path: str) -> dict[str, str]:
    """A second label set: JSONL lines with "id" and "label" (reasoning/knowledge) or "is_reasoning" (bool);
    canonical record files qualify. Returns id -> label."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.classifier.second_labels_path: {path!r} does not exist")
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ClassifierError(f"{path}, line {n}: not valid JSON ({e})") from None
            label = row.get("label")
            if label is None and isinstance(row.get("is_reasoning"), bool):
                label = "reasoning" if row["is_reasoning"] else "knowledge"
            if "id" not in row or label not in LABEL_NAMES:
                raise ClassifierError(f"{path}, line {n}: expected an 'id' and a 'label' in {list(LABEL_NAMES)} "
                                      f"(or a bool 'is_reasoning'), got keys {sorted(row)} label={label!r}")
            out[str(row["id"])] = label
    return out


def split_questions(records: Sequence[MCQRecord], *, test_path: str, test_fraction: float, val_fraction: float,
                    seed: int) -> tuple[list[MCQRecord], list[MCQRecord], list[MCQRecord]]:
    """(train, validation, test): the labelled questions of `test_path` as the test set, else a seeded held-out
    part of `records`; the validation part is held out of the rest (duplicate questions stay on one side)."""
    if test_path:
        test = [r for r in load_benchmark_spec(test_path) if r.label is not None]
        train_all = list(records)
    else:
        train_all, test = holdout_split(records, test_fraction=test_fraction, seed=seed)
    train, val = holdout_split(train_all, test_fraction=val_fraction, seed=seed + 1)
    return train, val, test


def tokenize_splits(tokenizer, train: list[MCQRecord], val: list[MCQRecord], test: list[MCQRecord], *,
                    max_len: int, text: str) -> ClassifierData:
    """The three splits tokenised for the classifier (training examples carry their label id)."""
    return ClassifierData(
        train, val, test,
        tokenize_records(tokenizer, train, max_len=max_len, text=text, with_labels=True),
        tokenize_records(tokenizer, val, max_len=max_len, text=text),
        tokenize_records(tokenizer, test, max_len=max_len, text=text) if test else [])


def training_steps(num_examples: int, batch_size: int, *, epochs: float, steps: int,
                   eval_every: int) -> tuple[int, int, int]:
    """(steps, steps per epoch, eval_every): `epochs` > 0 sets the steps; eval_every 0 means once per epoch."""
    steps_per_epoch = max(1, num_examples // batch_size)
    total = int(math.ceil(epochs * num_examples / batch_size)) if epochs > 0 else int(steps)
    return total, steps_per_epoch, int(eval_every) or steps_per_epoch


# --------------------------------------------------------------------------------------------------- loss


def weighted_ce_loss(class_weights: jax.Array):
    """The classifier's loss for the training loop: class-weighted cross-entropy, with accuracy and tokens."""

    def loss_fn(model, batch, rng):
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), dropout_rng=rng)
        labels = batch["label"].astype(jnp.int32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        w = class_weights[labels]
        # torch CrossEntropyLoss(weight=...) semantics: a weighted mean; "weight" lets grad accumulation
        # combine micro-batches exactly.
        loss = jnp.sum(w * ce) / jnp.sum(w)
        acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, {"weight": jnp.sum(w), "accuracy": acc,
                      "tokens": jnp.sum(batch["attention_mask"].astype(jnp.float32))}
    return loss_fn


def class_weights_for(labels: Sequence[int], num_classes: int, balanced: bool) -> np.ndarray:
    """Balanced weights n / (k * n_c) (sklearn's "balanced"), or ones."""
    counts = np.bincount(np.asarray(labels, int), minlength=num_classes)
    if (counts == 0).any():
        missing = [LABEL_NAMES[c] for c in np.flatnonzero(counts == 0)]
        raise ClassifierError(f"the training split has no {missing} questions; both classes are needed")
    if not balanced:
        return np.ones(num_classes, np.float32)
    return (counts.sum() / (num_classes * counts)).astype(np.float32)


# --------------------------------------------------------------------------------------------- training


class EarlyStopping:
    """The training loop's eval_fn: validation metrics, the best parameters so far, and early stopping.

    Scores compare as (metric, -loss): among equal macro-F1 / accuracy, the better-calibrated model wins.
    After `patience` evaluations without improvement (patience > 0) it ends the run (loop.StopTraining).
    """

    def __init__(self, predictor: Predictor, examples: Sequence[dict], y_val: np.ndarray, *, metric: str,
                 patience: int, steps: int):
        self.predictor, self.examples, self.y_val = predictor, examples, y_val
        self.metric, self.patience, self.steps = metric, patience, steps
        self.sign = -1.0 if metric == "loss" else 1.0
        self.best: tuple[float, float] = (-math.inf, -math.inf)
        self.best_step: int | None = None
        self.state: nnx.State | None = None
        self.bad = 0
        self.history: list[dict] = []

    def __call__(self, m: nnx.Module, step: int) -> dict:
        met = classification_metrics(self.y_val, self.predictor(nnx.state(m), self.examples), LABEL_NAMES)
        met["loss"] = met["log_loss"]
        score = (round(self.sign * met[self.metric], 9), round(-met["loss"], 9))
        self.history.append({"step": step, **{k: met[k] for k in ("accuracy", "macro_f1", "loss", "ece")}})
        if score > self.best:
            # copy: the trainer donates its arrays on the next update
            self.best, self.best_step, self.bad = score, step, 0
            self.state = jax.tree.map(lambda x: x.copy(), nnx.state(m, nnx.Param))
        else:
            self.bad += 1
        result = {k: met[k] for k in ("accuracy", "macro_f1", "loss", "ece")}
        if self.patience > 0 and self.bad >= self.patience and step < self.steps:
            log.info("early stopping at step %d: validation %s has not improved for %d evaluations (best %.4g "
                     "at step %d)", step, self.metric, self.patience, self.sign * self.best[0], self.best_step)
            raise loop.StopTraining(f"validation {self.metric} has not improved for {self.patience} evaluations",
                                    result)
        return result


def train_classifier(model: nnx.Module, data: ClassifierData, s: ClassifierSettings, *, weights: np.ndarray,
                     loop_settings: loop.LoopSettings, optimizer: OptimizerSettings, steps_per_epoch: int,
                     mesh: jax.sharding.Mesh, rules: Any, output_dir: str,
                     pad_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fine-tune `model` (updated in place to its best validation state) with class `weights`, and score it.

    Returns (the result: question counts, class weights, steps, early stopping, validation history, val / test
    metrics; loop.train's summary).
    """
    # One padded length for training (one compilation): the bucket that fits the longest training question.
    train_len = bucket_length(max(len(ex["input_ids"]) for ex in data.train_ex), length_buckets(s.max_len))
    batches = make_loader(data.train_ex, batch_size=s.batch_size, seed=s.seed, shuffle=True,
                          collate=Collator({"input_ids": pad_id}, length=train_len))
    predictor = Predictor(nnx.graphdef(model), mesh, batch_size=s.eval_batch_size, max_len=s.max_len,
                          pad_id=pad_id, desc="eval")
    tracker = EarlyStopping(predictor, data.val_ex, data.y_val, metric=s.early_stopping_metric,
                            patience=s.early_stopping_patience, steps=loop_settings.steps)
    summary = loop.train(model, loss_fn=weighted_ce_loss(jnp.asarray(weights)), batches=batches,
                         settings=loop_settings, optimizer=optimizer, output_dir=output_dir, mesh=mesh, rules=rules,
                         eval_fn=tracker, desc="classify")
    if tracker.state is not None:
        nnx.update(model, tracker.state)  # the best validation checkpoint is the one exported
    result: dict[str, Any] = {
        "train_questions": len(data.train), "val_questions": len(data.val), "test_questions": len(data.test),
        "train_class_counts": dict(zip(LABEL_NAMES, np.bincount(data.y_train, minlength=2).tolist())),
        "class_weights": dict(zip(LABEL_NAMES, weights.tolist())),
        "steps": summary.get("steps"), "steps_per_epoch": steps_per_epoch, "early_stopped":
            bool(summary.get("early_stopped", False)), "best_step": tracker.best_step,
        "early_stopping_metric": s.early_stopping_metric, "validation_history": tracker.history,
    }
    result.update(final_metrics(predictor, nnx.state(model), data, s.second_labels_path))
    return result, summary


def final_metrics(predictor: Predictor, state: nnx.State, data: ClassifierData,
                  second_labels_path: str = "") -> dict[str, Any]:
    """"val" and (with test questions) "test" metrics of the chosen model, and its agreement with a second
    label set of the test questions ("second_labels") when `second_labels_path` is given."""
    out: dict[str, Any] = {"val": classification_metrics(data.y_val, predictor(state, data.val_ex), LABEL_NAMES)}
    if not data.test:
        return out
    test_probs = predictor(state, data.test_ex, progress=True)
    y_test = np.array([LABEL_NAMES.index(r.label) for r in data.test])
    out["test"] = classification_metrics(y_test, test_probs, LABEL_NAMES)
    if second_labels_path:
        out["second_labels"] = _second_label_agreement(data.test, y_test, test_probs.argmax(-1),
                                                       read_label_file(second_labels_path))
    return out


def _second_label_agreement(test: Sequence[MCQRecord], y_test: np.ndarray, pred: np.ndarray,
                            second: dict[str, str]) -> dict[str, Any]:
    both = [(i, LABEL_NAMES.index(second[r.id])) for i, r in enumerate(test) if r.id in second]
    if not both:
        raise ClassifierError(f"config.classifier.second_labels_path: none of its ids match the "
                              f"{len(test)} test questions")
    idx, y2 = map(np.array, zip(*both))
    return {
        "n": len(idx),
        "kappa_classifier_vs_second": cohen_kappa(pred[idx], y2),
        "kappa_gold_vs_second": cohen_kappa(y_test[idx], y2),
        "agreement_classifier_vs_second": float((pred[idx] == y2).mean()),
        "agreement_gold_vs_second": float((y_test[idx] == y2).mean()),
    }
