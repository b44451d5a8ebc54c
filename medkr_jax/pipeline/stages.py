"""The stage registry and what every stage shares: its job config, running that job, earlier stages' results.

A stage is `fn(config, out_dir, results) -> summary dict`; `results` holds the completed stages' records
({"summary": ..., "wall_s": ...}). Per-stage settings come from config.pipeline.<stage> (a partial config
tree merged over the run config for that stage only), so one config file sizes every stage.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import ml_collections

from medkr_jax import parallel
from medkr_jax.jobs import job_function
from medkr_jax.jobs.common import resolve_model_path


def merge(base: ml_collections.ConfigDict, partial: Any, where: str = "config") -> None:
    """Recursively set the keys of `partial` on `base`; unknown keys are an error naming them."""
    for key, value in (partial.items() if partial is not None else ()):
        if key not in base:
            raise KeyError(f"{where}.{key} is not a key of the config (from config.pipeline overrides)")
        if isinstance(value, (ml_collections.ConfigDict, dict)) and isinstance(base[key], ml_collections.ConfigDict):
            merge(base[key], value, f"{where}.{key}")
        else:
            base[key] = value


def job_config(config: ml_collections.ConfigDict, stage: str, job: str, out_dir: Path,
               overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The run config, with config.pipeline.<stage> and then `overrides` ({"dotted.key": value}) applied."""
    sub = copy.deepcopy(config)
    with sub.unlocked():
        sub.job = job
        sub.output_dir = str(out_dir)
        sub.pipeline.stages = ()
    per_stage = config.pipeline.get(stage)
    if per_stage is not None:
        merge(sub, per_stage)
    for dotted, value in (overrides or {}).items():
        node = sub
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"config.{'.'.join(parts)} is not a key of the config")
        node[parts[-1]] = value
    return sub


def run_job(sub: ml_collections.ConfigDict) -> dict:
    resolve_model_path(sub)
    os.makedirs(sub.output_dir, exist_ok=True)
    if parallel.is_main_process():
        Path(sub.output_dir, "config.json").write_text(sub.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    return job_function(sub.job)(sub) or {}


def summary_of(results: dict, stage: str) -> dict:
    if stage not in results:
        raise ValueError(f"pipeline stage needs the earlier stage {stage!r}; add it to config.pipeline.stages")
    return results[stage]["summary"]


def out_of(config: ml_collections.ConfigDict, stage: str) -> Path:
    return Path(config.output_dir) / stage


STAGES: dict[str, Callable[[ml_collections.ConfigDict, Path, dict], dict]] = {}


def stage(name: str, *, always_rerun: bool = False, stale: Callable[[ml_collections.ConfigDict, dict], str] | None = None):
    """Register a stage; `always_rerun` stages (the report) run even when complete, as they summarise the rest.
    `stale(config, summary)`: for a completed stage, what in the config no longer matches its recorded summary
    ("" when nothing), so a resumed run stops with that instead of building on outputs of other settings."""
    def register(fn):
        fn.always_rerun = always_rerun
        fn.stale = stale
        STAGES[name] = fn
        return fn
    return register
