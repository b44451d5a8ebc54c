"""Train a small byte-level BPE tokenizer and save it as a Hugging Face tokenizer folder with a chat template.

Used for the tiny policy of the synthetic world: a small vocabulary keeps the model small enough to learn
on a CPU in minutes, while everything downstream (chat template, AutoTokenizer, the sampler's stop ids) is
exactly what a real checkpoint uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|begin|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# ChatML-like; `add_generation_prompt` opens the assistant turn, which the model closes with EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_bpe_tokenizer(corpus: Iterable[str], out_dir: str | Path, *, vocab_size: int = 1024,
                        min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `corpus`, save an HF folder (tokenizer.json + config + chat template) to out_dir."""
    texts = [t for t in corpus if t]
    if not texts:
        raise ValueError("train_bpe_tokenizer: the corpus is empty")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [PAD, BOS, EOS, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   additional_special_tokens=list(ROLE_TOKENS), padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast
