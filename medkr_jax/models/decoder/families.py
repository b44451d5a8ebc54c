"""The decoder families (Llama, Mistral, Qwen2, Qwen3, Gemma 3) as data: one row per HF ``architectures`` name.

Everything that differs between the families is a field here or a ``DecoderConfig`` field read once from the
HF config; the model code only sees the resulting switches (``DecoderConfig.qkv_bias``, ``qk_norm``, the
family's ``norm_offset``, ``sandwich_norms``, ``mlp_act``, ``embed_scale``; the config's sliding window,
layer types, RoPE bases, attention scale and soft-caps).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    """One decoder family.

    architecture: the HF ``architectures`` entry; model_type: HF's ``model_type``; name: for messages.
    qkv_bias: the q/k/v projections carry biases (Qwen2). qk_norm: per-head RMSNorm on q and k (Qwen3, Gemma 3).
    rejects_bias_flags: config.json's ``attention_bias`` / ``mlp_bias`` must be off (optional biases are not
    implemented).
    hf_fixed: keys an exported config.json states as fixed by this implementation.
    act_key / mlp_act: the config.json key naming the gated MLP's activation and the one value implemented:
    "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU with tanh GELU).
    norm_offset: RMSNorm scales by (1 + w), weights stored zero-centred, and the product is formed in float32
    before the cast back (Gemma); otherwise by w after the cast (Llama).
    sandwich_norms: four norms per layer: besides the pre-attention and pre-MLP norms, one on the attention
    output and one on the MLP output before each residual add (Gemma 3).
    embed_scale: embeddings are multiplied by sqrt(hidden_size), rounded to the compute dtype (Gemma).
    sliding: which layers attend within ``sliding_window``: "none" (config sliding keys are not read),
    "all" (every layer when the config sets ``sliding_window``: Mistral), "layer_types" (per layer, from
    ``layer_types`` or ``sliding_window_pattern``: Gemma 3).
    local_rope: sliding layers have their own RoPE base (``rope_local_base_freq`` /
    ``rope_parameters["sliding_attention"]``) and no RoPE scaling; global layers use ``rope_theta`` with the
    config's scaling (Gemma 3).
    softcap_keys: config.json carries ``query_pre_attn_scalar`` and the attention / final-logit soft-caps (Gemma).
    hf_defaults: transformers' defaults for keys a config.json may leave out (its config class's defaults).
    """

    architecture: str
    model_type: str
    name: str
    qkv_bias: bool
    qk_norm: bool
    rejects_bias_flags: bool
    hf_fixed: tuple[tuple[str, object], ...]
    act_key: str = "hidden_act"
    mlp_act: str = "silu"
    norm_offset: bool = False
    sandwich_norms: bool = False
    embed_scale: bool = False
    sliding: str = "none"
    local_rope: bool = False
    softcap_keys: bool = False
    hf_defaults: tuple[tuple[str, object], ...] = ()


# transformers' Gemma3TextConfig defaults (the Hub's Gemma 3 / MedGemma configs leave several of these out).
_GEMMA3_DEFAULTS = (("vocab_size", 262_208), ("max_position_embeddings", 131_072), ("rms_norm_eps", 1e-6),
                    ("rope_theta", 1_000_000.0), ("rope_local_base_freq", 10_000.0), ("query_pre_attn_scalar", 256),
                    ("sliding_window", 4096), ("sliding_window_pattern", 6), ("tie_word_embeddings", True),
                    ("hidden_activation", "gelu_pytorch_tanh"), ("bos_token_id", 2), ("eos_token_id", 1),
                    ("pad_token_id", 0))

FAMILIES: dict[str, Family] = {f.architecture: f for f in [
    Family("LlamaForCausalLM", "llama", "Llama", qkv_bias=False, qk_norm=False, rejects_bias_flags=True,
           hf_fixed=(("mlp_bias", False),)),
    Family("MistralForCausalLM", "mistral", "Mistral", qkv_bias=False, qk_norm=False, rejects_bias_flags=True,
           hf_fixed=(), sliding="all", hf_defaults=(("sliding_window", 4096),)),
    Family("Qwen2ForCausalLM", "qwen2", "Qwen2", qkv_bias=True, qk_norm=False, rejects_bias_flags=False,
           hf_fixed=(("use_sliding_window", False),)),
    Family("Qwen3ForCausalLM", "qwen3", "Qwen3", qkv_bias=False, qk_norm=True, rejects_bias_flags=False,
           hf_fixed=(("use_sliding_window", False),)),
    Family("Gemma3ForCausalLM", "gemma3_text", "Gemma 3", qkv_bias=False, qk_norm=True, rejects_bias_flags=True,
           hf_fixed=(("use_bidirectional_attention", False),), act_key="hidden_activation",
           mlp_act="gelu_pytorch_tanh", norm_offset=True, sandwich_norms=True, embed_scale=True,
           sliding="layer_types", local_rope=True, softcap_keys=True, hf_defaults=_GEMMA3_DEFAULTS),
]}
ARCHITECTURES = tuple(FAMILIES)
FAMILY_OF_MODEL_TYPE: dict[str, Family] = {f.model_type: f for f in FAMILIES.values()}


@dataclasses.dataclass(frozen=True)
class TextPart:
    """The text decoder inside a multimodal checkpoint (loaded alone; exported as its text-only family).

    config_key: the config.json sub-dict with the decoder's keys; architecture: the decoder's family row;
    prefixes: (prefix of the decoder's tensors, name of its LM head) as checkpoints store them, in the order
    tried; ignore: fnmatch patterns of the other towers' tensors, left unread.
    """

    config_key: str
    architecture: str
    prefixes: tuple[tuple[str, str], ...]
    ignore: tuple[str, ...]


# Where a plain causal LM keeps its tensors.
CAUSAL_LM_PREFIX = ("model.", "lm_head.weight")

MULTIMODAL: dict[str, TextPart] = {
    # Gemma 3 / MedGemma: "language_model.model." as released (and as transformers 5 saves them),
    # "model.language_model." as transformers 4.52-4.57 saved them.
    "Gemma3ForConditionalGeneration": TextPart(
        "text_config", "Gemma3ForCausalLM",
        (("language_model.model.", "language_model.lm_head.weight"), ("model.language_model.", "lm_head.weight")),
        ("vision_tower.*", "multi_modal_projector.*", "model.vision_tower.*", "model.multi_modal_projector.*")),
}
