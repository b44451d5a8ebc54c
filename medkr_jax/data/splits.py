"""Duplicate questions across record sets, and the seeded train / held-out split that keeps duplicates
on one side."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence

from medkr_jax.data.records import MCQRecord, question_hash

log = logging.getLogger(__name__)


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
