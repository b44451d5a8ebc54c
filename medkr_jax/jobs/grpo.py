"""Job "grpo": GRPO of the policy on MCQ prompts with a verifiable answer reward; exports the policy.

Per loop step config.grpo.prompts_per_step prompts (records of config.grpo.train_path, the reasoning-heavy ones
when config.grpo.reasoning_only, the first config.grpo.num_prompts when > 0; a config.traces share prefilled
with misleading reasoning) go through the learner of medkr_jax.train.grpo (rollout -> reward -> advantages ->
update) with the settings of config.grpo; the loop runs config.train.steps steps of config.grpo.mu optimizer
updates each, of the whole policy or, with config.lora.rank > 0, of LoRA adapters on the frozen policy (whose
base, the adapters off, is then the KL reference: no second copy of the weights).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import jax.numpy as jnp
from flax import nnx

from medkr_jax import parallel
from medkr_jax.config import require
from medkr_jax.data.records import read_records
from medkr_jax.eval import prompts
from medkr_jax.jobs.training import (check_batching, export_policy, load_policy_from_config, lora_settings,
                                      loop_settings, optimizer_settings, trace_mix)
from medkr_jax.models import lora
from medkr_jax.models.hf import load_decoder
from medkr_jax.sampling import Sampler
from medkr_jax.train import grpo, loop, traces
from medkr_jax.train.metrics_log import write_report
from medkr_jax.train.optim import make_optimizer, make_schedule
from medkr_jax.train.sft import filter_records


def grpo_settings(g) -> grpo.GRPOSettings:
    """config.grpo's learner settings (checked: group size, old_logprobs, loss and advantage names, ...); the
    unset keys (loss_aggregation "", epsilon_low / epsilon_high < 0, advantage "") take the loss's defaults."""
    advantage = str(g.advantage)
    if advantage in ("", "grpo") and not bool(g.scale_rewards):
        advantage = "dr_grpo"  # scale_rewards=False: the older spelling of advantage="dr_grpo"
    return grpo.GRPOSettings(
        num_generations=int(g.num_generations), max_new_tokens=int(g.max_new_tokens),
        temperature=float(g.temperature), top_k=int(g.top_k), top_p=float(g.top_p), beta=float(g.beta),
        epsilon_low=float(g.epsilon_low) if g.epsilon_low >= 0 else None,
        epsilon_high=float(g.epsilon_high) if g.epsilon_high >= 0 else None, mu=int(g.mu), loss=str(g.loss),
        loss_aggregation=str(g.loss_aggregation), advantage=advantage, format_reward=float(g.format_reward),
        answer_source=str(g.answer_source), old_logprobs=str(g.old_logprobs),
        dynamic_sampling_rounds=int(g.dynamic_sampling_rounds), overlong_buffer=int(g.overlong_buffer),
        overlong_penalty=float(g.overlong_penalty), shared_prompts=bool(g.shared_prompts))


def _records(config) -> list:
    """The training questions: config.grpo.train_path's (reasoning-heavy ones when reasoning_only), the first
    config.grpo.num_prompts when > 0."""
    g = config.grpo
    records = filter_records(read_records(g.train_path), bool(g.reasoning_only), g.train_path, key="config.grpo")
    if int(g.num_prompts) > 0:  # a pool of the first N questions, each visited more often in the same steps
        records = records[:int(g.num_prompts)]
    return records


def _examples(config) -> list:
    """The training questions as trace examples (a prefilled share per config.traces)."""
    return traces.build_examples(_records(config), trace_mix(config), require_trace=False)


def visited_records(config) -> list:
    """The questions a run of this config trains on: those of its config.train.steps prompt batches (the
    loader is seeded, so this is the run's own draw; the extra prompts of dynamic sampling are not included),
    each once, in file order, with meta["grpo_visits"] = how many steps drew it."""
    records = _records(config)
    batches = grpo.prompt_batches(len(records), int(config.grpo.prompts_per_step), seed=int(config.seed))
    visits = Counter(int(i) for _ in range(int(config.train.steps)) for i in next(batches)["index"])
    out = []
    for i, rec in enumerate(records):
        if visits[i]:
            rec.meta = {**(rec.meta or {}), "grpo_visits": visits[i]}
            out.append(rec)
    return out


