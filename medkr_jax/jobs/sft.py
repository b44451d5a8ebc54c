"""Job "sft": supervised fine-tuning of the policy on reasoning traces; exports it as an HF folder.

Records (config.sft.train_path; the reasoning-heavy ones when config.sft.reasoning_only) become plain /
adversarial / backtracking examples (config.traces), rendered like evaluation prompts (system prompt
config.eval.system_prompt) and packed into rows of config.train.seq_len (one per row when config.sft.packing is
False); the shared loop trains on them (config.train, config.optimizer; config.sft.epochs > 0 sets the steps), the
whole policy or, with config.lora.rank > 0, LoRA adapters on the frozen policy. The library part is
medkr_jax.train.sft.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from medkr_jax import parallel
from medkr_jax.config import require
from medkr_jax.data.records import read_records
from medkr_jax.jobs.training import (check_batching, export_policy, load_policy_from_config, loop_settings,
                                      optimizer_settings, trace_mix)
from medkr_jax.train import loop, sft, traces
from medkr_jax.train.metrics_log import write_report


def _rows(config, examples: list, tokenizer: Any, cfg: Any, tok_dir: str) -> tuple[dict, dict]:
    """The packed training rows of `examples` and their stats."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (cfg.eos_token_ids or (None,))[0]
    if eos is None:
        raise sft.SFTDataError(f"the tokenizer in {tok_dir} has no eos_token and config.json names no eos_token_id")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    seqs = [sft.tokenize_example(tokenizer, ex, system_prompt=config.eval.system_prompt, eos_id=eos)
            for ex in examples]
    return sft.pack_sequences(seqs, int(config.train.seq_len), pad_id=pad, packing=bool(config.sft.packing),
                              answer_weight=float(config.sft.answer_weight))


def _steps(config, rows: int, batch_size: int) -> int:
    """config.train.steps, or config.sft.epochs passes over the packed rows when set."""
    steps = int(config.train.steps)
    epochs = float(config.sft.get("epochs", 0) or 0)
    if epochs > 0:
        steps = max(1, int(round(epochs * rows / batch_size)))
    return steps


def _write_report(output_dir: str, summary: dict, examples: int, kinds: dict, stats: dict) -> None:
    write_report(output_dir, "SFT", summary,
                 extra_rows=[("examples", examples), ("trace kinds", kinds),
                             ("packed rows", stats["rows"]), ("target tokens", stats["target_tokens"]),
                             ("truncated / dropped", f"{stats.get('truncated', 0)} / {stats.get('dropped', 0)}")],
                 plots=[("loss", "loss.png"), ("token_accuracy", "token_accuracy.png"),
                        ("answer_accuracy", "answer_accuracy.png")])


def run(config, *, mesh: Any = None) -> dict:
    """Train the policy on trace examples, export it to an HF folder; returns a summary."""
    require(config, "output_dir", "sft.train_path")
    check_batching(config, int(config.train.batch_size), steps_optional=float(config.sft.get("epochs", 0) or 0) > 0)
    mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    rules = parallel.logical_rules(config)
    records = sft.filter_records(read_records(config.sft.train_path), config.sft.reasoning_only,
                                 config.sft.train_path)
    examples = traces.build_examples(records, trace_mix(config))
    if not examples:
        raise sft.SFTDataError(f"no record of {config.sft.train_path} has a reasoning trace ('trace' field)")
    model, cfg, tokenizer, tok_dir = load_policy_from_config(config, mesh, rules)
    rows, stats = _rows(config, examples, tokenizer, cfg, tok_dir)
    batch_size = int(config.train.batch_size)
    steps = _steps(config, stats["rows"], batch_size)
    batches = sft.make_batches(sft.scored_positions(rows), batch_size, seed=int(config.seed))
    summary = loop.train(model, loss_fn=sft.sft_loss, batches=batches, settings=loop_settings(config, steps=steps),
                         optimizer=optimizer_settings(config), output_dir=config.output_dir, mesh=mesh, rules=rules,
                         desc="sft")
    kinds = collections.Counter(e.kind for e in examples)
    summary.update(examples=len(examples), kinds=dict(kinds), data=stats)
    if not summary["preempted"]:
        summary.update(export_policy(config, model, cfg, tok_dir,
                                     config.sft.export_dir or os.path.join(config.output_dir, "hf")))
    _write_report(config.output_dir, summary, len(examples), dict(kinds), stats)
    return summary
