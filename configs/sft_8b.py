"""SFT of Llama-3.1-8B-Instruct on reasoning traces (BioMed-R1-8B, stage 1) on a Cloud TPU v5p-64 slice.

v5p-64 = 64 TensorCores = 32 chips (one JAX device each, 95 GB HBM), 8 hosts x 4 chips. The mesh is
fsdp=8 x tensor=4 = 32 devices: parameters, gradients and AdamW state are split 8 ways along "embed" and 4 ways
along heads / MLP / vocab; the global batch is split 8 ways (fsdp) and each host feeds only its own rows.
bf16 compute with float32 master weights, every layer rematerialised in the backward pass.

Memory plan for the slice (runs anywhere, no TPU needed):

    python -m medkr_jax.main --config configs/sft_8b.py --config.job=dry_run

Run on the slice (see launch/README.md; the model folder and the training records are copied to every worker
with `launch/tpu_pod.sh fetch`, outputs and checkpoints go to the gs:// folder):

    launch/tpu_pod.sh run --config configs/sft_8b.py \
        --config.output_dir=gs://BUCKET/runs/biomed_r1_8b_sft \
        --config.model.path=models/Llama-3.1-8B-Instruct \
        --config.sft.train_path=data/biomed_r1_train.jsonl

The same on a SLURM GPU cluster (2 nodes x 8 H100):

    sbatch --nodes=2 --gpus-per-node=8 launch/gpu_multinode.sh --config configs/sft_8b.py \
        --config.mesh.fsdp=4 --config.mesh.tensor=4 \
        --config.output_dir=/shared/runs/biomed_r1_8b_sft --config.model.path=/shared/models/Llama-3.1-8B-Instruct \
        --config.sft.train_path=/shared/data/biomed_r1_train.jsonl

config.output_dir has no default here: a pod run must write to storage every host can reach (gs://...).
"""

from ml_collections import config_dict

from medkr_jax.config import base_config

SLICE = "v5p-64"
CHIPS = 32  # v5p-N has N TensorCores, 2 per chip


def get_config():
    config = base_config()
    config.job = "sft"
    # Required on the command line (--config.output_dir=gs://...); see the module docstring.
    config.output_dir = config_dict.placeholder(str)
    config.seed = 0

    config.model.preset = "llama3.1-8b"
    config.model.path = ""  # local HF folder of Llama-3.1-8B-Instruct on every host
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = True

    config.mesh.data = 1
    config.mesh.fsdp = 8
    config.mesh.tensor = 4
    assert config.mesh.data * config.mesh.fsdp * config.mesh.tensor == CHIPS

    config.sft.train_path = ""  # canonical JSONL/Parquet records with traces (zou-lab/BioMed-R1-Train layout)
    config.sft.packing = True
    config.sft.reasoning_only = True
    # Ratios of trace kinds (normalised): half plain, a quarter adversarial-recovery, a quarter backtracking.
    config.traces.plain = 2.0
    config.traces.adversarial = 1.0
    config.traces.backtracking = 1.0

    config.train.seq_len = 4096
    config.train.batch_size = 64          # global rows of seq_len tokens per step (8 per host)
    config.train.steps = 1000
    config.train.log_every = 10
    config.train.checkpoint_every = 200
    config.train.keep_checkpoints = 2

    config.optimizer.learning_rate = 1e-5
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 30
    config.optimizer.min_lr_ratio = 0.1
    config.optimizer.weight_decay = 0.01
    config.optimizer.b2 = 0.95
    config.optimizer.grad_clip = 1.0
    config.optimizer.grad_accum = 1

    config.dry_run.chip = "v5p"
    config.dry_run.num_devices = CHIPS
    return config
