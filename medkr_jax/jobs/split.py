"""Job "split": label benchmark questions reasoning-heavy vs knowledge-heavy with a classifier folder.

The classifier (config.split.classifier_path: ours from job "classify", or the released
BioMedBERT-Knowledge-vs-Reasoning as-is) reads the questions of config.data.benchmarks; writes per-benchmark
split/<benchmark>/reasoning.jsonl / knowledge.jsonl with `reasoning_prob`, split_summary.json, metrics.jsonl,
a fraction plot and split_report.md (agreement with released `is_reasoning` labels, accuracy vs gold labels).
"""

from __future__ import annotations

from medkr_jax import parallel
from medkr_jax.config import ConfigError, require
from medkr_jax.data.readers import load_benchmark_spec
from medkr_jax.data.pipeline import load_tokenizer
from medkr_jax.data.records import MCQRecord
from medkr_jax.eval import classifier_report
from medkr_jax.eval.classification import ClassifierError
from medkr_jax.eval.split import TEXT_MODES, group_records, split_groups, summarize_split, write_split_files
from medkr_jax.jobs.common import bert_dtypes
from medkr_jax.models.bert import BertForSequenceClassification, load_bert


def _records(config) -> list[MCQRecord]:
    """The questions of config.data.benchmarks, the first config.data.limit of each when > 0."""
    records = []
    for spec in config.data.benchmarks:
        recs = list(load_benchmark_spec(spec))
        if int(config.data.limit) > 0:
            recs = recs[: int(config.data.limit)]
        records += recs
    return records


def run(config) -> dict:
    """Job "split": label benchmark questions reasoning-heavy vs knowledge-heavy with a classifier folder."""
    require(config, "output_dir", "split.classifier_path", "data.benchmarks")
    sc = config.split
    if sc.text not in TEXT_MODES:
        raise ConfigError(f"config.split.text={sc.text!r}: expected one of {TEXT_MODES}")
    threshold = float(sc.threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"config.split.threshold={threshold}: expected a probability in [0, 1]")
    out_dir = config.output_dir
    mesh, rules = parallel.make_mesh(config.mesh), parallel.logical_rules(config)
    dtype, param_dtype = bert_dtypes(config)
    model, bcfg = load_bert(sc.classifier_path, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype)
    if not isinstance(model, BertForSequenceClassification):
        raise ClassifierError(f"config.split.classifier_path={sc.classifier_path!r} has no classification head "
                              "(classifier.weight); give a BertForSequenceClassification folder")
    tokenizer = load_tokenizer(config.tokenizer_path or sc.classifier_path)

    groups = group_records(_records(config), str(sc.group_by or "benchmark"))
    if not groups:
        raise ClassifierError(f"config.data.benchmarks={tuple(config.data.benchmarks)} gave no questions")
    labelled = split_groups(groups, model, bcfg.id2label, mesh, tokenizer=tokenizer, threshold=threshold,
                            batch_size=int(sc.batch_size), max_len=int(sc.max_len), text=sc.text,
                            reasoning_id=int(sc.reasoning_index))
    files = write_split_files(out_dir, labelled) if parallel.is_main_process() else {}
    summary = summarize_split(labelled, files, classifier_path=sc.classifier_path, threshold=threshold)
    if parallel.is_main_process():
        classifier_report.write_split_outputs(out_dir, summary)
    return summary
