"""What the training jobs (classify, sft, grpo) share: the loop's, the optimizer's, the trace mix's and LoRA's
settings from the config tree, the policy named by config.model (with config.lora's adapters), its export, and
`check_batching` (sizes checked before loading)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from medkr_jax.config import ConfigError, require
from medkr_jax.models import lora
from medkr_jax.models.hf import export_decoder, export_peft
from medkr_jax.train.loop import LoopSettings
from medkr_jax.train.optim import OptimizerSettings
from medkr_jax.train.sft import load_policy
from medkr_jax.train.traces import TraceMix


def _from_section(cls: type, section: Any, **values: Any) -> Any:
    """A settings dataclass from the keys of a config section it has fields for (the others keep the class's
    defaults), then `values`."""
    known = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section}
    return cls(**{**known, **values})


def optimizer_settings(config) -> OptimizerSettings:
    """config.optimizer."""
    return _from_section(OptimizerSettings, config.optimizer)


def loop_settings(config, **overrides: Any) -> LoopSettings:
    """config.train and config.seed; `overrides` replace fields (e.g. steps computed from epochs)."""
    return _from_section(LoopSettings, config.train, seed=config.get("seed", 0), **overrides)


def trace_mix(config) -> TraceMix:
    """config.traces."""
    return _from_section(TraceMix, config.traces)


def lora_settings(config) -> lora.LoRASettings:
    """config.lora (checked: rank, alpha, dropout, the target patterns compile)."""
    section = config.lora
    return lora.LoRASettings(rank=int(section.rank), alpha=float(section.alpha), dropout=float(section.dropout),
                             target_modules=tuple(section.target_modules))


def load_policy_from_config(config, mesh: Any, rules: Any):
    """(model, DecoderConfig, tokenizer, tokenizer_dir) from config.model and config.tokenizer_path, with config.lora's
    adapters (seeded by config.seed) when its rank is > 0."""
    require(config, "model.path")
    settings = lora_settings(config)  # a bad config.lora fails before the weights are read
    m = config.model
    model, cfg, tokenizer, tok_dir = load_policy(m.path, config.tokenizer_path, mesh=mesh, rules=rules, dtype=m.dtype,
                                                 param_dtype=m.param_dtype, remat=m.remat,
                                                 allow_pickle=m.allow_pickle)
    model = lora.apply_lora(model, settings, mesh=mesh, rules=rules, seed=int(config.get("seed", 0)))
    return model, cfg, tokenizer, tok_dir


def export_policy(config, model: Any, cfg: Any, tok_dir: str, export_dir: str) -> dict:
    """The trained policy as an HF folder (`export_dir`; LoRA adapters merged) and, with adapters, the adapters as
    a PEFT folder (config.lora.peft_dir, "" = <output_dir>/peft); returns the summary entries naming them."""
    export_decoder(model, cfg, export_dir, tokenizer_dir=tok_dir)
    out = {"export_dir": export_dir}
    settings = lora_settings(config)
    if settings.enabled:
        peft_dir = config.lora.peft_dir or os.path.join(config.output_dir, "peft")
        export_peft(model, cfg, peft_dir, settings=settings, base_model=config.model.path)
        out.update(peft_dir=peft_dir, adapter_params=lora.adapter_count(model))
    return out


def check_batching(config, rows_per_step: int, *, rows_key: str = "config.train.batch_size",
                   steps_optional: bool = False) -> None:
    """The loop's sizes, checked before any data or model is loaded: one ConfigError naming the key.

    rows_per_step: the rows of one optimizer step (config.train.batch_size, or GRPO's prompts x generations,
    named by `rows_key`); steps_optional: config.train.steps may be 0 (it is then computed from epochs).
    """
    accum = int(config.optimizer.grad_accum)
    if rows_per_step < 1:
        raise ConfigError(f"{rows_key} must be >= 1, got {rows_per_step}")
    if accum < 1 or rows_per_step % accum:
        raise ConfigError(f"config.optimizer.grad_accum={accum} must be >= 1 and divide the {rows_per_step} rows of a "
                          f"step ({rows_key})")
    if int(config.train.steps) < (0 if steps_optional else 1):
        raise ConfigError(f"config.train.steps must be >= 1, got {config.train.steps}")
