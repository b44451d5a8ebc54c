"""The pipeline runner: a preempted stage stops the run without being recorded complete, and resumes."""

import numpy as np
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


def test_a_completed_data_stage_made_with_other_split_sizes_stops_a_resumed_run(tmp_path):
    import json

    from medkr_jax.pipeline import demo
    config = base_config()
    config.output_dir = str(tmp_path)
    config.pipeline.stages = ("data",)
    config.synthetic.policy_rl_questions = 600
    (tmp_path / "data").mkdir()
    record = {"stage": "data", "wall_s": 0.1, "summary": {"synthetic": demo.synthetic_sizes(config)}}
    (tmp_path / "data" / "stage.json").write_text(json.dumps(record))
    assert runner.run(config)["stages"] == {"data": ""}  # the same sizes: skipped as complete
    config.synthetic.policy_rl_questions = 4000
    with pytest.raises(ValueError, match=r"data/stage.json: the completed 'data' stage was made with other settings "
                                         r"\(config.synthetic.policy_rl_questions=4000 vs 600 made\)"):
        runner.run(config)


def test_main_reports_a_preempted_stage_in_one_line(fake_stage, tmp_path, capsys, monkeypatch):
    from medkr_jax import main

    cfg = tmp_path / "cfg.py"
    cfg.write_text("from medkr_jax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                   "    c.job = 'pipeline'\n    c.pipeline.stages = ('fake_preemptible',)\n    return c\n")
    rc = main.main(["medkr_jax.main", "--config", str(cfg), f"--config.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 143 and "was preempted (SIGTERM) at step 3" in err and "rerun the same command" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("rewards", [
    [0.1, 0.2, 0.15, 0.3, 0.35, 0.3, 0.45, 0.5],  # rising
    [0.5, 0.4, 0.45, 0.3, 0.2, 0.25, 0.1, 0.15],  # falling
    [0.25, 0.06, 0.19, 0.19, 0.0, 0.19, 0.13, 0.19, 0.06, 0.25, 0.13, 0.19],  # noise (the real recipe's first steps)
])
def test_reward_trend_is_the_least_squares_slope_and_its_t_statistic(rewards):
    from scipy import stats

    from medkr_jax.pipeline.demo import reward_trend
    fit = stats.linregress(np.arange(len(rewards)), rewards)
    slope, t, verdict = reward_trend(rewards)
    assert slope == pytest.approx(fit.slope, rel=1e-9) and t == pytest.approx(fit.slope / fit.stderr, rel=1e-9)
    assert verdict == ("rose" if t >= 2 else "fell" if t <= -2 else "no clear trend")
    assert reward_trend([0.1, 0.2])[2] == "too few steps for a trend"
    assert reward_trend([0.1, 0.2, 0.3])[2] == "rose"  # exact line: zero residual, infinite t
