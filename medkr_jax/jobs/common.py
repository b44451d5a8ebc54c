"""What several jobs share: filling config.model.path from config.model.preset."""

from __future__ import annotations

from medkr_jax.models import presets


def resolve_model_path(config) -> None:
    """config.model.path from config.model.preset when the preset's files ship with an installed package."""
    if config.model.path or not config.model.preset or config.job == "dry_run":
        return
    try:
        path = presets.resolve_path(config.model.preset)
    except presets.PresetError:
        return  # no local files: the job reports config.model.path as missing
    with config.unlocked():
        config.model.path = str(path)
