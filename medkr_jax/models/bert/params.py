"""BERT <-> Hugging Face folders: checkpoint tensor names, loading into sharded arrays, classifier export.

`load_bert` reads a local HF folder straight into sharded arrays and `export_bert_classifier` writes one back
that transformers loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medkr_jax import parallel
from medkr_jax.models import hf
from medkr_jax.models.bert.config import BertConfig, BertConfigError
from medkr_jax.models.bert.model import BertForSequenceClassification, BertModel
from medkr_jax.models.safetensors_io import (CheckpointError, OutputTensor, SafetensorsCheckpoint,
                                             copy_tokenizer_files, hf_tensor, write_weights)

def hf_names(cfg: BertConfig, *, classifier: bool, prefix: str = "") -> dict[str, tuple[str, bool]]:
    """Our parameter path -> (HF tensor name, transpose?). `prefix` is "bert." for HF task models.

    With `classifier=True` the paths are those of BertForSequenceClassification (under "bert.") plus the
    head ("classifier.weight"/"classifier.bias", never prefixed).
    """
    ours = "bert." if classifier else ""
    names: dict[str, tuple[str, bool]] = {}

    def dense(our: str, theirs: str):
        names[f"{ours}{our}.kernel"] = (f"{prefix}{theirs}.weight", True)  # torch Linear stores [out, in]
        names[f"{ours}{our}.bias"] = (f"{prefix}{theirs}.bias", False)

    def norm(our: str, theirs: str):
        names[f"{ours}{our}.scale"] = (f"{prefix}{theirs}.weight", False)
        names[f"{ours}{our}.bias"] = (f"{prefix}{theirs}.bias", False)

    for e in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        names[f"{ours}embeddings.{e}.embedding"] = (f"{prefix}embeddings.{e}.weight", False)
    norm("embeddings.LayerNorm", "embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        layer = f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            dense(f"layers.{i}.{proj}", f"{layer}.attention.self.{proj}")
        dense(f"layers.{i}.attention_output", f"{layer}.attention.output.dense")
        norm(f"layers.{i}.attention_norm", f"{layer}.attention.output.LayerNorm")
        dense(f"layers.{i}.intermediate", f"{layer}.intermediate.dense")
        dense(f"layers.{i}.output", f"{layer}.output.dense")
        norm(f"layers.{i}.output_norm", f"{layer}.output.LayerNorm")
    if cfg.add_pooling_layer:
        dense("pooler", "pooler.dense")
    if classifier:
        names["classifier.kernel"] = ("classifier.weight", True)
        names["classifier.bias"] = ("classifier.bias", False)
    return names


# Tensors a BERT checkpoint may hold that an encoder/classifier does not use (buffers, pretraining heads).
_IGNORED_PREFIXES = ("cls.", "lm_head.", "bert.cls.")
_IGNORED_SUFFIXES = ("embeddings.position_ids",)


def _random_source(shape: tuple[int, ...], std: float, seed: int):
    """A load_params source that returns HF-style init (normal(0, std), zeros if std == 0) in slices."""
    def read(ckpt, index):
        full = (np.random.default_rng(seed).normal(0.0, std, size=shape) if std > 0
                else np.zeros(shape)).astype(np.float32)
        return full[index] if index else full
    return read


def load_bert(folder: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, rules=None,
              num_labels: int | None = None, id2label: Mapping[int, str] | None = None,
              dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False, seed: int = 0,
              classifier_dropout: float | None = None,
              ) -> tuple[BertModel | BertForSequenceClassification, BertConfig]:
    """Load a local HF BERT folder (config.json + safetensors) straight into sharded arrays.

    Returns (model, cfg). The model is a BertForSequenceClassification when the checkpoint has a classifier
    head or `num_labels`/`id2label` is given (a missing head is initialised randomly, as HF does, with
    `seed`); otherwise a BertModel. Works for plain encoders (MiniLM: no "bert." prefix) and task models
    ("bert." prefix, e.g. the released reasoning/knowledge classifier). `mesh=None` loads on one device.
    `classifier_dropout` overrides the head's dropout rate (config.json's, else hidden_dropout_prob).
    """
    folder = os.fspath(folder)
    cfg = BertConfig.from_hf(hf.read_hf_config(folder), source=os.path.join(folder, "config.json"))
    ckpt = SafetensorsCheckpoint(folder)
    names = set(ckpt.names())
    prefix = "bert." if any(n.startswith("bert.") for n in names) else ""
    has_head = "classifier.weight" in names
    if id2label is not None:
        cfg = cfg.with_labels(dict(id2label))
        if num_labels is not None and num_labels != cfg.num_labels:
            raise BertConfigError(f"num_labels={num_labels} but id2label has {cfg.num_labels} entries")
    elif num_labels is not None and (num_labels != cfg.num_labels or not has_head):
        cfg = cfg.with_labels(num_labels)
    classifier = has_head or num_labels is not None or id2label is not None
    if classifier_dropout is not None:
        cfg = dataclasses.replace(cfg, classifier_dropout=float(classifier_dropout))
    if has_head and ckpt.shape("classifier.weight") != (cfg.num_labels, cfg.hidden_size):
        raise CheckpointError(
            f"classifier.weight in {str(ckpt.file_of('classifier.weight'))!r} has shape "
            f"{ckpt.shape('classifier.weight')}, expected ({cfg.num_labels}, {cfg.hidden_size}) for "
            f"num_labels={cfg.num_labels}")
    if not classifier and f"{prefix}pooler.dense.weight" not in names:
        cfg = dataclasses.replace(cfg, add_pooling_layer=False)  # e.g. a masked-LM checkpoint

    mapping: dict[str, Any] = hf_names(cfg, classifier=classifier, prefix=prefix)
    for path, (name, transpose) in list(mapping.items()):
        if name in names:
            continue
        if name.endswith(".weight") and "LayerNorm" in name and name[:-6] + "gamma" in names:
            mapping[path] = (name[:-6] + "gamma", transpose)  # TF-era checkpoints
        elif name.endswith(".bias") and "LayerNorm" in name and name[:-4] + "beta" in names:
            mapping[path] = (name[:-4] + "beta", transpose)
        elif name.startswith(("classifier.", f"{prefix}pooler.")) and classifier:
            # Task head (or pooler) absent: fresh init like HF (normal(initializer_range), zero bias).
            shape = ((cfg.hidden_size, cfg.num_labels) if name.startswith("classifier.") else
                     (cfg.hidden_size, cfg.hidden_size))
            shape = shape if name.endswith(".weight") else shape[1:]
            std = cfg.initializer_range if name.endswith(".weight") else 0.0
            mapping[path] = _random_source(shape, std, seed + len(path))
    if mesh is None:
        mesh = hf.one_device_mesh()
    cls = BertForSequenceClassification if classifier else BertModel
    with parallel.sharding_context(mesh, rules):
        abstract = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                              rngs=nnx.Rngs(seed)))
        model = hf.load_params(abstract, ckpt, mapping, param_dtype=param_dtype, mesh=mesh, warn_unused=False)
    used = {src[0] for src in mapping.values() if isinstance(src, tuple)}
    unused = sorted(n for n in names - used
                    if not n.startswith(_IGNORED_PREFIXES) and not n.endswith(_IGNORED_SUFFIXES))
    if unused:
        warnings.warn(f"{len(unused)} tensors in {folder!r} were not used: {unused[:10]}", stacklevel=2)
    return model, cfg


def init_bert_classifier(cfg: BertConfig, *, mesh: jax.sharding.Mesh | None = None, rules=None,
                         dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                         seed: int = 0) -> BertForSequenceClassification:
    """A randomly initialised classifier (for tests and from-scratch training), sharded on `mesh`."""
    if mesh is None:
        mesh = hf.one_device_mesh()
    with parallel.sharding_context(mesh, rules):
        return BertForSequenceClassification(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                             rngs=nnx.Rngs(seed))


# Tokenizer files of a BERT model (WordPiece); at least one must exist in the folder an export copies from.
BERT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def export_bert_classifier(model: BertForSequenceClassification, cfg: BertConfig, out_dir: str | os.PathLike,
                           tokenizer_dir: str | os.PathLike | None = None) -> str:
    """Write an HF BertForSequenceClassification folder (config.json with id2label/label2id,
    model.safetensors in float32, tokenizer files copied from `tokenizer_dir`) that transformers loads.
    Every process must call it (sharded params are gathered); only process 0 writes. Returns out_dir."""
    if not isinstance(model, BertForSequenceClassification):
        raise TypeError(f"export_bert_classifier needs a BertForSequenceClassification, got {type(model).__name__}")
    out_dir = os.fspath(out_dir)
    flat = dict((".".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = [OutputTensor(name, path, flat[path].get_value().size * 4,
                            partial(hf_tensor, transpose=transpose, dtype=np.float32))
               for path, (name, transpose) in hf_names(cfg, classifier=True, prefix="bert.").items()]
    writer = jax.process_index() == 0
    write_weights(Path(out_dir), tensors, lambda path: flat[path].get_value(), write=writer)
    if not writer:
        return out_dir
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf("BertForSequenceClassification"), f, indent=2)
    if tokenizer_dir is not None and not copy_tokenizer_files(os.fspath(tokenizer_dir), out_dir,
                                                              BERT_TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(BERT_TOKENIZER_FILES)}) in {tokenizer_dir!r}")
    return out_dir
