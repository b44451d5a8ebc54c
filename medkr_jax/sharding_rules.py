"""The default logical-axis sharding rules, as data (no jax, no ml_collections: config.py and parallel.py read it)."""

from __future__ import annotations

from typing import Any

# Logical axis name -> mesh axis ("data", "fsdp", "tensor"), a tuple of them, or None (replicated). The
# default table: config.sharding_rules starts as this, and rules a config sets are merged over it (by name),
# so a config lists only what it changes.
DEFAULT_SHARDING_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("classes", None),
    ("length", None),
)
