"""GRPO of MedGemma-27B (text) with a verifiable answer reward, on a Cloud TPU v5p-64.

The 8B recipe (configs/grpo_8b.py) with Gemma 3's 27B text decoder: 62 layers, 52 of them attending within a
1024-token sliding window, the other 10 globally. v5p-64 = 32 chips (95 GB HBM each), 8 hosts x 4 chips; mesh
fsdp=8 x tensor=4: MedGemma-27B's 32 query heads, 16 KV heads, 21504-wide MLP and 262144-token vocabulary
split evenly 4 ways, parameters and AdamW state 8 ways further along "embed". Parameters in bfloat16 with a
float32 master copy; 8 micro-batches of 64 sequences per update.

Memory plan for the slice (runs anywhere, no TPU needed):

    python -m medkr_jax.main --config configs/grpo_medgemma_27b.py --config.job=dry_run

Run on the slice (see launch/README.md), from the released checkpoint (text-only, Gemma3ForCausalLM):

    launch/tpu_pod.sh run --config configs/grpo_medgemma_27b.py \
        --config.output_dir=gs://BUCKET/runs/medgemma_27b_grpo \
        --config.model.path=models/medgemma-27b-text-it \
        --config.grpo.train_path=data/biomed_r1_train.jsonl

Rollouts stop at the checkpoint's eos_token_id list (config.json: <eos> and <end_of_turn>). Gemma's chat
template has no system turn: it folds the system prompt into the first user turn itself. config.output_dir has no default here: a pod run must write to storage every host can reach.
"""

from pathlib import Path

from medkr_jax.config import config_from_file

SLICE = "v5p-64"
CHIPS = 32  # v5p-N has N TensorCores, 2 per chip


def get_config():
    config = config_from_file(Path(__file__).with_name("grpo_8b.py"))
    config.model.preset = "medgemma-27b"
    config.model.path = ""  # local HF folder of MedGemma-27B (text) on every host
    config.model.param_dtype = "bfloat16"
    config.mesh.data = 1
    config.mesh.fsdp = 8
    config.mesh.tensor = 4
    assert config.mesh.data * config.mesh.fsdp * config.mesh.tensor == CHIPS
    config.optimizer.grad_accum = 8       # 8 micro-batches of 64 sequences per update
    config.dry_run.chip = "v5p"
    config.dry_run.num_devices = CHIPS
    return config
