"""What several jobs share: filling config.model.path from config.model.preset (and saying where it is), and the
BERT jobs' dtypes."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from medkr_jax import parallel
from medkr_jax.config import ConfigError
from medkr_jax.models import presets


def resolve_model_path(config) -> None:
    """config.model.path from config.model.preset when the preset's files ship with an installed package."""
    if config.model.path or not config.model.preset or config.job == "dry_run":
        return
    try:
        path = presets.resolve_path(config.model.preset, config.model.cache_dir or None)
    except presets.PresetError:
        return  # no local files: the job reports config.model.path as missing
    with config.unlocked():
        config.model.path = str(path)
    cache = Path(config.model.cache_dir or presets.default_cache_dir()).resolve()
    note = (f" (the preset cache; move it with --config.model.cache_dir or ${presets.CACHE_ENV})"
            if cache in Path(path).resolve().parents else "")
    if parallel.is_main_process():
        print(f"[medkr_jax] config.model.preset={config.model.preset!r} -> config.model.path={str(path)!r}{note}")


BERT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def bert_dtypes(config) -> tuple:
    """(dtype, param_dtype) of a BERT classifier from config.model.dtype / param_dtype."""
    out = []
    for key in ("dtype", "param_dtype"):
        name = config.model[key]
        if name not in BERT_DTYPES:
            raise ConfigError(f"config.model.{key}={name!r}: expected one of {sorted(BERT_DTYPES)}")
        out.append(BERT_DTYPES[name])
    return tuple(out)
