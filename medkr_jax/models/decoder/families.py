"""The decoder families (Llama, Qwen2, Qwen3) as data: one row per HF ``architectures`` name.

Everything that differs between the families is a field here, read once from the HF config; the model
code only sees the resulting switches (``DecoderConfig.qkv_bias``, ``qk_norm``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    """One decoder family.

    architecture: the HF ``architectures`` entry; model_type: HF's ``model_type``; name: for messages.
    qkv_bias: the q/k/v projections carry biases (Qwen2). qk_norm: per-head RMSNorm on q and k (Qwen3).
    rejects_bias_flags: config.json's ``attention_bias`` / ``mlp_bias`` must be off (Llama's optional
    biases are not implemented).
    hf_fixed: keys an exported config.json states as fixed by this implementation.
    """

    architecture: str
    model_type: str
    name: str
    qkv_bias: bool
    qk_norm: bool
    rejects_bias_flags: bool
    hf_fixed: tuple[tuple[str, object], ...]


FAMILIES: dict[str, Family] = {f.architecture: f for f in [
    Family("LlamaForCausalLM", "llama", "Llama", qkv_bias=False, qk_norm=False, rejects_bias_flags=True,
           hf_fixed=(("mlp_bias", False),)),
    Family("Qwen2ForCausalLM", "qwen2", "Qwen2", qkv_bias=True, qk_norm=False, rejects_bias_flags=False,
           hf_fixed=(("use_sliding_window", False),)),
    Family("Qwen3ForCausalLM", "qwen3", "Qwen3", qkv_bias=False, qk_norm=True, rejects_bias_flags=False,
           hf_fixed=(("use_sliding_window", False),)),
]}
ARCHITECTURES = tuple(FAMILIES)
FAMILY_OF_MODEL_TYPE: dict[str, Family] = {f.model_type: f for f in FAMILIES.values()}
