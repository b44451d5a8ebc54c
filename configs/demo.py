"""The demo: the paper's whole pipeline on a laptop CPU in minutes, offline.

    python -m medkr_jax.main --config configs/demo.py

Stages (each resumes from the files in output_dir): classifier on the synthetic world, split of the real
MMLU medical questions, evaluation of SmolLM2-135M-Instruct, tiny-policy SFT + GRPO, report.md.
"""

from medkr_jax.config import base_config


def get_config():
    config = base_config()
    config.job = "pipeline"
    config.output_dir = "runs/demo"
    return config
