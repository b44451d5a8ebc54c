"""The one training loop shared by the classifier, SFT and GRPO.

Two layers:

* `Trainer` holds the sharded training state (params, optimizer state, the model's non-parameter state such
  as dropout RNG counters) and one jitted update with explicit in/out shardings: params are placed by their
  logical axis names (config.sharding_rules), the batch is split over the "batch" mesh axes, and gradient
  accumulation runs inside the step as a `lax.scan` over micro-batches (one call = one optimizer update).
* `train(...)` drives it: per step it pulls a batch, runs the step (or a custom `step_fn`, e.g. GRPO's
  rollout + inner updates), logs every step to `metrics.jsonl` + TensorBoard + a tqdm bar with tokens/s,
  runs the eval hook, checkpoints (state + data-iterator state) every N steps, resumes from the latest
  checkpoint, saves and returns on SIGTERM, and stops on a non-finite loss without overwriting the last
  good checkpoint.

Loss functions have the signature `loss_fn(model, batch, rng) -> (loss, aux)` where `aux` is a dict of
scalars. Two aux keys are special: "weight" (the loss's normaliser, e.g. the number of target tokens; used to
weight micro-batches so accumulation equals one big batch; default 1) and "tokens" (summed; drives tokens/s).
All other aux entries are averaged over micro-batches with those weights.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medkr_jax import parallel, xla_options

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict]]
SUMMED_AUX = ("weight", "tokens")


class StopTraining(Exception):
    """Raised by an eval_fn to end the run after the current step (early stopping).

    The loop logs `metrics` (as the step's eval metrics), saves a checkpoint of that step and returns with
    `early_stopped=True` and `stop_reason`; nothing is lost and no private exception crosses the loop.
    """

    def __init__(self, reason: str, metrics: Mapping[str, Any] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.metrics = dict(metrics or {})


class TrainingDiverged(FloatingPointError):
    """The loss became NaN/inf; the run stopped and the last good checkpoint was kept."""


# --------------------------------------------------------------------------------------------- optimizer


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    try:
        return cfg.get(key, default)  # ConfigDict
    except AttributeError:
        return getattr(cfg, key, default)


def make_schedule(opt_cfg: Any, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule from config.optimizer: linear warmup then cosine / linear / constant."""
    lr = float(_get(opt_cfg, "learning_rate", 1e-4))
    warmup = int(_get(opt_cfg, "warmup_steps", 0))
    kind = str(_get(opt_cfg, "schedule", "cosine"))
    end = lr * float(_get(opt_cfg, "min_lr_ratio", 0.0))
    total = max(int(total_steps), warmup + 1)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, total, end)
    if kind == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, end, total - warmup)], [warmup])
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                    [warmup])
    raise ValueError(f"config.optimizer.schedule: expected 'cosine', 'linear' or 'constant', got {kind!r}")