def _base_policy(trainer) -> tuple[Any, Any]:
    """nnx.split of a LoRA policy's base (its adapters off): the reference model, on the trainer's own arrays."""
    return nnx.split(lora.adapters_off(trainer.model()))


def _reference(config, settings: grpo.GRPOSettings, mesh: Any, rules: Any) -> Any:
    """The frozen reference model (the initial policy) when the KL term is on (beta != 0): nnx.split of a second
    copy of the weights, or with LoRA the base the adapters sit on (`_base_policy`, no copy)."""
    if settings.beta == 0.0:
        return None
    if lora_settings(config).enabled:
        return _base_policy
    ref_model, _ = load_decoder(config.model.path, mesh=mesh, rules=rules, dtype=jnp.dtype(config.model.dtype),
                                param_dtype=jnp.dtype(config.model.param_dtype),
                                allow_pickle=config.model.allow_pickle)
    return nnx.split(ref_model)


def _write_report(output_dir: str, summary: dict, num_prompts: int, group: int) -> None:
    last = summary.get("last_metrics") or {}
    write_report(output_dir, "GRPO", summary,
                 extra_rows=[("prompts", num_prompts), ("generations per prompt", group),
                             ("final reward mean", last.get("reward_mean")),
                             ("final accuracy", last.get("accuracy"))],
                 plots=[("reward_mean", "reward.png"), ("accuracy", "accuracy.png"), ("kl", "kl.png"),
                        ("response_length", "response_length.png"), ("entropy", "entropy.png")])


def run(config, *, mesh: Any = None) -> dict:
    """GRPO on MCQ prompts with a correctness reward; exports the policy; returns a summary."""
    require(config, "output_dir", "grpo.train_path")
    settings = grpo_settings(config.grpo)
    check_batching(config, int(config.grpo.prompts_per_step) * settings.num_generations,
                   rows_key="config.grpo.prompts_per_step x config.grpo.num_generations")
    mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    rules = parallel.logical_rules(config)
    examples = _examples(config)
    model, cfg, tokenizer, tok_dir = load_policy_from_config(config, mesh, rules)
    stop_ids = prompts.stop_token_ids(tokenizer, cfg.eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    prompt_set = grpo.build_prompts(examples, tokenizer, system_prompt=config.eval.system_prompt,
                                    max_new_tokens=settings.max_new_tokens)
    sampler = Sampler(cfg, mesh=mesh, rules=rules, pad_id=pad, stop_ids=stop_ids)
    reference = _reference(config, settings, mesh, rules)
    n_pp = int(config.grpo.prompts_per_step)
    batches = grpo.prompt_batches(len(examples), n_pp, seed=int(config.seed))
    local = grpo.process_rows(n_pp * settings.num_generations)
    step_fn = grpo.make_step_fn(sampler, tokenizer, prompt_set, settings, pad_id=pad, local=local,
                                reference=reference)
    optimizer = optimizer_settings(config)
    opt_steps = int(config.train.steps) * settings.mu
    summary = loop.train(model, loss_fn=grpo.make_loss_fn(settings), batches=batches,
                         settings=loop_settings(config), optimizer=optimizer, output_dir=config.output_dir,
                         mesh=mesh, rules=rules, tx=make_optimizer(optimizer, opt_steps),
                         schedule=make_schedule(optimizer, opt_steps), step_fn=step_fn, desc="grpo")
    summary.update(prompts=len(examples), sampler_compiles=sampler.num_compiles)
    if not summary["preempted"]:
        summary.update(export_policy(config, model, cfg, tok_dir,
                                     config.grpo.export_dir or os.path.join(config.output_dir, "hf")))
    _write_report(config.output_dir, summary, len(examples), settings.num_generations)
    return summary
