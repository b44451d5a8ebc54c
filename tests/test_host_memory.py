"""medkr_jax.host_memory: with the policy, repeated executions of a jitted program stop paging in their
temporaries afresh (counted as minor page faults of the process), and results do not change."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from medkr_jax import host_memory

# A program whose temporaries (running sums over [2048, 4096] float32 arrays, 32 MB each) are well above
# glibc's largest mmap threshold, so without the policy every call maps and unmaps them.
SCRIPT = r"""
import json, os, resource, sys
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])  # one CPU, one XLA thread: as bench/ runs steps
from medkr_jax.host_memory import reuse_freed_memory
applied = reuse_freed_memory()
import jax, jax.numpy as jnp
import numpy as np

@jax.jit
def f(x):
    s = jnp.cumsum(jnp.tanh(x), 0)
    t = jnp.cumsum(s * x, 1)
    return (t - s).max(0) + jnp.cumsum(t, 0).min(0)

x = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32) * 0.01)
out = f(x).block_until_ready()
for _ in range(2):
    f(x).block_until_ready()
windows = []  # faults per call over three windows of two calls: the quietest (the heap may grow once)
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        out = f(x).block_until_ready()
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2)
print(json.dumps({"applied": applied, "faults_per_call": min(windows), "out": np.asarray(out).tobytes().hex()}))
"""


def _run(defaults: bool) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
    env.pop("MEDKR_MALLOC_DEFAULTS", None)
    if defaults:
        env["MEDKR_MALLOC_DEFAULTS"] = "1"
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="the policy is glibc's malloc settings")
def test_policy_stops_repeated_calls_paging_in_their_temporaries():
    default, policy = _run(defaults=True), _run(defaults=False)
    assert not default["applied"] and policy["applied"]
    pages = 32 * 2**20 // 4096  # one 32 MB temporary, in 4 KiB pages
    assert default["faults_per_call"] > pages, default["faults_per_call"]  # the cost the policy removes
    assert policy["faults_per_call"] < pages / 8, (policy["faults_per_call"], default["faults_per_call"])
    assert policy["out"] == default["out"]  # where buffers live changes no value


def test_opt_out_and_once_per_process(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setenv("MEDKR_MALLOC_DEFAULTS", "1")
    assert host_memory.reuse_freed_memory() is False
    monkeypatch.delenv("MEDKR_MALLOC_DEFAULTS")
    assert host_memory.reuse_freed_memory() is False  # decided once per process: no change behind a test's back


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cpu,cuda", True), ("tpu", False),
                                                 ("cuda,cpu", False)])
def test_applies_only_where_jax_runs_on_the_cpu(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.cpu_backend_expected() is expected
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setattr(host_memory, "_glibc", lambda: pytest.fail("looked for glibc on an accelerator"))
    if not expected:
        assert host_memory.reuse_freed_memory() is False


def test_an_installed_accelerator_plugin_means_not_the_cpu(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    found = {"libtpu"}
    monkeypatch.setattr(host_memory.importlib.util, "find_spec", lambda name: object() if name in found else None)
    assert host_memory.cpu_backend_expected() is False
    found.clear()
    assert host_memory.cpu_backend_expected() is True


def test_minor_page_faults_count_first_touches():
    """Writing one byte to each page of a fresh 64 MiB anonymous mapping maps in each page (a count that does not
    move fails)."""
    import mmap

    size, page = 64 * 2**20, mmap.PAGESIZE
    region = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)  # 4 KiB pages even where transparent huge pages are always on
    before = host_memory.minor_page_faults()
    for offset in range(0, size, page):
        region[offset] = 1
    after = host_memory.minor_page_faults()
    region.close()
    assert after - before >= 0.9 * size / page, after - before