# Parameters whose lower-cased dotted path matches one of these get no weight decay: biases and
# LayerNorm/RMSNorm parameters, the patterns of transformers.Trainer.get_decay_parameter_names (embeddings and
# kernels are decayed, as there). By name, not rank: with stacked layers (scan_layers) a norm scale is
# [layers, hidden], i.e. rank 2.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def param_path(path: Sequence[Any]) -> str:
    """The dotted name of a parameter from its pytree key path (NNX's trailing `.value` dropped)."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return ".".join(_key_name(k) for k in keys)


def make_decay_mask(patterns: Sequence[str] = NO_DECAY_PATTERNS) -> Callable[[Any], Any]:
    """An optax `mask` function: True (decay) for each parameter whose dotted path matches none of `patterns`
    (regular expressions, searched in the lower-cased path)."""
    compiled = [re.compile(p) for p in patterns]

    def mask(params: Any) -> Any:
        def decay(path, _):
            name = param_path(path).lower()
            return not any(p.search(name) for p in compiled)
        return jax.tree_util.tree_map_with_path(decay, params)

    return mask


def make_optimizer(opt_cfg: Any, total_steps: int) -> optax.GradientTransformation:
    """AdamW with warmup + schedule and global-norm clipping, from config.optimizer.

    Weight decay skips biases and norm parameters by name (`NO_DECAY_PATTERNS`, or the optional
    config.optimizer.no_decay_patterns), whatever the layout of the layers.

    Gradient accumulation (config.optimizer.grad_accum) is not part of the transformation: `Trainer` scans
    over micro-batches inside one jitted step, so one optimizer update = one loop step.
    """
    schedule = make_schedule(opt_cfg, total_steps)
    parts = []
    clip = float(_get(opt_cfg, "grad_clip", 0.0) or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(
        schedule,
        b1=float(_get(opt_cfg, "b1", 0.9)),
        b2=float(_get(opt_cfg, "b2", 0.999)),
        eps=float(_get(opt_cfg, "eps", 1e-8)),
        weight_decay=float(_get(opt_cfg, "weight_decay", 0.0)),
        mask=make_decay_mask(tuple(_get(opt_cfg, "no_decay_patterns", None) or NO_DECAY_PATTERNS)),
    ))
    return optax.chain(*parts)


# ------------------------------------------------------------------------------------- state <-> nested dict


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def to_nested_dict(tree: Any) -> dict:
    """Any pytree as nested dicts of its leaves, keyed by path (what orbax stores, readable on disk)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        names = [_key_name(k) for k in path] or ["value"]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def from_nested_dict(nested: Mapping, like: Any) -> Any:
    """Inverse of `to_nested_dict`, rebuilding the structure of `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node: Any = nested
        names = [_key_name(k) for k in path] or ["value"]
        for name in names:
            node = node[name]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ------------------------------------------------------------------------------------------------ trainer


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class Trainer:
    """Sharded train state + jitted update step for an NNX model.

    The model is split into (graphdef, params, rest): params (nnx.Param) are trained, `rest` (RNG counters,
    batch stats ...) is carried through the step. `model()` returns a live view on the current state, for
    sampling or evaluation; the arrays of an older view are donated (invalid) after the next `update`.
    """

    def __init__(self, model: nnx.Module, *, loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                 rules: Any = None, grad_accum: int = 1, schedule: optax.Schedule | None = None):
        if grad_accum < 1:
            raise ValueError(f"config.optimizer.grad_accum must be >= 1, got {grad_accum}")
        self.mesh = mesh
        self.rules = parallel.logical_rules(rules)
        self.loss_fn = loss_fn
        self.tx = tx
        self.schedule = schedule
        self.grad_accum = int(grad_accum)
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        repl = parallel.replicated(mesh)
        self.param_shardings = parallel.state_logical_shardings(params, mesh, self.rules)
        self.rest_shardings = jax.tree.map(lambda _: repl, rest)
        self.params = jax.device_put(params, self.param_shardings)
        self.rest = jax.device_put(rest, self.rest_shardings)
        abstract_opt = jax.eval_shape(tx.init, self.params)
        self.opt_shardings = optax.tree_map_params(
            tx, lambda _, s: s, abstract_opt, self.param_shardings, transform_non_params=lambda _: repl)
        self.opt_state = jax.jit(tx.init, out_shardings=self.opt_shardings)(self.params)
        self.opt_steps = 0
        batch_axes = dict(self.rules).get("batch", parallel.BATCH_AXES)
        self._batch_axes = batch_axes
        self._flat_sharding = NamedSharding(mesh, P(batch_axes))
        spec = P(None, batch_axes) if self.grad_accum > 1 else P(batch_axes)
        self.batch_sharding = NamedSharding(mesh, spec)
        k = self.grad_accum
        # micro-batch i = rows [i*B/k, (i+1)*B/k) of the global batch
        self._split_micro = jax.jit(
            lambda t: jax.tree.map(lambda a: a.reshape((k, a.shape[0] // k) + a.shape[1:]), t),
            out_shardings=self.batch_sharding)
        self._update = jax.jit(
            self._update_impl,
            in_shardings=(self.param_shardings, self.opt_shardings, self.rest_shardings, self.batch_sharding,
                          repl),
            out_shardings=(self.param_shardings, self.opt_shardings, self.rest_shardings, repl),
            donate_argnums=(0, 1, 2),
            compiler_options=xla_options.dense_program_options(),
        )

    # -- model views ---------------------------------------------------------------------------------------

    def model(self) -> nnx.Module:
        """A module on the current params (shares arrays; do not keep it across `update`)."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    def learning_rate(self) -> float:
        return float(self.schedule(self.opt_steps)) if self.schedule is not None else float("nan")

    # -- the step --------------------------------------------------------------------------------------------

    def _loss_and_grad(self, params, rest, batch, rng):
        def f(p, r):
            model = nnx.merge(self.graphdef, p, r)
            loss, aux = self.loss_fn(model, batch, rng)
            new_rest = nnx.split(model, nnx.Param, ...)[2]
            return loss, (dict(aux), new_rest)

        (loss, (aux, new_rest)), grads = jax.value_and_grad(f, has_aux=True)(params, rest)
        weight = jnp.asarray(aux.pop("weight", 1.0), jnp.float32)
        return loss.astype(jnp.float32), weight, aux, new_rest, grads

    def _update_impl(self, params, opt_state, rest, batch, rng):
        if self.grad_accum == 1:
            loss, weight, aux, rest, grads = self._loss_and_grad(params, rest, batch, rng)
            aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
        else:
            # Micro-batches weighted by their loss normaliser: the accumulated gradient equals the gradient of
            # the whole batch's loss (e.g. token-mean over all tokens), not a mean of per-micro-batch means.
            def body(carry, xs):
                g_acc, l_acc, w_acc, a_acc, rest = carry
                mb, i = xs
                loss, w, aux, rest, g = self._loss_and_grad(params, rest, mb, jax.random.fold_in(rng, i))
                g_acc = jax.tree.map(lambda a, b: a + w * b, g_acc, g)
                a_acc = {k: a_acc[k] + (jnp.asarray(aux[k], jnp.float32) * (1.0 if k in SUMMED_AUX else w))
                         for k in a_acc}
                return (g_acc, l_acc + w * loss, w_acc + w, a_acc, rest), None

            first = jax.tree.map(lambda x: x[0], batch)
            aux_shape = jax.eval_shape(lambda: self._loss_and_grad(params, rest, first, rng)[2])
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
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "update_ratio": update_ratio,
                   "weight": weight, **aux}
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
                x = jax.device_put(x, self._flat_sharding)
            else:
                x = np.asarray(x)
                if x.ndim == 0:
                    raise ValueError("every batch entry needs a leading batch dimension; got a scalar")
                x = jax.make_array_from_process_local_data(self._flat_sharding, x)
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
            self.params, self.opt_state, self.rest, batch, rng)
        self.opt_steps += 1
        return metrics

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


