"""Hugging Face weight folders on disk: lazy sharded safetensors reading and the one sharded writer.

The reader never materialises a whole checkpoint: each tensor is opened lazily and only the
slices a device holds are read (``jax.make_array_from_callback`` asks for exactly those), so a
host of a multi-host pod reads only what its own devices need. Pickled ``pytorch_model.bin``
folders are read (whole, with torch) only on explicit opt-in.

The writer (``write_weights``) is shared by every exporter (decoders, the BERT classifier, the GGUF
converter): it plans shards from sizes alone and gathers and writes one shard at a time, so host
memory holds at most one shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# Files that make up an HF tokenizer + chat template; copied next to exported decoder weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint folder or tensor does not match what the model expects."""


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
# writing


@dataclasses.dataclass(frozen=True)
class OutputTensor:
    """One tensor of an exported weights folder.

    ``source`` names what ``write_weights``' ``fetch`` returns (gathered to this host once per shard, so
    several tensors may be cut from one source, e.g. the layers of a stacked parameter); ``convert`` turns
    that host array into this tensor as written; ``nbytes`` is its size as written (plans the shards).
    """

    name: str
    source: Hashable
    nbytes: int
    convert: Callable[[np.ndarray], np.ndarray]


def to_host(x: Any) -> np.ndarray:
    """Gather a (possibly multi-host sharded) array to a numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def hf_tensor(host: np.ndarray, *, layer: int | None = None, transpose: bool = False, dtype=None) -> np.ndarray:
    """One tensor as written, cut from a gathered array: layer ``layer`` of a stacked one, transposed (torch
    Linear weights are [out, in]), cast to ``dtype`` (None keeps the dtype), C-contiguous."""
    arr = host if layer is None else host[layer]
    arr = arr.T if transpose else arr
    return np.ascontiguousarray(arr.astype(np.dtype(dtype)) if dtype is not None else arr)


def plan_shards(tensors: Sequence[OutputTensor], max_shard_bytes: float) -> list[list[OutputTensor]]:
    """Consecutive groups of ``tensors``, each at most ``max_shard_bytes`` unless one tensor alone is larger."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_weights(out: Path, tensors: Sequence[OutputTensor], fetch: Callable[[Hashable], Any], *,
                  max_shard_bytes: float = float("inf"), write: bool = True, single: str = SAFE_SINGLE) -> None:
    """Write ``tensors`` into ``out`` as ``model.safetensors`` (or ``single``, e.g. a PEFT folder's
    ``adapter_model.safetensors``), or as ``model-0000i-of-0000n.safetensors`` with a
    ``model.safetensors.index.json`` when they exceed ``max_shard_bytes``.

    Safetensors files and an index already in ``out`` are removed first (stale shards of an earlier export
    would confuse loaders). Every process of a multi-host run calls this (gathering sharded arrays is
    collective); only those with ``write`` touch the disk.
    """
    shards = plan_shards(tensors, max_shard_bytes)
    if write:
        out.mkdir(parents=True, exist_ok=True)
        for old in list(out.glob("*.safetensors")) + [out / SAFE_INDEX]:
            old.unlink(missing_ok=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = single if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays, host = {}, {}
        for t in shard:
            if t.source not in host:
                host[t.source] = to_host(fetch(t.source))
            arrays[t.name] = t.convert(host[t.source])
            weight_map[t.name] = fname
            total += t.nbytes
        if write:
            save_file(arrays, str(out / fname), metadata={"format": "pt"})
        del arrays, host
    if write and len(shards) > 1:
        (out / SAFE_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def copy_tokenizer_files(tokenizer_dir: str | os.PathLike, out: str | os.PathLike,
                         names: Sequence[str] = TOKENIZER_FILES) -> list[str]:
    """Copy those of ``names`` present in ``tokenizer_dir`` into ``out``; returns the names copied. A file
    that already is the target (exporting into the folder the tokenizer is read from) is left alone."""
    copied = []
    for name in names:
        src, dst = os.path.join(tokenizer_dir, name), os.path.join(out, name)
        if not os.path.isfile(src):
            continue
        if not (os.path.exists(dst) and os.path.samefile(src, dst)):
            shutil.copyfile(src, dst)
        copied.append(name)
    return copied
