"""The benchmarks run end to end (tiny shapes, two rounds) and end with their JSON line, with the fields every
bench/*.py reports (bench/harness.py); the harness's arithmetic against hand computations on fake timings."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
COMMON = ("ratio", "ratio_best", "ratio_cpu", "ratio_rounds", "peak_fraction", "peak_flops", "load_avg",
          "load_warning")


def run_bench(script: str, args: list[str], rounds: int) -> dict:
    """Run bench/<script> and return its JSON line, checked for the fields every benchmark reports."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    missing = [k for k in COMMON if k not in result]
    assert not missing, f"{script}: JSON line lacks {missing}"
    rounds_ = result["ratio_rounds"]
    assert len(rounds_) == rounds and all(r > 0 for r in rounds_)
    assert min(rounds_) - 1e-3 <= result["ratio"] <= max(rounds_) + 1e-3  # a median of the rounds
    assert result["ratio_best"] > 0 and result["ratio_cpu"] > 0
    assert 0 < result["peak_fraction"] and result["peak_flops"] > 1e6
    assert isinstance(result["load_warning"], bool) and result["load_avg"] >= 0
    return result


@pytest.mark.parametrize("script", ["bert_forward.py", "bert_train.py"])
def test_bert_benchmark_runs(script):
    result = run_bench(script, ["--batch", "2", "--seq", "32", "--repeats", "2", "--peak-n", "256"], rounds=2)
    assert result["batch"] == 2 and result["cpu_time_ratio"] > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_accelerator_step_benchmark_runs(dtype):
    """bench/accelerator_step.py at tiny shapes (on the CPU here): both sides train, in either compute dtype."""
    args = ["--dims", "tiny", "--batch", "2", "--seq", "32", "--steps", "2", "--peak-n", "128", "--dtype", dtype]
    result = run_bench("accelerator_step.py", args, rounds=2)
    assert result["dtype"] == dtype and result["batch"] == 2 and result["seq"] == 32
    assert result["ours"] > 0 and result["reference"] > 0 and result["reference_peak_fraction"] > 0


def test_engine_benchmark_runs():
    """bench/engine.py on a tiny heavy-tailed workload: the engine, the static path and HF agree token for token,
    and a whole run over mixed prompt lengths compiles at most 6 programs."""
    args = ["--prompts", "12", "--max-prompt", "80", "--median-new", "6", "--max-new", "24", "--batch", "4",
            "--repeats", "2", "--peak-n", "256", "--vocab", "1024", "--stream-mb", "16"]
    result = run_bench("engine.py", args, rounds=2)
    assert result["ratio_static"] > 0 and result["batch"] == 4
    assert len(result["ratio_static_rounds"]) == 2 and result["ratio_static_cpu"] > 0
    assert result["greedy_match_static"] == 1.0 and result["greedy_match_hf"] == 1.0
    assert result["compiles"] + result["layout_compiles"] <= 6
    # every useful token is emitted once; no slot emits twice in a step
    assert 0 < result["occupancy"] <= 1 and result["decode_steps"] * 4 * result["occupancy"] == pytest.approx(
        result["useful_tokens"], rel=1e-3)  # occupancy is rounded to 4 digits
    assert 0 <= result["prefill_padding"] < 1 and result["bandwidth_fraction"] > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_accelerator_generate_benchmark_runs(dtype):
    """bench/accelerator_generate.py at tiny shapes (on the CPU here): the three sides generate every useful token,
    in float32 the same greedy tokens, a whole run compiles at most 6 programs, and --compare-cache's float32-cache
    engine matches the default one."""
    args = ["--dims", "tiny", "--prompts", "12", "--max-prompt", "80", "--median-new", "6", "--max-new", "24",
            "--batch", "4", "--repeats", "2", "--peak-n", "128", "--dtype", dtype, "--compare-cache"]
    result = run_bench("accelerator_generate.py", args, rounds=2)
    # the KV cache in the model's dtype (bfloat16 here) gives what a float32 cache gives, bit for bit
    assert result["cache_identical"] is True and len(result["ratio_cache_rounds"]) == 2 and result["ratio_cache"] > 0
    assert result["dtype"] == dtype and result["batch"] == 4 and result["ratio_static"] > 0
    assert result["compiles"] + result["layout_compiles"] <= 6
    assert result["decode_steps"] * 4 * result["occupancy"] == pytest.approx(result["useful_tokens"], rel=1e-3)
    if dtype == "float32":
        assert result["greedy_match_static"] == 1.0 and result["greedy_match_hf"] == 1.0
    else:  # bfloat16 rounds differently in each program: most tokens still agree with the static path
        assert result["greedy_match_static"] > 0.5


