"""A reduced study for tests: every arm of configs/study.py at toy sizes, 2 seeds, 2 GRPO candidates (the
first two).

    python -m medkr_jax.main --config configs/study_smoke.py --config.output_dir=/tmp/study_smoke
"""

from pathlib import Path

from medkr_jax.config import config_from_file


def get_config():
    config = config_from_file(Path(__file__).with_name("study.py"))
    config.output_dir = "runs/study_smoke"
    config.study.seeds = (0, 1)
    config.study.grpo_candidates = config.study.grpo_candidates[:2]
    config.synthetic.classifier_questions = 8
    config.synthetic.policy_train_questions = 32
    config.synthetic.policy_eval_questions = 8
    config.synthetic.policy_val_questions = 8
    config.synthetic.policy_rl_questions = 16
    config.pipeline.policy.hidden_size = 32
    config.pipeline.policy.intermediate_size = 64
    config.pipeline.policy.num_layers = 1
    config.pipeline.policy.vocab_size = 400
    for name in ("eval_sft_plain", "eval_sft", "eval_grpo", "eval_sft_more", "val_sft", "val_grpo", "sampled_sft",
                 "sampled_grpo"):
        config.pipeline[name].eval.max_new_tokens = 16
        config.pipeline[name].eval.batch_size = 16
    config.pipeline.sft.train.steps = 4
    config.pipeline.sft.train.batch_size = 8
    config.pipeline.sft.train.seq_len = 128
    config.pipeline.grpo.train.steps = 2
    config.pipeline.grpo.grpo.num_generations = 2
    config.pipeline.grpo.grpo.prompts_per_step = 4
    config.pipeline.grpo.grpo.max_new_tokens = 16
    return config
