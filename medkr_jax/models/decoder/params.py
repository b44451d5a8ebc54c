"""Our decoder parameter paths -> the tensor names of HF Llama / Qwen2 / Qwen3 checkpoints."""

from __future__ import annotations

from medkr_jax.models.decoder.config import DecoderConfig


def hf_param_mapping(cfg: DecoderConfig, *, scan_layers: bool = False) -> dict[str, tuple]:
    """Our parameter path -> (HF tensor name(s), transpose) for Llama/Qwen2/Qwen3 checkpoints.

    With ``scan_layers`` each layer parameter is stacked, so it maps to the list of per-layer HF
    tensors; otherwise ``layers.{i}.<name>`` maps to ``model.layers.{i}.<hf name>``.
    """
    m: dict[str, tuple] = {
        "embed.embedding": ("model.embed_tokens.weight", False),
        "norm.scale": ("model.norm.weight", False),
    }

    def per_layer(ours: str, theirs: str, transpose: bool) -> None:
        names = [f"model.layers.{i}.{theirs}" for i in range(cfg.num_layers)]
        if scan_layers:
            m[f"layers.{ours}"] = (names, transpose)
        else:
            m.update({f"layers.{i}.{ours}": (n, transpose) for i, n in enumerate(names)})

    per_layer("attn_norm.scale", "input_layernorm.weight", False)
    per_layer("mlp_norm.scale", "post_attention_layernorm.weight", False)
    for ours, theirs in [("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                         ("attn.v_proj", "self_attn.v_proj"), ("attn.o_proj", "self_attn.o_proj"),
                         ("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj"),
                         ("mlp.down_proj", "mlp.down_proj")]:
        per_layer(f"{ours}.kernel", f"{theirs}.weight", True)
    if cfg.qkv_bias:
        for p in ("q_proj", "k_proj", "v_proj"):
            per_layer(f"attn.{p}.bias", f"self_attn.{p}.bias", False)
    if cfg.qk_norm:
        per_layer("attn.q_norm.scale", "self_attn.q_norm.weight", False)
        per_layer("attn.k_norm.scale", "self_attn.k_norm.weight", False)
    if not cfg.tie_word_embeddings:
        m["lm_head.kernel"] = ("lm_head.weight", True)
    return m
