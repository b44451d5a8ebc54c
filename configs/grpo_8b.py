"""GRPO of Llama-3.1-8B-Instruct (or its SFT checkpoint) with a verifiable answer reward, on a Cloud TPU v5p-64.

BioMed-R1-8B, stage 2: start from the SFT export (`<sft output_dir>/hf`, copied to every host) or from the
instruct model. v5p-64 = 32 chips (95 GB HBM each), 8 hosts x 4 chips; mesh fsdp=8 x tensor=4. Rollouts
(the jitted KV-cache sampler) and updates run on the same mesh with the same sharded parameters; each step
samples num_generations completions for each of prompts_per_step prompts.

Memory plan for the slice (runs anywhere, no TPU needed):

    python -m medkr_jax.main --config configs/grpo_8b.py --config.job=dry_run

Run on the slice (see launch/README.md):

    launch/tpu_pod.sh run --config configs/grpo_8b.py \
        --config.output_dir=gs://BUCKET/runs/biomed_r1_8b_grpo \
        --config.model.path=models/biomed_r1_8b_sft \
        --config.grpo.train_path=data/biomed_r1_train.jsonl

config.output_dir has no default here: a pod run must write to storage every host can reach (gs://...).
"""

from ml_collections import config_dict

from medkr_jax.config import base_config

SLICE = "v5p-64"
CHIPS = 32  # v5p-N has N TensorCores, 2 per chip


def get_config():
    config = base_config()
    config.job = "grpo"
    # Required on the command line (--config.output_dir=gs://...); see the module docstring.
    config.output_dir = config_dict.placeholder(str)
    config.seed = 0

    config.model.preset = "llama3.1-8b"
    config.model.path = ""  # local HF folder: the SFT export or Llama-3.1-8B-Instruct, on every host
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = True

    config.mesh.data = 1
    config.mesh.fsdp = 8
    config.mesh.tensor = 4
    assert config.mesh.data * config.mesh.fsdp * config.mesh.tensor == CHIPS

    config.grpo.train_path = ""  # canonical records (question, options, answer); traces are not needed
    config.grpo.prompts_per_step = 64
    config.grpo.num_generations = 8
    config.grpo.max_new_tokens = 1024
    config.grpo.temperature = 1.0
    config.grpo.top_p = 1.0
    config.grpo.beta = 0.0                # no KL term, hence no reference copy of the weights
    config.grpo.loss = "dapo"             # token-level loss, clip-higher: epsilon 0.2 low / 0.28 high
    config.grpo.mu = 1
    config.grpo.format_reward = 0.1

    # Per step: 64 prompts x 8 completions = 512 sequences of up to 1024 prompt + 1024 generated tokens.
    # The grpo job derives its shapes from config.grpo; these two size the dry-run memory plan.
    config.train.batch_size = 512
    config.train.seq_len = 2048
    config.train.steps = 300
    config.train.log_every = 1
    config.train.checkpoint_every = 25
    config.train.keep_checkpoints = 2

    config.optimizer.learning_rate = 1e-6
    config.optimizer.schedule = "constant"
    config.optimizer.warmup_steps = 10
    config.optimizer.weight_decay = 0.0
    config.optimizer.b2 = 0.99
    config.optimizer.grad_clip = 1.0
    config.optimizer.grad_accum = 4       # 4 micro-batches of 128 sequences per update

    config.dry_run.chip = "v5p"
    config.dry_run.num_devices = CHIPS
    return config
