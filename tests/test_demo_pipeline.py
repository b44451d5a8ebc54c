"""The demo pipeline end to end at toy sizes, and resume after an interruption at a stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")


def demo_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "medkr_jax.main", "--config", "configs/demo_smoke.py", f"--config.output_dir={out}"]


def run_demo(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(demo_cmd(out), cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=1800)


@pytest.mark.slow
def test_reduced_demo_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    # Interrupted run: killed with SIGKILL while the pipeline is in its split_mmlu stage.
    proc = subprocess.Popen(demo_cmd(out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=ENV)
    try:
        for line in proc.stdout:
            if line.startswith("[pipeline] 3/13 split_mmlu"):
                break
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "split_mmlu" / "stage.json").exists()
    classifier_done = json.loads((out / "classifier" / "stage.json").read_text())

    full = run_demo(out)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "classifier: already complete" in full.stdout and "[pipeline] 3/13 split_mmlu ..." in full.stdout
    assert json.loads((out / "classifier" / "stage.json").read_text()) == classifier_done  # not redone

    report = (out / "report.md").read_text()
    for heading in ("Reasoning / knowledge classifier", "MMLU medical", "SmolLM2-135M-Instruct",
                    "Tiny policy", "GRPO diagnostics", "Wall time per stage"):
        assert heading in report
    # numbers in the report are the ones the stages wrote
    split = json.loads((out / "split_mmlu" / "split_summary.json").read_text())
    assert f"**{split['reasoning_fraction']:.1%}**" in report
    for stage in ("eval_smollm", "eval_init", "eval_sft", "eval_grpo"):
        assert (out / stage / "metrics.jsonl").exists()
    assert (out / "report" / "policy_accuracy.png").exists()
    assert (out / "grpo" / "hf" / "config.json").exists()
    # a third run has nothing left to do
    again = run_demo(out)
    assert again.returncode == 0 and again.stdout.count("already complete") == 12  # all but the report
