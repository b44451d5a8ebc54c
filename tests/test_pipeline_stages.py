"""The pipeline runner: a preempted stage stops the run without being recorded complete, and resumes."""

import pytest

from medkr_jax.pipeline import runner, stages
from medkr_jax.config import base_config


@pytest.fixture
def fake_stage():
    calls = []

    @stages.stage("fake_preemptible")
    def fn(config, out, results):
        calls.append(len(calls))
        # the first run is preempted after saving (as train.loop returns on SIGTERM); the rerun completes
        return {"preempted": len(calls) == 1, "steps": 3 if len(calls) == 1 else 8, "headline": "done"}

    yield calls
    stages.STAGES.pop("fake_preemptible")


def test_preempted_stage_stops_the_pipeline_and_resumes_on_rerun(fake_stage, tmp_path):
    config = base_config()
    config.output_dir = str(tmp_path)
    config.pipeline.stages = ("fake_preemptible",)
    with pytest.raises(runner.StagePreempted, match="'fake_preemptible' was preempted .* at step 3"):
        runner.run(config)
    assert runner.completed(config, "fake_preemptible") is None  # not recorded as complete
    runner.run(config)  # the rerun runs the stage again (its job resumes from the checkpoint)
    assert fake_stage == [0, 1]
    assert runner.completed(config, "fake_preemptible")["summary"]["steps"] == 8
    runner.run(config)  # now complete: skipped
    assert fake_stage == [0, 1]


def test_main_reports_a_preempted_stage_in_one_line(fake_stage, tmp_path, capsys, monkeypatch):
    from medkr_jax import main

    cfg = tmp_path / "cfg.py"
    cfg.write_text("from medkr_jax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                   "    c.job = 'pipeline'\n    c.pipeline.stages = ('fake_preemptible',)\n    return c\n")
    rc = main.main(["medkr_jax.main", "--config", str(cfg), f"--config.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 143 and "was preempted (SIGTERM) at step 3" in err and "rerun the same command" in err
    assert "Traceback" not in err
