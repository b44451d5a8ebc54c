"""A reduced demo for tests: every stage of configs/demo.py at toy sizes (runs in a few minutes on 2 cores).

    python -m medkr_jax.main --config configs/demo_smoke.py --config.output_dir=/tmp/demo_smoke
"""

from pathlib import Path

from medkr_jax.config import config_from_file


def get_config():
    config = config_from_file(Path(__file__).with_name("demo.py"))
    config.output_dir = "runs/demo_smoke"
    config.pipeline.eval_questions_per_split = 2
    config.synthetic.classifier_questions = 80
    config.synthetic.policy_train_questions = 48
    config.synthetic.policy_eval_questions = 16
    config.synthetic.policy_rl_questions = 16
    config.data.subjects = ("anatomy", "medical_genetics")
    config.pipeline.policy.hidden_size = 64
    config.pipeline.policy.intermediate_size = 128
    config.pipeline.policy.num_layers = 2
    config.pipeline.policy.vocab_size = 512
    config.pipeline.classifier.classifier.max_len = 48
    config.pipeline.classifier.classifier.epochs = 1.0
    config.pipeline.split_mmlu.split.max_len = 48
    config.pipeline.eval_smollm.eval.max_new_tokens = 8
    config.pipeline.eval_smollm.eval.batch_size = 4
    for name in ("eval_init", "eval_sft", "eval_grpo"):  # keep the demo's policy prompt and prefill
        config.pipeline[name].eval.max_new_tokens = 24
        config.pipeline[name].eval.batch_size = 16
    config.pipeline.sft.train.steps = 6
    config.pipeline.sft.train.batch_size = 8
    config.pipeline.sft.train.checkpoint_every = 3
    config.pipeline.grpo.train.steps = 2
    config.pipeline.grpo.train.checkpoint_every = 1
    config.pipeline.grpo.grpo.num_generations = 4
    config.pipeline.grpo.grpo.prompts_per_step = 2
    config.pipeline.grpo.grpo.max_new_tokens = 24
    return config
