"""GRPO of a 32B policy (Qwen2.5-32B-Instruct) with a verifiable answer reward, on a Cloud TPU v5p-256 slice.

BioMed-R1-32B scale. v5p-256 = 256 TensorCores = 128 chips (95 GB HBM each), 32 hosts x 4 chips. The mesh is
fsdp=16 x tensor=8 = 128 devices: Qwen2.5-32B's 40 query heads, 8 KV heads, 27648-wide MLP and 152064-token
vocabulary all split evenly 8 ways; parameters and AdamW state are further split 16 ways along "embed".
Rollouts and updates share the mesh. For Qwen3-32B use --config.model.preset=qwen3-32b and its folder.

Memory plan for the slice (runs anywhere, no TPU needed):

    python -m medkr_jax.main --config configs/grpo_32b.py --config.job=dry_run

Run on the slice (see launch/README.md):

    launch/tpu_pod.sh run --config configs/grpo_32b.py \
        --config.output_dir=gs://BUCKET/runs/biomed_r1_32b_grpo \
        --config.model.path=models/Qwen2.5-32B-Instruct \
        --config.grpo.train_path=data/biomed_r1_train.jsonl

config.output_dir has no default here: a pod run must write to storage every host can reach (gs://...).
"""

from pathlib import Path

from medkr_jax.config import config_from_file

# The recipe is the 8B one (configs/grpo_8b.py); only the model, the mesh and the slice differ.

SLICE = "v5p-256"
CHIPS = 128  # v5p-N has N TensorCores, 2 per chip


def get_config():
    config = config_from_file(Path(__file__).with_name("grpo_8b.py"))
    config.model.preset = "qwen2.5-32b"
    config.model.path = ""  # local HF folder of the 32B policy on every host
    config.mesh.data = 1
    config.mesh.fsdp = 16
    config.mesh.tensor = 8
    assert config.mesh.data * config.mesh.fsdp * config.mesh.tensor == CHIPS
    config.dry_run.num_devices = CHIPS
    return config
