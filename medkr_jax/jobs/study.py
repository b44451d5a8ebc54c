"""Job "study": the BioMed-R1 recipe's ablation over several seeds, with paired tests (medkr_jax.pipeline.study)."""

from __future__ import annotations

from medkr_jax.pipeline import study


def run(config) -> dict:
    return study.run(config)
