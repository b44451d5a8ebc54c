"""Orbax checkpoints: async save every N steps, keep-N, atomic, restore latest; `restore_params` fills a model
with a checkpoint's parameters (the export job), through the nested-dict layout orbax stores.

A checkpoint holds one pytree of arrays (params, optimizer state, step, RNG key data ...) saved sharded as
it lives on the mesh, plus an optional JSON-able data-iterator state (grain iterators expose one), so a
killed run resumes where it stopped. Paths may be local or gs:// (orbax writes through etils.epath).
Orbax writes into a temporary folder and renames it when complete, so a crash mid-save leaves the previous
checkpoints intact and the partial one invisible.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from medkr_jax.models import lora
from medkr_jax.models.hf import concrete_sharding
from medkr_jax.models.safetensors_io import CheckpointError


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


# ------------------------------------------------------------------------- state <-> nested dict


def key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def to_nested_dict(tree: Any) -> dict:
    """Any pytree as nested dicts of its leaves, keyed by path (what orbax stores, readable on disk)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        names = [key_name(k) for k in path] or ["value"]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def from_nested_dict(nested: Mapping, like: Any) -> Any:
    """Inverse of `to_nested_dict`, rebuilding the structure of `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node: Any = nested
        names = [key_name(k) for k in path] or ["value"]
        for name in names:
            node = node[name]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def restore_params(model: nnx.Module, checkpoint_dir: str | os.PathLike, *,
                   mesh: jax.sharding.Mesh | None = None, step: int | None = None):
    """Fill a module with the trained parameters of a training checkpoint (``train.loop`` layout).

    ``checkpoint_dir`` is a run's ``checkpoints`` folder (or the run folder holding one); the newest step is used
    unless ``step`` is given. Only what training updated is read (not the optimizer state), each array straight
    into its sharding on ``mesh``: every parameter of an abstract model (``nnx.eval_shape``), or the adapters of
    a LoRA model whose base is already loaded (``lora.trainable_filter``). Returns (model, step).
    """
    directory = epath.Path(checkpoint_dir)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(directory)!r} does not exist")
    graphdef, params, rest = nnx.split(model, lora.trainable_filter(model), ...)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(rest)):
        raise CheckpointError("restore_params fills only the trained parameters; the rest of the module (a LoRA "
                              "model's base) must be loaded already")
    manager = ocp.CheckpointManager(directory)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' for step {step}'} in "
                                    f"{str(directory)!r} (steps: {list(manager.all_steps())})")
        target = to_nested_dict(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=concrete_sharding(x, mesh)), params))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item={"params": target}, partial_restore=True,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args(
                                                 {"params": target}))))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint step {step} in {str(directory)!r} does not hold this model's "
                                  f"parameters: {e}") from None
    finally:
        manager.close()
    return nnx.merge(graphdef, from_nested_dict(restored["state"]["params"], params), rest), step
