"""Orbax checkpoint round trip, keep-N, and restore-latest after the writer is killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medkr_jax import parallel
from medkr_jax.train.checkpoint import Checkpointer


def make_state(step: int, mesh):
    w = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) * step
    return {
        "params": {"w": jax.device_put(w, parallel.logical_sharding(("embed", "mlp"), mesh))},
        "opt": {"mu": jnp.full((8,), step, jnp.float32), "count": jnp.int32(step)},
        "step": jnp.int32(step),
        "rng": jax.random.fold_in(jax.random.key(0), step),
    }


@pytest.mark.devices(8)
def test_round_trip_keep_n_and_sharding(tmp_path):
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=2, keep=2)
    for step in range(1, 8):
        ckpt.save(step, make_state(step, mesh), data_state={"epoch": 0, "position": step * 4})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6]
    assert ckpt.save(7, make_state(7, mesh), force=True)
    ckpt.wait()
    assert ckpt.latest_step() == 7

    state, data = ckpt.restore(None, make_state(0, mesh))
    expected = make_state(7, mesh)
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(expected["params"]["w"]))
    assert state["params"]["w"].sharding.spec == expected["params"]["w"].sharding.spec
    assert int(state["step"]) == 7 and data is None
    np.testing.assert_array_equal(jax.random.key_data(state["rng"]), jax.random.key_data(expected["rng"]))

    state, data = ckpt.restore(6, make_state(0, mesh))
    assert int(state["opt"]["count"]) == 6 and data == {"epoch": 0, "position": 24}
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 3"):
        ckpt.restore(3, make_state(0, mesh))
    ckpt.close()
    assert Checkpointer(str(tmp_path / "empty"), save_every=1).restore(None, make_state(0, mesh)) is None


def test_grain_style_bytes_state(tmp_path):
    ckpt = Checkpointer(str(tmp_path), save_every=1, async_save=False)
    ckpt.save(1, {"x": jnp.ones(3)}, data_state=b'{"next_index": 17}')
    _, data = ckpt.restore(None, {"x": jnp.zeros(3)})
    assert data == b'{"next_index": 17}'


WRITER = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from medkr_jax.train.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], save_every=2, keep=3, async_save=True)
    for step in range(1, 10_000):
        state = {"w": jnp.full((256, 256), float(step)), "step": jnp.int32(step)}
        if ckpt.save(step, state, data_state={"position": step}):
            ckpt.wait()
            print("saved", step, flush=True)
        time.sleep(0.05)
""")


def test_restore_latest_after_sigkill(tmp_path):
    directory = str(tmp_path / "ckpt")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, directory], stdout=subprocess.PIPE, text=True, env=env)
    saved = []
    deadline = time.time() + 120
    while len(saved) < 4 and time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("saved"):
            saved.append(int(line.split()[1]))
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: possibly while the next save is being written
    proc.wait()
    assert len(saved) == 4, "writer did not save in time"

    ckpt = Checkpointer(directory, save_every=2, keep=3)
    latest = ckpt.latest_step()
    assert latest >= saved[-1]  # nothing that was reported saved is lost
    state, data = ckpt.restore(None, {"w": jnp.zeros((256, 256)), "step": jnp.int32(0)})
    assert int(state["step"]) == latest and data == {"position": latest}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((256, 256), float(latest)))
    # the resumed run keeps saving on top of what survived
    ckpt.save(latest + 2, {"w": jnp.zeros((256, 256)), "step": jnp.int32(latest + 2)})
    ckpt.close()
    assert Checkpointer(directory, save_every=2).latest_step() == latest + 2


def test_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer("runs/x/checkpoints", save_every=1, async_save=False)
    ckpt.save(1, {"x": jnp.ones(2)})
    ckpt.close()
    assert (tmp_path / "runs/x/checkpoints/1").is_dir()