# ---------------------------------------------------------------------------------------------------- logging


class MetricsLogger:
    """metrics.jsonl + TensorBoard events in the run dir (main process only)."""

    def __init__(self, output_dir: str, *, start_step: int = 0, tensorboard: bool = True):
        self.enabled = parallel.is_main_process()
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        # On resume, drop lines past the restored step so the file is one clean curve.
        if os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if int(rec.get("step", 0)) <= start_step:
                        kept.append(json.dumps(rec))
            with open(self.path, "w") as f:
                f.write("".join(k + "\n" for k in kept))
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(output_dir, "tb"), purge_step=start_step + 1)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": time.time()}
        for k, v in metrics.items():
            rec[k] = v if isinstance(v, (str, bool)) or v is None else float(v)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str) -> list[dict]:
    """All records of a run's metrics.jsonl."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------------ loop


class _Preemption:
    """SIGTERM (TPU/VM preemption) -> set a flag; the loop checkpoints and returns after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _data_state(batches: Any) -> Any:
    return batches.get_state() if hasattr(batches, "get_state") else None


def _no_loss(model, batch, rng):
    raise ValueError("this run was given a step_fn without a loss_fn; trainer.update needs a loss_fn")


def default_step_fn(trainer: Trainer, batch: Any, rng: jax.Array) -> dict:
    return trainer.update(batch, rng)


