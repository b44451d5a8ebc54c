"""Our decoder parameter paths -> the tensor names of HF checkpoints of each family."""

from __future__ import annotations

from medkr_jax.models.decoder.config import DecoderConfig
from medkr_jax.models.decoder.families import CAUSAL_LM_PREFIX

# Our norm -> its HF name (after "model.layers.N."), by whether the family has four norms per layer: Llama's
# "post_attention_layernorm" is the pre-MLP norm, Gemma 3's normalises the attention output.
_NORMS = {
    False: [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")],
    True: [("attn_norm", "input_layernorm"), ("mlp_norm", "pre_feedforward_layernorm"),
           ("attn_post_norm", "post_attention_layernorm"), ("mlp_post_norm", "post_feedforward_layernorm")],
}


def hf_param_mapping(cfg: DecoderConfig, *, scan_layers: bool = False,
                     prefix: tuple[str, str] = CAUSAL_LM_PREFIX) -> dict[str, tuple]:
    """Our parameter path -> (HF tensor name(s), transpose) for the checkpoints of ``cfg``'s family.

    With ``scan_layers`` each layer parameter is stacked, so it maps to the list of per-layer HF
    tensors; otherwise ``layers.{i}.<name>`` maps to ``model.layers.{i}.<hf name>``. ``prefix``: (where
    the decoder's tensors sit, the LM head's name): ``("model.", "lm_head.weight")`` for causal LMs, others
    for the text part of a multimodal checkpoint (``families.MULTIMODAL``).
    """
    base, head = prefix
    m: dict[str, tuple] = {
        "embed.embedding": (f"{base}embed_tokens.weight", False),
        "norm.scale": (f"{base}norm.weight", False),
    }

    def per_layer(ours: str, theirs: str, transpose: bool) -> None:
        names = [f"{base}layers.{i}.{theirs}" for i in range(cfg.num_layers)]
        if scan_layers:
            m[f"layers.{ours}"] = (names, transpose)
        else:
            m.update({f"layers.{i}.{ours}": (n, transpose) for i, n in enumerate(names)})

    for ours, theirs in _NORMS[cfg.family.sandwich_norms]:
        per_layer(f"{ours}.scale", f"{theirs}.weight", False)
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
        m["lm_head.kernel"] = (head, True)
    return m
