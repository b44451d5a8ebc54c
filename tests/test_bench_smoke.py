"""The benchmarks run end to end (tiny shapes, one round) and end with their JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", ["bert_forward.py", "bert_train.py"])
def test_bert_benchmark_runs(script):
    args = ["--batch", "2", "--seq", "32", "--repeats", "1", "--peak-n", "256"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ratio"] > 0 and 0 < result["peak_fraction"] and result["batch"] == 2


def test_engine_benchmark_runs():
    """bench/engine.py on a tiny heavy-tailed workload: the engine, the static path and HF agree token for token,
    and a whole run over mixed prompt lengths compiles at most 6 programs."""
    args = ["--prompts", "12", "--max-prompt", "80", "--median-new", "6", "--max-new", "24", "--batch", "4",
            "--repeats", "1", "--peak-n", "256", "--vocab", "1024"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, str(BENCH / "engine.py"), *args], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ratio"] > 0 and result["ratio_static"] > 0 and result["batch"] == 4
    assert result["greedy_match_static"] == 1.0 and result["greedy_match_hf"] == 1.0
    assert result["compiles"] + result["layout_compiles"] <= 6
