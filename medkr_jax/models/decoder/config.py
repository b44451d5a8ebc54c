"""Decoder hyper-parameters (``DecoderConfig``), read from and written to HF ``config.json`` dicts."""

from __future__ import annotations

import dataclasses

from medkr_jax.models.decoder.families import ARCHITECTURES, FAMILIES, FAMILY_OF_MODEL_TYPE, Family

_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The HF config describes a model this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a Llama / Qwen2 / Qwen3 decoder (mirrors the HF config.json fields)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedModelError(f"architecture {self.architecture!r} is not supported; supported: "
                                        f"{list(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"num_heads={self.num_heads} must be a multiple of "
                                        f"num_kv_heads={self.num_kv_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported; supported: "
                                        f"{list(_ROPE_TYPES)}")
        # Hashable (jit static args, dict keys): freeze the tuple and dict fields.
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, _FrozenDict):
            object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))

    @property
    def family(self) -> Family:
        """The family row of this architecture (see ``families``)."""
        return FAMILIES[self.architecture]

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        e, h, kv, hd, m = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        attn = e * h * hd * 2 + e * kv * hd * 2 + (h * hd + 2 * kv * hd if self.qkv_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        layer = attn + 3 * e * m + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_layers * layer + e + head

    @classmethod
    def from_hf(cls, hf: dict) -> "DecoderConfig":
        """Build from an HF ``config.json`` dict (old rope_theta/rope_scaling or new rope_parameters)."""
        archs = hf.get("architectures") or []
        if archs:
            arch = archs[0]
        elif hf.get("model_type") in FAMILY_OF_MODEL_TYPE:
            arch = FAMILY_OF_MODEL_TYPE[hf["model_type"]].architecture
        else:
            raise UnsupportedModelError(f"config.json names neither 'architectures' nor a known model_type "
                                        f"(model_type={hf.get('model_type')!r}); supported: {list(ARCHITECTURES)}")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(f"config.json 'architectures' is {archs!r}; supported: "
                                        f"{list(ARCHITECTURES)}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        absent = [k for k in required if k not in hf]
        if absent:
            raise UnsupportedModelError(f"config.json lacks required keys {absent}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"config.json hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
        family = FAMILIES[arch]
        if family.rejects_bias_flags and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise UnsupportedModelError(f"{family.name} configs with attention_bias or mlp_bias are not supported")
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError("config.json use_sliding_window=true is not supported")

        rope = dict(hf.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = rope or hf.get("rope_scaling")
        if scaling:
            scaling = dict(scaling)
            scaling["rope_type"] = scaling.get("rope_type", scaling.pop("type", "default"))
            scaling.pop("type", None)
            if scaling["rope_type"] == "default":
                scaling = None
        heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rope_theta=theta,
            rope_scaling=scaling or None,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family.qkv_bias,
            qk_norm=family.qk_norm,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict:
        """An HF ``config.json`` dict that transformers' Auto classes load."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(dict(self.rope_scaling))
        eos = list(self.eos_token_ids)
        out = {
            "architectures": [self.architecture],
            "model_type": self.family.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # older transformers / vLLM read these two keys
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        out.update(self.family.hf_fixed)
        return out


class _FrozenDict(dict):
    """A hashable read-only dict (DecoderConfig must be hashable to be a static jit argument)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    def _readonly(self, *a, **k):
        raise TypeError("DecoderConfig.rope_scaling is read-only")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _readonly

