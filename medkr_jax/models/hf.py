"""Hugging Face checkpoint interchange: lazy sharded safetensors reading, loading and export.

The reader never materialises a whole checkpoint: each tensor is opened lazily and only the
slices a device holds are read (``jax.make_array_from_callback`` asks for exactly those), so a
host of a multi-host pod reads only what its own devices need.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder or tensor does not match what the model expects."""


# --------------------------------------------------------------------------------------------
# config.json


def read_hf_config(folder: str | os.PathLike) -> dict:
    """Read ``config.json`` from a Hugging Face model folder.

    Raises FileNotFoundError for a missing folder or config.json, CheckpointError for bad JSON.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist (expected a Hugging Face "
                                "model folder with config.json and *.safetensors)")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model folder {str(folder)!r} (found: "
                                f"{sorted(p.name for p in folder.iterdir())[:20]})")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(cfg).__name__}")
    return cfg


# --------------------------------------------------------------------------------------------
# safetensors reading

# safetensors dtype codes -> numpy dtypes. numpy has no bfloat16/float8; ml_dtypes provides them
# (it is what jax uses), so bf16 checkpoints are read without a framework round trip.
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
}
# Dtypes safetensors' numpy backend cannot return; those are read through a memory map instead.
_MEMMAP_ONLY = {"BF16", "F8_E4M3", "F8_E5M2"}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """Return (header dict, byte offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


class _SafetensorsFile:
    """One open safetensors file: names, shapes, dtypes and lazy slice reads."""

    def __init__(self, path: Path):
        self.path = path
        try:
            # safe_open validates the header against the file size, so a truncated or corrupt
            # file fails here, at open time, rather than with garbage values later.
            self._handle = safe_open(str(path), framework="numpy")
            self._header, self._data_start = _safetensors_header(path)
        except (SafetensorError, OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): "
                                  f"{e}") from None
        self._header.pop("__metadata__", None)
        self._memmap: np.memmap | None = None

    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._header[name]["dtype"]
        if code not in _ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {str(self.path)!r} has unsupported dtype {code}")
        return np.dtype(_ST_DTYPES[code])

    def read(self, name: str, index: tuple[slice, ...] | None) -> np.ndarray:
        info = self._header[name]
        try:
            if info["dtype"] in _MEMMAP_ONLY:
                if self._memmap is None:
                    self._memmap = np.memmap(self.path, dtype=np.uint8, mode="r")
                begin, end = info["data_offsets"]
                raw = self._memmap[self._data_start + begin:self._data_start + end]
                full = raw.view(self.dtype(name)).reshape(info["shape"])
                return np.array(full if index is None else full[index])
            sl = self._handle.get_slice(name)
            if index is None or len(info["shape"]) == 0:
                return np.asarray(sl[...] if info["shape"] else self._handle.get_tensor(name))
            return np.asarray(sl[index])
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {str(self.path)!r}: {e}") from None


def shard_path(folder: Path, fname: Any, index: Path) -> Path:
    """``folder / fname`` for a shard named by an index file; a name that is not a plain relative path inside
    ``folder`` (absolute, with '..', not a string) is refused: an index must not point outside its folder."""
    rel = Path(fname) if isinstance(fname, str) and fname else None
    if rel is None or rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise CheckpointError(f"{index} names shard {fname!r}, which is not a file name inside {str(folder)!r} "
                              "(absolute paths and '..' are refused)")
    return folder / rel


