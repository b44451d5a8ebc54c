"""Decoder hyper-parameters (``DecoderConfig``), read from and written to HF ``config.json`` dicts."""

from __future__ import annotations

import dataclasses

from medkr_jax.models.decoder.families import ARCHITECTURES, FAMILIES, FAMILY_OF_MODEL_TYPE, MULTIMODAL, Family

_ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedModelError(ValueError):
    """The HF config describes a model this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a decoder of one of the ``families`` (mirrors the HF config.json fields).

    sliding_window: how far a sliding layer looks back (a query at slot i sees keys at slots j with
    i - window < j <= i, as transformers); layer_types: per layer "full_attention" or "sliding_attention"
    (left empty: every layer "sliding_attention" when ``sliding_window`` is set, else "full_attention").
    local_rope_theta: the RoPE base of the sliding layers (None: the global RoPE, scaling included).
    query_pre_attn_scalar: attention scores are scaled by its -1/2 power (None: head_dim's).
    attn_logit_softcapping / final_logit_softcapping: c * tanh(x / c) on the attention scores / the logits.
    """

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
    sliding_window: int | None = None
    layer_types: tuple = ()
    local_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

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
        self._check_layer_types()
        # Hashable (jit static args, dict keys): freeze the tuple and dict fields.
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, _FrozenDict):
            object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))

    def _check_layer_types(self) -> None:
        """Fill an empty ``layer_types`` and check it (one UnsupportedModelError naming the bad value)."""
        if self.sliding_window is not None and int(self.sliding_window) < 1:
            raise UnsupportedModelError(f"sliding_window={self.sliding_window} must be a positive integer")
        kinds = tuple(self.layer_types) or (
            ("sliding_attention" if self.sliding_window else "full_attention"),) * self.num_layers
        bad = sorted(set(kinds) - set(LAYER_TYPES))
        if bad:
            raise UnsupportedModelError(f"layer_types holds {bad}; supported: {list(LAYER_TYPES)}")
        if len(kinds) != self.num_layers:
            raise UnsupportedModelError(f"layer_types lists {len(kinds)} layers, num_hidden_layers is "
                                        f"{self.num_layers}")
        if "sliding_attention" in kinds and not self.sliding_window:
            raise UnsupportedModelError("layer_types has sliding_attention layers but sliding_window is not set")
        object.__setattr__(self, "layer_types", kinds)

    @property
    def family(self) -> Family:
        """The family row of this architecture (see ``families``)."""
        return FAMILIES[self.architecture]

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends within ``sliding_window`` only."""
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        e, h, kv, hd, m = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        attn = e * h * hd * 2 + e * kv * hd * 2 + (h * hd + 2 * kv * hd if self.qkv_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        layer = attn + 3 * e * m + (4 if self.family.sandwich_norms else 2) * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_layers * layer + e + head

    @classmethod
    def from_hf(cls, hf: dict) -> "DecoderConfig":
        """Build from an HF ``config.json`` dict (old rope_theta/rope_scaling or new rope_parameters); a
        multimodal checkpoint's config (``families.MULTIMODAL``) gives its text decoder."""
        family, hf = _family_and_keys(hf)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        absent = [k for k in required if k not in hf]
        if absent:
            raise UnsupportedModelError(f"config.json lacks required keys {absent}")
        act = hf.get(family.act_key, "silu")
        if act != family.mlp_act:
            raise UnsupportedModelError(f"config.json {family.act_key}={act!r}; {family.name} supports only "
                                        f"{family.mlp_act!r}")
        if family.rejects_bias_flags and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise UnsupportedModelError(f"{family.name} configs with attention_bias or mlp_bias are not supported")
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError("config.json use_sliding_window=true is not supported")
        if hf.get("use_bidirectional_attention"):
            raise UnsupportedModelError("config.json use_bidirectional_attention=true is not supported "
                                        "(a causal decoder only)")
        theta, scaling, local_theta = _rope_from_hf(hf, family)
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
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family.qkv_bias,
            qk_norm=family.qk_norm,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            architecture=family.architecture,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id"),
            local_rope_theta=local_theta,
            **_attention_keys_from_hf(hf, family),
        )

    def to_hf(self) -> dict:
        """An HF ``config.json`` dict that transformers' Auto classes load."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(dict(self.rope_scaling))
        eos = list(self.eos_token_ids)
        family = self.family
        out = {
            "architectures": [self.architecture],
            "model_type": family.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            family.act_key: family.mlp_act,
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
        if family.sliding != "none":
            out["sliding_window"] = self.sliding_window
        if family.sliding == "layer_types":
            out["layer_types"] = list(self.layer_types)
        if family.local_rope:
            out["rope_local_base_freq"] = self.local_rope_theta
            out["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
                "rope_type": "default", "rope_theta": self.local_rope_theta}}
        if family.softcap_keys:
            out.update(query_pre_attn_scalar=_number(self.query_pre_attn_scalar),
                       attn_logit_softcapping=self.attn_logit_softcapping,
                       final_logit_softcapping=self.final_logit_softcapping)
        out.update(family.hf_fixed)
        return out


def _family_and_keys(hf: dict) -> tuple[Family, dict]:
    """The family a config.json describes and its keys (a multimodal config's text part, the family's
    defaults filled in for keys left out)."""
    archs = hf.get("architectures") or []
    if archs and archs[0] in MULTIMODAL:
        part = MULTIMODAL[archs[0]]
        text = hf.get(part.config_key)
        if not isinstance(text, dict):
            raise UnsupportedModelError(f"config.json of a {archs[0]} has no {part.config_key!r} dict")
        # the top level's token ids and tying fill in what the text part leaves out
        top = {k: hf[k] for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
        hf = {**top, **text, "architectures": [part.architecture]}
        archs = hf["architectures"]
    if archs:
        arch = archs[0]
    elif hf.get("model_type") in FAMILY_OF_MODEL_TYPE:
        arch = FAMILY_OF_MODEL_TYPE[hf["model_type"]].architecture
    else:
        raise UnsupportedModelError(f"config.json names neither 'architectures' nor a known model_type "
                                    f"(model_type={hf.get('model_type')!r}); supported: {list(ARCHITECTURES)}")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"config.json 'architectures' is {archs!r}; supported: "
                                    f"{list(ARCHITECTURES) + list(MULTIMODAL)}")
    family = FAMILIES[arch]
    return family, {**dict(family.hf_defaults), **hf}


def _rope_scaling(params: dict) -> tuple[float | None, dict | None]:
    """(rope_theta or None, scaling dict or None) of one RoPE parameter dict ("type" read as "rope_type")."""
    scaling = dict(params)
    theta = scaling.pop("rope_theta", None)
    scaling["rope_type"] = scaling.get("rope_type", scaling.pop("type", "default"))
    scaling.pop("type", None)
    if scaling["rope_type"] == "default":
        return theta, None
    return theta, scaling


def _rope_from_hf(hf: dict, family: Family) -> tuple[float, dict | None, float | None]:
    """(global rope_theta, global scaling, local rope_theta) from either config layout.

    New layout: ``rope_parameters`` (per layer type, {"full_attention": ..., "sliding_attention": ...}, for
    ``family.local_rope``); old: ``rope_theta`` + ``rope_scaling`` (+ ``rope_local_base_freq``).
    """
    params = dict(hf.get("rope_parameters") or {})
    local_theta = None
    if family.local_rope:
        local = dict(params.pop("sliding_attention", None) or {})
        params = dict(params.pop("full_attention", None) or params)
        local_theta, local_scaling = _rope_scaling(local)
        if local_scaling:
            raise UnsupportedModelError(f"config.json rope_parameters['sliding_attention'] has scaling "
                                        f"{local_scaling['rope_type']!r}; only 'default' is supported there")
        local_theta = float(local_theta if local_theta is not None else hf["rope_local_base_freq"])
    theta, scaling = _rope_scaling(params or hf.get("rope_scaling") or {})
    if theta is None:
        theta = hf.get("rope_theta", 10000.0)
    return float(theta), scaling, local_theta


def _attention_keys_from_hf(hf: dict, family: Family) -> dict:
    """The sliding-window and Gemma keys of ``DecoderConfig`` (none for families that do not read them)."""
    out: dict = {}
    if family.sliding != "none" and hf.get("sliding_window") is not None:
        out["sliding_window"] = int(hf["sliding_window"])
    if family.sliding == "layer_types":
        kinds = hf.get("layer_types")
        if kinds is None:  # transformers' rule: every pattern-th layer is global
            pattern = int(hf["sliding_window_pattern"])
            kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(int(hf["num_hidden_layers"]))]
        out["layer_types"] = tuple(kinds)
    if family.softcap_keys:
        if hf.get("attn_logit_softcapping") is not None:
            raise UnsupportedModelError(
                f"config.json attn_logit_softcapping={hf['attn_logit_softcapping']}: transformers' {family.name} "
                "does not apply it (its attention ignores the key), so which attention the checkpoint was trained "
                "with is ambiguous; set it to null (DecoderConfig.attn_logit_softcapping applies it if wanted)")
        for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = hf.get(key)
            out[key] = None if value is None else float(value)
    return out


def _number(x: float | None) -> float | int | None:
    """A float written as an int when it is one (transformers' typed Gemma 3 config declares
    query_pre_attn_scalar an int)."""
    return int(x) if x is not None and float(x).is_integer() else x


class _FrozenDict(dict):
    """A hashable read-only dict (DecoderConfig must be hashable to be a static jit argument)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    def _readonly(self, *a, **k):
        raise TypeError("DecoderConfig.rope_scaling is read-only")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _readonly
