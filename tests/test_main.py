"""The entry point: one-line errors for bad jobs, bad keys and missing files; config written to output_dir."""

import json
import subprocess
import sys
from pathlib import Path

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
    # a short header, not the ~230-line config; --print_config prints the whole of it
    assert "[medkr_jax] job=dry_run" in res.stdout and "model.preset: qwen3-8b" in res.stdout
    assert f"full config: {out / 'config.json'}" in res.stdout and "job: dry_run" not in res.stdout
    full = run_main("--config", "configs/demo.py", "--config.job=dry_run", f"--config.output_dir={out}",
                    "--config.model.preset=qwen3-8b", "--config.dry_run.num_devices=8", "--print_config")
    assert full.returncode == 0 and "job: dry_run" in full.stdout, full.stderr[-3000:]


def test_list_keys_take_comma_separated_values():
    """--config.data.benchmarks=a,b works like the tuple literal; a spec's own ?subjects=x,y list stays whole."""
    config, _ = entry.parse_config([
        "prog", "--config=configs/evaluate.py",
        "--config.data.benchmarks=medmcqa:/x.jsonl?limit=100, mmlu_flat:/y.jsonl?subjects=anatomy,medical_genetics",
        "--config.pipeline.stages=data,tokenizer"])
    assert config.data.benchmarks == ("medmcqa:/x.jsonl?limit=100",
                                      "mmlu_flat:/y.jsonl?subjects=anatomy,medical_genetics")
    assert config.pipeline.stages == ("data", "tokenizer")
    config, _ = entry.parse_config(["prog", "--config=configs/evaluate.py",
                                    "--config.data.benchmarks=/a.jsonl,mmlu_flat:?subjects=anatomy,virology,/b.jsonl"])
    assert config.data.benchmarks == ("/a.jsonl", "mmlu_flat:?subjects=anatomy,virology", "/b.jsonl")
    config, _ = entry.parse_config(["prog", "--config=configs/evaluate.py",
                                    "--config.data.benchmarks=('records:/a.jsonl', 'records:/b.jsonl')"])
    assert config.data.benchmarks == ("records:/a.jsonl", "records:/b.jsonl")  # the literal form still works


def test_bad_batch_size_fails_before_anything_loads(tmp_path, capsys):
    """A config error of the loop is reported before the (missing) data and model are touched."""
    rc = entry.main(["prog", "--config=configs/demo.py", "--config.job=sft", f"--config.output_dir={tmp_path}",
                     "--config.sft.train_path=/nonexistent/train.jsonl", "--config.train.batch_size=0"])
    err = capsys.readouterr().err
    assert rc == 1 and "config.train.batch_size must be >= 1, got 0" in err, err


def test_preset_resolution_says_where_the_model_is(tmp_path, capsys, monkeypatch):
    """config.model.preset -> config.model.path, printed; presets converted into a cache say how to move it."""
    from medkr_jax.jobs.common import resolve_model_path
    from medkr_jax.models import presets

    fake = presets.Preset("fake", "decoder", presets.TINY, locate=lambda cache: cache / "fake-model")
    monkeypatch.setitem(presets.PRESETS, "fake", fake)
    config = base_config()
    config.job, config.model.preset, config.model.cache_dir = "evaluate", "fake", str(tmp_path / "cache")
    resolve_model_path(config)
    assert config.model.path == str(tmp_path / "cache" / "fake-model")
    line = capsys.readouterr().out
    assert f"config.model.path='{tmp_path / 'cache' / 'fake-model'}'" in line and "--config.model.cache_dir" in line
    monkeypatch.setenv(presets.CACHE_ENV, str(tmp_path / "env"))
    assert presets.resolve_path("fake") == tmp_path / "env" / "fake-model"


def test_help_lists_jobs_and_configs():
    res = run_main("--help")
    assert res.returncode == 0, res.stderr
    for job in entry.JOBS:
        assert f"\n  {job} " in res.stdout
    assert "evaluate.py        Evaluate a model on benchmark files" in res.stdout
    assert "demo.py            The demo:" in res.stdout


@pytest.mark.parametrize("config_file, job", [("configs/evaluate.py", "evaluate"),
                                              ("configs/adversarial.py", "adversarial")])
def test_evaluate_and_adversarial_configs_load_and_name_the_missing_model(tmp_path, capsys, config_file, job):
    from medkr_jax.data.records import MCQRecord, write_records

    config, _ = entry.parse_config(["prog", f"--config={config_file}"])
    assert config.job == job and config.model.path == ""
    recs = write_records(tmp_path / "r.jsonl", [MCQRecord(id="q", benchmark="b", question="Q?", options=["x", "y"],
                                                          answer=0, label="knowledge")])
    rc = entry.main(["prog", f"--config={config_file}", f"--config.output_dir={tmp_path / 'out'}",
                     f"--config.data.eval_path={recs}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 1 and err[0] == (f"error: ConfigError: config.job={job!r} needs these keys set: config.model.path "
                                  "(set them in the config file or with --config.<key>=<value>)")


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        rc = entry.main(["prog", "--config=configs/evaluate.py", f"--config.output_dir={out}"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: config.output_dir='{out}' cannot be a run folder: ") and "is a file" in err[0]


def _diverge(config):
    from medkr_jax.train.loop import TrainingDiverged

    raise TrainingDiverged("non-finite loss nan at step 7 (runs/x); stopped without saving this state; last good "
                           "checkpoint: step 5 in runs/x/checkpoints. Lower config.optimizer.learning_rate ...")


def test_diverged_run_is_one_line_naming_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(entry, "job_function", lambda name: _diverge)
    monkeypatch.delenv("MEDKR_TRACEBACK", raising=False)
    rc = entry.main(["prog", "--config=configs/evaluate.py", "--config.job=diverge",
                     f"--config.output_dir={tmp_path / 'out'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 1 and err[0].startswith("error: TrainingDiverged: non-finite loss nan at step 7")
    assert "last good checkpoint: step 5 in runs/x/checkpoints" in err[0] and "Traceback" not in "".join(err)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.py")), ids=lambda p: p.name)
def test_every_config_file_loads_and_names_a_job(path):
    from medkr_jax.config import config_from_file
    from medkr_jax.jobs import JOBS

    config = config_from_file(path)
    assert config.job in JOBS, f"{path.name}: config.job={config.job!r}"