def _torch_state_dict(torch: Any, path: Path) -> dict:
    """``torch.load(path, weights_only=True)`` as a name -> tensor dict; anything else is a CheckpointError."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for non-weight objects, RuntimeError / EOFError for corrupt files
        raise CheckpointError(f"{path} is not a PyTorch weights file (torch.load with weights_only=True failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(sd, dict) or not all(hasattr(t, "detach") for t in sd.values()):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict of name -> tensor")
    return sd


class SafetensorsCheckpoint:
    """Lazy view over the weights of a Hugging Face model folder.

    Finds ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (+ shards); other
    ``*.safetensors`` files are used when neither is present. Pickled ``pytorch_model.bin``
    checkpoints are rejected unless ``allow_pickle=True`` (unpickling can run arbitrary code);
    they are then loaded whole with torch, which must be installed.
    """

    def __init__(self, folder: str | os.PathLike, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {str(self.folder)!r} does not exist")
        self._files: dict[Path, _SafetensorsFile] = {}
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._pickled: dict[str, np.ndarray] | None = None

        index = self.folder / SAFE_INDEX
        single = self.folder / SAFE_SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map' "
                                      f"object): {e}") from None
            for name, fname in weight_map.items():
                path = shard_path(self.folder, fname, index)
                if not path.is_file():
                    raise FileNotFoundError(f"shard {fname!r} listed in {index} for tensor {name!r} "
                                            "does not exist")
                self._where[name] = path
            for path in sorted(set(self._where.values())):
                self._open(path)
        elif single.is_file():
            self._add_file(single)
        else:
            others = sorted(self.folder.glob("*.safetensors"))
            if others:
                for path in others:
                    self._add_file(path)
            elif (self.folder / PICKLE_SINGLE).is_file() or (self.folder / PICKLE_INDEX).is_file():
                if not allow_pickle:
                    raise CheckpointError(
                        f"{self.folder} holds only a pickled PyTorch checkpoint ({PICKLE_SINGLE}); "
                        "unpickling can execute arbitrary code, so it is refused. Convert it to "
                        "safetensors, or pass allow_pickle=True if you trust the file.")
                self._load_pickle()
            else:
                raise FileNotFoundError(
                    f"no weights in {str(self.folder)!r}: expected {SAFE_SINGLE}, {SAFE_INDEX} or "
                    f"*.safetensors (found: {sorted(p.name for p in self.folder.iterdir())[:20]})")

    def _open(self, path: Path) -> _SafetensorsFile:
        if path not in self._files:
            self._files[path] = _SafetensorsFile(path)
        return self._files[path]

    def _add_file(self, path: Path) -> None:
        for name in self._open(path).names():
            self._where[name] = path

    def _load_pickle(self) -> None:
        try:
            import torch  # only on explicit opt-in; the package does not otherwise need torch
        except ImportError:
            raise CheckpointError(f"{self.folder} holds a pickled PyTorch checkpoint; reading it needs "
                                  "torch, which is not installed. Convert it to safetensors.") from None
        files = [self.folder / PICKLE_SINGLE]
        if (self.folder / PICKLE_INDEX).is_file():
            wm = json.loads((self.folder / PICKLE_INDEX).read_text())["weight_map"]
            files = [shard_path(self.folder, f, self.folder / PICKLE_INDEX) for f in sorted(set(wm.values()))]
        self._pickled = {}
        for path in files:
            for name, t in _torch_state_dict(torch, path).items():
                t = t.detach()
                if t.dtype == torch.bfloat16:
                    arr = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                else:
                    arr = t.numpy()
                self._pickled[name] = arr
                self._where[name] = path

    # public API ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        self._check(name)
        return self._where[name]

    def _check(self, name: str) -> None:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} not found in checkpoint {str(self.folder)!r} "
                                  f"(files: {sorted({p.name for p in self._where.values()})})")

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (from file headers; reads no data)."""
        self._check(name)
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return self._files[self._where[name]].shape(name)

    def dtype(self, name: str) -> np.dtype:
        """Stored dtype of tensor ``name``."""
        self._check(name)
        if self._pickled is not None:
            return self._pickled[name].dtype
        return self._files[self._where[name]].dtype(name)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Read tensor ``name`` (or only ``index``, a tuple of slices) as a numpy array."""
        self._check(name)
        if self._pickled is not None:
            arr = self._pickled[name]
            return np.array(arr if index is None else arr[index])
        return self._files[self._where[name]].read(name, index)


# --------------------------------------------------------------------------------------------
# filling an abstract nnx module


# A mapping value: (hf_name, transpose) copies one tensor (optionally transposed, 2-D only);
# (list_of_hf_names, transpose) stacks tensors along a new leading axis (one per layer, for
# scanned layer stacks); a callable f(ckpt, index) -> np.ndarray computes the value (index is a
# tuple of slices in the *parameter's* layout, or None for all of it).
TensorSource = Union[tuple[str, bool], tuple[Sequence[str], bool], Callable[[SafetensorsCheckpoint, Any], np.ndarray]]


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _source_shape(ckpt: SafetensorsCheckpoint, src, pname: str, expected: tuple[int, ...]) -> None:
    """Validate that ``src`` exists and yields ``expected`` (raises CheckpointError)."""
    names, transpose = src
    stacked = not isinstance(names, str)
    for name in ([names] if not stacked else list(names)):
        if name not in ckpt:
            raise CheckpointError(f"missing tensor {name!r} for parameter {pname!r} in checkpoint "
                                  f"{str(ckpt.folder)!r} (expected shape "
                                  f"{_hf_shape(expected[1:] if stacked else expected, transpose)})")
        found = ckpt.shape(name)
        want = _hf_shape(expected[1:] if stacked else expected, transpose)
        if found != want:
            raise CheckpointError(f"tensor {name!r} in {str(ckpt.file_of(name))!r} has shape {found}, "
                                  f"expected {want} (for parameter {pname!r})")
    if stacked and len(names) != expected[0]:
        raise CheckpointError(f"parameter {pname!r} stacks {expected[0]} tensors, mapping lists {len(names)}")


def _hf_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    return tuple(reversed(shape)) if transpose else tuple(shape)


def _read_source(ckpt: SafetensorsCheckpoint, src, index: tuple[slice, ...]) -> np.ndarray:
    if callable(src):
        return np.asarray(src(ckpt, index))
    names, transpose = src
    if isinstance(names, str):
        hf_index = tuple(reversed(index)) if transpose else index
        arr = ckpt.read(names, hf_index)
        return arr.T if transpose else arr
    rest = index[1:]
    hf_index = tuple(reversed(rest)) if transpose else rest
    parts = []
    for i in range(len(names))[index[0]]:
        arr = ckpt.read(names[i], hf_index)
        parts.append(arr.T if transpose else arr)
    return np.stack(parts)


def _concrete_sharding(abstract_value, mesh: jax.sharding.Mesh | None):
    """The concrete sharding for an abstract parameter value (eval_shape yields AbstractMesh)."""
    sharding = getattr(abstract_value, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        if mesh is None:
            current = jax.sharding.get_mesh()
            mesh = current if isinstance(current, jax.sharding.Mesh) and not current.empty else None
        if mesh is None:
            if isinstance(sharding.mesh, jax.sharding.Mesh):
                return sharding
            raise CheckpointError("the abstract model is sharded over an abstract mesh; pass mesh= "
                                  "(the concrete jax.sharding.Mesh it was created for)")
        return jax.sharding.NamedSharding(mesh, sharding.spec)
    if sharding is not None and not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def load_params(abstract_model: nnx.Module, ckpt: SafetensorsCheckpoint,
                mapping: Mapping[str, TensorSource], *, param_dtype=None,
                mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                warn_unused: bool = True, ignore_unused: Sequence[str] = ()) -> nnx.Module:
    """Fill an abstract nnx module (from ``nnx.eval_shape``) with checkpoint tensors.

    Args:
      abstract_model: module built with ``nnx.eval_shape`` (inside ``parallel.sharding_context``
        so that each Param carries its sharding).
      ckpt: the checkpoint to read.
      mapping: our parameter path (``"layers.attn.q_proj.kernel"``) -> source (see TensorSource).
      param_dtype: dtype of the loaded params; None keeps the abstract model's dtypes.
      mesh: concrete mesh for the shardings; defaults to the mesh set with ``jax.set_mesh``.
      seed: seed for RNG-stream state (e.g. dropout keys) held by the module.
      warn_unused: warn about checkpoint tensors the mapping does not use.
      ignore_unused: fnmatch patterns of tensors that may go unused without a warning.

    Returns the loaded module. Every Param must be in ``mapping``; a missing tensor or wrong shape
    raises one CheckpointError naming the tensor, file and shapes, before any data is read.
    """
    graphdef, state = nnx.split(abstract_model)
    flat = nnx.to_flat_state(state)
    param_paths = {_path_str(p) for p, v in flat if isinstance(v, nnx.Param)}
    unknown = sorted(set(mapping) - {_path_str(p) for p, _ in flat})
    if unknown:
        raise CheckpointError(f"mapping names parameters the model does not have: {unknown[:10]}")
    missing = sorted(param_paths - set(mapping))
    if missing:
        raise CheckpointError(f"no checkpoint tensor mapped for model parameters {missing[:10]}")

    # Validate every source first so a bad checkpoint fails before reading gigabytes.
    for path, var in flat:
        pname = _path_str(path)
        if pname in mapping and not callable(mapping[pname]):
            _source_shape(ckpt, mapping[pname], pname, tuple(var.get_value().shape))

    used: set[str] = set()
    rng_key = jax.random.key(seed)
    new_flat = []
    for i, (path, var) in enumerate(flat):
        pname = _path_str(path)
        abstract = var.get_value()
        if pname in mapping:
            src = mapping[pname]
            if not callable(src):
                names = src[0]
                used.update([names] if isinstance(names, str) else names)
            dtype = np.dtype(param_dtype if (param_dtype is not None and isinstance(var, nnx.Param))
                             else abstract.dtype)
            shape = tuple(abstract.shape)
            sharding = _concrete_sharding(abstract, mesh)

            def callback(index, src=src, dtype=dtype, shape=shape, pname=pname):
                index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape)) if index else ()
                arr = _read_source(ckpt, src, index)
                want = tuple(s.stop - s.start for s in index)
                if arr.shape != want:
                    raise CheckpointError(f"source for parameter {pname!r} gave a block of shape "
                                          f"{arr.shape}, expected {want}")
                return arr.astype(dtype)

            value = jax.make_array_from_callback(shape, sharding, callback)
        elif isinstance(var, nnx.RngKey):
            value = jax.random.fold_in(rng_key, i)
        elif isinstance(var, nnx.RngCount):
            value = jax.numpy.zeros(abstract.shape, abstract.dtype)
        else:
            raise CheckpointError(f"model state {pname!r} ({type(var).__name__}) has no mapping entry")
        new_flat.append((path, var.replace(value)))

    if warn_unused:
        unused = sorted(n for n in set(ckpt.names()) - used
                        if not any(fnmatch.fnmatchcase(n, pat) for pat in ignore_unused))
        if unused:
            warnings.warn(f"{len(unused)} checkpoint tensors in {str(ckpt.folder)!r} were not used: "
                          f"{unused[:10]}{' ...' if len(unused) > 10 else ''}", stacklevel=2)
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


# --------------------------------------------------------------------------------------------
# decoders: load and export


def _one_device_mesh() -> jax.sharding.Mesh:
    from medkr_jax import parallel
    return parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def abstract_decoder(cfg, *, mesh: jax.sharding.Mesh, rules=None, dtype=jax.numpy.float32,
                     param_dtype=jax.numpy.float32, remat: bool | str = False, scan_layers: bool = False):
    """A ``Decoder`` of shapes only (nothing allocated), each Param carrying its sharding on ``mesh``."""
    from medkr_jax import parallel
    from medkr_jax.models.decoder import Decoder

    with parallel.sharding_context(mesh, rules):
        return nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                              scan_layers=scan_layers, rngs=nnx.Rngs(0)))


def load_decoder(folder: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, rules=None,
                 dtype=jax.numpy.float32, param_dtype=jax.numpy.float32, remat: bool | str = False,
                 scan_layers: bool = False, allow_pickle: bool = False):
    """Load a local HF Llama / Qwen2 / Qwen3 folder into a sharded ``Decoder``.

    Parameters go straight from the safetensors files to their shards on ``mesh`` (default: a
    one-device mesh), placed by the logical-axis ``rules`` (default: ``parallel.DEFAULT_RULES``).
    ``scan_layers`` picks the stacked-layer layout (see ``Decoder``). Returns (model, config).
    """
    from medkr_jax.models.decoder import DecoderConfig, hf_param_mapping

    cfg = DecoderConfig.from_hf(read_hf_config(folder))
    ckpt = SafetensorsCheckpoint(folder, allow_pickle=allow_pickle)
    mesh = mesh if mesh is not None else _one_device_mesh()
    abstract = abstract_decoder(cfg, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                scan_layers=scan_layers)
    # Tied checkpoints sometimes still store lm_head.weight; old ones store RoPE buffers.
    ignore = ["*rotary_emb.inv_freq"] + (["lm_head.weight"] if cfg.tie_word_embeddings else [])
    model = load_params(abstract, ckpt, hf_param_mapping(cfg, scan_layers=scan_layers), param_dtype=param_dtype,
                        mesh=mesh,
                        ignore_unused=ignore)
    return model, cfg


def check_tokenizer_fits(tokenizer: Any, model_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike) -> None:
    """Refuse a tokenizer whose ids run past the embedding rows of the model in ``model_dir`` (its config.json
    only is read, so call this before loading weights): ``len(tokenizer) > vocab_size`` means lookups past the
    table and a run that goes on writing nonsense. More rows than tokens (padded vocabularies) is fine."""
    from medkr_jax.models.decoder import DecoderConfig

    n, rows = len(tokenizer), DecoderConfig.from_hf(read_hf_config(model_dir)).vocab_size
    if n > rows:
        raise CheckpointError(
            f"the tokenizer in {str(tokenizer_dir)!r} has {n} tokens but the model in {str(model_dir)!r} has "
            f"vocab_size {rows} (embedding rows); they do not belong together. Point config.tokenizer_path at "
            "the model's own tokenizer (or leave it empty to use the model folder's)")


# Files that make up an HF tokenizer + chat template; copied next to exported weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def _to_host(x: jax.Array) -> np.ndarray:
    """Gather a (possibly multi-host sharded) array to a numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst``, doing nothing when both name the same file (e.g. exporting into the folder the
    tokenizer is read from)."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return
    shutil.copyfile(src, dst)


