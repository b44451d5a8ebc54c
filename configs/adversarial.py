"""Adversarial robustness: accuracy before / after a misleading reasoning prefix (job "adversarial").

Each question is answered plainly, then again with the assistant turn prefilled with reasoning that argues
for a wrong option, followed by a reconsideration cue (config.adversarial.cue); the report gives the drop
per benchmark and per knowledge / reasoning split. Point it at a local Hugging Face model folder and at
benchmark files ("reader:path?key=value" specs, medkr_jax.data.readers.READERS) or canonical records:

    python -m medkr_jax.main --config configs/adversarial.py \\
        --config.model.path=/models/Qwen3-8B \\
        --config.data.benchmarks='("biomed_r1_eval:/data/BioMed-R1-Eval?config=medqa",)' \\
        --config.adversarial.source=released,template --config.output_dir=runs/adv_qwen3_8b

Sources (comma-separated, run one after another): "released" (the adversarial_trace_* columns of the
released BioMed-R1-Eval files), "template" (config.adversarial.template), "generated" (written by
config.adversarial.generator_path, default the model itself).
"""

from medkr_jax.config import base_config


def get_config():
    config = base_config()
    config.job = "adversarial"
    config.model.path = ""          # local HF model folder (required)
    config.data.benchmarks = ()     # benchmark spec strings; and/or
    config.data.eval_path = ""      # canonical records (.jsonl / .parquet)
    config.adversarial.source = "template"
    config.eval.temperature = 0.0
    return config
