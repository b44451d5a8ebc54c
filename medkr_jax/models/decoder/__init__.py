"""One decoder-only transformer for Llama, Mistral, Qwen2, Qwen3 and Gemma 3 checkpoints (Flax NNX).

families.py: the per-family differences as data; config.py: DecoderConfig (from / to HF config.json);
layers.py: RoPE and the building blocks; model.py: Decoder and its KV cache; params.py: HF tensor names.
"""

from medkr_jax.models.decoder.config import DecoderConfig, UnsupportedModelError
from medkr_jax.models.decoder.families import ARCHITECTURES, CAUSAL_LM_PREFIX, FAMILIES, MULTIMODAL, Family
from medkr_jax.models.decoder.layers import apply_rope, rope_inv_freq, rope_tables
from medkr_jax.models.decoder.model import Decoder, KVCache, init_cache
from medkr_jax.models.decoder.params import hf_param_mapping

__all__ = ["ARCHITECTURES", "CAUSAL_LM_PREFIX", "FAMILIES", "MULTIMODAL", "Decoder", "DecoderConfig", "Family", "KVCache", "UnsupportedModelError",
           "apply_rope", "hf_param_mapping", "init_cache", "rope_inv_freq", "rope_tables"]
