"""Orbax checkpoints: async save every N steps, keep-N, atomic, restore latest.

A checkpoint holds one pytree of arrays (params, optimizer state, step, RNG key data ...) saved sharded as
it lives on the mesh, plus an optional JSON-able data-iterator state (grain iterators expose one), so a
killed run resumes where it stopped. Paths may be local or gs:// (orbax writes through etils.epath).
Orbax writes into a temporary folder and renames it when complete, so a crash mid-save leaves the previous
checkpoints intact and the partial one invisible.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def _to_json(data_state: Any) -> Any:
    """grain iterator states are bytes or dicts; store either as JSON."""
    if isinstance(data_state, bytes):
        return {"__bytes__": base64.b64encode(data_state).decode("ascii")}
    return data_state


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict) and set(obj) == {"__bytes__"}:
        return base64.b64decode(obj["__bytes__"])
    return obj


def _key_to_data(tree: Any) -> Any:
    """Typed PRNG keys are stored as their raw uint32 data (orbax saves plain arrays)."""
    return jax.tree.map(
        lambda x: jax.random.key_data(x) if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
            x.dtype, jax.dtypes.prng_key) else x, tree)


def _data_to_key(restored: Any, abstract: Any) -> Any:
    return jax.tree.map(
        lambda r, a: jax.random.wrap_key_data(r) if hasattr(a, "dtype") and jax.dtypes.issubdtype(
            a.dtype, jax.dtypes.prng_key) else r, restored, abstract)


def _abstract_of(tree: Any) -> Any:
    def one(x):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, x)
            sharding = getattr(x, "sharding", None)
            return jax.ShapeDtypeStruct(data.shape, data.dtype,
                                        sharding=None if sharding is None else _key_data_sharding(sharding, data))
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        if isinstance(x, np.ndarray):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x
    return jax.tree.map(one, tree)


def _key_data_sharding(sharding: Any, data: jax.ShapeDtypeStruct) -> Any:
    # key data has one trailing dim more than the key array; keep the key's layout and replicate that dim.
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(data.shape) - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


class Checkpointer:
    """Save every `save_every` steps (async), keep the newest `keep`, restore the latest or a given step."""

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        if save_every <= 0:
            raise ValueError(f"checkpoint save_every must be > 0, got {save_every}")
        # orbax wants absolute paths; URLs such as gs://bucket/run are already absolute.
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # we decide when to save (should_save); orbax keeps the last `keep`
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.save_every == 0

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, data_state: Any = None, force: bool = False) -> bool:
        """Start saving `state` (and the data-iterator state) at `step`; returns False when skipped."""
        if not force and not self.should_save(step):
            return False
        if step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(_key_to_data(state))}
        items["data"] = ocp.args.JsonSave({"data_state": _to_json(data_state)})
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, Any] | None:
        """(state, data_state) at `step` (None = latest), laid out like `abstract_state`; None if no checkpoint.

        `abstract_state` may be the live state or its jax.eval_shape; restored arrays take its shardings.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        target = _abstract_of(abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        state = _data_to_key(restored["state"], abstract_state)
        data = restored["data"] or {}
        return state, _from_json(data.get("data_state"))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

