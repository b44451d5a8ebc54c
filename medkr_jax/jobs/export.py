"""Job "export": a trained decoder checkpoint -> an HF folder (config.json + safetensors + tokenizer); a LoRA run's
checkpoint (adapters only) -> the merged HF folder and the PEFT adapter folder."""

from __future__ import annotations

import os

import jax

from medkr_jax import parallel
from medkr_jax.config import require
from medkr_jax.jobs.training import lora_settings
from medkr_jax.models import lora
from medkr_jax.models.decoder import DecoderConfig
from medkr_jax.models.hf import abstract_decoder, export_decoder, export_peft, load_decoder, read_hf_config
from medkr_jax.train.checkpoint import restore_params


def run(config) -> dict:
    """Export the parameters of a training checkpoint as an HF folder.

    Reads config.model.path (the HF folder the run started from: architecture and tokenizer; with config.lora.rank
    > 0 also the frozen base the adapters sit on), config.export.checkpoint_dir (the run's checkpoints; "" =
    <output_dir>/checkpoints), config.export.out_dir ("" = <output_dir>/hf), config.export.max_shard_bytes,
    config.lora (as the run had it; peft_dir "" = <output_dir>/peft), config.seed, config.mesh,
    config.sharding_rules, config.model.param_dtype and config.tokenizer_path ("" = model.path).
    """
    require(config, "model.path")
    ckpt_dir = config.export.checkpoint_dir or os.path.join(config.output_dir or ".", "checkpoints")
    out_dir = config.export.out_dir or os.path.join(config.output_dir or ".", "hf")
    param_dtype = jax.numpy.dtype(config.model.param_dtype)
    mesh = parallel.make_mesh(config.mesh)
    rules = config.sharding_rules or None
    settings = lora_settings(config)
    cfg = DecoderConfig.from_hf(read_hf_config(config.model.path))
    if settings.enabled:  # the base from the run's model folder, the adapters from the checkpoint
        base, _ = load_decoder(config.model.path, mesh=mesh, rules=rules, param_dtype=param_dtype,
                               allow_pickle=config.model.allow_pickle)
        model = lora.apply_lora(base, settings, mesh=mesh, rules=rules, seed=int(config.seed))
    else:
        model = abstract_decoder(cfg, mesh=mesh, rules=rules, param_dtype=param_dtype)
    model, step = restore_params(model, ckpt_dir, mesh=mesh)
    out = export_decoder(model, cfg, out_dir, tokenizer_dir=config.tokenizer_path or config.model.path,
                         max_shard_bytes=float(config.export.max_shard_bytes))
    summary = {"step": int(step), "checkpoint_dir": str(ckpt_dir), "out_dir": str(out),
               "architecture": cfg.architecture, "num_params": cfg.num_params}
    if settings.enabled:
        peft_dir = config.lora.peft_dir or os.path.join(config.output_dir or ".", "peft")
        export_peft(model, cfg, peft_dir, settings=settings, base_model=config.model.path)
        summary.update(peft_dir=peft_dir, adapter_params=lora.adapter_count(model))
    print(f"exported step {step} of {ckpt_dir} -> {out}")
    return summary