StepFn = Callable[[Trainer, Any, jax.Array], Mapping[str, Any]]


# A step whose update is this many times the norm of the weights it updates (update_ratio =
# ||delta theta|| / ||theta||) is no training step: fine-tuning moves weights by ~1e-4..1e-2 of their norm per
# step and even a from-scratch tiny model at a high learning rate stays below ~0.5 (Adam's step is bounded by
# lr per coordinate), so healthy runs sit orders of magnitude below. At learning_rate=1e6 it is ~1e5.
UPDATE_RATIO_LIMIT = 10.0
# "the loss did not move": first and last loss within this fraction of each other (healthy runs that are
# long enough to matter move their loss by far more than 1%).
FLAT_LOSS_RTOL = 0.01


class _Health:
    """Watches the per-step loss and update_ratio; says what is wrong with a run that finished but did not
    train (update norm exploded, loss flat), so it does not end with exit code 0 and no word."""

    def __init__(self):
        self.first_loss = self.last_loss = None
        self.max_ratio, self.max_ratio_step = 0.0, None

    def observe(self, step: int, metrics: Mapping[str, Any]) -> None:
        loss, ratio = metrics.get("loss"), metrics.get("update_ratio")
        if isinstance(loss, float):
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
        if isinstance(ratio, float) and math.isfinite(ratio) and ratio > self.max_ratio:
            self.max_ratio, self.max_ratio_step = ratio, step

    def warnings(self, *, lr: Any = None) -> list[str]:
        if self.max_ratio <= UPDATE_RATIO_LIMIT:
            return []
        first, last = self.first_loss, self.last_loss
        flat = first is not None and abs(last - first) <= FLAT_LOSS_RTOL * max(abs(first), 1e-12)
        loss = (f"the loss did not move ({first:.6g} -> {last:.6g})" if flat else
                f"the loss went {first:.6g} -> {last:.6g}" if first is not None else "no loss was logged")
        return [f"the run did not train: update_ratio (||delta theta|| / ||theta||) reached {self.max_ratio:.3g} at "
                f"step {self.max_ratio_step} (healthy runs stay far below {UPDATE_RATIO_LIMIT:g}) and {loss}; "
                f"config.optimizer.learning_rate={lr} is far too high"]


