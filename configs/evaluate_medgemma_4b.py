"""Evaluate MedGemma-4B (its text decoder) on benchmark files, on one Cloud TPU v6e-8 host (job "evaluate").

google/medgemma-4b-it is an image-text checkpoint (Gemma3ForConditionalGeneration): the loader reads its text
decoder alone (34 layers, 29 of them attending within a 1024-token sliding window) and leaves the vision tower
unread. v6e-8 = 8 chips of 32 GB on one host: the bfloat16 weights (7.2 GiB) fit on every chip, so the mesh
is data=8 (each chip samples its own rows, no collective in the decode loop).

Memory plan for the host (runs anywhere, no TPU needed): weights plus the sampler's KV cache for
eval.batch_size rows of up to 512 prompt + eval.max_new_tokens tokens:

    python -m medkr_jax.main --config configs/evaluate_medgemma_4b.py --config.job=dry_run

Run on the host:

    python -m medkr_jax.main --config configs/evaluate_medgemma_4b.py \\
        --config.model.path=/models/medgemma-4b-it \\
        --config.data.benchmarks='("biomed_r1_eval:/data/BioMed-R1-Eval?config=medqa",)' \\
        --config.output_dir=runs/eval_medgemma_4b
"""

from pathlib import Path

from medkr_jax.config import config_from_file

HOST = "v6e-8"
CHIPS = 8


def get_config():
    config = config_from_file(Path(__file__).with_name("evaluate.py"))
    config.model.preset = "medgemma-4b"
    config.model.path = ""                   # local folder of google/medgemma-4b-it (required)
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = CHIPS, 1, 1
    config.eval.batch_size = 64              # 8 rows per chip
    config.eval.max_new_tokens = 1024
    config.eval.stop_strings = ("<end_of_turn>",)  # Gemma ends a chat turn with it, besides <eos>
    config.dry_run.chip = "v6e"
    config.dry_run.num_devices = CHIPS
    config.dry_run.train = False
    config.dry_run.batch_size = config.eval.batch_size
    config.dry_run.seq_len = 512 + config.eval.max_new_tokens
    return config
