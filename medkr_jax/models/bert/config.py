"""BERT hyper-parameters: the subset of a Hugging Face BertConfig that determines the computation."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

ACTIVATIONS = {
    # HF "gelu" is the exact erf form; "gelu_new"/"gelu_pytorch_tanh" are the tanh approximation.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

_SUPPORTED_ARCHITECTURES = ("BertModel", "BertForSequenceClassification", "BertForMaskedLM", "BertForPreTraining")


class BertConfigError(ValueError):
    """A BERT config.json is missing a field or asks for something this implementation does not support."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The subset of a Hugging Face BertConfig that determines the computation (plus the label names)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    pad_token_id: int = 0
    initializer_range: float = 0.02
    num_labels: int = 2
    id2label: tuple[tuple[int, str], ...] = ((0, "LABEL_0"), (1, "LABEL_1"))
    add_pooling_layer: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise BertConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise BertConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}")
        if len(self.id2label) != self.num_labels:
            raise BertConfigError(f"id2label has {len(self.id2label)} entries but num_labels is {self.num_labels}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def label_names(self) -> list[str]:
        return [name for _, name in sorted(self.id2label)]

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label}

    def with_labels(self, labels: int | list[str] | Mapping[int, str]) -> "BertConfig":
        """A copy with a new label set: a count (names LABEL_i), a list of names, or an id -> name mapping."""
        if isinstance(labels, int):
            pairs = tuple((i, f"LABEL_{i}") for i in range(labels))
        elif isinstance(labels, Mapping):
            pairs = tuple(sorted((int(k), str(v)) for k, v in labels.items()))
        else:
            pairs = tuple((i, str(n)) for i, n in enumerate(labels))
        return dataclasses.replace(self, num_labels=len(pairs), id2label=pairs)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> "BertConfig":
        """Build from a Hugging Face BERT config dict (the contents of config.json)."""
        archs = hf.get("architectures") or []
        if archs and not any(a in _SUPPORTED_ARCHITECTURES for a in archs):
            raise BertConfigError(f"{source}: architectures {archs} is not a BERT model; supported: "
                                  f"{list(_SUPPORTED_ARCHITECTURES)}")
        if hf.get("model_type", "bert") != "bert":
            raise BertConfigError(f"{source}: model_type {hf.get('model_type')!r} is not 'bert'")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise BertConfigError(f"{source}: position_embedding_type {pos!r} is not supported (only 'absolute')")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise BertConfigError(f"{source}: decoder / cross-attention BERT variants are not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in hf]
        if missing:
            raise BertConfigError(f"{source}: missing required field(s) {missing}")
        id2label = hf.get("id2label")
        if id2label:
            pairs = tuple(sorted((int(k), str(v)) for k, v in id2label.items()))
        else:
            n = int(hf.get("num_labels", 2))
            pairs = tuple((i, f"LABEL_{i}") for i in range(n))
        try:
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=int(hf["num_attention_heads"]),
                intermediate_size=int(hf["intermediate_size"]),
                hidden_act=str(hf.get("hidden_act", "gelu")),
                max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
                type_vocab_size=int(hf.get("type_vocab_size", 2)),
                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
                hidden_dropout_prob=float(hf.get("hidden_dropout_prob", 0.1)),
                attention_probs_dropout_prob=float(hf.get("attention_probs_dropout_prob", 0.1)),
                classifier_dropout=(None if hf.get("classifier_dropout") is None
                                    else float(hf["classifier_dropout"])),
                pad_token_id=int(hf.get("pad_token_id") or 0),
                initializer_range=float(hf.get("initializer_range", 0.02)),
                num_labels=len(pairs),
                id2label=pairs,
            )
        except BertConfigError as e:
            raise BertConfigError(f"{source}: {e}") from None

    def to_hf(self, architecture: str = "BertForSequenceClassification") -> dict[str, Any]:
        """The config.json dict transformers expects for this model."""
        return {
            "architectures": [architecture],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "classifier_dropout": self.classifier_dropout,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "position_embedding_type": "absolute",
            "id2label": {str(i): name for i, name in self.id2label},
            "label2id": {name: i for i, name in self.id2label},
            "torch_dtype": "float32",
        }

