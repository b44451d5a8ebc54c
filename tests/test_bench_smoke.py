"""The BERT benchmarks run end to end (tiny shapes, one round) and end with their JSON line."""

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
