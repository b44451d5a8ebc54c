"""Raw rows of a benchmark source: a local file (JSONL, JSON, Parquet, Arrow, CSV/TSV), a local folder
(a ``datasets.save_to_disk`` output or a hub snapshot of data files) or, only when asked for, a hub id.

Every row keeps where it came from, so a malformed one raises a ``RecordError`` naming the file and
the row/line.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from medkr_jax.data.records import RecordError, iter_jsonl


class Row(NamedTuple):
    """One raw source row and where it came from (for error messages)."""

    source: str
    where: str
    data: dict


_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow", ".csv", ".tsv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _rows_from_json(path: Path) -> list[Row]:
    src = str(path)
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
        return _rows_from_json(path)
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


def _read_table(path: Path) -> pa.Table:
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


def _rows_from_saved_dataset(path: Path, split: str | None) -> list[Row]:
    import datasets  # heavy (pandas, fsspec, hub client): only for save_to_disk folders and hub ids

    obj = datasets.load_from_disk(str(path))
    if isinstance(obj, datasets.DatasetDict):
        ds, name = _pick_split(obj, str(path), split)
        return _rows_from_dataset(ds, f"{path}[{name}]")
    return _rows_from_dataset(obj, str(path))


def _rows_from_folder(path: Path, config: str | None, split: str | None) -> list[Row]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _rows_from_saved_dataset(path, split)
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


@contextlib.contextmanager
def hub_opt_in(allowed: bool) -> Iterator[None]:
    """Within the block, ``hub_allowed()`` is also true when ``allowed`` (one ``load_benchmark`` call)."""
    token = _HUB_OPT_IN.set(bool(allowed))
    try:
        yield
    finally:
        _HUB_OPT_IN.reset(token)


def _rows_from_hub(path: str, config: str | None, split: str | None) -> list[Row]:
    if not hub_allowed():
        raise FileNotFoundError(
            f"{path}: no such file or folder. It looks like a Hugging Face Hub dataset id; loading from the "
            f"Hub is off unless asked for: add hub=1 to the benchmark spec (e.g. 'reader:{path}?hub=1') or "
            f"set {HUB_ENV}=1")
    try:
        import datasets  # heavy (pandas, fsspec, hub client): only for save_to_disk folders and hub ids

        ds = datasets.load_dataset(path, config, split=split or "test")
    except Exception as e:  # offline, unknown id, ... -> one clear message
        raise FileNotFoundError(
            f"{path}: not a local file or folder, and loading it as a hub dataset "
            f"(config={config!r}, split={split or 'test'!r}) failed: {type(e).__name__}: {e}"
        ) from None
    return _rows_from_dataset(ds, f"{path}:{config}[{split or 'test'}]")


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
        return _rows_from_hub(str(path), config, split)
    raise FileNotFoundError(f"{path}: no such file or folder")
