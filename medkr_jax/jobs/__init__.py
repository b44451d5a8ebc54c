"""Jobs: what ``config.job`` names. One module per job, each with ``run(config) -> dict``.

Jobs (with the pipeline stages that prepare their configs) are the layer that reads the config tree: a job
checks the keys it needs, builds plain arguments (or small settings objects) and calls the library (data/,
models/, train/, eval/, sampling/; parallel.py's mesh helpers take config.mesh and config.sharding_rules).
Nothing in the library imports this package; pipeline stages run jobs through ``job_function``.

Modules are imported only when their job runs, so ``--help`` and config errors answer without jax.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

JOBS: dict[str, str] = {
    "classify": "medkr_jax.jobs.classify",
    "split": "medkr_jax.jobs.split",
    "evaluate": "medkr_jax.jobs.evaluate",
    "budget_sweep": "medkr_jax.jobs.budget_sweep",
    "adversarial": "medkr_jax.jobs.adversarial",
    "sft": "medkr_jax.jobs.sft",
    "grpo": "medkr_jax.jobs.grpo",
    "pipeline": "medkr_jax.jobs.pipeline",
    "study": "medkr_jax.jobs.study",
    "dry_run": "medkr_jax.jobs.dry_run",
    "export": "medkr_jax.jobs.export",
    "import": "medkr_jax.jobs.import_model",
}


class UnknownJob(ValueError):
    """config.job names no job."""


def job_function(name: str) -> Callable[[Any], Any]:
    """The ``run`` function of job ``name``."""
    if name not in JOBS:
        raise UnknownJob(f"unknown config.job={name!r}; valid jobs: {', '.join(JOBS)}")
    return importlib.import_module(JOBS[name]).run
