"""The study job: its statistics against scipy / hand computations, and a toy-sized end-to-end run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from medkr_jax.pipeline import study, study_report

ROOT = Path(__file__).resolve().parents[1]


def test_mean_ci_is_the_student_t_interval_over_seeds():
    x = [0.40, 0.46, 0.49]
    m, lo, hi = study_report.mean_ci(x)
    sd = math.sqrt(sum((v - np.mean(x)) ** 2 for v in x) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2 d.o.f.}
    assert m == pytest.approx(np.mean(x)) and lo == pytest.approx(m - half) and hi == pytest.approx(m + half)
    assert (lo, hi) == pytest.approx(stats.t.interval(0.95, 2, loc=np.mean(x), scale=stats.sem(x)))
    m1, lo1, hi1 = study_report.mean_ci([0.5])
    assert m1 == 0.5 and math.isnan(lo1) and math.isnan(hi1)


@pytest.mark.parametrize("wins,losses", [(0, 0), (5, 0), (25, 15), (15, 15), (3, 40), (60, 31)])
def test_sign_test_matches_scipy_binomial_test(wins, losses):
    want = 1.0 if wins + losses == 0 else stats.binomtest(wins, wins + losses, 0.5).pvalue
    assert study_report.sign_test(wins, losses) == pytest.approx(want, rel=1e-9)


def test_paired_counts_by_hand():
    x = {"s0/q1": 1.0, "s0/q2": 0.0, "s1/q1": 0.0, "s1/q3": 1.0, "only_x": 1.0}
    y = {"s0/q1": 1.0, "s0/q2": 1.0, "s1/q1": 1.0, "s1/q3": 0.0, "only_y": 0.0}
    assert study_report.paired_counts(x, y) == (2, 1, 4)


def test_candidate_dirs_are_named_by_content_not_position():
    a, b = {"optimizer": {"learning_rate": 1e-4}}, {"grpo": {"num_prompts": 64}}
    assert study.candidate_key(a) == study.candidate_key({"optimizer": {"learning_rate": 0.0001}})
    assert study.candidate_key(a)[1] != study.candidate_key(b)[1]
    assert study.candidate_key({"x": 1, "y": 2})[0] == study.candidate_key({"y": 2, "x": 1})[0] == '{"x": 1, "y": 2}'
    # the same settings on other GRPO / validation splits: another run directory
    rl600, rl4000 = {"policy_rl_questions": 600}, {"policy_rl_questions": 4000}
    assert study.candidate_key(a, rl600) == study.candidate_key(a, dict(rl600))
    assert study.candidate_key(a, rl600)[1] != study.candidate_key(a, rl4000)[1]


def test_a_changed_grpo_choice_reruns_only_the_seeds_grpo_dependent_stages(tmp_path):
    for name in ("sft", "grpo", "eval_grpo", "sft_more", "eval_sft_more"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "stage.json").write_text("{}")
    study.invalidate_stale_grpo(tmp_path, "A")  # first run: records the choice, removes nothing
    assert all((tmp_path / n).exists() for n in ("sft", "grpo", "sft_more"))
    study.invalidate_stale_grpo(tmp_path, "A")  # same choice: nothing to redo
    assert (tmp_path / "grpo").exists()
    study.invalidate_stale_grpo(tmp_path, "B")  # a new choice: the stages built on the old one go
    assert (tmp_path / "sft").exists()
    assert not any((tmp_path / n).exists() for n in study.GRPO_DEPENDENT_STAGES)
    assert json.loads((tmp_path / "grpo_settings.json").read_text()) == {"chosen": "B"}


def test_kind_groups_name_the_step_a_reasoning_question_hinges_on():
    assert study_report.kind_group({"kind": "dose"}) == "dose"
    assert study_report.kind_group({"kind": "treatment", "condition": "gout", "switched": True}) == "switch"
    assert study_report.kind_group({"kind": "treatment", "condition": "gout", "switched": False}) == "other"
    assert study_report.kind_group({"kind": "treatment", "condition": None, "switched": False}) == "none"
    assert study_report.kind_group({"kind": "lab"}) is None


def test_compute_counts_each_stage_once(tmp_path):
    """The search seed's candidate folders hold copies of the seed's shared stage markers: counted once, at the seed;
    a candidate's own stages and the scored seeds' count as they ran."""
    def mark(run, stage, wall):
        (tmp_path / run / stage).mkdir(parents=True)
        (tmp_path / run / stage / "stage.json").write_text(json.dumps({"stage": stage, "wall_s": wall}))

    mark("search_seed100", "sft", 120.0)
    mark("search_seed100/grpo_a", "sft", 120.0)  # the copy search_grpo makes
    mark("search_seed100/grpo_a", "grpo", 60.0)
    mark("seed0", "sft", 90.0)
    mark("seed0", "grpo", 30.0)
    assert study_report.stage_seconds(tmp_path) == {"search_seed100": {"sft": 120.0},
                                                    "search_seed100/grpo_a": {"grpo": 60.0},
                                                    "seed0": {"grpo": 30.0, "sft": 90.0}}
    lines = study_report.compute_lines(tmp_path)
    assert "| search_seed100/grpo_a | 1 | 1.0 |" in lines and "| **all** | 4 | **5.0** |" in lines


def test_study_refuses_a_scored_search_seed(tmp_path):
    cmd = [sys.executable, "-m", "medkr_jax.main", "--config", "configs/study_smoke.py",
           f"--config.output_dir={tmp_path}", "--config.study.search_seed=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
    assert proc.returncode == 1 and "search_seed=1 is also a scored seed" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_study_end_to_end_at_toy_sizes(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "medkr_jax.main", "--config", "configs/study_smoke.py", f"--config.output_dir={out}"]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| (b) vs (a), adversarial drop (all) | 16 |" in report  # every test question of both seeds, paired
    for text in ("chosen on the validation split", "(chosen)", "Accuracy per arm", "Paired tests",
                 "(c) vs (b), reasoning", "(b) vs (a), adversarial drop", "GRPO training reward", "seed0", "seed1",
                 "seed1: GRPO diagnostics", "groups with equal rewards (no signal)",
                 "Reasoning accuracy by question kind", "| (c) | ", "least-squares slope",
                 "GRPO's own prompts vs held-out questions", "| seed1 | ", "Greedy vs sampled answers",
                 "| seed | greedy | pass@1 | maj@4 | pass@4 |", "## Compute", "| **all** |"):
        assert text in report, text
    # the search ran on the search seed only; its candidates were scored on the validation split
    cand_dirs = sorted((out / "search_seed100").glob("grpo_*"))  # one per candidate, named by its content
    assert len(cand_dirs) == 2 and all((d / "val_grpo" / "metrics.jsonl").exists() for d in cand_dirs)
    assert not (out / "seed0" / "val_grpo").exists()
    # every arm of every scored seed was evaluated on the test split
    for seed in ("seed0", "seed1"):
        for st in ("eval_sft_plain", "eval_sft", "eval_grpo", "eval_sft_more"):
            assert (out / seed / st / "metrics.jsonl").exists(), (seed, st)
        # (b) and (c) were also scored on the questions GRPO trained on (2 steps x 4 prompts)
        visits = [json.loads(line)["meta"]["grpo_visits"]
                  for line in (out / seed / "own_grpo" / "grpo_prompts.jsonl").read_text().splitlines()]
        assert sum(visits) == 2 * 4
        # (d) trains on as many tokens as (c)'s GRPO updates processed
        more = json.loads((out / seed / "sft_more" / "stage.json").read_text())["summary"]
        grpo_tokens = sum(json.loads(line).get("train_tokens", 0)
                          for line in (out / seed / "grpo" / "metrics.jsonl").read_text().splitlines())
        assert more["grpo_train_tokens"] == grpo_tokens > 0
        assert more["steps"] == math.ceil(grpo_tokens / (8 * 128))
    # a rerun resumes: every stage is already complete
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    assert again.returncode == 0 and "] grpo ..." not in again.stdout
