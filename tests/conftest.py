"""Test setup: 8 fake CPU devices, set before jax is imported anywhere.

MEDKR_TEST_DEVICES=1 gives the CPU one device instead, as a machine with one accelerator has: the tests marked
``devices(8)`` then skip (``pytest_runtest_setup`` below).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={int(os.environ.get('MEDKR_TEST_DEVICES', '8'))}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_runtest_setup(item):
    """Tests marked ``devices(n)`` build meshes of n devices (the suite's fake CPU devices): on a machine with
    fewer (one GPU, say) they are skipped with the reason, not failed on the mesh's size."""
    marker = item.get_closest_marker("devices")
    if marker is not None and jax.device_count() < marker.args[0]:
        import pytest

        pytest.skip(f"needs {marker.args[0]} devices, {jax.device_count()} here ({jax.default_backend()})")