def train(model: nnx.Module, *, loss_fn: LossFn | None, batches: Iterator, config: Any, output_dir: str,
          mesh: Mesh, rules: Any = None, steps: int | None = None, tx: optax.GradientTransformation | None = None,
          schedule: optax.Schedule | None = None, step_fn: StepFn | None = None,
          eval_fn: Callable[[nnx.Module, int], Mapping[str, Any]] | None = None,
          on_trainer: Callable[[Trainer], None] | None = None, desc: str = "train") -> dict:
    """Train `model` for `steps` (default config.train.steps) loop steps; resumable; returns a summary.

    batches: iterator of host batches (dicts of arrays with a leading batch dim). With get_state()/set_state()
      (grain iterators) its position is checkpointed and restored.
    step_fn(trainer, batch, rng) -> metrics: one loop step; default = one `trainer.update`. GRPO passes its
      rollout + inner updates here (it may call trainer.update several times and uses trainer.model()).
    eval_fn(model, step) -> metrics: run every config.train.eval_every steps and at the end ("eval/" prefix);
      it may raise StopTraining(reason, metrics) to end the run after this step (early stopping).
    tx/schedule: default make_optimizer(config.optimizer, steps).
    on_trainer: called once with the Trainer after restore (e.g. to grab a reference copy of the params).
    The final model state is written back into `model` (nnx.update) before returning.
    """
    from medkr_jax.train.checkpoint import Checkpointer

    tcfg = config.train
    steps = int(steps if steps is not None else tcfg.steps)
    if steps < 1:
        raise ValueError(f"{desc}: {steps} training steps (config.train.steps, or sft.epochs when set): nothing would "
                         "be trained, and the job would go on to export or score the untrained model; set "
                         "config.train.steps >= 1")
    seed = int(_get(config, "seed", 0))
    opt_cfg = _get(config, "optimizer")
    if tx is None:
        schedule = make_schedule(opt_cfg, steps)
        tx = make_optimizer(opt_cfg, steps)
    if step_fn is None:
        if loss_fn is None:
            raise ValueError("train(): give a loss_fn or a step_fn")
        step_fn = default_step_fn
    trainer = Trainer(model, loss_fn=loss_fn or _no_loss, tx=tx, mesh=mesh, rules=rules,
                      grad_accum=int(_get(opt_cfg, "grad_accum", 1) or 1), schedule=schedule)
    ckpt_every = int(_get(tcfg, "checkpoint_every", 0) or 0)
    ckpt = Checkpointer(os.path.join(output_dir, "checkpoints"), save_every=ckpt_every if ckpt_every > 0 else 10**12,
                        keep=int(_get(tcfg, "keep_checkpoints", 3)),
                        async_save=bool(_get(tcfg, "async_checkpoint", True)))
    start = 0
    restored = None
    if bool(_get(tcfg, "resume", True)):
        restored = ckpt.restore(None, trainer.checkpoint_state(0))
    elif ckpt.latest_step() is not None:
        ckpt.close()
        raise ValueError(
            f"config.train.resume=False but {ckpt.directory} already holds checkpoints {ckpt.all_steps()}; "
            f"use a new config.output_dir, or set config.train.resume=True to continue that run")
    if restored is not None:
        state, data_state = restored
        start = trainer.load_checkpoint_state(state)
        if data_state is not None and hasattr(batches, "set_state"):
            batches.set_state(data_state)
    if on_trainer is not None:
        on_trainer(trainer)
    logger = MetricsLogger(output_dir, start_step=start, tensorboard=bool(_get(tcfg, "tensorboard", True)))
    eval_every = int(_get(tcfg, "eval_every", 0) or 0)
    log_every = max(1, int(_get(tcfg, "log_every", 1) or 1))
    base_rng = jax.random.key(seed)
    last: dict = {}
    health = _Health()
    preempted = False
    stop_reason: str | None = None
    t_start = time.perf_counter()
    total_tokens = 0.0
    step = start
    bar = None
    if parallel.is_main_process():
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc=desc, dynamic_ncols=True, disable=None)
    try:
        with _Preemption() as preempt:
            while step < steps:
                batch = next(batches)
                t0 = time.perf_counter()
                lr = trainer.learning_rate()
                metrics = step_fn(trainer, batch, jax.random.fold_in(base_rng, step))
                metrics = {k: (v if isinstance(v, (str, bool)) else float(np.asarray(jax.device_get(v))))
                           for k, v in metrics.items()}
                dt = time.perf_counter() - t0
                step += 1
                metrics["lr"] = lr
                metrics["step_time_s"] = dt
                if "tokens" in metrics:
                    metrics["tokens_per_s"] = metrics["tokens"] / max(dt, 1e-9)
                    total_tokens += metrics["tokens"]
                if not math.isfinite(metrics.get("loss", 0.0)):
                    logger.log(step, metrics)
                    ckpt.wait()
                    good = ckpt.latest_step()
                    kept = f"step {good} in {ckpt.directory}" if good is not None else "none (no checkpoint saved yet)"
                    raise TrainingDiverged(
                        f"non-finite loss {metrics['loss']} at step {step} ({output_dir}); stopped without saving "
                        f"this state; last good checkpoint: {kept}. Lower "
                        f"config.optimizer.learning_rate or raise config.optimizer.warmup_steps, then rerun.")
                health.observe(step, metrics)
                evaluated = eval_every > 0 and step % eval_every == 0 and eval_fn is not None and step < steps
                if evaluated:
                    try:
                        ev = eval_fn(trainer.model(), step)
                    except StopTraining as stop:
                        ev, stop_reason = stop.metrics, stop.reason
                        metrics["early_stopped"] = True
                    metrics.update({f"eval/{k}": v for k, v in ev.items()})
                if step % log_every == 0 or step == steps or evaluated or preempt.requested:
                    logger.log(step, metrics)
                last = metrics
                if bar is not None:
                    post = {"loss": f"{metrics['loss']:.4g}" if "loss" in metrics else ""}
                    if "tokens_per_s" in metrics:
                        post["tok/s"] = f"{metrics['tokens_per_s']:.3g}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if ckpt.should_save(step) or preempt.requested or stop_reason is not None:
                    ckpt.save(step, trainer.checkpoint_state(step), data_state=_data_state(batches), force=True)
                if stop_reason is not None:
                    if bar is not None:
                        bar.write(f"{desc}: stopped early at step {step}: {stop_reason}")
                    break
                if preempt.requested:
                    preempted = True
                    break
        if not preempted and stop_reason is None:
            if eval_fn is not None:
                ev = {f"eval/{k}": v for k, v in eval_fn(trainer.model(), step).items()}
                if ev:
                    logger.log(step, ev)
                    last.update(ev)
            if step > start or ckpt.latest_step() != step:
                ckpt.save(step, trainer.checkpoint_state(step), data_state=_data_state(batches), force=True)
    finally:
        ckpt.close()
        logger.close()
        if bar is not None:
            bar.close()
    nnx.update(model, trainer.params, trainer.rest)
    wall = time.perf_counter() - t_start
    warnings = health.warnings(lr=_get(opt_cfg, "learning_rate"))
    for w in warnings if parallel.is_main_process() else ():
        print(f"WARNING [{desc}]: {w}", file=sys.stderr, flush=True)
    return {
        "steps": step,
        "start_step": start,
        "resumed": start > 0,
        "preempted": preempted,
        "early_stopped": stop_reason is not None,
        "stop_reason": stop_reason,
        "final_loss": last.get("loss"),
        "last_metrics": last,
        "tokens_per_s": total_tokens / wall if total_tokens else None,
        "wall_s": wall,
        "checkpoint_dir": os.path.join(output_dir, "checkpoints"),
        "metrics_path": os.path.join(output_dir, "metrics.jsonl"),
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------------------------------- report


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(output_dir: str, title: str, summary: Mapping[str, Any], *,
                 extra_rows: Sequence[tuple[str, Any]] = (),
                 plots: Sequence[tuple[str, str]] = (("loss", "loss.png"),)) -> str | None:
    """report.md (a summary table + the last metrics) and PNG curves of metrics.jsonl keys; main process only."""
    if not parallel.is_main_process():
        return None
    recs = read_metrics(output_dir) if os.path.exists(os.path.join(output_dir, "metrics.jsonl")) else []
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    for k in ("steps", "start_step", "preempted", "final_loss", "tokens_per_s", "wall_s", "export_dir"):
        if summary.get(k) is not None:
            lines.append(f"| {k} | {_fmt_value(summary[k])} |")
    for k, v in extra_rows:
        lines.append(f"| {k} | {_fmt_value(v)} |")
    lines += [f"\n**Warning:** {w}" for w in summary.get("warnings") or ()]
    last = summary.get("last_metrics") or {}
    if last:
        lines += ["", "## Last step", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt_value(v)} |" for k, v in sorted(last.items())]
    made = []
    if recs:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        for key, fname in plots:
            pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(*zip(*pts))
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.set_title(f"{title}: {key}")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(os.path.join(output_dir, fname), dpi=100)
            plt.close(fig)
            made.append((key, fname))
    if made:
        lines += ["", "## Curves", ""] + [f"![{k}]({f})" for k, f in made]
    path = os.path.join(output_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
