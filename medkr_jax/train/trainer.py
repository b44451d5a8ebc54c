"""`Trainer`: the sharded training state of an NNX model and its one jitted optimizer update.

The model is split into (graphdef, params, frozen, rest): params are trained and placed by their logical axis names
(config.sharding_rules): every nnx.Param, or only the LoRA adapters of a model that has them
(models/lora.py), whose base parameters are then `frozen`: placed like params, read by the step, never
updated, not in the optimizer state or the checkpoint. `rest` (RNG counters, batch stats ...) is carried
through the step. The
batch is split over the "batch" mesh axes, and gradient accumulation runs inside the step as a `lax.scan` over
micro-batches (one call = one optimizer update). train/loop.py drives it.

Loss functions have the signature `loss_fn(model, batch, rng) -> (loss, aux)` where `aux` is a dict of
scalars. Two aux keys are special: "weight" (the loss's normaliser, e.g. the number of target tokens; used to
weight micro-batches so accumulation equals one big batch; default 1) and "tokens" (summed; drives tokens/s).
All other aux entries are averaged over micro-batches with those weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medkr_jax import parallel, xla_options
from medkr_jax.models import lora
from medkr_jax.train.checkpoint import from_nested_dict, to_nested_dict

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict]]
SUMMED_AUX = ("weight", "tokens")


def _after(params: Any, values: Any) -> Any:
    """``params`` unchanged (each plus 0 x the sum of ``values``' scalars), but read after ``values`` are computed.

    The new weights are written over the old, donated ones, and only a data dependency orders a read of the old
    weights before those writes. The step's metrics read them outside the update's path (update_ratio's norm of the
    weights; the loss and the updates' norm, where XLA recomputes an elementwise piece inside a reduction), so
    without one XLA copies every parameter at the start of the step and keeps the copies through it: 39 copies in
    bench/train_step.py's SFT step, 272 (513 MiB) in SmolLM2-135M's. An optimization barrier does not order it (XLA
    removes barriers before it decides on copies). w + 0 is w, so the new weights are bit for bit the same; a
    non-finite metric (a NaN loss, an infinite update) makes them NaN.
    """
    leaves = jax.tree.leaves(values)
    zero = sum(jnp.sum(jnp.asarray(v, jnp.float32)) for v in leaves) * 0.0 if leaves else 0.0
    return jax.tree.map(lambda w: w + jnp.asarray(zero, w.dtype), params)


class Trainer:
    """Sharded train state + jitted update step for an NNX model.

    The model is split into (graphdef, params, frozen, rest) (see the module doc; `trainable` overrides which
    variables are params: default `lora.trainable_filter`). `rest` (RNG counters, batch stats ...) is carried
    through the step. The loss runs with LoRA dropout keyed by the step's rng (`lora.with_dropout`; nothing
    without adapters). `model()` returns a live view on the current state, for sampling or evaluation; the
    arrays of an older view are donated (invalid) after the next `update`.
    """

    def __init__(self, model: nnx.Module, *, loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                 rules: Any = None, grad_accum: int = 1, schedule: optax.Schedule | None = None,
                 trainable: Any = None):
        if grad_accum < 1:
            raise ValueError(f"config.optimizer.grad_accum must be >= 1, got {grad_accum}")
        self.mesh = mesh
        self.rules = parallel.logical_rules(rules)
        self.loss_fn = lora.with_dropout(loss_fn)
        self.tx = tx
        self.schedule = schedule
        self.grad_accum = int(grad_accum)
        self.trainable = lora.trainable_filter(model) if trainable is None else trainable
        self.graphdef, params, frozen, rest = nnx.split(model, self.trainable, nnx.Param, ...)
        repl = parallel.replicated(mesh)
        self.param_shardings = parallel.state_logical_shardings(params, mesh, self.rules)
        self.frozen_shardings = parallel.state_logical_shardings(frozen, mesh, self.rules)
        self.rest_shardings = jax.tree.map(lambda _: repl, rest)
        self.params = jax.device_put(params, self.param_shardings)
        self.frozen = jax.device_put(frozen, self.frozen_shardings)
        self.rest = jax.device_put(rest, self.rest_shardings)
        abstract_opt = jax.eval_shape(tx.init, self.params)
        self.opt_shardings = optax.tree_map_params(
            tx, lambda _, s: s, abstract_opt, self.param_shardings, transform_non_params=lambda _: repl)
        self.opt_state = jax.jit(tx.init, out_shardings=self.opt_shardings)(self.params)
        self.opt_steps = 0
        batch_axes = dict(self.rules).get("batch", parallel.BATCH_AXES)
        self._batch_axes = batch_axes
        # rows of a global batch split over the batch axes (no micro-batch dimension)
        self.row_sharding = NamedSharding(mesh, P(batch_axes))
        spec = P(None, batch_axes) if self.grad_accum > 1 else P(batch_axes)
        self.batch_sharding = NamedSharding(mesh, spec)
        k = self.grad_accum
        # micro-batch i = rows [i*B/k, (i+1)*B/k) of the global batch
        self._split_micro = jax.jit(
            lambda t: jax.tree.map(lambda a: a.reshape((k, a.shape[0] // k) + a.shape[1:]), t),
            out_shardings=self.batch_sharding)
        self._update = jax.jit(
            self._update_impl,
            in_shardings=(self.param_shardings, self.opt_shardings, self.rest_shardings, self.frozen_shardings,
                          self.batch_sharding, repl),
            out_shardings=(self.param_shardings, self.opt_shardings, self.rest_shardings, repl),
            donate_argnums=(0, 1, 2),
            compiler_options=xla_options.dense_program_options(),
        )

    # -- model views ---------------------------------------------------------------------------------------

    def model(self) -> nnx.Module:
        """A module on the current params (shares arrays; do not keep it across `update`)."""
        return nnx.merge(self.graphdef, self.params, self.frozen, self.rest)

    def learning_rate(self) -> float:
        return float(self.schedule(self.opt_steps)) if self.schedule is not None else float("nan")

    # -- the step --------------------------------------------------------------------------------------------

    def _loss_and_grad(self, params, frozen, rest, batch, rng):
        def f(p, r):
            model = nnx.merge(self.graphdef, p, frozen, r)
            loss, aux = self.loss_fn(model, batch, rng)
            new_rest = nnx.split(model, self.trainable, nnx.Param, ...)[3]
            return loss, (dict(aux), new_rest)

        (loss, (aux, new_rest)), grads = jax.value_and_grad(f, has_aux=True)(params, rest)
        weight = jnp.asarray(aux.pop("weight", 1.0), jnp.float32)
        return loss.astype(jnp.float32), weight, aux, new_rest, grads

    def _update_impl(self, params, opt_state, rest, frozen, batch, rng):
        if self.grad_accum == 1:
            loss, weight, aux, rest, grads = self._loss_and_grad(params, frozen, rest, batch, rng)
            aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
        else:
            # Micro-batches weighted by their loss normaliser: the accumulated gradient equals the gradient of
            # the whole batch's loss (e.g. token-mean over all tokens), not a mean of per-micro-batch means.
            def body(carry, xs):
                g_acc, l_acc, w_acc, a_acc, rest = carry
                mb, i = xs
                loss, w, aux, rest, g = self._loss_and_grad(params, frozen, rest, mb, jax.random.fold_in(rng, i))
                g_acc = jax.tree.map(lambda a, b: a + w * b, g_acc, g)
                a_acc = {k: a_acc[k] + (jnp.asarray(aux[k], jnp.float32) * (1.0 if k in SUMMED_AUX else w))
                         for k in a_acc}
                return (g_acc, l_acc + w * loss, w_acc + w, a_acc, rest), None

            first = jax.tree.map(lambda x: x[0], batch)
            aux_shape = jax.eval_shape(lambda: self._loss_and_grad(params, frozen, rest, first, rng)[2])
            zeros_g = jax.tree.map(jnp.zeros_like, params)
            zeros_a = {k: jnp.zeros((), jnp.float32) for k in aux_shape}
            init = (zeros_g, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros_a, rest)
            (g_sum, l_sum, weight, a_sum, rest), _ = jax.lax.scan(
                body, init, (batch, jnp.arange(self.grad_accum)))
            denom = jnp.maximum(weight, 1e-12)
            grads = jax.tree.map(lambda g: g / denom, g_sum)
            loss = l_sum / denom
            aux = {k: (v if k in SUMMED_AUX else v / denom) for k, v in a_sum.items()}
        updates, opt_state = self.tx.update(grads, opt_state, params)
        # update size relative to the weights, ||delta theta|| / ||theta||: how far one step moves the model
        update_ratio = optax.global_norm(updates) / jnp.maximum(optax.global_norm(params), 1e-12)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "update_ratio": update_ratio,
                   "weight": weight, **aux}
        # the old weights, read by the metrics, are overwritten only once those are computed (see `_after`)
        params = optax.apply_updates(_after(params, metrics), updates)
        return params, opt_state, rest, metrics

    def place_batch(self, batch: Any) -> Any:
        """Batch -> global arrays sharded over the batch axes ([k, B/k, ...] micro-batches when accumulating).

        Host (numpy) leaves are this process's rows; jax.Array leaves are already global (e.g. reference
        log-probs computed on device from an earlier placement of the same rows).
        """
        k = self.grad_accum
        divisor = math.prod(self.mesh.shape[a] for a in (
            (self._batch_axes,) if isinstance(self._batch_axes, str) else tuple(self._batch_axes or ())))

        def put(x):
            if isinstance(x, jax.Array):
                x = jax.device_put(x, self.row_sharding)
            else:
                x = np.asarray(x)
                if x.ndim == 0:
                    raise ValueError("every batch entry needs a leading batch dimension; got a scalar")
                x = jax.make_array_from_process_local_data(self.row_sharding, x)
            b = x.shape[0]
            if b % k or (b // k) % divisor:
                raise ValueError(
                    f"global batch {b} must split into config.optimizer.grad_accum={k} micro-batches whose size "
                    f"is a multiple of the mesh's batch axes {self._batch_axes} (size {divisor}); change the "
                    f"batch size, grad_accum or config.mesh")
            return x

        batch = jax.tree.map(put, batch)
        if k > 1:
            batch = self._split_micro(batch)
        return batch

    def update(self, batch: Any, rng: jax.Array) -> dict[str, jax.Array]:
        """One optimizer update on `batch` (host or device arrays); returns the step's metrics (on device)."""
        batch = self.place_batch(batch)
        self.params, self.opt_state, self.rest, metrics = self._update(
            self.params, self.opt_state, self.rest, self.frozen, batch, rng)
        self.opt_steps += 1
        return metrics

    def compiled_update(self, batch: Any, rng: jax.Array) -> jax.stages.Compiled:
        """The update step compiled for this batch (XLA's program: its text, its memory analysis)."""
        placed = self.place_batch(batch)
        return self._update.lower(self.params, self.opt_state, self.rest, self.frozen, placed, rng).compile()

    def step_memory(self, batch: Any, rng: jax.Array) -> dict[str, int]:
        """Bytes the compiled update step needs on one device, from XLA's memory analysis of the program for this
        batch: arguments, outputs, temporaries, and peak = arguments + outputs - donated aliases + temporaries."""
        m = self.compiled_update(batch, rng).memory_analysis()
        out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
        out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
        return out

    # -- checkpoint state --------------------------------------------------------------------------------------

    def checkpoint_state(self, step: int) -> dict:
        return {
            "params": to_nested_dict(self.params),
            "opt_state": to_nested_dict(self.opt_state),
            "rest": to_nested_dict(self.rest),
            "step": np.asarray(step, np.int64),
            "opt_steps": np.asarray(self.opt_steps, np.int64),
        }

    def load_checkpoint_state(self, state: Mapping) -> int:
        """Load a restored checkpoint dict (from `checkpoint_state`'s layout); returns the loop step."""
        self.params = from_nested_dict(state["params"], self.params)
        self.opt_state = from_nested_dict(state["opt_state"], self.opt_state)
        self.rest = from_nested_dict(state["rest"], self.rest)
        self.opt_steps = int(np.asarray(state["opt_steps"]))
        return int(np.asarray(state["step"]))
