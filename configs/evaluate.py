"""Evaluate a model on benchmark files: accuracy on knowledge- vs reasoning-heavy questions (job "evaluate").

Point it at a local Hugging Face model folder (config.json, *.safetensors, tokenizer) and at benchmark files,
given as "reader:path?key=value" specs (readers: medkr_jax.data.readers.READERS) and/or a canonical
records file with reasoning/knowledge labels (e.g. the split job's output):

    python -m medkr_jax.main --config configs/evaluate.py \\
        --config.model.path=/models/Qwen3-8B \\
        --config.data.benchmarks='("biomed_r1_eval:/data/BioMed-R1-Eval?config=medqa", "gpqa:/data/gpqa_main.csv")' \\
        --config.output_dir=runs/eval_qwen3_8b

    python -m medkr_jax.main --config configs/evaluate.py \\
        --config.model.path=runs/sft/hf --config.data.eval_path=runs/split/labelled.jsonl --config.data.limit=50

A tokenizer kept apart from the weights: --config.tokenizer_path=/models/tok. A Hub dataset id instead of a local
path needs hub=1 in its spec ("biomed_r1_eval:zou-lab/BioMed-R1-Eval?config=medqa&hub=1"). Outputs in
config.output_dir (default runs/evaluate): generations.jsonl (a rerun resumes), results.csv / .md, a plot.
"""

from medkr_jax.config import base_config


def get_config():
    config = base_config()
    config.job = "evaluate"
    config.model.path = ""          # local HF model folder (required)
    config.data.benchmarks = ()     # benchmark spec strings; and/or
    config.data.eval_path = ""      # canonical records (.jsonl / .parquet) with label / is_reasoning
    config.data.limit = 0           # first N questions of each benchmark (0 = all)
    config.eval.num_samples = 1
    config.eval.temperature = 0.0
    return config
