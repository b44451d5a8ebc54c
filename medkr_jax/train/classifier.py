"""The reasoning/knowledge question classifier: training (job "classify") and benchmark splitting (job "split").

`classify` fine-tunes a BERT sequence classifier (PubMedBERT in the paper, MiniLM offline) on labelled questions
(MedXpertQA's Reasoning/Understanding types, the synthetic world, or any canonical records with `label`) with
the shared training loop, early stopping on a validation split, and writes an HF BertForSequenceClassification
folder, metrics JSON, confusion-matrix / calibration plots and report.md.

`split` applies a classifier folder (ours, or the released BioMedBERT-Knowledge-vs-Reasoning as-is) to
benchmark files and writes per-benchmark reasoning.jsonl / knowledge.jsonl with `reasoning_prob`, a fraction
table, agreement with released `is_reasoning` labels and a bar plot.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medkr_jax import parallel, xla_options
from medkr_jax.data.records import LETTERS, MCQRecord, write_records

log = logging.getLogger(__name__)

# Class ids of the classifiers this project trains (label2id of the exported folder).
LABEL_NAMES = ("knowledge", "reasoning")
REASONING = 1
TEXT_MODES = ("question", "question_options")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ClassifierError(ValueError):
    """Bad classifier input: missing labels, unknown label names, an unusable classifier folder."""


# ------------------------------------------------------------------------------------------------- inputs


def record_text(record: MCQRecord, mode: str = "question") -> str:
    """The text the classifier reads for a record: the question, optionally followed by lettered options."""
    if mode == "question":
        return record.question
    if mode == "question_options":
        return record.question + " " + " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(record.options))
    raise ClassifierError(f"classifier text mode {mode!r} is unknown; expected one of {TEXT_MODES}")


def load_labelled_records(spec: str, config: Any = None) -> list[MCQRecord]:
    """Labelled records from a benchmark spec ("medxpertqa:path", a canonical .jsonl/.parquet, ...).

    "synthetic" draws them from the synthetic world (config.synthetic: seed, the world's sizes,
    classifier_questions, reasoning_fraction). Records without a label are left out (counted in a warning); none
    labelled is an error.
    """
    if spec == "synthetic":
        from medkr_jax.config import base_config
        from medkr_jax.data import synthetic
        s = (config if config is not None else base_config()).synthetic
        world = synthetic.make_world(int(s.seed), n_diseases=int(s.n_diseases), n_classes=int(s.n_classes),
                                     drugs_per_class=int(s.drugs_per_class))
        records = synthetic.make_questions(world, int(s.classifier_questions), int(s.seed),
                                           reasoning_fraction=float(s.reasoning_fraction))
    else:
        from medkr_jax.data.benchmarks import load_benchmark_spec
        records = list(load_benchmark_spec(spec))
    labelled = [r for r in records if r.label is not None]
    if not labelled:
        raise ClassifierError(f"{spec}: none of the {len(records)} records has a 'label' (reasoning/knowledge); "
                              "the classifier needs labelled questions (e.g. MedXpertQA question types)")
    if len(labelled) < len(records):
        log.warning("%s: %d of %d records have no label and are left out", spec, len(records) - len(labelled),
                    len(records))
    return labelled


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


def tokenize_records(tokenizer, records: Sequence[MCQRecord], *, max_len: int, text: str = "question",
                     with_labels: bool = False) -> list[dict[str, np.ndarray]]:
    """Per-record dicts of unpadded input_ids / token_type_ids (truncated to max_len) [+ label id]."""
    from medkr_jax.data.pipeline import tokenize_texts
    fields = {}
    if with_labels:
        fields["label"] = [LABEL_NAMES.index(r.label) for r in records]
    return tokenize_texts(tokenizer, [record_text(r, text) for r in records], max_length=max_len, **fields)


def length_buckets(max_len: int) -> tuple[int, ...]:
    """Padded lengths used for inference batches: few shapes (few compilations), little padding."""
    return tuple(b for b in (32, 64, 128, 256, 512) if b < max_len) + (int(max_len),)


# ---------------------------------------------------------------------------------------------- inference


class Predictor:
    """Batched, sharded classifier inference: rows split over the mesh's batch axes, lengths bucketed.

    One jitted forward per padded length; params are passed per call, so the same Predictor serves every
    evaluation during training (new params, same shapes: no recompilation).
    """

    def __init__(self, graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, *, batch_size: int, max_len: int,
                 pad_id: int = 0, desc: str = "classify"):
        self.graphdef, self.mesh, self.desc = graphdef, mesh, desc
        div = parallel.batch_divisor(mesh)
        self.batch_size = max(div, int(math.ceil(batch_size / div) * div))
        self.buckets = length_buckets(max_len)
        self.pad_id = int(pad_id)
        graphdef_ = graphdef

        def forward(state, ids, mask, types):
            logits = nnx.merge(graphdef_, state)(ids, mask, types)
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

        self._forward = jax.jit(forward, out_shardings=parallel.replicated(mesh),
                                compiler_options=xla_options.dense_program_options())

    def __call__(self, state: nnx.State, examples: Sequence[Mapping[str, np.ndarray]], *,
                 progress: bool = False) -> np.ndarray:
        """Class probabilities float32[N, num_labels] for tokenised examples, in input order."""
        from medkr_jax.data.pipeline import bucket_length
        n = len(examples)
        lengths = np.array([len(ex["input_ids"]) for ex in examples])
        order = np.argsort(-lengths, kind="stable")  # similar lengths together: little padding
        out = None
        bar = None
        if progress and parallel.is_main_process():
            from tqdm.auto import tqdm
            bar = tqdm(total=n, desc=self.desc, unit="q", dynamic_ncols=True)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            t = bucket_length(int(lengths[idx].max()), self.buckets)
            ids = np.full((self.batch_size, t), self.pad_id, np.int32)
            types = np.zeros((self.batch_size, t), np.int32)
            mask = np.zeros((self.batch_size, t), bool)
            mask[:, 0] = True  # filler rows attend to one token (never all-masked)
            for row, i in enumerate(idx):
                ex = examples[i]
                k = min(len(ex["input_ids"]), t)
                ids[row, :k] = ex["input_ids"][:k]
                mask[row, :k] = True
                if "token_type_ids" in ex:
                    types[row, :k] = ex["token_type_ids"][:k]
            batch = parallel.shard_batch((ids, mask, types), self.mesh)
            probs = np.asarray(jax.device_get(self._forward(state, *batch)))
            if out is None:
                out = np.zeros((n, probs.shape[-1]), np.float32)
            out[idx] = probs[:len(idx)]
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out if out is not None else np.zeros((0, 0), np.float32)


# ------------------------------------------------------------------------------------------------ metrics


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


# -------------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_confusion_matrix(cm: Sequence[Sequence[int]], label_names: Sequence[str], path: str, title: str) -> str:
    """Confusion-matrix heat map with counts and row percentages."""
    plt = _pyplot()
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
    plt = _pyplot()
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
    plt = _pyplot()
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


# ---------------------------------------------------------------------------------------------- utilities


def _mesh_and_rules(config) -> tuple[jax.sharding.Mesh, tuple]:
    return parallel.make_mesh(config.mesh), parallel.logical_rules(config)


def _dtype(name: str, key: str):
    if name not in DTYPES:
        from medkr_jax.config import ConfigError
        raise ConfigError(f"{key}={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


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


# --------------------------------------------------------------------------------------------- job: classify


def _weighted_ce_loss(class_weights: jax.Array):
    import optax

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


def run_classify(config) -> dict:
    """Job "classify": fine-tune the BERT reasoning/knowledge classifier; returns a summary dict."""
    from medkr_jax.config import ConfigError, require
    from medkr_jax.data.benchmarks import holdout_split, load_benchmark_spec
    from medkr_jax.data.pipeline import Collator, bucket_length, load_tokenizer, make_loader
    from medkr_jax.models.bert import export_bert_classifier, load_bert
    from medkr_jax.train import loop

    require(config, "output_dir", "model.path", "classifier.train_path")
    cc = config.classifier
    if int(cc.num_labels) != len(LABEL_NAMES):
        raise ConfigError(f"config.classifier.num_labels={cc.num_labels}: the reasoning/knowledge classifier has "
                          f"{len(LABEL_NAMES)} classes {LABEL_NAMES}")
    if cc.text not in TEXT_MODES:
        raise ConfigError(f"config.classifier.text={cc.text!r}: expected one of {TEXT_MODES}")
    out_dir = config.output_dir
    os.makedirs(out_dir, exist_ok=True)
    seed = int(config.seed)

    # data: train / validation / test
    records = load_labelled_records(cc.train_path, config)
    if cc.test_path:
        test = [r for r in load_benchmark_spec(cc.test_path) if r.label is not None]
        train_all = records
    else:
        train_all, test = holdout_split(records, test_fraction=float(cc.test_fraction), seed=seed)
    train, val = holdout_split(train_all, test_fraction=float(cc.val_fraction), seed=seed + 1)
    if not val:
        raise ConfigError(f"config.classifier.val_fraction={cc.val_fraction} leaves no validation questions "
                          f"({len(train_all)} training questions); early stopping needs some")
    tok_path = config.tokenizer_path or config.model.path
    tokenizer = load_tokenizer(tok_path)
    max_len = int(cc.max_len)
    train_ex = tokenize_records(tokenizer, train, max_len=max_len, text=cc.text, with_labels=True)
    val_ex = tokenize_records(tokenizer, val, max_len=max_len, text=cc.text)
    test_ex = tokenize_records(tokenizer, test, max_len=max_len, text=cc.text) if test else []
    y_train = [int(ex["label"]) for ex in train_ex]
    y_val = np.array([LABEL_NAMES.index(r.label) for r in val])
    weights = class_weights_for(y_train, len(LABEL_NAMES), bool(cc.class_weighting))

    # model
    mesh, rules = _mesh_and_rules(config)
    model, bcfg = load_bert(config.model.path, mesh=mesh, rules=rules, id2label=dict(enumerate(LABEL_NAMES)),
                            dtype=_dtype(config.model.dtype, "config.model.dtype"),
                            param_dtype=_dtype(config.model.param_dtype, "config.model.param_dtype"),
                            remat=bool(config.model.remat), seed=seed, classifier_dropout=float(cc.dropout))

    # schedule
    bs = int(config.train.batch_size)
    steps_per_epoch = max(1, len(train_ex) // bs)
    steps = (int(math.ceil(float(cc.epochs) * len(train_ex) / bs)) if float(cc.epochs) > 0
             else int(config.train.steps))
    eval_every = int(config.train.eval_every) or steps_per_epoch
    run_cfg = config.copy_and_resolve_references()
    with run_cfg.unlocked():
        run_cfg.train.eval_every = eval_every
    # One padded length for training (one compilation): the bucket that fits the longest training question.
    train_len = bucket_length(max(len(ex["input_ids"]) for ex in train_ex), length_buckets(max_len))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = make_loader(train_ex, batch_size=bs, seed=seed, shuffle=True,
                          collate=Collator({"input_ids": pad_id}, length=train_len))

    predictor = Predictor(nnx.graphdef(model), mesh, batch_size=int(cc.eval_batch_size), max_len=max_len,
                          pad_id=pad_id, desc="eval")
    metric, patience = str(cc.early_stopping_metric), int(cc.early_stopping_patience)
    if metric not in ("macro_f1", "accuracy", "loss"):
        raise ConfigError(f"config.classifier.early_stopping_metric={metric!r}: expected macro_f1, accuracy or loss")
    sign = -1.0 if metric == "loss" else 1.0
    # Scores compare as (metric, -loss): among equal macro-F1 / accuracy, the better-calibrated model wins.
    track: dict[str, Any] = {"best": (-math.inf, -math.inf), "best_step": None, "state": None, "bad": 0,
                             "history": []}

    def eval_fn(m: nnx.Module, step: int) -> dict:
        state = nnx.state(m)
        probs = predictor(state, val_ex)
        met = classification_metrics(y_val, probs, LABEL_NAMES)
        met["loss"] = met["log_loss"]
        score = (round(sign * met[metric], 9), round(-met["loss"], 9))
        track["history"].append({"step": step, **{k: met[k] for k in ("accuracy", "macro_f1", "loss", "ece")}})
        if score > track["best"]:
            # copy: the trainer donates its arrays on the next update
            track.update(best=score, best_step=step, bad=0,
                         state=jax.tree.map(lambda x: x.copy(), nnx.state(m, nnx.Param)))
        else:
            track["bad"] += 1
        result = {k: met[k] for k in ("accuracy", "macro_f1", "loss", "ece")}
        if patience > 0 and track["bad"] >= patience and step < steps:
            log.info("early stopping at step %d: validation %s has not improved for %d evaluations (best %.4g "
                     "at step %d)", step, metric, patience, sign * track["best"][0], track["best_step"])
            raise loop.StopTraining(f"validation {metric} has not improved for {patience} evaluations", result)
        return result

    summary = loop.train(model, loss_fn=_weighted_ce_loss(jnp.asarray(weights)), batches=batches,
                         config=run_cfg, output_dir=out_dir, mesh=mesh, rules=rules, steps=steps,
                         eval_fn=eval_fn, desc="classify")
    if track["state"] is not None:
        nnx.update(model, track["state"])  # the best validation checkpoint is the one exported

    # final evaluation of the chosen model
    state = nnx.state(model)
    val_metrics = classification_metrics(y_val, predictor(state, val_ex), LABEL_NAMES)
    result: dict[str, Any] = {
        "train_questions": len(train), "val_questions": len(val), "test_questions": len(test),
        "train_class_counts": dict(zip(LABEL_NAMES, np.bincount(y_train, minlength=2).tolist())),
        "class_weights": dict(zip(LABEL_NAMES, weights.tolist())),
        "steps": summary.get("steps"), "steps_per_epoch": steps_per_epoch, "early_stopped":
            bool(summary.get("early_stopped", False)), "best_step": track["best_step"],
        "early_stopping_metric": metric, "validation_history": track["history"], "val": val_metrics,
    }
    if test:
        test_probs = predictor(state, test_ex, progress=True)
        y_test = np.array([LABEL_NAMES.index(r.label) for r in test])
        result["test"] = classification_metrics(y_test, test_probs, LABEL_NAMES)
        if cc.second_labels_path:
            second = read_label_file(cc.second_labels_path)
            both = [(i, LABEL_NAMES.index(second[r.id])) for i, r in enumerate(test) if r.id in second]
            if not both:
                raise ClassifierError(f"config.classifier.second_labels_path: none of its ids match the "
                                      f"{len(test)} test questions")
            idx, y2 = map(np.array, zip(*both))
            pred = test_probs.argmax(-1)
            result["second_labels"] = {
                "n": len(idx),
                "kappa_classifier_vs_second": cohen_kappa(pred[idx], y2),
                "kappa_gold_vs_second": cohen_kappa(y_test[idx], y2),
                "agreement_classifier_vs_second": float((pred[idx] == y2).mean()),
                "agreement_gold_vs_second": float((y_test[idx] == y2).mean()),
            }

    export_dir = cc.export_dir or os.path.join(out_dir, "classifier")
    export_bert_classifier(model, bcfg, export_dir, tokenizer_dir=tok_path)
    result["export_dir"] = export_dir
    if parallel.is_main_process():
        _write_json(os.path.join(out_dir, "classifier_metrics.json"), result)
        final = result.get("test", val_metrics)
        which = "test" if "test" in result else "validation"
        plot_confusion_matrix(final["confusion_matrix"], LABEL_NAMES, os.path.join(out_dir, "confusion_matrix.png"),
                              f"Confusion matrix ({which}, n={final['n']})")
        plot_calibration(final["calibration_bins"], os.path.join(out_dir, "calibration.png"),
                         f"Reliability ({which}), ECE={final['ece']:.3f}")
        loop.write_report(out_dir, "Reasoning / knowledge classifier", {**summary, "export_dir": export_dir},
                          plots=(("loss", "loss.png"), ("eval/macro_f1", "val_macro_f1.png")))
        _append_classifier_report(out_dir, result)
    return {k: v for k, v in result.items() if k not in ("validation_history",)}


def _append_classifier_report(out_dir: str, result: Mapping[str, Any]) -> None:
    lines = ["", "## Classifier metrics", ""]
    rows = []
    for split in ("val", "test"):
        if split in result:
            m = result[split]
            rows.append([split, m["n"], m["accuracy"], m["macro_f1"], m["ece"], m["majority_baseline"]])
    lines += _md_table(["split", "n", "accuracy", "macro-F1", "ECE", "majority class"], rows)
    final = result.get("test", result["val"])
    lines += ["", "Per class (" + ("test" if "test" in result else "validation") + "):", ""]
    lines += _md_table(["class", "precision", "recall", "F1", "support"],
                       [[c, v["precision"], v["recall"], v["f1"], v["support"]] for c, v in final["per_class"].items()])
    cm = final["confusion_matrix"]
    lines += ["", "Confusion matrix (rows true, columns predicted):", ""]
    lines += _md_table(["true \\ predicted", *LABEL_NAMES], [[n, *row] for n, row in zip(LABEL_NAMES, cm)])
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


# ------------------------------------------------------------------------------------------------ job: split


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "benchmark"


def split_records(records: Sequence[MCQRecord], model, id2label, mesh, *, tokenizer, threshold: float,
                  batch_size: int, max_len: int, text: str = "question", reasoning_id: int = -1,
                  progress: bool = True) -> list[MCQRecord]:
    """Copies of `records` with reasoning_prob / is_reasoning from the classifier; released values (if any)
    move to meta["released_reasoning_prob"] / meta["released_is_reasoning"]."""
    import dataclasses
    r_id = reasoning_index(id2label, reasoning_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = tokenize_records(tokenizer, records, max_len=max_len, text=text)
    predictor = Predictor(nnx.graphdef(model), mesh, batch_size=batch_size, max_len=max_len, pad_id=pad_id,
                          desc="split")
    probs = predictor(nnx.state(model), examples, progress=progress)[:, r_id] if records else np.zeros(0)
    out = []
    for r, p in zip(records, probs):
        meta = dict(r.meta)
        if r.is_reasoning is not None:
            meta["released_is_reasoning"] = r.is_reasoning
        if r.reasoning_prob is not None:
            meta["released_reasoning_prob"] = r.reasoning_prob
        out.append(dataclasses.replace(r, meta=meta, reasoning_prob=float(p), is_reasoning=bool(p >= threshold)))
    return out


def run_split(config) -> dict:
    """Job "split": label benchmark questions reasoning-heavy vs knowledge-heavy with a classifier folder."""
    from medkr_jax.config import ConfigError, require
    from medkr_jax.data.benchmarks import load_benchmark_spec
    from medkr_jax.data.pipeline import load_tokenizer
    from medkr_jax.models.bert import BertForSequenceClassification, load_bert

    require(config, "output_dir", "split.classifier_path", "data.benchmarks")
    sc = config.split
    if sc.text not in TEXT_MODES:
        raise ConfigError(f"config.split.text={sc.text!r}: expected one of {TEXT_MODES}")
    threshold = float(sc.threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"config.split.threshold={threshold}: expected a probability in [0, 1]")
    out_dir = config.output_dir
    mesh, rules = _mesh_and_rules(config)
    model, bcfg = load_bert(sc.classifier_path, mesh=mesh, rules=rules,
                            dtype=_dtype(config.model.dtype, "config.model.dtype"),
                            param_dtype=_dtype(config.model.param_dtype, "config.model.param_dtype"))
    if not isinstance(model, BertForSequenceClassification):
        raise ClassifierError(f"config.split.classifier_path={sc.classifier_path!r} has no classification head "
                              "(classifier.weight); give a BertForSequenceClassification folder")
    tokenizer = load_tokenizer(config.tokenizer_path or sc.classifier_path)

    group_by = str(sc.group_by or "benchmark")
    by_bench: dict[str, list[MCQRecord]] = {}
    for spec in config.data.benchmarks:
        recs = list(load_benchmark_spec(spec))
        if int(config.data.limit) > 0:
            recs = recs[: int(config.data.limit)]
        for r in recs:
            # e.g. group_by="subject": one row per MMLU subject (records without the key keep their benchmark)
            key = r.benchmark if group_by == "benchmark" else str(r.meta.get(group_by) or r.benchmark)
            by_bench.setdefault(key, []).append(r)
    if not by_bench:
        raise ClassifierError(f"config.data.benchmarks={tuple(config.data.benchmarks)} gave no questions")
    names = sorted(by_bench)
    flat = [r for n in names for r in by_bench[n]]
    labelled = split_records(flat, model, bcfg.id2label, mesh, tokenizer=tokenizer, threshold=threshold,
                             batch_size=int(sc.batch_size), max_len=int(sc.max_len), text=sc.text,
                             reasoning_id=int(sc.reasoning_index))

    rows, agreement, accuracy, files = [], [], [], {}
    pos = 0
    for name in names:
        recs = labelled[pos:pos + len(by_bench[name])]
        pos += len(recs)
        reasoning = [r for r in recs if r.is_reasoning]
        knowledge = [r for r in recs if not r.is_reasoning]
        rows.append({"benchmark": name, "n": len(recs), "reasoning": len(reasoning), "knowledge": len(knowledge),
                     "reasoning_fraction": len(reasoning) / len(recs),
                     "mean_reasoning_prob": float(np.mean([r.reasoning_prob for r in recs]))})
        rel = [(r.is_reasoning, r.meta["released_is_reasoning"]) for r in recs if "released_is_reasoning" in r.meta]
        if rel:
            ours, theirs = (np.array(x, int) for x in zip(*rel))
            agreement.append({"benchmark": name, "n": len(rel), "agreement": float((ours == theirs).mean()),
                              "kappa": cohen_kappa(ours, theirs), "released_reasoning_fraction":
                                  float(theirs.mean())})
        gold = [(int(r.is_reasoning), int(r.label == "reasoning")) for r in recs if r.label is not None]
        if gold:
            ours, truth = (np.array(x) for x in zip(*gold))
            accuracy.append({"benchmark": name, "n": len(gold), "accuracy": float((ours == truth).mean()),
                             "kappa": cohen_kappa(ours, truth)})
        if parallel.is_main_process():
            # An empty class gets no file: an empty JSONL is not a valid record file (read_records rejects it).
            d = os.path.join(out_dir, "split", _safe_name(name))
            files[name] = {kind: str(write_records(os.path.join(d, f"{kind}.jsonl"), part))
                           for kind, part in (("reasoning", reasoning), ("knowledge", knowledge)) if part}
    total = sum(r["n"] for r in rows)
    overall = sum(r["reasoning"] for r in rows) / total
    summary = {"classifier_path": sc.classifier_path, "threshold": threshold, "questions": total,
               "reasoning": sum(r["reasoning"] for r in rows), "reasoning_fraction": overall,
               "per_benchmark": rows, "agreement_with_released": agreement, "accuracy_vs_gold_labels": accuracy,
               "files": files}
    if agreement:
        ours = np.array([int(r.is_reasoning) for r in labelled if "released_is_reasoning" in r.meta])
        theirs = np.array([int(r.meta["released_is_reasoning"]) for r in labelled if "released_is_reasoning" in r.meta])
        summary["agreement_overall"] = {"n": len(ours), "agreement": float((ours == theirs).mean()),
                                        "kappa": cohen_kappa(ours, theirs)}
    if parallel.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        _write_json(os.path.join(out_dir, "split_summary.json"), summary)
        with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.write(json.dumps({"benchmark": "overall", "n": total, "reasoning_fraction": overall}) + "\n")
        plot_reasoning_fractions([(r["benchmark"], r["reasoning_fraction"]) for r in rows], overall,
                                 os.path.join(out_dir, "reasoning_fraction.png"))
        _write_split_report(out_dir, summary)
    return summary


def _write_split_report(out_dir: str, s: Mapping[str, Any]) -> None:
    lines = ["# Reasoning / knowledge split", "",
             f"Classifier `{s['classifier_path']}`, threshold {s['threshold']}: **{s['reasoning']} of "
             f"{s['questions']} questions ({100 * s['reasoning_fraction']:.1f}%) are reasoning-heavy**.", ""]
    lines += _md_table(["benchmark", "questions", "reasoning", "knowledge", "reasoning %", "mean p(reasoning)"],
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
        lines += _md_table(["benchmark", "n", "agreement %", "Cohen's kappa", "released reasoning %"], rows)
    if s["accuracy_vs_gold_labels"]:
        lines += ["", "## Against gold reasoning/knowledge labels", ""]
        lines += _md_table(["benchmark", "n", "accuracy", "Cohen's kappa"],
                           [[a["benchmark"], a["n"], a["accuracy"], a["kappa"]] for a in s["accuracy_vs_gold_labels"]])
    lines += ["", "![reasoning fraction](reasoning_fraction.png)", "",
              "Per-benchmark files: `split/<benchmark>/reasoning.jsonl` and `knowledge.jsonl` "
              "(records with `reasoning_prob` and `is_reasoning`; released values kept in `meta`; a class with "
              "no questions has no file)."]
    with open(os.path.join(out_dir, "split_report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# main.py's job table names the two entry points; `run` is the classify job.
run = run_classify
