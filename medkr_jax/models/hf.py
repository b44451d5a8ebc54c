"""Hugging Face decoder folders: config.json, filling an abstract model from a checkpoint, loading, export.

Checkpoint tensors go straight into each device's shards (``jax.make_array_from_callback`` asks the lazy
reader of ``safetensors_io`` for exactly the slices a device holds); export writes an HF folder that
transformers loads, through the shared sharded writer: a model with LoRA adapters (models/lora.py) as its
merged weights, and its adapters alone as a PEFT folder (``export_peft``).
"""

from __future__ import annotations

import fnmatch
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Union

import jax
import numpy as np
from flax import nnx

from medkr_jax import parallel
from medkr_jax.models import lora
from medkr_jax.models.decoder import CAUSAL_LM_PREFIX, MULTIMODAL, Decoder, DecoderConfig, hf_param_mapping
from medkr_jax.models.safetensors_io import (CheckpointError, OutputTensor, SafetensorsCheckpoint,
                                             copy_tokenizer_files, hf_tensor, write_weights)

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


def concrete_sharding(abstract_value, mesh: jax.sharding.Mesh | None):
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
            sharding = concrete_sharding(abstract, mesh)

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


def one_device_mesh() -> jax.sharding.Mesh:
    """A mesh of this host's first device (every axis of size 1): loading without a mesh given."""
    return parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def abstract_decoder(cfg: DecoderConfig, *, mesh: jax.sharding.Mesh, rules=None, dtype=jax.numpy.float32,
                     param_dtype=jax.numpy.float32, remat: bool | str = False, scan_layers: bool = False):
    """A ``Decoder`` of shapes only (nothing allocated), each Param carrying its sharding on ``mesh``."""
    with parallel.sharding_context(mesh, rules):
        return nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                              scan_layers=scan_layers, rngs=nnx.Rngs(0)))


def load_decoder(folder: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, rules=None,
                 dtype=jax.numpy.float32, param_dtype=jax.numpy.float32, remat: bool | str = False,
                 scan_layers: bool = False, allow_pickle: bool = False):
    """Load a local HF folder of a decoder family (``families``) into a sharded ``Decoder``; of a multimodal
    checkpoint (Gemma 3 / MedGemma), its text decoder.

    Parameters go straight from the safetensors files to their shards on ``mesh`` (default: a
    one-device mesh), placed by the logical-axis ``rules`` (default: ``sharding_rules.DEFAULT_SHARDING_RULES``).
    ``scan_layers`` picks the stacked-layer layout (see ``Decoder``). Returns (model, config).
    """
    hf = read_hf_config(folder)
    cfg = DecoderConfig.from_hf(hf)
    ckpt = SafetensorsCheckpoint(folder, allow_pickle=allow_pickle)
    mesh = mesh if mesh is not None else one_device_mesh()
    abstract = abstract_decoder(cfg, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                scan_layers=scan_layers)
    prefix, ignore = _checkpoint_layout(hf, ckpt)
    # Tied checkpoints sometimes still store lm_head.weight; old ones store RoPE buffers.
    ignore += ["*rotary_emb.inv_freq"] + ([prefix[1]] if cfg.tie_word_embeddings else [])
    model = load_params(abstract, ckpt, hf_param_mapping(cfg, scan_layers=scan_layers, prefix=prefix),
                        param_dtype=param_dtype, mesh=mesh, ignore_unused=ignore)
    return model, cfg


def _checkpoint_layout(hf: dict, ckpt: SafetensorsCheckpoint) -> tuple[tuple[str, str], list[str]]:
    """(decoder tensor prefix, LM head name) of the checkpoint and the patterns of tensors it holds besides the
    decoder: a causal LM's, or for a multimodal checkpoint (``MULTIMODAL``) the first layout whose embedding
    the checkpoint holds."""
    part = MULTIMODAL.get((hf.get("architectures") or [""])[0])
    if part is None:
        return CAUSAL_LM_PREFIX, []
    for prefix in part.prefixes:
        if f"{prefix[0]}embed_tokens.weight" in ckpt:
            return prefix, list(part.ignore)
    raise CheckpointError(f"checkpoint {str(ckpt.folder)!r} of a {hf['architectures'][0]} holds none of "
                          f"{[p + 'embed_tokens.weight' for p, _ in part.prefixes]}")


