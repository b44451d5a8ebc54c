"""Launch scripts (bash -n, shellcheck, --help, early errors, the commands they issue) and the pod configs.

gcloud / srun / scontrol are replaced by small stand-in executables that record their arguments (and, for
`gcloud ... ssh --command`, run the remote script in a fake worker home), so the scripts' real logic runs end
to end without a cloud account or a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_pod.sh"
GPU = REPO / "launch" / "gpu_multinode.sh"
SCRIPTS = [TPU, GPU]

# Everything the scripts (and the remote/task scripts they run) call, except gcloud/srun/scontrol.
TOOLS = ["bash", "env", "dirname", "cat", "git", "tar", "gzip", "mktemp", "du", "cut", "rm", "date", "sed", "tee",
         "mkdir", "head", "tr", "grep", "seq", "hostname", "ln", "setsid", "nohup", "sleep", "ls"]


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _bin_dir(tmp: Path) -> Path:
    """A PATH folder with only the needed system tools (no gcloud, srun or scontrol)."""
    d = tmp / "bin"
    d.mkdir(exist_ok=True)
    for tool in TOOLS:
        found = shutil.which(tool)
        if found and not (d / tool).exists():
            (d / tool).symlink_to(found)
    return d


def _run(args, *, env: dict, cwd: Path = REPO, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _clean_env(tmp: Path, **extra) -> dict:
    env = {"PATH": str(_bin_dir(tmp)), "HOME": str(tmp / "home"), "LANG": "C.UTF-8"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ------------------------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    exe = shutil.which("shellcheck")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is required in CI (apt-get install -y shellcheck)")
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck); CI runs it")
    res = subprocess.run([exe, "--severity=style", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    if script == GPU:
        # The per-task script is a string run by `srun bash -c`: check it as a script of its own.
        text = script.read_text()
        task = text.split("readonly TASK_SCRIPT='", 1)[1].split("'\n", 1)[0]
        assert "exec \"$PYTHON\" -m medkr_jax.main" in task
        res = subprocess.run([exe, "--severity=style", "--shell=bash", "-"], input=task, capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_prints_usage(script, tmp_path):
    for flag in ("--help", "-h"):
        res = _run([script, flag], env=_clean_env(tmp_path))
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("Usage:"), res.stdout[:200]
        assert "medkr_jax.main" in res.stdout


# ---------------------------------------------------------------------------------------------- tpu_pod.sh

STUB_GCLOUD = r'''#!{python}
"""Stand-in for gcloud: logs argv as JSON lines; `describe` prints $STUB_IPS; `ssh --command` runs the remote
script in $STUB_WORKERS/w<i> (one fake home per worker) when $STUB_WORKERS is set, or prints $STUB_SSH_ECHO."""
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
if "describe" in args:
    if os.environ.get("STUB_MISSING"):
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
    fmt = next((a for a in args if a.startswith("--format=")), "")
    print(os.environ.get("STUB_IPS", "10.0.0.2") if "ipAddress" in fmt else "READY")
    sys.exit(0)
if "ssh" in args:
    cmd = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    worker = next(a.split("=", 1)[1] for a in args if a.startswith("--worker="))
    if os.environ.get("STUB_SSH_ECHO"):
        print(os.environ["STUB_SSH_ECHO"])
        sys.exit(0)
    root = os.environ.get("STUB_WORKERS")
    if root:
        n = len(os.environ.get("STUB_IPS", "x").split(";"))
        for i in (range(n) if worker == "all" else [int(worker)]):
            home = os.path.join(root, f"w{{i}}")
            env = dict(os.environ, HOME=home, STUB_WORKER_NUM=str(i))
            subprocess.run(["bash", "-c", cmd], env=env, cwd=home, check=True)
    sys.exit(0)
if "scp" in args:
    dest = os.environ.get("STUB_SCP_DIR")
    if dest:
        src = [a for a in args if not a.startswith("-") and a not in ("compute", "tpus", "tpu-vm", "scp")][0]
        shutil.copy(src, dest)
    sys.exit(0)
'''

# The TPU metadata server answers with the worker's index; curl stands in for it on the fake workers.
STUB_CURL = "#!/usr/bin/env bash\necho \"$STUB_WORKER_NUM\"\n"

# The worker's venv python: record argv, cwd and the MEDKR_* variables, as the real job would see them.
STUB_WORKER_PYTHON = r'''#!{python}
import json, os, sys
out = os.path.join(os.environ["HOME"], "job.json")
env = {{k: v for k, v in os.environ.items() if k.startswith("MEDKR_") or k == "XLA_FLAGS"}}
with open(out + ".tmp", "w") as f:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": env}}, f)
os.replace(out + ".tmp", out)
print("fake job started", flush=True)
'''


@pytest.fixture
def gcloud_env(tmp_path):
    """Environment with a stand-in gcloud first in PATH; returns (env, call log path)."""
    bindir = _bin_dir(tmp_path)
    _write_exe(bindir / "gcloud", STUB_GCLOUD.format(python=sys.executable))
    _write_exe(bindir / "curl", STUB_CURL)
    log = tmp_path / "gcloud_calls.jsonl"
    log.touch()
    env = _clean_env(tmp_path, STUB_LOG=log, TPU_NAME="medkr-test", ZONE="us-east5-a", PROJECT="proj-1",
                     ACCELERATOR_TYPE="v5p-64", LOG_DIR=tmp_path / "logs")
    return env, log


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def test_tpu_fails_early_without_gcloud(tmp_path):
    env = _clean_env(tmp_path, TPU_NAME="t", ZONE="z", PROJECT="p", ACCELERATOR_TYPE="v5p-64")
    assert shutil.which("gcloud", path=env["PATH"]) is None
    for cmd in (["create"], ["run", "--config", "configs/sft_8b.py"], ["delete"]):
        res = _run([TPU, *cmd], env=env)
        assert res.returncode != 0
        assert "gcloud not found" in res.stderr, res.stderr


@pytest.mark.parametrize("missing,cmd", [
    ("TPU_NAME", ["run", "--config", "configs/sft_8b.py"]),
    ("ZONE", ["setup"]),
    ("PROJECT", ["delete"]),
    ("ACCELERATOR_TYPE", ["create"]),
])
def test_tpu_fails_early_on_missing_variable(gcloud_env, missing, cmd):
    env, log = gcloud_env
    env.pop(missing)
    res = _run([TPU, *cmd], env=env)
    assert res.returncode != 0
    assert f"missing required environment variable(s): {missing}" in res.stderr, res.stderr
    assert _calls(log) == [], "gcloud must not be called before the variables are checked"


def test_tpu_rejects_unknown_command_and_run_without_config(gcloud_env):
    env, log = gcloud_env
    res = _run([TPU, "launch"], env=env)
    assert res.returncode != 0 and "unknown command 'launch'" in res.stderr
    res = _run([TPU, "run", "--config.train.steps=3"], env=env)
    assert res.returncode != 0 and "no --config given" in res.stderr
    assert _calls(log) == []


def test_tpu_create_new_and_reuse(gcloud_env):
    env, log = gcloud_env
    res = _run([TPU, "create"], env=dict(env, STUB_MISSING="1", SPOT="1"))
    assert res.returncode == 0, res.stderr
    create = [c for c in _calls(log) if "create" in c]
    assert create == [["compute", "tpus", "tpu-vm", "create", "medkr-test", "--accelerator-type=v5p-64",
                       "--version=v2-alpha-tpuv5", "--spot", "--zone=us-east5-a", "--project=proj-1"]]
    log.write_text("")
    res = _run([TPU, "create"], env=env)
    assert res.returncode == 0, res.stderr
    assert "reusing slice 'medkr-test'" in res.stdout
    assert not [c for c in _calls(log) if "create" in c]


def test_tpu_setup_copies_the_checkout(gcloud_env, tmp_path):
    env, log = gcloud_env
    scp_dir = tmp_path / "scp"
    scp_dir.mkdir()
    res = _run([TPU, "setup"], env=dict(env, STUB_SCP_DIR=scp_dir))
    assert res.returncode == 0, res.stderr
    calls = _calls(log)
    scp = [c for c in calls if "scp" in c]
    assert len(scp) == 1 and "--worker=all" in scp[0] and "medkr-test:medkr_jax_src.tgz" in scp[0]
    with tarfile.open(scp_dir / "medkr_jax_src.tgz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "medkr_jax/main.py", "medkr_jax/parallel.py", "launch/tpu_pod.sh",
            "configs/sft_8b.py"} <= names
    assert not any(n.startswith((".git/", ".venv/")) for n in names)
    ssh = [c for c in calls if "ssh" in c]
    assert len(ssh) == 1 and "--worker=all" in ssh[0]
    remote = next(a for a in ssh[0] if a.startswith("--command="))
    assert "pip install -q -e '.[tpu]'" in remote and "python3.11 -m venv .venv" in remote
    assert "pip install -q gcsfs" in remote  # gs:// output dirs
    assert subprocess.run(["bash", "-n", "-c", remote.split("=", 1)[1]]).returncode == 0


def test_tpu_run_starts_every_worker_with_jax_variables(gcloud_env, tmp_path):
    env, log = gcloud_env
    workers = tmp_path / "workers"
    for i in range(2):
        venv_bin = workers / f"w{i}" / "medkr_jax" / ".venv" / "bin"
        venv_bin.mkdir(parents=True)
        _write_exe(venv_bin / "python", STUB_WORKER_PYTHON.format(python=sys.executable))
    args = ["--config", "configs/sft_8b.py", "--config.output_dir=gs://bucket/runs/a b",
            "--config.train.steps=5"]
    res = _run([TPU, "run", "--no-follow", "--", *args],
               env=dict(env, STUB_IPS="10.1.2.3;10.1.2.4", STUB_WORKERS=workers, REMOTE_ENV="XLA_FLAGS=--xla_x=1"))
    assert res.returncode == 0, res.stdout + res.stderr
    ssh = [c for c in _calls(log) if "ssh" in c]
    assert len(ssh) == 1 and "--worker=all" in ssh[0] and "medkr-test" in ssh[0]
    for i in range(2):
        job = workers / f"w{i}" / "job.json"
        deadline = time.time() + 20
        while not job.exists() and time.time() < deadline:
            time.sleep(0.1)
        got = json.loads(job.read_text())
        assert got["argv"] == ["-m", "medkr_jax.main", *args]
        assert got["cwd"] == str(workers / f"w{i}" / "medkr_jax")
        assert got["env"] == {"MEDKR_COORDINATOR": "10.1.2.3:8476", "MEDKR_NUM_PROCESSES": "2",
                              "MEDKR_PROCESS_ID": str(i), "XLA_FLAGS": "--xla_x=1"}
        logs = workers / f"w{i}" / "medkr_jax" / "logs"
        assert (logs / "latest.log").is_symlink() and (logs / "job.pid").exists()
        deadline = time.time() + 20
        while "fake job started" not in (logs / "latest.log").read_text() and time.time() < deadline:
            time.sleep(0.1)
        assert "fake job started" in (logs / "latest.log").read_text()
    assert "starting on 2 worker(s)" in res.stdout


def test_tpu_logs_stream_to_local_file_and_delete(gcloud_env, tmp_path):
    env, log = gcloud_env
    res = _run([TPU, "logs", "--worker=all"], env=dict(env, STUB_SSH_ECHO="sft step 7 loss 1.23"))
    assert res.returncode == 0, res.stderr
    assert "sft step 7 loss 1.23" in res.stdout
    assert "sft step 7 loss 1.23" in (tmp_path / "logs" / "medkr-test.log").read_text()
    ssh = _calls(log)[-1]
    assert "--worker=all" in ssh and any("tail -n +1 -F ~/medkr_jax/logs/latest.log" in a for a in ssh)
    res = _run([TPU, "delete"], env=env)
    assert res.returncode == 0, res.stderr
    assert _calls(log)[-1] == ["compute", "tpus", "tpu-vm", "delete", "medkr-test", "--quiet",
                               "--zone=us-east5-a", "--project=proj-1"]


# ----------------------------------------------------------------------------------------- gpu_multinode.sh

# srun stand-in: log its options, then run the task command once per task locally with SLURM's variables.
STUB_SRUN = r'''#!/usr/bin/env bash
printf '%s\n' "$*" >>"$STUB_LOG"
n=1
while [[ "$1" == --* ]]; do
  case "$1" in --ntasks=*) n="${1#--ntasks=}" ;; esac
  shift
done
for ((i = 0; i < n; i++)); do
  SLURM_JOB_ID="${SLURM_JOB_ID:-4242}" SLURM_JOB_NODELIST="gpu[07-08]" SLURM_NTASKS="$n" SLURM_PROCID="$i" \
    SLURM_LOCALID=0 "$@" &
done
wait
'''
STUB_SCONTROL = "#!/usr/bin/env bash\n[[ \"$1 $2\" == 'show hostnames' ]] && printf 'gpu07\\ngpu08\\n'\n"
STUB_TASK_PYTHON = r'''#!{python}
import json, os, sys
env = {{k: v for k, v in os.environ.items() if k.startswith("MEDKR_") or k == "JAX_LOCAL_DEVICE_IDS"}}
with open(os.path.join(os.environ["STUB_OUT"], "task%s.json" % os.environ["SLURM_PROCID"]), "w") as f:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": env}}, f)
'''


@pytest.fixture
def slurm_env(tmp_path):
    bindir = _bin_dir(tmp_path)
    _write_exe(bindir / "srun", STUB_SRUN)
    _write_exe(bindir / "scontrol", STUB_SCONTROL)
    py = _write_exe(tmp_path / "task_python", STUB_TASK_PYTHON.format(python=sys.executable))
    out = tmp_path / "tasks"
    out.mkdir()
    log = tmp_path / "srun_calls.txt"
    log.touch()
    return _clean_env(tmp_path, STUB_LOG=log, STUB_OUT=out, PYTHON=py), log, out


def test_gpu_fails_early_without_srun(tmp_path):
    env = _clean_env(tmp_path, NODES=2)
    assert shutil.which("srun", path=env["PATH"]) is None
    res = _run([GPU, "--config", "configs/sft_8b.py"], env=env)
    assert res.returncode != 0 and "srun not found" in res.stderr, res.stderr


def test_gpu_fails_early_on_missing_nodes_and_config(slurm_env):
    env, log, _ = slurm_env
    res = _run([GPU, "--config", "configs/sft_8b.py"], env=env)
    assert res.returncode != 0 and "set NODES=" in res.stderr, res.stderr
    res = _run([GPU, "--config.train.steps=1"], env=dict(env, NODES="2"))
    assert res.returncode != 0 and "no --config given" in res.stderr
    res = _run([GPU], env=dict(env, NODES="2"))
    assert res.returncode != 0 and "no arguments" in res.stderr
    res = _run([GPU, "--config", "x.py"], env=dict(env, NODES="two"))
    assert res.returncode != 0 and "NODES='two'" in res.stderr
    assert log.read_text() == "", "srun must not run before the checks pass"


def test_gpu_wrapper_sets_jax_variables_per_task(slurm_env, tmp_path):
    env, log, out = slurm_env
    args = ["--config", "configs/sft_8b.py", "--config.output_dir=/shared/run 1"]
    res = _run([GPU, *args], env=dict(env, NODES="2", GPUS_PER_NODE="4", PARTITION="gpu"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["task0.json", "task1.json"], res.stderr
    srun_opts = log.read_text().split(" bash -c ")[0].split()
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu"} <= set(
        srun_opts)
    for i in range(2):
        got = json.loads((out / f"task{i}.json").read_text())
        assert got["argv"] == ["-m", "medkr_jax.main", *args]
        assert got["cwd"] == str(REPO)
        assert got["env"] == {"MEDKR_COORDINATOR": f"gpu07:{20000 + 4242}", "MEDKR_NUM_PROCESSES": "2",
                              "MEDKR_PROCESS_ID": str(i), "MEDKR_REPO": str(REPO),
                              "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}


def test_gpu_inside_allocation_uses_its_nodes(slurm_env, tmp_path):
    env, log, out = slurm_env
    env = dict(env, SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="3", SLURM_SUBMIT_DIR=REPO,
               CUDA_VISIBLE_DEVICES="0,1", MEDKR_COORDINATOR_PORT="23456")
    res = _run([GPU, "--config", "configs/grpo_8b.py"], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "--nodes=3 --ntasks=3" in log.read_text()
    for i in range(3):
        got = json.loads((out / f"task{i}.json").read_text())
        assert got["env"]["MEDKR_COORDINATOR"] == "gpu07:23456"
        assert got["env"]["MEDKR_NUM_PROCESSES"] == "3" and got["env"]["MEDKR_PROCESS_ID"] == str(i)
        assert got["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1"


# ------------------------------------------------------------------------------------------------- configs


def _load_config(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, mod.get_config()


@pytest.mark.parametrize("name,job,chips,preset", [
    ("sft_8b", "sft", 32, "llama3.1-8b"),
    ("grpo_8b", "grpo", 32, "llama3.1-8b"),
    ("grpo_32b", "grpo", 128, "qwen2.5-32b"),
])
def test_pod_configs(name, job, chips, preset):
    mod, c = _load_config(name)
    assert c.job == job and c.model.preset == preset
    assert c.model.dtype == "bfloat16" and c.model.remat
    assert c.mesh.data * c.mesh.fsdp * c.mesh.tensor == chips == c.dry_run.num_devices
    assert min(c.mesh.fsdp, c.mesh.tensor) > 1
    # v5p-N: N TensorCores, 2 per chip
    assert mod.SLICE.startswith("v5p-") and int(mod.SLICE.split("-")[1]) // 2 == chips
    assert c.output_dir is None, "output_dir must be given on the command line"
    assert f"--config {Path(mod.__file__).relative_to(REPO)}" in mod.__doc__
    assert "--config.output_dir=gs://" in mod.__doc__
    # the global batch splits evenly over the batch axes and the hosts (4 chips per v5p host)
    assert c.train.batch_size % (c.mesh.data * c.mesh.fsdp) == 0
    assert c.train.batch_size % (chips // 4) == 0


def _dry_run(config: str, *extra: str) -> tuple[str, dict]:
    """(printed output, the job's summary) of `main --config.job=dry_run`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "medkr_jax.main", "--config", config, "--config.job=dry_run",
                          *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    # main prints the summary as JSON after the "done in" line
    summary = json.loads(res.stdout.split(" done in ", 1)[1].split("\n", 1)[1])
    return res.stdout, summary


# Published sizes: Llama-3.1-8B 8.03B parameters, Qwen2.5-32B 32.76B (embeddings untied in both).
@pytest.mark.parametrize("name,devices,params,chip_mesh", [
    ("sft_8b", 32, 8.03e9, "data=1 x fsdp=8 x tensor=4"),
    ("grpo_8b", 32, 8.03e9, "data=1 x fsdp=8 x tensor=4"),
    ("grpo_32b", 128, 32.76e9, "data=1 x fsdp=16 x tensor=8"),
])
def test_dry_run_prints_memory_plan_that_fits(name, devices, params, chip_mesh, tmp_path):
    out, plan = _dry_run(f"configs/{name}.py", f"--config.output_dir={tmp_path / name}")
    assert plan["chip"] == "v5p" and plan["num_devices"] == devices
    assert plan["mesh"] == dict(zip(("data", "fsdp", "tensor"), _mesh_sizes(chip_mesh)))
    assert abs(plan["num_params"] / params - 1) < 0.005
    assert plan["fits"] is True and plan["hbm_fraction"] < 0.9
    # the printed plan: per-device lines and the verdict against the chip's HBM
    assert f"on {devices} devices ({chip_mesh})" in out
    for part in ("params", "grads", "optimizer", "activations", "total"):
        assert f"    {part}" in out
    assert "v5p HBM 95 GiB" in out and "-> fits" in out


def _mesh_sizes(text: str) -> list[int]:
    return [int(kv.split("=")[1]) for kv in text.split(" x ")]


def test_dry_run_says_when_it_does_not_fit(tmp_path):
    # the 8B SFT step on a single v5p chip: fp32 params + grads + AdamW alone exceed 95 GB
    out, plan = _dry_run("configs/sft_8b.py", f"--config.output_dir={tmp_path}", "--config.mesh.fsdp=1",
                         "--config.mesh.tensor=1", "--config.dry_run.num_devices=1")
    assert plan["fits"] is False and plan["num_devices"] == 1
    assert "DOES NOT FIT" in out

def test_tpu_stop_terminates_only_the_recorded_job(gcloud_env, tmp_path):
    env, log = gcloud_env
    workers = tmp_path / "workers"
    jobs = []
    try:
        for i in range(2):
            logs = workers / f"w{i}" / "medkr_jax" / "logs"
            logs.mkdir(parents=True)
            if i == 0:  # worker 0 runs a job; worker 1 has none
                jobs.append(subprocess.Popen(["sleep", "60"]))
                (logs / "job.pid").write_text(f"{jobs[0].pid}\n")
        res = _run([TPU, "stop"], env=dict(env, STUB_IPS="10.0.0.2;10.0.0.3", STUB_WORKERS=workers))
        assert res.returncode == 0, res.stderr
        assert jobs[0].wait(timeout=10) == -15  # SIGTERM: training checkpoints and exits on it
        assert f"stopping pid {jobs[0].pid}" in res.stdout and "no job running" in res.stdout
    finally:
        for p in jobs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("target,chip,devices", [("v6e-8", "v6e", 8), ("v5e-8", "v5e", 8), ("h100", "h100", 1)])
def test_lora_grpo_8b_plans_fit_one_host(target, chip, devices, capsys):
    """configs/grpo_8b_lora.py:<target>: Llama-3.1-8B GRPO with LoRA fits one host, the plan printed per device."""
    from medkr_jax.jobs import dry_run

    mod, _ = _load_config("grpo_8b_lora")
    c = mod.get_config(target)
    assert c.job == "grpo" and c.lora.rank > 0 and c.model.param_dtype == "bfloat16"
    assert c.train.batch_size == c.grpo.prompts_per_step * c.grpo.num_generations
    c.job = "dry_run"
    plan = dry_run.run(c)
    assert plan["chip"] == chip and plan["num_devices"] == devices and plan["fits"] is True
    assert plan["adapter_params"] == 41_943_040 and plan["master"] == 0
    assert plan["kv_rows"] == c.train.batch_size and plan["kv_cache"] > 0
    out = capsys.readouterr().out
    assert "LoRA r=16" in out and "kv_cache" in out and "-> fits" in out
    with pytest.raises(ValueError, match="expected one of"):
        mod.get_config("v4-8")
