"""Mesh construction from config and logical-rule sharding on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from medkr_jax import parallel


class TwoLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.up = nnx.Param(nnx.with_partitioning(init, ("embed", "mlp"))(rngs.params(), (16, 32)))
        self.down = nnx.Param(nnx.with_partitioning(init, ("mlp", "embed"))(rngs.params(), (32, 16)))
        self.emb = nnx.Param(nnx.with_partitioning(init, ("vocab", "embed"))(rngs.params(), (64, 16)))
        self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("norm",))(rngs.params(), (16,)))

    def __call__(self, x):
        return jnp.tanh(x @ self.up[...]) @ self.down[...] * self.scale[...]


@pytest.mark.devices(8)
@pytest.mark.parametrize("sizes, expected", [
    ((8, 1, 1), (8, 1, 1)),
    ((2, 4, 1), (2, 4, 1)),
    ((1, 4, 2), (1, 4, 2)),
    ((-1, 2, 2), (2, 2, 2)),
])
def test_mesh_shapes_and_param_sharding(sizes, expected):
    mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, sizes)))
    assert tuple(mesh.shape[a] for a in parallel.MESH_AXES) == expected
    with parallel.sharding_context(mesh):
        model = TwoLayer(nnx.Rngs(0))
    assert model.up[...].sharding.spec == P("fsdp", "tensor")
    assert model.down[...].sharding.spec == P("tensor", "fsdp")
    assert model.emb[...].sharding.spec == P("tensor", "fsdp")
    assert model.scale[...].sharding.spec == P(None)
    # Each device holds exactly its shard of the (16, 32) kernel.
    shard = model.up[...].addressable_shards[0].data.shape
    assert shard == (16 // mesh.shape["fsdp"], 32 // mesh.shape["tensor"])

    # The sharded module computes what an unsharded copy computes.
    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    xs = parallel.shard_batch(x, mesh)
    assert xs.sharding.spec == P(("data", "fsdp"), None)
    host = jax.tree.map(np.asarray, nnx.state(model))
    expected_out = np.tanh(x @ host["up"][...]) @ host["down"][...] * host["scale"][...]
    out = nnx.jit(lambda m, x: m(x))(model, xs)
    np.testing.assert_allclose(np.asarray(out), expected_out, rtol=1e-5, atol=1e-6)


@pytest.mark.devices(8)
def test_reshard_module_onto_another_mesh():
    with parallel.sharding_context(parallel.make_mesh({"data": 8})):
        model = TwoLayer(nnx.Rngs(1))
    before = np.asarray(model.up[...])
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    parallel.shard_module(model, mesh)
    assert model.up[...].sharding.spec == P("fsdp", "tensor")
    assert model.up[...].sharding.mesh.shape == mesh.shape
    np.testing.assert_array_equal(np.asarray(model.up[...]), before)


@pytest.mark.devices(8)
@pytest.mark.parametrize("sizes, needle", [
    ((3, 1, 1), "data*fsdp*tensor = 3 but 8 devices"),
    ((2, 2, 1), "data*fsdp*tensor = 4 but 8 devices"),
    ((-1, 3, 1), "does not divide the 8 available devices"),
    ((-1, -1, 2), "at most one may be -1"),
    ((0, 8, 1), "positive int"),
])
def test_wrong_mesh_is_a_clear_error(sizes, needle):
    with pytest.raises(parallel.MeshError, match=needle.replace("*", r"\*")):
        parallel.make_mesh(dict(zip(parallel.MESH_AXES, sizes)))


def test_rules_from_config_override_defaults_and_are_checked():
    rules = dict(parallel.logical_rules([("embed", None), ("mlp", ("fsdp", "tensor"))]))
    assert rules["embed"] is None and rules["mlp"] == ("fsdp", "tensor") and rules["vocab"] == "tensor"
    assert parallel.logical_to_spec(("embed", "mlp"), [("embed", None), ("mlp", ("fsdp", "tensor"))]) == \
        P(None, ("fsdp", "tensor"))
    # a mesh axis is used at most once per tensor
    assert parallel.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    with pytest.raises(ValueError, match="mesh axes are"):
        parallel.logical_rules([("embed", "model")])


@pytest.mark.devices(8)
def test_batch_must_divide_batch_axes():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="not divisible by data\\*fsdp = 4"):
        parallel.shard_batch(np.zeros((6, 3)), mesh)


def test_single_process_initialize_is_a_noop(monkeypatch):
    for var in ("MEDKR_COORDINATOR", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed(None) is False
    assert jax.process_count() == 1