def check_tokenizer_fits(tokenizer: Any, model_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike) -> None:
    """Refuse a tokenizer whose ids run past the embedding rows of the model in ``model_dir`` (its config.json
    only is read, so call this before loading weights): ``len(tokenizer) > vocab_size`` means lookups past the
    table and a run that goes on writing nonsense. More rows than tokens (padded vocabularies) is fine."""
    n, rows = len(tokenizer), DecoderConfig.from_hf(read_hf_config(model_dir)).vocab_size
    if n > rows:
        raise CheckpointError(
            f"the tokenizer in {str(tokenizer_dir)!r} has {n} tokens but the model in {str(model_dir)!r} has "
            f"vocab_size {rows} (embedding rows); they do not belong together. Point config.tokenizer_path at "
            "the model's own tokenizer (or leave it empty to use the model folder's)")


def _export_plan(params: Mapping[str, nnx.Param], mapping: Mapping[str, tuple], dtype) -> list[OutputTensor]:
    """The HF tensors of ``mapping`` (our path -> (HF name or per-layer names, transpose)), in mapping order."""
    tensors = []
    for pname, (names, transpose) in mapping.items():
        value = params[pname].get_value()
        out_dtype = np.dtype(dtype or value.dtype)
        if isinstance(names, str):
            tensors.append(OutputTensor(names, pname, value.size * out_dtype.itemsize,
                                        partial(hf_tensor, layer=None, transpose=transpose, dtype=dtype)))
        else:
            per = value.size // len(names) * out_dtype.itemsize
            tensors.extend(OutputTensor(n, pname, per, partial(hf_tensor, layer=i, transpose=transpose,
                                                                dtype=dtype))
                           for i, n in enumerate(names))
    return tensors


def export_decoder(model, cfg: DecoderConfig, out_dir: str | os.PathLike, *,
                   tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: float = 5e9, dtype=None) -> Path:
    """Write ``model`` as an HF folder (config.json + safetensors) that transformers loads.

    Files larger than ``max_shard_bytes`` are split into ``model-0000i-of-0000n.safetensors`` with a
    ``model.safetensors.index.json``. ``dtype`` (e.g. jnp.bfloat16) converts weights on the way
    out; by default they keep the model's param dtype. A model with LoRA adapters is written with the adapters
    merged into its kernels (W + A B * alpha / r, one kernel at a time). Tokenizer and chat-template files are
    copied from ``tokenizer_dir`` when given. All processes must call this (gathering sharded
    weights is collective); only process 0 writes. Returns the output folder.
    """
    out = Path(out_dir)
    writer = jax.process_index() == 0
    mapping = hf_param_mapping(cfg, scan_layers=bool(getattr(model, "scan_layers", False)))
    params = _flat_params(model)
    missing = sorted(set(mapping) - set(params))
    if missing:
        raise CheckpointError(f"model lacks parameters {missing[:10]} that config {cfg.architecture} needs")
    merged = lora.merged_kernels(model)
    write_weights(out, _export_plan(params, mapping, dtype),
                  lambda pname: merged[pname]() if pname in merged else params[pname].get_value(),
                  max_shard_bytes=max_shard_bytes, write=writer)
    if not writer:
        return out
    hf = cfg.to_hf()
    first = params[next(iter(mapping))].get_value()
    hf["torch_dtype"] = hf["dtype"] = str(np.dtype(dtype or first.dtype))
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer_dir is not None:
        if not Path(tokenizer_dir).is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(Path(tokenizer_dir))!r} does not exist")
        copy_tokenizer_files(tokenizer_dir, out)
    if not (out / "generation_config.json").exists():
        eos = list(cfg.eos_token_ids)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
               "pad_token_id": cfg.pad_token_id}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def _flat_params(model) -> dict[str, nnx.Param]:
    """Dotted path -> parameter of every nnx.Param of ``model`` (adapters included)."""
    return {_path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v, nnx.Param)}


def export_peft(model, cfg: DecoderConfig, out_dir: str | os.PathLike, *, settings: lora.LoRASettings,
                base_model: str | os.PathLike = "") -> Path:
    """Write the LoRA adapters of ``model`` as a PEFT folder (adapter_config.json + adapter_model.safetensors)
    that ``peft.PeftModel.from_pretrained`` loads onto the base HF model (``base_model``: its folder, recorded
    in the config). Collective like ``export_decoder``; only process 0 writes. Returns the output folder."""
    if not lora.has_adapters(model):
        raise ValueError("export_peft: the model has no LoRA adapters (config.lora.rank is 0)")
    out = Path(out_dir)
    writer = jax.process_index() == 0
    mapping = lora.peft_tensors(model, hf_param_mapping(cfg, scan_layers=bool(getattr(model, "scan_layers", False))))
    params = _flat_params(model)
    write_weights(out, _export_plan(params, mapping, None), lambda pname: params[pname].get_value(), write=writer,
                  single="adapter_model.safetensors")
    if writer:
        config = lora.peft_config(model, settings, str(base_model))
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
