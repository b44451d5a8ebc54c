"""The SFT job as 2 JAX processes on one machine, exactly as launch/*.sh start it on a pod.

Each process runs `python -m medkr_jax.main --config ... ` with MEDKR_COORDINATOR / MEDKR_NUM_PROCESSES /
MEDKR_PROCESS_ID set (a local coordinator on a free port), 2 CPU devices of its own and gloo CPU collectives,
so the 4 devices of the ("data", "fsdp", "tensor") = (1, 2, 2) mesh span both processes: parameters are
sharded across processes, every process feeds only its own rows of the global batch, and orbax writes one
checkpoint from both. Oracles:

* the 2-process run's per-step losses equal a 1-process run's on the same 4-device mesh;
* a 1-process run resumes from the 2-process run's checkpoint, and its remaining losses and final exported
  weights equal those of the uninterrupted 1-process run.

The training set is exactly one global batch (8 unpacked rows, batch 8), so every step sees the same rows
whatever the process count, and the constant learning rate makes a shorter run a true prefix of a longer one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Answer with the letter."
DRUGS = ["aspirin", "heparin", "warfarin", "insulin", "metformin", "digoxin"]
GLOBAL_BATCH = 8
TIMEOUT_S = 240


def _records():
    from medkr_jax.data.records import MCQRecord

    rng = np.random.default_rng(0)
    out = []
    for i in range(GLOBAL_BATCH):
        opts = [str(o) for o in rng.choice(DRUGS, size=4, replace=False)]
        ans = int(rng.integers(4))
        out.append(MCQRecord(id=f"mp{i}", benchmark="toy", question=f"Case {i}: which drug?", options=opts,
                             answer=ans, label="reasoning", trace=f"Case {i} needs {opts[ans]}."))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Training records, a tiny random Llama-style policy with a BPE tokenizer, and a config file for it."""
    import jax
    from flax import nnx

    from medkr_jax import parallel
    from medkr_jax.data.records import write_records
    from medkr_jax.data.tokenizer import train_bpe_tokenizer
    from medkr_jax.eval.prompts import format_question
    from medkr_jax.models.decoder import Decoder, DecoderConfig
    from medkr_jax.models.hf import export_decoder

    d = tmp_path_factory.mktemp("multiprocess")
    recs = _records()
    write_records(str(d / "train.jsonl"), recs)
    corpus = [SYSTEM, "The answer is A. B. C. D."]
    for r in recs:
        corpus += [format_question(r), r.trace] + list(r.options)
    tok = train_bpe_tokenizer(corpus * 3, d / "tokenizer", vocab_size=320, min_frequency=1)
    cfg = DecoderConfig(vocab_size=int(np.ceil(len(tok) / 8) * 8), hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512,
                        bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
                        pad_token_id=tok.pad_token_id)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with parallel.sharding_context(mesh):
        model = Decoder(cfg, rngs=nnx.Rngs(0))
    export_decoder(model, cfg, d / "policy", tokenizer_dir=d / "tokenizer")

    config_file = d / "tiny_sft.py"
    config_file.write_text(f'''
from medkr_jax.config import base_config


def get_config():
    c = base_config()
    c.job = "sft"
    c.seed = 0
    c.model.path = {str(d / "policy")!r}
    c.sft.train_path = {str(d / "train.jsonl")!r}
    c.sft.packing = False
    c.traces.plain, c.traces.adversarial, c.traces.backtracking = 1.0, 0.0, 0.0
    c.eval.system_prompt = {SYSTEM!r}
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 2
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.train.steps = 4
    c.train.batch_size = {GLOBAL_BATCH}
    c.train.seq_len = 96
    c.train.checkpoint_every = 2
    return c
''')
    return d, config_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(config_file: Path, out_dir: Path, steps: int, *, devices: int, nproc: int = 1, pid: int = 0,
           port: int = 0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDKR_", "SLURM_", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               MEDKR_TRACEBACK="1", TQDM_DISABLE="1")
    if nproc > 1:
        env.update(MEDKR_COORDINATOR=f"localhost:{port}", MEDKR_NUM_PROCESSES=str(nproc), MEDKR_PROCESS_ID=str(pid))
    cmd = [sys.executable, "-m", "medkr_jax.main", "--config", str(config_file), f"--config.output_dir={out_dir}",
           f"--config.train.steps={steps}"]
    with open(out_dir.parent / f"{out_dir.name}.p{pid}.log", "w") as log:
        # Own session: on failure the whole process group is killed, nothing survives the test.
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_all(procs: list[subprocess.Popen], deadline: float) -> None:
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _check(procs: list[subprocess.Popen], out_dir: Path) -> None:
    for i, p in enumerate(procs):
        if p.returncode != 0:
            log = (out_dir.parent / f"{out_dir.name}.p{i}.log").read_text()
            pytest.fail(f"{out_dir.name} process {i} exited with {p.returncode}:\n{log[-4000:]}")


def _losses(out_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert len(steps) == len(set(steps)), f"metrics written more than once per step (by several processes?): {steps}"
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _weights(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
def test_two_process_sft_matches_one_process_and_resumes_in_one(world, tmp_path):
    _, config_file = world
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    t0 = time.time()
    deadline = t0 + TIMEOUT_S
    port = _free_port()
    procs_two = [_start(config_file, two, 2, devices=2, nproc=2, pid=i, port=port) for i in range(2)]
    procs_one = [_start(config_file, one, 4, devices=4)]
    _wait_all(procs_two + procs_one, deadline)
    _check(procs_two, two)
    _check(procs_one, one)
    t_first = time.time() - t0

    loss_one, loss_two = _losses(one), _losses(two)
    assert sorted(loss_one) == [1, 2, 3, 4] and sorted(loss_two) == [1, 2]
    for step in (1, 2):
        np.testing.assert_allclose(loss_two[step], loss_one[step], rtol=1e-5, err_msg=f"step {step}")
    assert loss_one[4] < loss_one[1], "the tiny policy should learn"
    # Both processes ran the job on the 4-device mesh (each printing its own process index).
    log0 = (tmp_path / "two.p0.log").read_text()
    assert "job=sft" in log0 and (two / "checkpoints" / "2").is_dir()
    assert "job=sft" not in (tmp_path / "two.p1.log").read_text(), "only process 0 prints the run header"
    assert sorted(_weights(two / "hf")) == sorted(_weights(one / "hf")), "the 2-process run exports the policy"
    assert json.loads((two / "config.json").read_text())["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}

    # A 1-process run continues the 2-process run's checkpoint (the whole output dir, as on a pod).
    shutil.copytree(two, resumed)
    procs_resume = [_start(config_file, resumed, 4, devices=4)]
    _wait_all(procs_resume, time.time() + TIMEOUT_S)
    _check(procs_resume, resumed)
    loss_resumed = _losses(resumed)
    assert sorted(loss_resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        np.testing.assert_allclose(loss_resumed[step], loss_one[step], rtol=1e-5, err_msg=f"step {step}")
    w_one, w_resumed = _weights(one / "hf"), _weights(resumed / "hf")
    assert sorted(w_one) == sorted(w_resumed) and w_one
    # Adam's normalised updates turn float32 reduction-order differences (2 vs 1 process) into ~1e-6 weight
    # differences on near-zero second moments; a real resume bug moves weights by ~lr = 1e-3.
    for name in w_one:
        np.testing.assert_allclose(w_resumed[name], w_one[name], rtol=1e-4, atol=1e-5, err_msg=name)
    print(f"2-process + 1-process runs: {t_first:.0f}s; resume: {time.time() - t0 - t_first:.0f}s")
