"""The report's paired comparison of two evaluations (questions gained / lost, McNemar's exact test)."""

import json

import ml_collections
import numpy as np
from scipy import stats

from medkr_jax.pipeline import report

OPTIONS = ["aspirin", "heparin", "warfarin", "insulin"]


def _write_log(path, correct_by_key, label="reasoning", answer=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for key, right in correct_by_key.items():
            texts = [f"The answer is {'C' if r else 'A'}." for r in np.atleast_1d(right)]
            f.write(json.dumps({"key": key, "label": label, "answer": answer, "options": OPTIONS,
                                "samples": [{"text": t} for t in texts]}) + "\n")
        # a question of the other split never counts
        f.write(json.dumps({"key": "other", "label": "knowledge", "answer": answer, "options": OPTIONS,
                            "samples": [{"text": "The answer is C."}]}) + "\n")


def test_paired_flips_match_scipy_binomial_test(tmp_path):
    rng = np.random.default_rng(0)
    before = rng.random(60) < 0.4
    after = np.where(rng.random(60) < 0.3, ~before, before)
    _write_log(tmp_path / "a" / "generations.jsonl", {f"q{i}": bool(b) for i, b in enumerate(before)})
    _write_log(tmp_path / "b" / "generations.jsonl", {f"q{i}": bool(x) for i, x in enumerate(after)})
    config = ml_collections.ConfigDict({"output_dir": str(tmp_path)})
    got = report.paired_flips(config, "a", "b", "reasoning")
    gained, lost = int((after & ~before).sum()), int((before & ~after).sum())
    assert (got["questions"], got["gained"], got["lost"]) == (60, gained, lost)
    assert np.isclose(got["p_value"], stats.binomtest(gained, gained + lost, 0.5).pvalue)


def test_paired_flips_use_the_majority_of_samples_and_handle_no_overlap(tmp_path):
    _write_log(tmp_path / "a" / "generations.jsonl", {"q0": [True, False, False], "q1": [True, True, False]})
    _write_log(tmp_path / "b" / "generations.jsonl", {"q0": [True, True, False], "q1": [True, True, False]})
    config = ml_collections.ConfigDict({"output_dir": str(tmp_path)})
    got = report.paired_flips(config, "a", "b", "reasoning")
    assert (got["gained"], got["lost"], got["p_value"]) == (1, 0, 1.0)
    assert report.paired_flips(config, "a", "missing", "reasoning") is None
