"""The released BioMed-R1 layouts: ``zou-lab/BioMed-R1-Eval`` and ``zou-lab/BioMed-R1-Train``
(options as a JSON string letter->text, the answer as a letter, one config per source benchmark)."""

from __future__ import annotations

import os
from pathlib import Path

from medkr_jax.data.readers.fields import (AnswerTextCheck, RecordList, bool_field, float_field, letter_index, limited,
                                           make_record, options_field, require_columns, text_field)
from medkr_jax.data.readers.io import Row, read_rows
from medkr_jax.data.readers.registry import register_reader

# The configs of the released evaluation set, one per benchmark.
BIOMED_R1_EVAL_CONFIGS: tuple[str, ...] = (
    "medmcqa",
    "medqa",
    "pubmedqa",
    "mmlu_health_biology",
    "GPQA_Medical_test",
    "Lancet",
    "NEJM",
    "medbullets_op4",
    "medbullets_op5",
    "MedXpertQA",
    "hle_biomed",
)


def _released_common(row: Row, layout: str, checker: AnswerTextCheck) -> tuple[list[str], int]:
    require_columns(row, ("question", "options", "answer_idx"), layout)
    options = options_field(row, "options")
    idx = letter_index(row, "answer_idx", len(options))
    checker.check(row, "answer", options, idx)
    return options, idx


def _benchmark_name(row: Row, benchmark: str | None, config: str | None, path) -> str:
    return benchmark or text_field(row, "dataset_name", required=False) or config or Path(str(path)).stem


def _record_fields(row: Row, n: int, name: str, options: list[str], idx: int) -> dict:
    """The record fields both released layouts fill the same way (id falls back to ``<benchmark>-<n>``)."""
    return {"id": text_field(row, "id", required=False) or f"{name}-{n}", "benchmark": name,
            "question": text_field(row, "question"), "options": options, "answer": idx}


@register_reader("biomed_r1_eval")
def read_biomed_r1_eval(
    path: str | os.PathLike,
    *,
    config: str | None = None,
    split: str | None = "test",
    benchmark: str | None = None,
    limit: int | None = None,
) -> RecordList:
    """The released ``zou-lab/BioMed-R1-Eval`` layout (one ``config`` per benchmark).

    Columns: ``id, question, answer, options`` (JSON string letter->text), ``answer_idx`` (letter),
    ``dataset_name, adversarial_trace_0..2, reasoning_prob, is_reasoning, reasoning_threshold``.
    The released classifier output goes to ``reasoning_prob`` / ``is_reasoning`` (``label`` stays None).
    """
    rows = limited(read_rows(path, config=config, split=split), limit)
    checker = AnswerTextCheck(f"{path} (biomed_r1_eval)")
    out = RecordList()
    for n, row in enumerate(rows):
        options, idx = _released_common(row, "biomed_r1_eval", checker)
        name = _benchmark_name(row, benchmark, config, path)
        traces = [t for k in range(3) if (t := text_field(row, f"adversarial_trace_{k}", required=False))]
        meta = {k: row.data[k] for k in ("dataset_name", "reasoning_threshold") if row.data.get(k) is not None}
        out.append(make_record(row, **_record_fields(row, n, name, options, idx), meta=meta, adversarial_traces=traces,
                               reasoning_prob=float_field(row, "reasoning_prob"),
                               is_reasoning=bool_field(row, "is_reasoning")))
    checker.report()
    return out


@register_reader("biomed_r1_train")
def read_biomed_r1_train(
    path: str | os.PathLike,
    *,
    config: str | None = None,
    split: str | None = "train",
    benchmark: str | None = None,
    limit: int | None = None,
) -> RecordList:
    """The released ``zou-lab/BioMed-R1-Train`` layout (configs ``biomed_r1``, ``m23k_clean``).

    Columns: ``id, question, answer, options, answer_idx, dataset_name, reasoning_prob, reasoning``;
    the ``reasoning`` trace becomes ``record.trace``.
    """
    rows = limited(read_rows(path, config=config, split=split), limit)
    checker = AnswerTextCheck(f"{path} (biomed_r1_train)")
    out = RecordList()
    for n, row in enumerate(rows):
        options, idx = _released_common(row, "biomed_r1_train", checker)
        require_columns(row, ("reasoning",), "biomed_r1_train")
        name = _benchmark_name(row, benchmark, config, path)
        meta = {"dataset_name": row.data["dataset_name"]} if row.data.get("dataset_name") else {}
        out.append(make_record(row, **_record_fields(row, n, name, options, idx), meta=meta,
                               trace=text_field(row, "reasoning"), reasoning_prob=float_field(row, "reasoning_prob")))
    checker.report()
    return out