def test_sampler_benchmark_runs():
    """bench/sampler.py at tiny shapes: ours and HF generate the same greedy tokens; the decode step's bytes are the
    model's weights (tied embedding read once, as the LM head) plus the whole KV cache of the batch."""
    # 32 new tokens: the decode-only time (the whole call minus the 1-token call) stays well above the rounds' noise
    args = ["--vocab", "1024", "--new-tokens", "32", "--batch", "2", "--prompt-len", "8", "--repeats", "2",
            "--peak-n", "256", "--no-compile-count", "--hf-cache", "dynamic", "--stream-mb", "16"]
    result = run_bench("sampler.py", args, rounds=2)
    assert result["batch"] == 2 and result["greedy_match"] == 1.0 and result["decode_ratio"] > 0
    assert result["compiles"] is None and result["round_ratios"] == result["ratio_rounds"]
    # bench/sampler.py's model: 4 layers x 256, MLP 768, 4 query / 2 KV heads of 64, qk-norm, tied vocab 1024;
    # prompt 8 -> bucket 64, + 32 new tokens = 96 cache slots
    layer = 256 * 4 * 64 + 2 * 256 * 2 * 64 + 4 * 64 * 256 + 3 * 256 * 768 + 2 * 256 + 2 * 64
    weights = 4 * (4 * layer + 1024 * 256 + 256)
    kv = 4 * 4 * 2 * 2 * 2 * 64 * 96  # float32 x layers x (k, v) x rows x KV heads x head_dim x slots
    assert result["decode_bytes_per_step"] == weights + kv
    assert result["stream_bytes_per_s"] > 1e8 and result["bandwidth_fraction"] > 0
    assert result["bandwidth_fraction"] == pytest.approx(
        (weights + kv) / result["decode_step_s"] / result["stream_bytes_per_s"], rel=2e-3)


def test_train_step_benchmark_runs():
    """bench/train_step.py at tiny shapes without tunix (its venv is not set up here): SFT and LoRA rounds, our
    GRPO job's step rate, the GRPO ratio null with its reason, packed vs unpacked rows."""
    args = ["--steps", "2", "--repeats", "1", "--batch", "2", "--seq", "32", "--peak-n", "256", "--lora-rank", "4",
            "--skip-tunix"]
    result = run_bench("train_step.py", args, rounds=2)
    assert result["grpo_ours_samples_per_s"] > 0 and result["grpo_ratio"] is None
    assert "skip" in result["grpo_reference_error"]
    phases = result["grpo_ours_phases_s"]
    assert set(phases) == {"generate_s", "update_s"} and min(phases.values()) > 0
    assert sum(phases.values()) < 2 * 32 / result["grpo_ours_samples_per_s"]  # parts of a step period (32 rows)
    assert len(result["lora_time_ratio_rounds"]) == 2 and result["lora_memory_ratio"] < 1
    assert len(result["packed_time_ratio_rounds"]) == 2 and result["packed_segments"] == 4