def export_decoder(model, cfg, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
                   max_shard_bytes: float = 5e9, dtype=None) -> Path:
    """Write ``model`` as an HF folder (config.json + safetensors) that transformers loads.

    Files larger than ``max_shard_bytes`` are split into ``model-0000i-of-0000n.safetensors`` with a
    ``model.safetensors.index.json``. ``dtype`` (e.g. jnp.bfloat16) converts weights on the way
    out; by default they keep the model's param dtype. Tokenizer and chat-template files are
    copied from ``tokenizer_dir`` when given. All processes must call this (gathering sharded
    weights is collective); only process 0 writes. Returns the output folder.
    """
    from safetensors.numpy import save_file

    from medkr_jax.models.decoder import hf_param_mapping

    out = Path(out_dir)
    writer = jax.process_index() == 0
    mapping = hf_param_mapping(cfg, scan_layers=bool(getattr(model, "scan_layers", False)))
    _, state = nnx.split(model)
    params = {_path_str(p): v for p, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param)}
    missing = sorted(set(mapping) - set(params))
    if missing:
        raise CheckpointError(f"model lacks parameters {missing[:10]} that config {cfg.architecture} needs")

    # Plan the shards from shapes alone, then gather and write one shard at a time so host memory
    # holds at most one shard.
    entries = []  # (hf_name, our_path, layer index or None, transpose, nbytes)
    for pname, (names, transpose) in mapping.items():
        value = params[pname].get_value()
        out_dtype = np.dtype(dtype or value.dtype)
        if isinstance(names, str):
            entries.append((names, pname, None, transpose, value.size * out_dtype.itemsize))
        else:
            per = value.size // len(names) * out_dtype.itemsize
            entries.extend((n, pname, i, transpose, per) for i, n in enumerate(names))
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e[4] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e[4]

    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for old in list(out.glob("*.safetensors")) + [out / SAFE_INDEX]:
            old.unlink(missing_ok=True)  # stale shards from an earlier export would confuse loaders
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = SAFE_SINGLE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors, host = {}, {}
        for name, pname, layer, transpose, nbytes in shard:
            if pname not in host:
                host[pname] = _to_host(params[pname].get_value())
            arr = host[pname] if layer is None else host[pname][layer]
            arr = arr.T if transpose else arr
            tensors[name] = np.ascontiguousarray(arr.astype(np.dtype(dtype)) if dtype is not None else arr)
            weight_map[name] = fname
            total += nbytes
        if writer:
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors, host
    if writer:
        if len(shards) > 1:
            (out / SAFE_INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        hf = cfg.to_hf()
        first = next(iter(params.values())).get_value()
        hf["torch_dtype"] = hf["dtype"] = str(np.dtype(dtype or first.dtype))
        (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer_dir is not None:
            tok = Path(tokenizer_dir)
            if not tok.is_dir():
                raise FileNotFoundError(f"tokenizer folder {str(tok)!r} does not exist")
            for name in TOKENIZER_FILES:
                if (tok / name).is_file():
                    copy_file(tok / name, out / name)
        if not (out / "generation_config.json").exists():
            eos = list(cfg.eos_token_ids)
            gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
                   "pad_token_id": cfg.pad_token_id}
            (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def restore_params(abstract_model: nnx.Module, checkpoint_dir: str | os.PathLike, *,
                   mesh: jax.sharding.Mesh | None = None, step: int | None = None):
    """Fill an abstract module with the parameters of a training checkpoint (``train.loop`` layout).

    ``checkpoint_dir`` is a run's ``checkpoints`` folder (or the run folder holding one); the
    newest step is used unless ``step`` is given. Only the parameters are read (not the optimizer
    state), each straight into its sharding on ``mesh``. Returns (model, step).
    """
    import orbax.checkpoint as ocp
    from etils import epath

    from medkr_jax.train.loop import from_nested_dict, to_nested_dict

    directory = epath.Path(checkpoint_dir)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(directory)!r} does not exist")
    manager = ocp.CheckpointManager(directory)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' for step {step}'} in "
                                    f"{str(directory)!r} (steps: {list(manager.all_steps())})")
        graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise CheckpointError("restore_params handles modules whose state is all nnx.Param")
        target = to_nested_dict(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_concrete_sharding(x, mesh)), params))
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


def run_export(config) -> dict:
    """Job "export": a trained decoder checkpoint -> an HF folder (config.json + safetensors + tokenizer).

    Reads config.model.path (the HF folder the run started from: architecture and tokenizer),
    config.export.checkpoint_dir (the run's checkpoints; "" = <output_dir>/checkpoints),
    config.export.out_dir ("" = <output_dir>/hf), config.export.max_shard_bytes, config.mesh,
    config.sharding_rules, config.model.param_dtype and config.tokenizer_path ("" = model.path).
    """
    from medkr_jax import parallel
    from medkr_jax.config import require
    from medkr_jax.models.decoder import DecoderConfig

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
