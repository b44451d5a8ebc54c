"""GRPO of Llama-3.1-8B-Instruct with LoRA adapters on one host: a TPU v6e-8 or v5e-8, or one 80 GB GPU.

The GRPO recipe of configs/grpo_8b.py (DAPO loss, verifiable answer reward) with the base weights frozen in
bfloat16 and rank-16 adapters on every attention and MLP projection (42M trained parameters): the adapters,
their gradients and AdamW moments are float32 and tiny, so the per-device memory is the bf16 base (split over
the host's chips), the training micro-batch's activations and, in turn with them, the rollout's KV cache.
Pick the machine after the file name:

    python -m medkr_jax.main --config configs/grpo_8b_lora.py:v6e-8 --config.job=dry_run   # or :v5e-8, :h100

prints the per-device plan (params, adapters, optimizer state of the adapters, activations, KV cache); the plans
are in launch/README.md. A run on the host itself (TPU VM or GPU box; one process, no launcher needed):

    python -m medkr_jax.main --config configs/grpo_8b_lora.py:v6e-8 \
        --config.output_dir=runs/biomed_r1_8b_grpo_lora \
        --config.model.path=models/Llama-3.1-8B-Instruct \
        --config.grpo.train_path=data/biomed_r1_train.jsonl

It exports the merged policy to <output_dir>/hf and the adapters as a PEFT folder to <output_dir>/peft.
config.output_dir has no default here: name the run folder on the command line.
"""

from pathlib import Path

from ml_collections import config_dict

from medkr_jax.config import config_from_file

# machine -> chip (dry-run HBM table), mesh (data, fsdp, tensor), prompts per step, micro-batches per update
TARGETS = {
    "v6e-8": dict(chip="v6e", mesh=(1, 8, 1), prompts_per_step=16, grad_accum=8),
    "v5e-8": dict(chip="v5e", mesh=(1, 8, 1), prompts_per_step=8, grad_accum=8),
    "h100": dict(chip="h100", mesh=(1, 1, 1), prompts_per_step=8, grad_accum=16),
}


def get_config(target: str = "v6e-8"):
    if target not in TARGETS:
        raise ValueError(f"configs/grpo_8b_lora.py:{target}: expected one of {sorted(TARGETS)}")
    t = TARGETS[target]
    config = config_from_file(Path(__file__).with_name("grpo_8b.py"))
    config.output_dir = config_dict.placeholder(str)
    config.model.param_dtype = "bfloat16"  # the frozen base; the adapters are float32 whatever this says

    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.dropout = 0.0
    config.lora.target_modules = (r"attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$")

    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = t["mesh"]
    config.grpo.prompts_per_step = t["prompts_per_step"]
    config.grpo.num_generations = 8
    config.grpo.max_new_tokens = 1024
    # Rows of one update: prompts x generations, in grad_accum micro-batches; these two size the dry-run plan.
    config.train.batch_size = t["prompts_per_step"] * config.grpo.num_generations
    config.train.seq_len = 2048  # a prompt bucket of up to 1024 tokens + 1024 generated
    config.train.checkpoint_every = 10
    config.optimizer.grad_accum = t["grad_accum"]
    config.optimizer.learning_rate = 1e-5  # adapters take a larger step than full fine-tuning (grpo_8b: 1e-6)

    config.dry_run.chip = t["chip"]
    config.dry_run.num_devices = t["mesh"][0] * t["mesh"][1] * t["mesh"][2]
    config.dry_run.kv_rows = -1  # the rollout: prompts_per_step * num_generations rows
    return config
