"""Run a pipeline: the paper's stages in order, each resuming from the files the previous ones left.

Every stage writes into <output_dir>/<stage>/ and, when it completes, a `stage.json` with its summary and
wall time. A rerun skips completed stages and restarts the interrupted one (which itself resumes from its
checkpoints or generation logs), so interrupting the pipeline loses at most the unsaved part of one stage.
The stages of a run are listed in config.pipeline.stages; see the stage modules of this package for what each does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ml_collections

from medkr_jax import parallel
from medkr_jax.pipeline.stages import STAGES


class StagePreempted(RuntimeError):
    """A stage's job stopped on a preemption signal after saving; the pipeline stops without marking it done."""

    def __init__(self, message: str, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name


def stage_dir(config: ml_collections.ConfigDict, name: str) -> Path:
    return Path(config.output_dir) / name


def completed(config: ml_collections.ConfigDict, name: str) -> dict | None:
    """The summary of a completed stage, or None."""
    marker = stage_dir(config, name) / "stage.json"
    if not marker.exists():
        return None
    return json.loads(marker.read_text())


def run(config: ml_collections.ConfigDict) -> dict:
    names = list(config.pipeline.stages)
    if not names:
        raise ValueError("config.pipeline.stages is empty; known stages: " + ", ".join(STAGES))
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"config.pipeline.stages: unknown {unknown}; known stages: {', '.join(STAGES)}")

    results: dict[str, dict] = {}
    for i, name in enumerate(names, 1):
        done = completed(config, name)
        if done is not None and not getattr(STAGES[name], "always_rerun", False):
            changed = STAGES[name].stale(config, done["summary"]) if STAGES[name].stale else ""
            if changed:
                raise ValueError(f"{stage_dir(config, name) / 'stage.json'}: the completed {name!r} stage was made with "
                                 f"other settings ({changed}); use a new output_dir, or remove that stage's folder "
                                 "and the stages built on it")
            print(f"[pipeline] {i}/{len(names)} {name}: already complete ({done['wall_s']:.1f}s), skipping")
            results[name] = done
            continue
        print(f"[pipeline] {i}/{len(names)} {name} ...", flush=True)
        start = time.time()
        out = stage_dir(config, name)
        out.mkdir(parents=True, exist_ok=True)
        summary = STAGES[name](config, out, results)
        if (summary or {}).get("preempted"):
            by = summary.get("preempted_by") or "SIGTERM"
            raise StagePreempted(
                f"pipeline stage {name!r} was preempted ({by}) at step {summary.get('steps')} and saved a "
                f"checkpoint in {out}; it is not complete: rerun the same command to resume it", by)
        record = {"stage": name, "wall_s": time.time() - start, "summary": summary or {}}
        if parallel.is_main_process():
            tmp = out / "stage.json.tmp"
            tmp.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
            tmp.replace(out / "stage.json")  # atomic: a stage is complete only once this exists
        results[name] = record
        print(f"[pipeline] {name} done in {record['wall_s']:.1f}s", flush=True)

    table = summary_table(results)
    print("\n" + table)
    return {"stages": {n: r["summary"].get("headline", "") for n, r in results.items()},
            "wall_s": {n: round(r["wall_s"], 1) for n, r in results.items()}}


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def summary_table(results: dict[str, dict]) -> str:
    """One Markdown table: stage, wall time, headline numbers."""
    lines = ["| stage | wall time | headline |", "|---|---:|---|"]
    for name, rec in results.items():
        head = rec.get("summary", {}).get("headline", "")
        lines.append(f"| {name} | {rec['wall_s']:.1f}s | {head} |")
    return "\n".join(lines)
