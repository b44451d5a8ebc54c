"""Job "classify": fine-tune a BERT reasoning/knowledge question classifier (PubMedBERT in the paper, MiniLM offline).

Questions come from config.classifier.train_path (a benchmark spec whose records carry `label`, e.g. MedXpertQA's
question types, or "synthetic": the synthetic world of config.synthetic); the test set is
config.classifier.test_path or a held-out part. Writes an HF BertForSequenceClassification folder,
classifier_metrics.json, confusion-matrix / calibration plots and report.md in config.output_dir.
"""

from __future__ import annotations

import os

from medkr_jax import parallel
from medkr_jax.config import ConfigError, require
from medkr_jax.data import synthetic
from medkr_jax.data.pipeline import load_tokenizer
from medkr_jax.data.records import MCQRecord
from medkr_jax.eval import classifier_report
from medkr_jax.eval.classification import LABEL_NAMES
from medkr_jax.eval.split import TEXT_MODES
from medkr_jax.jobs.common import bert_dtypes
from medkr_jax.jobs.training import check_batching, loop_settings, optimizer_settings
from medkr_jax.models.bert import export_bert_classifier, load_bert
from medkr_jax.train import classifier
from medkr_jax.train.metrics_log import write_report


def classifier_settings(config) -> classifier.ClassifierSettings:
    """The checked config.classifier settings of the run."""
    require(config, "output_dir", "model.path", "classifier.train_path")
    cc = config.classifier
    if int(cc.num_labels) != len(LABEL_NAMES):
        raise ConfigError(f"config.classifier.num_labels={cc.num_labels}: the reasoning/knowledge classifier has "
                          f"{len(LABEL_NAMES)} classes {LABEL_NAMES}")
    if cc.text not in TEXT_MODES:
        raise ConfigError(f"config.classifier.text={cc.text!r}: expected one of {TEXT_MODES}")
    metric = str(cc.early_stopping_metric)
    if metric not in classifier.EARLY_STOPPING_METRICS:
        raise ConfigError(f"config.classifier.early_stopping_metric={metric!r}: expected macro_f1, accuracy or loss")
    return classifier.ClassifierSettings(
        text=cc.text, max_len=int(cc.max_len), batch_size=int(config.train.batch_size),
        eval_batch_size=int(cc.eval_batch_size), early_stopping_metric=metric,
        early_stopping_patience=int(cc.early_stopping_patience), second_labels_path=cc.second_labels_path,
        seed=int(config.seed))


def labelled_records(config, spec: str) -> list[MCQRecord]:
    """Labelled questions of a benchmark spec; "synthetic" draws them from the synthetic world (config.synthetic:
    seed, the world's sizes, classifier_questions, reasoning_fraction)."""
    if spec != "synthetic":
        return classifier.load_labelled_records(spec)
    s = config.synthetic
    world = synthetic.make_world(int(s.seed), n_diseases=int(s.n_diseases), n_classes=int(s.n_classes),
                                 drugs_per_class=int(s.drugs_per_class))
    records = synthetic.make_questions(world, int(s.classifier_questions), int(s.seed),
                                       reasoning_fraction=float(s.reasoning_fraction))
    return classifier.keep_labelled(records, spec)


def _data(config, s: classifier.ClassifierSettings) -> tuple[classifier.ClassifierData, str, int]:
    """The tokenised train / validation / test questions, the tokenizer folder and its pad id."""
    cc = config.classifier
    train, val, test = classifier.split_questions(
        labelled_records(config, cc.train_path), test_path=cc.test_path, test_fraction=float(cc.test_fraction),
        val_fraction=float(cc.val_fraction), seed=s.seed)
    if not val:
        raise ConfigError(f"config.classifier.val_fraction={cc.val_fraction} leaves no validation questions "
                          f"({len(train)} training questions); early stopping needs some")
    tok_path = config.tokenizer_path or config.model.path
    tokenizer = load_tokenizer(tok_path)
    data = classifier.tokenize_splits(tokenizer, train, val, test, max_len=s.max_len, text=s.text)
    return data, tok_path, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def run(config) -> dict:
    """Job "classify": fine-tune the BERT reasoning/knowledge classifier; returns a summary dict."""
    s = classifier_settings(config)
    cc, out_dir = config.classifier, config.output_dir
    check_batching(config, s.batch_size, steps_optional=float(cc.epochs) > 0)
    os.makedirs(out_dir, exist_ok=True)
    data, tok_path, pad_id = _data(config, s)
    weights = classifier.class_weights_for(data.y_train, len(LABEL_NAMES), bool(cc.class_weighting))
    mesh, rules = parallel.make_mesh(config.mesh), parallel.logical_rules(config)
    dtype, param_dtype = bert_dtypes(config)
    model, bcfg = load_bert(config.model.path, mesh=mesh, rules=rules, id2label=dict(enumerate(LABEL_NAMES)),
                            dtype=dtype, param_dtype=param_dtype, remat=bool(config.model.remat), seed=s.seed,
                            classifier_dropout=float(cc.dropout))
    steps, steps_per_epoch, eval_every = classifier.training_steps(
        len(data.train_ex), s.batch_size, epochs=float(cc.epochs), steps=int(config.train.steps),
        eval_every=int(config.train.eval_every))
    result, summary = classifier.train_classifier(
        model, data, s, weights=weights, loop_settings=loop_settings(config, steps=steps, eval_every=eval_every),
        optimizer=optimizer_settings(config), steps_per_epoch=steps_per_epoch, mesh=mesh, rules=rules,
        output_dir=out_dir, pad_id=pad_id)

    export_dir = cc.export_dir or os.path.join(out_dir, "classifier")
    export_bert_classifier(model, bcfg, export_dir, tokenizer_dir=tok_path)
    result["export_dir"] = export_dir
    if parallel.is_main_process():
        classifier_report.write_json(os.path.join(out_dir, "classifier_metrics.json"), result)
        classifier_report.plot_classifier_metrics(out_dir, result)
        write_report(out_dir, "Reasoning / knowledge classifier", {**summary, "export_dir": export_dir},
                     plots=(("loss", "loss.png"), ("eval/macro_f1", "val_macro_f1.png")))
        classifier_report.append_classifier_report(out_dir, result)
    return {k: v for k, v in result.items() if k not in ("validation_history",)}
