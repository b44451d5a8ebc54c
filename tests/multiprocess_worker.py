"""One process of a multi-process CPU run, started by tests/test_multiprocess.py.

    python tests/multiprocess_worker.py <output_dir> <steps> <devices_per_process>

The process joins JAX's multi-controller runtime from the MEDKR_* environment variables (exactly what the
launch scripts set on a pod), builds a ("data","fsdp","tensor") mesh over all processes' devices, and trains a
tiny decoder with the shared training loop: params sharded fsdp x tensor, each process feeding only its own
rows of the global batch, checkpoints written collectively by orbax. It resumes from <output_dir> when a
checkpoint is there, so a run started with another process count continues a run's checkpoint.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    out_dir, steps, local_devices = argv[1], int(argv[2]), int(argv[3])
    # Fake CPU devices must be fixed before jax is imported.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    import optax
    from flax import nnx

    jax.config.update("jax_default_matmul_precision", "highest")
    from medkr_jax import parallel
    from medkr_jax.config import base_config
    from medkr_jax.models.decoder import Decoder, DecoderConfig
    from medkr_jax.train import loop

    multi = parallel.initialize_distributed(None)
    nproc, pid = jax.process_count(), jax.process_index()
    assert multi == (nproc > 1), (multi, nproc)
    assert jax.device_count() == nproc * local_devices, (jax.device_count(), nproc, local_devices)

    config = base_config()
    config.seed = 0
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 2})
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.train.steps = steps
    config.train.checkpoint_every = 2
    config.train.async_checkpoint = True
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.logical_rules(config)

    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    with parallel.sharding_context(mesh, rules):
        model = Decoder(cfg, rngs=nnx.Rngs(0))

    def loss_fn(model, batch, rng):
        tokens = batch["tokens"]
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, _ = model(tokens[:, :-1], pos[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        n = jnp.asarray(nll.size, jnp.float32)
        return nll.mean(), {"weight": n, "tokens": n}

    global_batch, seq = 8, 16

    class Batches:
        """Step-indexed global batches; each process yields only its own contiguous block of rows."""

        def __init__(self):
            self.step = 0

        def __iter__(self):
            return self

        def __next__(self):
            rng = np.random.default_rng(1000 + self.step)
            # A learnable pattern (token i+1 = token i + 1 mod V) so the loss really falls.
            start = rng.integers(0, cfg.vocab_size, size=(global_batch, 1))
            tokens = ((start + np.arange(seq)) % cfg.vocab_size).astype(np.int32)
            self.step += 1
            rows = global_batch // nproc
            return {"tokens": tokens[pid * rows:(pid + 1) * rows]}

        def get_state(self):
            return {"step": self.step}

        def set_state(self, state):
            self.step = int(state["step"])

    summary = loop.train(model, loss_fn=loss_fn, batches=Batches(), config=config, output_dir=out_dir,
                         mesh=mesh, rules=rules)
    params = nnx.state(model, nnx.Param)
    # Every process gathers the (sharded) params; process 0 writes them for the test to compare.
    from jax.experimental import multihost_utils

    def host_value(x):
        return np.asarray(x) if x.is_fully_addressable else np.asarray(multihost_utils.process_allgather(x, tiled=True))

    flat = {"/".join(str(k) for k in path): host_value(v.get_value()) for path, v in nnx.to_flat_state(params)}
    if pid == 0:
        np.savez(os.path.join(out_dir, f"params_step{summary['steps']}.npz"), **flat)
        with open(os.path.join(out_dir, f"summary_{nproc}proc.json"), "w") as f:
            json.dump({"steps": summary["steps"], "start_step": summary["start_step"], "nproc": nproc,
                       "devices": jax.device_count(), "mesh": dict(mesh.shape)}, f)
    print(f"[worker {pid}/{nproc}] done: steps {summary['start_step']}->{summary['steps']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