def test_train_step_benchmark_runs_the_comparisons_asked_for():
    """--only: the packing comparison alone names itself and its ratio (unpacked over packed time, the median of
    the rounds); no SFT, GRPO or LoRA fields. An unknown comparison is an argparse error naming the valid ones."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--only", "packing", "--steps", "2",
                          "--batch", "2", "--seq", "32"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["name"] == "train_step_packed_vs_unpacked" and result["comparisons"] == ["packing"]
    assert result["ratio"] == pytest.approx(statistics.median(1 / r for r in result["packed_time_ratio_rounds"]),
                                            abs=1e-3)
    assert not [k for k in result if k.startswith(("grpo", "lora", "peak"))]
    bad = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--only", "sft,nope"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "unknown comparison(s) ['nope']; choose from sft, grpo, lora, packing" in bad.stderr


def test_train_step_benchmark_on_a_checkpoint_folder(tmp_path):
    """--model: the SFT comparison alone, both sides loading the same checkpoint (here a tiny random Llama)."""
    from tests.helpers_models import make_tiny_hf_model

    make_tiny_hf_model("llama", tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--steps", "2", "--batch", "2", "--seq", "16", "--peak-n", "256",
            "--prompt-fraction", "0.5"]  # half of each row prompt: ours scores the other half only, HF labels -100
    result = run_bench("train_step.py", args, rounds=2)
    assert result["model"] == str(tmp_path / "model") and result["batch"] == 2 and "grpo_ratio" not in result
    assert result["prompt_fraction"] == 0.5


# ---------------------------------------------------------------------------------------- the harness itself


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("bench_harness", BENCH / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no pin(): importing the harness changes nothing
    return module


def fake_timer(harness, walls, cpus, flops=None):
    t = harness.Timer(flops=flops)
    for w, c in zip(walls, cpus):
        t.add(w, c)
    return t


def test_ratios_are_the_median_of_per_round_ratios(harness):
    # per round: 3/1 = 3, 2/4 = 0.5, 3/2 = 1.5 -> median 1.5; best over best: 2 / 1 = 2
    # CPU: median(5, 1, 3) = 3 over median(1, 3, 2) = 2 -> 1.5 (bests would give 1 / 1 = 1)
    ours = fake_timer(harness, [1.0, 4.0, 2.0], [1.0, 3.0, 2.0])
    ref = fake_timer(harness, [3.0, 2.0, 3.0], [5.0, 1.0, 3.0])
    r = harness.ratios(ours, ref, key="ratio_x")
    assert r == {"ratio_x": 1.5, "ratio_x_best": 2.0, "ratio_x_cpu": 1.5, "ratio_x_rounds": [3.0, 0.5, 1.5]}
    with pytest.raises(ValueError, match="same number"):
        harness.ratios(ours, fake_timer(harness, [1.0], [1.0]))


def test_timer_keeps_every_round_and_rounds_alternate(harness, monkeypatch):
    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(harness, "cpu_seconds", lambda: clock["cpu"])
    calls = []

    def fn(name, wall, cpu):
        def call():
            calls.append(name)
            clock["wall"] += wall
            clock["cpu"] += cpu
        return call

    a, b = harness.Timer(fn("a", 2.0, 1.0), iters=2), harness.Timer(fn("b", 3.0, 3.0))
    peak = {"p": harness.Timer(fn("p", 0.5, 0.5), flops=4.0)}
    harness.run_rounds({"a": a, "b": b}, 2, peak, peak_calls=2)
    assert calls == ["a", "a", "b", "p"] + ["a", "a", "b", "p", "p"] + ["p", "p", "b", "a", "a"]  # untimed first
    assert a.walls == [2.0, 2.0] and a.cpus == [1.0, 1.0] and len(b.walls) == 2 and len(peak["p"].walls) == 4
    assert harness.peak_flops(peak) == (8.0, 8.0)


def test_peak_is_the_better_framework_best_call(harness):
    jax_mm = fake_timer(harness, [4.0, 2.0], [2.0, 2.0], flops=8.0)  # best 4 FLOP/s, 4 per CPU-s
    torch_mm = fake_timer(harness, [1.0, 3.0], [4.0, 8.0], flops=6.0)  # best 6 FLOP/s, 1.5 per CPU-s
    assert harness.peak_flops({"jax_mm": jax_mm, "torch_mm": torch_mm}) == (6.0, 4.0)


def test_stream_bandwidth_is_the_better_framework_best_call(harness):
    jax_read = fake_timer(harness, [2.0, 1.0], [2.0, 1.0])
    jax_read.nbytes = 8.0  # best 8 bytes/s
    torch_read = fake_timer(harness, [4.0, 3.0], [4.0, 3.0])
    torch_read.nbytes = 12.0  # best 4 bytes/s
    timers = {"jax_read": jax_read, "torch_read": torch_read}
    assert harness.stream_bandwidth(timers) == 8.0
    assert harness.stream_line(timers).startswith("streaming read 0.0 GB/s (jax 0.0, torch 0.0")


@pytest.mark.parametrize("load,cores,warn", [(3.2, 2, True), (3.0, 2, False), (6.1, 4, True), (0.4, 1, False)])
def test_load_warning_above_one_and_a_half_per_core(harness, monkeypatch, capsys, load, cores, warn):
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (load, 1.0, 1.0))
    monkeypatch.setattr(harness.os, "cpu_count", lambda: cores)
    assert harness.load_report(1) == {"load_avg": load, "load_warning": warn}
    assert ("WARNING" in capsys.readouterr().out) == warn


def test_wakeup_round_trip_is_measured_and_restores_affinity(harness):
    cpus = sorted(os.sched_getaffinity(0))
    us = harness.wakeup_round_trip_us(cpus[0], cpus[-1], n=200)
    assert 0.0 < us < 1e5  # a round trip between two threads: microseconds, not zero, not a stall
    assert sorted(os.sched_getaffinity(0)) == cpus
    with pytest.raises(OSError, match="cannot pin a thread to CPU 4096"):  # an error, not a wait for a reply
        harness.wakeup_round_trip_us(cpus[0], 4096, n=10)
    assert sorted(os.sched_getaffinity(0)) == cpus


def test_load_report_adds_wakeups_for_more_than_one_thread(harness, monkeypatch, capsys):
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (0.5, 1.0, 1.0))
    monkeypatch.setattr(harness.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(harness, "wakeup_round_trip_us", lambda a, b: 7.0 if a == b else 47.0)
    assert harness.load_report(1) == {"load_avg": 0.5, "load_warning": False}
    assert "wake-up" not in capsys.readouterr().out
    assert harness.load_report(2) == {"load_avg": 0.5, "load_warning": False, "wakeup_us_one_cpu": 7.0,
                                      "wakeup_us_across_cpus": 47.0}
    assert "7.0 us on CPU 0, 47.0 us across CPUs 0 and 1" in capsys.readouterr().out


def test_threads_from_argv(harness):
    assert harness.threads_from_argv(["x.py"]) == 1
    assert harness.threads_from_argv(["x.py", "--threads", "4"]) == 4
    assert harness.threads_from_argv(["x.py", "--batch", "2", "--threads=3"]) == 3
    with pytest.raises(ValueError, match="--threads"):
        harness.threads_from_argv(["x.py", "--threads=0"])


def test_remote_timer_times_the_worker_calls_and_reports_a_dead_worker(harness, tmp_path):
    """RemoteTimer drives a `serve` worker: each round is the worker's own timing of its calls (here a 50 ms sleep:
    wall >= 50 ms, CPU near 0, as the worker's process saw it), its other output passes by, and a worker that dies
    before answering is named in the error."""
    worker = tmp_path / "worker.py"
    worker.write_text(f"import sys, time\nsys.path.insert(0, {str(BENCH)!r})\nfrom harness import serve\n"
                      "print('loading the reference')\nserve(lambda: time.sleep(0.05))\n")
    timer = harness.RemoteTimer([sys.executable, str(worker)], iters=2)
    wall, cpu = timer.call(3)
    assert wall >= 0.15 and cpu < 0.1
    harness.run_rounds({"reference": timer}, repeats=2)
    assert len(timer.walls) == 2 and min(timer.walls) >= 0.05 and max(timer.cpus) < 0.05
    timer.close()
    assert timer.proc.returncode == 0

    dead = tmp_path / "dead.py"
    dead.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match=r"exited with 3 before answering 'ready'.*dead\.py"):
        harness.RemoteTimer([sys.executable, str(dead)])
