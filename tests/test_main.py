"""The entry point: one-line errors for bad jobs, bad keys and missing files; config written to output_dir."""

import json
import subprocess
import sys

import pytest

from medkr_jax import main as entry
from medkr_jax.config import ConfigError, base_config, require


def run_main(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "medkr_jax.main", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_unknown_job_lists_valid_jobs():
    res = run_main("--config", "configs/demo.py", "--config.job=nope")
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "unknown config.job='nope'" in lines[0]
    for job in entry.JOBS:
        assert job in lines[0]


@pytest.mark.parametrize("override, needle", [
    ("--config.not_a_key=1", "--config.not_a_key"),
    ("--config.mesh.dta=2", 'Did you mean "data"'),
])
def test_typo_in_override_names_the_key(override, needle):
    res = run_main("--config", "configs/demo.py", override)
    assert res.returncode != 0
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1, res.stderr
    assert needle in res.stderr


def test_missing_config_file_and_bad_value():
    res = run_main("--config", "configs/does_not_exist.py")
    assert res.returncode != 0 and "does_not_exist.py" in res.stderr and "Traceback" not in res.stderr
    res = run_main("--config", "configs/demo.py", "--config.seed=abc")
    assert res.returncode != 0 and "--config.seed" in res.stderr and "Traceback" not in res.stderr
    res = run_main()
    assert res.returncode != 0 and "--config" in res.stderr


def test_require_names_every_missing_key():
    config = base_config()
    config.job = "evaluate"
    with pytest.raises(ConfigError, match=r"config.model.path, config.data.benchmarks"):
        require(config, "model.path", "data.benchmarks", "seed")


def test_config_is_printed_and_written(tmp_path):
    out = tmp_path / "run"
    res = run_main("--config", "configs/demo.py", "--config.job=dry_run", f"--config.output_dir={out}",
                   "--config.model.preset=qwen3-8b", "--config.mesh.fsdp=16", "--config.mesh.tensor=4",
                   "--config.mesh.data=1")
    assert res.returncode == 0, res.stderr[-3000:]
    written = json.loads((out / "config.json").read_text())
    assert written["job"] == "dry_run" and written["mesh"]["fsdp"] == 16
    assert "job: dry_run" in res.stdout
