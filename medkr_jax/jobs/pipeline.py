"""Job "pipeline": run config.pipeline.stages in order, each resuming from the files earlier ones left."""

from __future__ import annotations

from medkr_jax.pipeline import runner


def run(config) -> dict:
    return runner.run(config)
