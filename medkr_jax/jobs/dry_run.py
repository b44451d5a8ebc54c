"""Job "dry_run": print and write the per-device memory plan of the config's model on the config's mesh."""

from __future__ import annotations

import json
import math

import jax
from etils import epath  # orbax's path library: local folders and gs:// alike

from medkr_jax import parallel
from medkr_jax.config import ConfigError
from medkr_jax.jobs.training import lora_settings
from medkr_jax.models import presets
from medkr_jax.models.decoder import DecoderConfig
from medkr_jax.models.hf import read_hf_config
from medkr_jax.models.memory import MemoryPlanError, format_plan, memory_plan


def _decoder_config(config) -> tuple[DecoderConfig, str]:
    """The planned model's hyper-parameters and its name: config.model.preset, else config.model.path."""
    if config.model.preset:
        return presets.decoder_config(config.model.preset), config.model.preset
    if config.model.path:
        return DecoderConfig.from_hf(read_hf_config(config.model.path)), str(config.model.path)
    raise ConfigError("config.job='dry_run' needs config.model.preset or config.model.path")


def _mesh_sizes(config) -> dict[str, int]:
    """config.mesh with an axis of -1 sized by config.dry_run.num_devices (the devices are not here)."""
    dry = config.dry_run
    sizes = {a: int(config.mesh[a]) for a in parallel.MESH_AXES}
    if any(s == -1 for s in sizes.values()):
        if not dry.num_devices:
            raise MemoryPlanError("config.mesh has an axis of -1; set config.dry_run.num_devices to size it")
        shape = parallel.resolve_mesh_shape(sizes, int(dry.num_devices))
        return dict(zip(parallel.MESH_AXES, shape))
    if dry.num_devices and math.prod(sizes.values()) != dry.num_devices:
        raise MemoryPlanError(f"config.mesh {sizes} has {math.prod(sizes.values())} devices but "
                              f"config.dry_run.num_devices = {dry.num_devices}")
    return sizes


def _kv_rows(config) -> int:
    """config.dry_run.kv_rows, -1 meaning a GRPO rollout's rows: grpo.prompts_per_step * grpo.num_generations."""
    rows = int(config.dry_run.kv_rows)
    if rows == -1:
        return int(config.grpo.prompts_per_step) * int(config.grpo.num_generations)
    if rows < 0:
        raise ConfigError(f"config.dry_run.kv_rows must be >= 0 or -1 (the GRPO rollout's rows), got {rows}")
    return rows


def run(config) -> dict:
    """Print and return the per-device memory plan; with config.output_dir, also memory_plan.json / .md there.

    Reads config.model (preset or path, dtype, param_dtype, remat), config.mesh, config.sharding_rules,
    config.train (batch_size, seq_len), config.lora (adapters on the frozen base when rank > 0), config.grpo
    (the rollout rows when dry_run.kv_rows is -1) and config.dry_run (chip, num_devices, batch_size, seq_len,
    train, kv_rows, kv_len, kv_dtype).
    """
    cfg, name = _decoder_config(config)
    dry = config.dry_run
    sizes = _mesh_sizes(config)
    # Gradient accumulation scans over micro-batches: activations are those of one micro-batch.
    accum = max(int(config.optimizer.get("grad_accum", 1) or 1), 1) if dry.train else 1
    batch = int(dry.batch_size or config.train.batch_size)
    plan = memory_plan(cfg, sizes, rules=config.sharding_rules or None, param_dtype=config.model.param_dtype,
                       dtype=config.model.dtype, batch_size=max(batch // accum, 1),
                       seq_len=int(dry.seq_len or config.train.seq_len), remat=bool(config.model.remat),
                       chip=dry.chip or None, train=bool(dry.train), lora=lora_settings(config),
                       kv_rows=_kv_rows(config), kv_len=int(dry.kv_len or config.train.seq_len),
                       kv_dtype=dry.kv_dtype or None)
    plan["model"] = name
    text = format_plan(plan, name)
    print(text)
    if config.output_dir and jax.process_index() == 0:
        out = epath.Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory_plan.json").write_text(json.dumps(plan, indent=2, default=str))
        (out / "memory_plan.md").write_text(f"# Memory plan\n\n```\n{text}\n```\n")
    return {k: v for k, v in plan.items() if k != "activation_detail"}
