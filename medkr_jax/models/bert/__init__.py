"""BERT encoder and sequence classifier (Flax NNX), matching Hugging Face `BertModel` numerically.

config.py: BertConfig (from / to an HF config.json); model.py: the modules; params.py: HF tensor names,
loading a local HF folder into sharded arrays, and classifier export.
"""

from medkr_jax.models.bert.config import ACTIVATIONS, BertConfig, BertConfigError
from medkr_jax.models.bert.model import BertForSequenceClassification, BertModel, dropout_keep_mask
from medkr_jax.models.bert.params import export_bert_classifier, hf_names, init_bert_classifier, load_bert

__all__ = ["ACTIVATIONS", "BertConfig", "BertConfigError", "BertForSequenceClassification", "BertModel",
           "dropout_keep_mask", "export_bert_classifier", "hf_names", "init_bert_classifier", "load_bert"]
