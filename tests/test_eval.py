"""Evaluation: prompts, metrics and CIs, the resumable generation log, the evaluate and adversarial jobs
end to end on a tiny random model with a locally trained tokenizer (resume after a kill)."""

import csv
import json
import math

import numpy as np
import pytest

from medkr_jax.config import base_config
from medkr_jax.data import synthetic
from medkr_jax.data.answer import extract_answer
from medkr_jax.data.pipeline import load_tokenizer
from medkr_jax.data.records import MCQRecord, write_records
from medkr_jax.data.tokenizer import train_bpe_tokenizer
from medkr_jax.eval import adversarial, evaluate, metrics, prompts, report
from medkr_jax.eval.genlog import GenerationLog, ResumeError
from medkr_jax.jobs import adversarial as adversarial_job
from medkr_jax.jobs import evaluate as evaluate_job
from tests.helpers_models import make_tiny_hf_model

SYSTEM = "Think step by step. End with 'The answer is X.'"


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world_records():
    world = synthetic.make_world(0)
    recs = synthetic.make_questions(world, 12, seed=0)
    for i, r in enumerate(recs):
        r.benchmark = "synthA" if i % 2 else "synthB"
    return world, recs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, world_records):
    """A tiny random Qwen3 checkpoint and a BPE tokenizer (chat template) trained here, in one folder."""
    world, recs = world_records
    folder = tmp_path_factory.mktemp("eval_model")
    extra = [SYSTEM, "Wait, let me re-check this.", "The answer is A. The answer is B."]
    extra += [prompts.format_question(r) for r in recs]
    tok = train_bpe_tokenizer(synthetic.corpus(world, recs, extra_texts=extra), folder, vocab_size=400)
    make_tiny_hf_model("qwen3", folder, seed=3, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return folder


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(str(model_dir))


def make_config(tmp_path, model_dir, records_path, name="run", **eval_overrides):
    config = base_config()
    config.job = "evaluate"
    config.output_dir = str(tmp_path / name)
    config.model.path = str(model_dir)
    config.data.eval_path = str(records_path)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 1, 2
    config.eval.system_prompt = SYSTEM
    config.eval.max_new_tokens = 12
    config.eval.batch_size = 8
    config.eval.temperature = 1.0  # sampled, so resuming must reproduce per-question randomness
    for k, v in eval_overrides.items():
        config.eval[k] = v
    return config


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------- prompts


def test_prompt_uses_chat_template_system_prompt_and_prefix(tokenizer, world_records):
    rec = world_records[1][0]
    text = prompts.build_prompt(tokenizer, rec, system_prompt=SYSTEM, assistant_prefix="I think (B).")
    assert text.startswith("<|system|>" + SYSTEM + "<|end|><|user|>Question: ")
    assert "\nA. " + rec.options[0] in text and "\nD. " + rec.options[3] in text
    assert text.endswith("<|end|><|assistant|>I think (B).")
    ids = prompts.encode(tokenizer, text)
    assert tokenizer.decode(ids) == text  # no extra BOS added on top of the template
    assert prompts.stop_token_ids(tokenizer, (tokenizer.eos_token_id,), ("<|user|>",)) == (
        tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|user|>"))
    with pytest.raises(prompts.PromptError, match="not a single token"):
        prompts.stop_token_ids(tokenizer, (), ("not a token",))
    with pytest.raises(prompts.PromptError, match="unknown field"):
        prompts.format_question(rec, "{question} {choices}")


def test_prompt_context_and_template_without_system_role(tokenizer):
    rec = MCQRecord(id="q", benchmark="pubmedqa", question="Does X reduce Y?", options=["yes", "no", "maybe"],
                    answer=0, context="In a trial of 200 patients ...")
    text = prompts.format_question(rec)
    assert text.startswith("Context: In a trial of 200 patients ...\n\nQuestion: Does X reduce Y?")

    class NoSystem:
        chat_template = "x"

        def apply_chat_template(self, messages, **kw):
            if any(m["role"] == "system" for m in messages):
                raise ValueError("System role not supported")
            return "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"

    out = prompts.render_chat(NoSystem(), "Q?", system_prompt="Be brief.", assistant_prefix="Hmm")
    assert out == "[user]Be brief.\n\nQ?[assistant]Hmm"


# ------------------------------------------------------------------------------------------- metrics


def test_wilson_interval_matches_closed_form():
    lo, hi = metrics.wilson_interval(8, 10)
    # Wilson (1927) for 8/10 at z = 1.96: 0.4902, 0.9433
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert metrics.wilson_interval(0, 20)[0] == 0.0 and metrics.wilson_interval(20, 20)[1] == 1.0


def test_accuracy_table_by_benchmark_and_split():
    rows = [
        {"benchmark": "a", "label": "knowledge", "correct": [True], "pred": [0]},
        {"benchmark": "a", "label": "knowledge", "correct": [False], "pred": [None]},
        {"benchmark": "a", "label": "reasoning", "correct": [True], "pred": [1]},
        {"benchmark": "b", "label": None, "correct": [False], "pred": [2]},
    ]
    table = {(r["benchmark"], r["split"]): r for r in metrics.accuracy_table(rows)}
    assert table[("a", "knowledge")]["accuracy"] == 0.5
    assert table[("a", "reasoning")]["accuracy"] == 1.0
    assert table[("a", "all")]["accuracy"] == pytest.approx(2 / 3)
    assert ("b", "knowledge") not in table and table[("b", "all")]["n_questions"] == 1
    assert table[("overall", "all")]["accuracy"] == 0.5 and table[("overall", "all")]["no_answer"] == 1
    assert table[("a", "knowledge")]["no_answer_rate"] == 0.5
    assert table[("a", "all")]["ci_method"] == "wilson"
    lo, hi = metrics.wilson_interval(2, 3)
    assert (table[("a", "all")]["ci_low"], table[("a", "all")]["ci_high"]) == (lo, hi)


def test_n_samples_are_averaged_and_bootstrapped():
    rng = np.random.default_rng(0)
    rows = [{"benchmark": "a", "label": "knowledge", "correct": list(rng.random(4) < p), "pred": [0] * 4}
            for p in rng.random(200)]
    (row,) = [r for r in metrics.accuracy_table(rows) if r["benchmark"] == "a" and r["split"] == "all"]
    per_q = [np.mean(r["correct"]) for r in rows]
    assert row["accuracy"] == pytest.approx(np.mean(per_q))
    assert row["ci_method"] == "bootstrap" and row["n_samples"] == 800
    se = np.std(per_q, ddof=1) / math.sqrt(len(per_q))
    # the percentile bootstrap of a mean of 200 questions is close to the normal interval
    assert row["ci_low"] == pytest.approx(row["accuracy"] - 1.96 * se, abs=0.015)
    assert row["ci_high"] == pytest.approx(row["accuracy"] + 1.96 * se, abs=0.015)
    again = [r for r in metrics.accuracy_table(rows) if r["benchmark"] == "a" and r["split"] == "all"][0]
    assert again == row  # fixed seed: reproducible


def test_pass_at_k_matches_the_binomial_formula():
    """Chen et al. (2021): pass@k = 1 - C(n - c, k) / C(n, k), here with scipy's exact binomials."""
    from scipy.special import comb

    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1.0 - comb(n - c, k, exact=True) / comb(n, k, exact=True)
                assert metrics.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError, match="pass@k"):
        metrics.pass_at_k(4, 1, 5)


def np_majority_right(preds, answer):
    """maj@n of one question, written independently: np.unique's counts, ties to the earliest first answer."""
    votes = np.array([p for p in preds if p is not None])
    if votes.size == 0:
        return False
    values, first, counts = np.unique(votes, return_index=True, return_counts=True)
    tied = counts == counts.max()
    return bool(values[tied][np.argmin(first[tied])] == answer)


def test_self_consistency_columns_match_references():
    from scipy.special import comb

    rng = np.random.default_rng(1)
    rows = []
    for i in range(300):
        preds = [None if rng.random() < 0.15 else int(rng.integers(4)) for _ in range(6)]
        answer = int(rng.integers(4))
        rows.append({"benchmark": "a", "label": ("knowledge", "reasoning")[i % 2], "pred": preds, "answer": answer,
                     "correct": [p == answer for p in preds]})
    rows[0]["pred"], rows[0]["answer"] = [1, 2, 2, 1, None, 3], 1  # a tie: the first answer given wins
    rows[0]["correct"] = [p == 1 for p in rows[0]["pred"]]
    assert np_majority_right(rows[0]["pred"], 1) and metrics.majority(rows[0]["pred"]) == 1
    table = {(r["benchmark"], r["split"]): r for r in metrics.accuracy_table(rows, pass_k=(1, 4, 9))}
    for split in ("knowledge", "reasoning", "all"):
        group = [r for r in rows if split in ("all", r["label"])]
        row = table[("a", split)]
        maj = [np_majority_right(r["pred"], r["answer"]) for r in group]
        assert row["maj@6"] == pytest.approx(np.mean(maj))
        assert (row["maj@6_ci_low"], row["maj@6_ci_high"]) == metrics.wilson_interval(sum(maj), len(maj))
        for k in (1, 4):
            want = np.mean([1 - comb(6 - sum(r["correct"]), k) / comb(6, k) for r in group])
            assert row[f"pass@{k}"] == pytest.approx(want, abs=1e-12)
            assert row[f"pass@{k}_ci_low"] < want < row[f"pass@{k}_ci_high"]
        assert row["pass@1"] == pytest.approx(row["accuracy"])  # pass@1 is the mean accuracy
        assert "pass@9" not in row  # k > n is left out
    assert table[("a", "all")]["pass@4"] > table[("a", "all")]["maj@6"] > 0.2
    md = report.self_consistency_markdown(list(table.values()))
    assert "| a | reasoning | " in md and "maj@6" in md and "pass@4" in md


# ------------------------------------------------------------------------------------------- log


def test_generation_log_resume_truncates_partial_line(tmp_path):
    path = tmp_path / "g.jsonl"
    glog = GenerationLog(path, {"model": "m", "temperature": 0.0})
    glog.append([{"key": "a/1", "samples": []}, {"key": "a/2", "samples": []}])
    with pytest.raises(ValueError, match="generated twice"):
        glog.append([{"key": "a/1", "samples": []}])
    with open(path, "a") as f:
        f.write('{"key": "a/3", "sam')  # killed mid-write
    again = GenerationLog(path, {"model": "m", "temperature": 0.0})
    assert sorted(again.entries) == ["a/1", "a/2"]
    assert path.read_text().count("\n") == 2 and path.read_text().endswith("\n")
    with pytest.raises(ResumeError, match="temperature"):
        GenerationLog(path, {"model": "m", "temperature": 1.0})


def test_score_text_uses_prefix_when_continuation_is_silent():
    entry = {"options": ["x", "y", "z"], "prefix": "So the answer is (B).\n\nWait, let me re-check this.\n"}
    assert evaluate.score_text("Yes, that holds.", entry) == 1
    assert evaluate.score_text("No: the answer is (C).", entry) == 2
    assert evaluate.score_text("Yes, that holds.", {"options": ["x", "y"], "prefix": ""}) is None


# ------------------------------------------------------------------------------------------- jobs


class Killed(Exception):
    pass


@pytest.mark.devices(8)
def test_evaluate_resumes_after_kill_with_identical_table(tmp_path, model_dir, world_records, capsys):
    _, recs = world_records
    records_path = write_records(tmp_path / "records.jsonl", recs)

    config = make_config(tmp_path, model_dir, records_path, num_samples=2)

    def kill_after_first_batch(done):
        raise Killed(done)

    with pytest.raises(Killed):
        evaluate_job.run(config, on_batch=kill_after_first_batch)
    log_path = tmp_path / "run" / "generations.jsonl"
    first = [json.loads(line)["key"] for line in log_path.read_text().splitlines()]
    assert len(first) == 4  # batch_size 8 rows / 2 samples = 4 questions per batch
    assert not (tmp_path / "run" / "results.csv").exists()

    summary = evaluate_job.run(config)
    assert summary["resumed"] == 4 and summary["generated"] == len(recs) - 4
    keys = [json.loads(line)["key"] for line in log_path.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len(recs)  # nothing generated twice

    capsys.readouterr()
    fresh = evaluate_job.run(make_config(tmp_path, model_dir, records_path, name="fresh", num_samples=2))
    assert fresh["generated"] == len(recs) and fresh["resumed"] == 0
    bar = capsys.readouterr().err  # the progress bar: the first batch says it compiles, then tokens/s
    assert "compiling + first batch of 4 questions" in bar and "generated tok/s" in bar, bar[-500:]
    assert (tmp_path / "run" / "results.csv").read_text() == (tmp_path / "fresh" / "results.csv").read_text()
    assert (tmp_path / "run" / "generations.jsonl").read_text().count("\n") == len(recs)
    by_key = {json.loads(x)["key"]: json.loads(x) for x in log_path.read_text().splitlines()}
    fresh_log = (tmp_path / "fresh" / "generations.jsonl").read_text().splitlines()
    for x in map(json.loads, fresh_log):
        assert [s["text"] for s in x["samples"]] == [s["text"] for s in by_key[x["key"]]["samples"]]

    # The table, recomputed independently from the log, and the written outputs.
    table = {(r["benchmark"], r["split"]): r for r in read_csv(tmp_path / "run" / "results.csv")}
    for bench in ("synthA", "synthB"):
        for split in ("knowledge", "reasoning", "all"):
            es = [e for e in by_key.values() if e["benchmark"] == bench and split in ("all", e["label"])]
            acc = np.mean([np.mean([extract_answer(s["text"], e["options"]) == e["answer"] for s in e["samples"]])
                           for e in es])
            assert float(table[(bench, split)]["accuracy"]) == pytest.approx(acc, abs=1e-6)
            assert int(table[(bench, split)]["n_questions"]) == len(es)
            assert int(table[(bench, split)]["n_samples"]) == 2 * len(es)
            # self-consistency of the 2 samples: maj@2 and pass@1 (the mean accuracy), recomputed from the log
            maj = np.mean([np_majority_right([extract_answer(s["text"], e["options"]) for s in e["samples"]],
                                             e["answer"]) for e in es])
            assert float(table[(bench, split)]["maj@2"]) == pytest.approx(maj, abs=1e-6)
            assert float(table[(bench, split)]["pass@1"]) == pytest.approx(acc, abs=1e-6)
    assert table[("overall", "all")]["ci_method"] == "bootstrap"
    for e in by_key.values():
        assert all(len(s["text"]) > 0 and s["tokens"] <= 12 for s in e["samples"])
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| synthA |" in md and "| overall |" in md and "### Self-consistency" in md and "maj@2" in md
    png = (tmp_path / "run" / "knowledge_vs_reasoning.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 5000

    # Resuming with other settings is refused instead of mixing two experiments.
    with pytest.raises(ResumeError, match="max_new_tokens"):
        evaluate_job.run(make_config(tmp_path, model_dir, records_path, num_samples=2, max_new_tokens=5))


@pytest.mark.devices(8)
def test_adversarial_job(tmp_path, model_dir, world_records, tokenizer):
    _, recs = world_records
    recs = recs[:6]
    records_path = write_records(tmp_path / "records.jsonl", recs)
    config = make_config(tmp_path, model_dir, records_path, name="adv", temperature=0.0)
    config.job = "adversarial"
    config.adversarial.source = "released,generated,template"
    config.adversarial.generator_max_new_tokens = 10
    summary = adversarial_job.run(config)
    assert set(summary["overall"]) == {"released", "generated", "template"}
    assert summary["generated"]["released"]["generated"] == 3 * len(recs)

    rows = read_csv(tmp_path / "adv" / "adversarial.csv")
    variants = {(r["source"], r["variant"]) for r in rows}
    assert variants == {("released", "trace0"), ("released", "trace1"), ("released", "trace2"),
                        ("released", "mean"), ("generated", "generated"), ("template", "template")}
    before = {(r["benchmark"], r["split"]): float(r["accuracy"]) for r in read_csv(tmp_path / "adv" / "before.csv")}
    for r in rows:
        assert float(r["before"]) == pytest.approx(before[(r["benchmark"], r["split"])], abs=1e-6)
        assert float(r["drop"]) == pytest.approx(float(r["before"]) - float(r["after"]), abs=1e-6)
    for bench, split in before:
        per = [float(r["after"]) for r in rows if r["source"] == "released" and r["variant"].startswith("trace")
               and (r["benchmark"], r["split"]) == (bench, split)]
        (mean,) = [r for r in rows if r["variant"] == "mean" and (r["benchmark"], r["split"]) == (bench, split)]
        assert float(mean["after"]) == pytest.approx(np.mean(per), abs=1e-6)
        assert float(mean["after_std"]) == pytest.approx(np.std(per, ddof=1), abs=1e-6)
        assert float(mean["after_min"]) == pytest.approx(min(per), abs=1e-6)
    # Released traces and the template argue for wrong options by construction.
    for r in rows:
        if r["source"] in ("released", "template"):
            assert float(r["prefix_on_target"]) == 1.0

    # The prompts end with the prefilled misleading reasoning and the cue; the model continues from there.
    log = [json.loads(x) for x in (tmp_path / "adv" / "adversarial_template.jsonl").read_text().splitlines()]
    rec = {r.id: r for r in recs}
    for e in log:
        r = rec[e["id"]]
        wrong = adversarial.wrong_option(r, 0)
        assert wrong != r.answer
        assert e["prefix"].startswith(config.adversarial.template.format(letter="ABCD"[wrong],
                                                                         option=r.options[wrong]))
        assert e["prefix"].endswith("\n\nWait, let me re-check this.\n")
        assert e["target"] == wrong
    released = [json.loads(x) for x in (tmp_path / "adv" / "adversarial_released.jsonl").read_text().splitlines()]
    assert {e["variant"] for e in released} == {"trace0", "trace1", "trace2"}
    for e in released:
        k = int(e["variant"][-1])
        assert e["prefix"].startswith(rec[e["id"]].adversarial_traces[k].strip())
    assert (tmp_path / "adv" / "adversarial.png").read_bytes()[:4] == b"\x89PNG"
    assert "| released | overall | all |" in (tmp_path / "adv" / "adversarial.md").read_text()

    # Everything is resumable: a rerun generates nothing.
    again = adversarial_job.run(config)
    assert all(c["generated"] == 0 for c in again["generated"].values())
    assert again["overall"] == summary["overall"]


@pytest.mark.devices(8)
def test_evaluate_with_a_thinking_budget(tmp_path, model_dir, world_records, tokenizer):
    """config.eval.thinking_budget: a prompt that opens the thinking block (here the chat template's assistant
    tag serves as the start marker) thinks `budget` tokens, then the engine writes the end marker and the answer
    cue; the budget is part of the generation log's settings."""
    _, recs = world_records
    records_path = write_records(tmp_path / "records.jsonl", recs[:4])
    config = make_config(tmp_path, model_dir, records_path, name="think", temperature=0.0, max_new_tokens=20,
                         thinking_budget=3, thinking_start="<|assistant|>")
    evaluate_job.run(config)
    closing = config.eval.thinking_end + config.eval.answer_cue
    n_closing = len(tokenizer.encode(closing, add_special_tokens=False))
    log = [json.loads(x) for x in (tmp_path / "think" / "generations.jsonl").read_text().splitlines()]
    for e in log:
        (smp,) = e["samples"]
        got = tokenizer.encode(smp["text"], add_special_tokens=False)
        assert closing in smp["text"] and smp["tokens"] >= 3 + n_closing, smp
        assert tokenizer.decode(got[3:3 + n_closing]).startswith(config.eval.thinking_end), smp["text"]
    settings = json.loads((tmp_path / "think" / "generations.jsonl.settings.json").read_text())
    assert settings["thinking"]["budget"] == 3
    with pytest.raises(ValueError, match="config.eval.thinking_budget"):
        evaluate_job.run(make_config(tmp_path, model_dir, records_path, name="x", thinking_budget=12))


@pytest.mark.devices(8)
def test_budget_sweep_job(tmp_path, model_dir, world_records, tokenizer):
    """Job budget_sweep: one evaluation per budget (the smaller budgets close the block after `budget` tokens, 0 runs
    without one), a table per budget x benchmark x split whose accuracy and mean tokens are those of the logs, the
    per-split gains from the first budget to the last computed by hand, resuming, and config errors."""
    from medkr_jax.config import ConfigError
    from medkr_jax.jobs import budget_sweep as sweep_job

    _, recs = world_records
    records_path = write_records(tmp_path / "records.jsonl", recs[:8])
    config = make_config(tmp_path, model_dir, records_path, name="sweep", temperature=0.0, max_new_tokens=28,
                         thinking_start="<|assistant|>", thinking_budgets=(0, 2, 6))
    config.job = "budget_sweep"
    summary = sweep_job.run(config)
    out = tmp_path / "sweep"
    assert summary["budgets"] == [2, 6, 0] and summary["generated"] == {2: 8, 6: 8, 0: 8}
    closing = config.eval.thinking_end + config.eval.answer_cue
    logs = {b: {e["key"]: e for e in map(json.loads, (out / f"generations_budget{b}.jsonl").read_text().splitlines())}
            for b in (2, 6, 0)}
    for b in (2, 6):
        for e in logs[b].values():  # closed at the budget, unless the row ended by itself before it
            smp = e["samples"][0]
            assert closing in smp["text"] or (smp["stopped"] and smp["tokens"] <= b), (b, smp)
        assert any(closing in e["samples"][0]["text"] for e in logs[b].values())
        settings = json.loads((out / f"generations_budget{b}.jsonl.settings.json").read_text())
        assert settings["thinking"]["budget"] == b
    assert "thinking" not in json.loads((out / "generations_budget0.jsonl.settings.json").read_text())

    def correct(e):
        return float(e["samples"][0]["pred"] == "ABCD"[e["answer"]])

    table = read_csv(out / "budget_sweep.csv")
    assert len(table) == 3 * len({(r["benchmark"], r["split"]) for r in table})
    for row in table:
        entries = [e for e in logs[int(row["budget"])].values()
                   if row["benchmark"] in ("overall", e["benchmark"]) and row["split"] in ("all", e["label"])]
        assert int(row["n_questions"]) == len(entries)
        assert float(row["accuracy"]) == pytest.approx(np.mean([correct(e) for e in entries]), abs=1e-6)
        assert float(row["mean_tokens"]) == pytest.approx(np.mean([e["samples"][0]["tokens"] for e in entries]),
                                                          abs=1e-5)
    (overall,) = [g for g in summary["gains"] if g["benchmark"] == "overall"]
    for split in ("knowledge", "reasoning"):
        keys = [k for k, e in logs[2].items() if e["label"] == split]
        assert overall[f"gain_{split}"] == pytest.approx(np.mean([correct(logs[0][k]) - correct(logs[2][k])
                                                                  for k in keys]))
    assert overall["from"] == 2 and overall["to"] == 0
    md = (out / "budget_sweep.md").read_text()
    assert "| benchmark | split | 2 | 6 | none |" in md and "reasoning - knowledge" in md
    assert (out / "accuracy_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    assert sweep_job.run(config)["generated"] == {2: 0, 6: 0, 0: 0}  # resumed: nothing generated again

    for bad in ((), (4, 4), (-1, 2)):
        config.eval.thinking_budgets = bad
        with pytest.raises(ConfigError, match="config.eval.thinking_budgets"):
            sweep_job.run(config)


def test_split_gain_difference_against_a_hand_computation():
    rng = np.random.default_rng(0)
    before, after = [], []
    for i in range(400):
        label = "reasoning" if i % 3 == 0 else "knowledge"
        p0, p1 = (0.3, 0.6) if label == "reasoning" else (0.5, 0.55)
        c0, c1 = rng.random(2) < (p0, p1)
        before.append({"key": f"q{i}", "label": label, "correct": [bool(c0)]})
        after.append({"key": f"q{i}", "label": label, "correct": [bool(c1)]})
    got = metrics.split_gain_difference(before, after, seed=1)
    gains = {s: np.array([float(a["correct"][0]) - float(b["correct"][0]) for a, b in zip(after, before)
                          if a["label"] == s]) for s in ("knowledge", "reasoning")}
    assert got["n_reasoning"] == 134 and got["n_knowledge"] == 266
    assert got["difference"] == pytest.approx(gains["reasoning"].mean() - gains["knowledge"].mean())
    # the bootstrap interval against the normal approximation of the difference of two independent means
    se = math.sqrt(sum(g.var(ddof=1) / g.size for g in gains.values()))
    assert got["difference_ci_low"] == pytest.approx(got["difference"] - 1.96 * se, abs=0.25 * 1.96 * se)
    assert got["difference_ci_high"] == pytest.approx(got["difference"] + 1.96 * se, abs=0.25 * 1.96 * se)


@pytest.mark.devices(8)
def test_config_errors_name_the_key(tmp_path, model_dir, world_records):
    _, recs = world_records
    records_path = write_records(tmp_path / "records.jsonl", recs[:2])
    config = make_config(tmp_path, model_dir, records_path)
    config.adversarial.source = "released,bogus"
    with pytest.raises(ValueError, match="config.adversarial.source"):
        adversarial_job.run(config)
    config = make_config(tmp_path, model_dir, records_path, chat_template_kwargs="{not json")
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        evaluate_job.run(config)
    config = make_config(tmp_path, model_dir, records_path)
    config.data.eval_path = ""
    with pytest.raises(ValueError, match="config.data.benchmarks"):
        evaluate_job.run(config)
