"""The small BPE tokenizer: an HF folder that AutoTokenizer loads, round-trips text, renders the chat template."""

from transformers import AutoTokenizer

from medkr_jax.data.tokenizer import EOS, train_bpe_tokenizer

CORPUS = [
    "A 45-year-old man presents with fever and cough. Which drug is best? The answer is C.",
    "Metformin belongs to the biguanide class. Lisinopril is an ACE inhibitor.",
    "Step 1: the findings suggest pneumonia. Step 2: penicillin allergy rules out amoxicillin.",
] * 20


def test_bpe_folder_loads_and_round_trips(tmp_path):
    train_bpe_tokenizer(CORPUS, tmp_path, vocab_size=600)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "A 45-year-old man presents with cough. The answer is C."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # merges were learned
    assert tok.eos_token == EOS and tok.pad_token_id is not None and tok.padding_side == "left"
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Which drug?"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>Be brief.<|end|><|user|>Which drug?<|end|><|assistant|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "Which drug?"}], tokenize=True,
                                  add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.convert_ids_to_tokens(ids[0]) == "<|user|>" and tok.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"
