"""Job "export": a trained decoder checkpoint -> an HF folder (config.json + safetensors + tokenizer)."""

from __future__ import annotations

import os

import jax

from medkr_jax import parallel
from medkr_jax.config import require
from medkr_jax.models.decoder import DecoderConfig
from medkr_jax.models.hf import abstract_decoder, export_decoder, read_hf_config
from medkr_jax.train.checkpoint import restore_params


def run(config) -> dict:
    """Export the parameters of a training checkpoint as an HF folder.

    Reads config.model.path (the HF folder the run started from: architecture and tokenizer),
    config.export.checkpoint_dir (the run's checkpoints; "" = <output_dir>/checkpoints),
    config.export.out_dir ("" = <output_dir>/hf), config.export.max_shard_bytes, config.mesh,
    config.sharding_rules, config.model.param_dtype and config.tokenizer_path ("" = model.path).
    """
    require(config, "model.path")
    ckpt_dir = config.export.checkpoint_dir or os.path.join(config.output_dir or ".", "checkpoints")
    out_dir = config.export.out_dir or os.path.join(config.output_dir or ".", "hf")
    param_dtype = jax.numpy.dtype(config.model.param_dtype)
    mesh = parallel.make_mesh(config.mesh)
    cfg = DecoderConfig.from_hf(read_hf_config(config.model.path))
    abstract = abstract_decoder(cfg, mesh=mesh, rules=config.sharding_rules or None, param_dtype=param_dtype)
    model, step = restore_params(abstract, ckpt_dir, mesh=mesh)
    out = export_decoder(model, cfg, out_dir, tokenizer_dir=config.tokenizer_path or config.model.path,
                         max_shard_bytes=float(config.export.max_shard_bytes))
    print(f"exported step {step} of {ckpt_dir} -> {out}")
    return {"step": int(step), "checkpoint_dir": str(ckpt_dir), "out_dir": str(out),
            "architecture": cfg.architecture, "num_params": cfg.num_params}
