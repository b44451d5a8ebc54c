"""The one training loop shared by the classifier, SFT and GRPO.

`train(...)` drives a `Trainer` (train/trainer.py: sharded state + one jitted update): per step it pulls a
batch, runs the step (or a custom `step_fn`, e.g. GRPO's rollout + inner updates), logs every step to
`metrics.jsonl` + TensorBoard + a tqdm bar with tokens/s, runs the eval hook, checkpoints (state +
data-iterator state) every N steps, resumes from the latest checkpoint, saves and returns on SIGTERM or a first Ctrl-C, and stops
on a non-finite loss without overwriting the last good checkpoint. `LoopSettings` (config.train as plain
values, built by the job) says how; the optimizer comes from train/optim.py, the metrics log from
train/metrics_log.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from medkr_jax import host_memory, parallel
from medkr_jax.train.checkpoint import Checkpointer
from medkr_jax.train.metrics_log import MetricsLogger, RunHealth
from medkr_jax.train.optim import OptimizerSettings, make_optimizer, make_schedule
from medkr_jax.train.trainer import LossFn, Trainer


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


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How `train` runs: config.train (and config.seed) as plain values; the job builds it."""

    steps: int
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0          # 0 = only at the end
    checkpoint_every: int = 0    # 0 = only at the end
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    resume: bool = True
    tensorboard: bool = True


class _Preemption:
    """SIGTERM (TPU/VM preemption) or a first Ctrl-C (SIGINT) -> set a flag; the loop checkpoints and returns
    after the current step. A second Ctrl-C interrupts at once (the default handler is back after the first)."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # started with Ctrl-C ignored (e.g. in the background): keep it so
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT) or signal.default_int_handler)
            print("\n[medkr_jax] Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop "
                  "at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            if previous is not None:  # None: a handler installed outside Python, which cannot be restored
                signal.signal(sig, previous)


def _data_state(batches: Any) -> Any:
    return batches.get_state() if hasattr(batches, "get_state") else None


def _no_loss(model, batch, rng):
    raise ValueError("this run was given a step_fn without a loss_fn; trainer.update needs a loss_fn")


def default_step_fn(trainer: Trainer, batch: Any, rng: jax.Array) -> dict:
    return trainer.update(batch, rng)


StepFn = Callable[[Trainer, Any, jax.Array], Mapping[str, Any]]


@dataclasses.dataclass
class _Run:
    """What one `train` call carries from step to step."""

    trainer: Trainer
    ckpt: Checkpointer
    logger: MetricsLogger
    steps: int
    start: int
    output_dir: str
    desc: str
    step: int = 0
    bar: Any = None
    last: dict = dataclasses.field(default_factory=dict)
    health: RunHealth = dataclasses.field(default_factory=RunHealth)
    total_tokens: float = 0.0
    preempted: bool = False
    preempted_by: str = ""    # the signal that stopped the run: "SIGTERM" or "SIGINT"
    stop_reason: str | None = None

    def save(self, batches: Any) -> None:
        self.ckpt.save(self.step, self.trainer.checkpoint_state(self.step), data_state=_data_state(batches),
                       force=True)


def _check_steps(steps: int, desc: str) -> int:
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"{desc}: {steps} training steps (config.train.steps, or sft.epochs when set): nothing would "
                         "be trained, and the job would go on to export or score the untrained model; set "
                         "config.train.steps >= 1")
    return steps


def _make_trainer(model: nnx.Module, loss_fn: LossFn | None, step_fn: StepFn | None, optimizer: OptimizerSettings,
                  tx: optax.GradientTransformation | None, schedule: optax.Schedule | None, steps: int,
                  mesh: Mesh, rules: Any) -> tuple[Trainer, StepFn]:
    """The Trainer (optimizer from `optimizer` unless `tx` is given) and the step function to run."""
    if tx is None:
        schedule = make_schedule(optimizer, steps)
        tx = make_optimizer(optimizer, steps)
    if step_fn is None:
        if loss_fn is None:
            raise ValueError("train(): give a loss_fn or a step_fn")
        step_fn = default_step_fn
    trainer = Trainer(model, loss_fn=loss_fn or _no_loss, tx=tx, mesh=mesh, rules=rules,
                      grad_accum=int(optimizer.grad_accum or 1), schedule=schedule)
    return trainer, step_fn


def _open_checkpointer(settings: LoopSettings, output_dir: str) -> Checkpointer:
    every = int(settings.checkpoint_every or 0)
    return Checkpointer(os.path.join(output_dir, "checkpoints"), save_every=every if every > 0 else 10**12,
                        keep=int(settings.keep_checkpoints), async_save=bool(settings.async_checkpoint))


def _restore(trainer: Trainer, ckpt: Checkpointer, settings: LoopSettings, batches: Any) -> int:
    """Load the latest checkpoint (state + data-iterator position) when resuming; returns the loop step."""
    restored = None
    if bool(settings.resume):
        restored = ckpt.restore(None, trainer.checkpoint_state(0))
    elif ckpt.latest_step() is not None:
        ckpt.close()
        raise ValueError(
            f"config.train.resume=False but {ckpt.directory} already holds checkpoints {ckpt.all_steps()}; "
            f"use a new config.output_dir, or set config.train.resume=True to continue that run")
    if restored is None:
        return 0
    state, data_state = restored
    start = trainer.load_checkpoint_state(state)
    if data_state is not None and hasattr(batches, "set_state"):
        batches.set_state(data_state)
    return start


def _run_step(run: _Run, batches: Iterator, step_fn: StepFn, base_rng: jax.Array) -> dict:
    """Pull a batch, run one step, return its metrics as host floats (+ lr, step time, tokens/s, and the host's
    page faults during the step: on CPU, the pages the step touched for the first time, see host_memory)."""
    batch = next(batches)
    faults = host_memory.minor_page_faults()
    t0 = time.perf_counter()
    lr = run.trainer.learning_rate()
    metrics = step_fn(run.trainer, batch, jax.random.fold_in(base_rng, run.step))
    metrics = {k: (v if isinstance(v, (str, bool)) else float(np.asarray(jax.device_get(v))))
               for k, v in metrics.items()}
    dt = time.perf_counter() - t0
    run.step += 1
    metrics["lr"] = lr
    metrics["step_time_s"] = dt
    metrics["host_page_faults"] = host_memory.minor_page_faults() - faults
    if "tokens" in metrics:
        metrics["tokens_per_s"] = metrics["tokens"] / max(dt, 1e-9)
        run.total_tokens += metrics["tokens"]
    return metrics


def _stop_if_diverged(run: _Run, metrics: dict) -> None:
    """A non-finite loss: log the step, keep the last good checkpoint, raise TrainingDiverged."""
    if math.isfinite(metrics.get("loss", 0.0)):
        return
    run.logger.log(run.step, metrics)
    run.ckpt.wait()
    good = run.ckpt.latest_step()
    kept = f"step {good} in {run.ckpt.directory}" if good is not None else "none (no checkpoint saved yet)"
    raise TrainingDiverged(
        f"non-finite loss {metrics['loss']} at step {run.step} ({run.output_dir}); stopped without saving "
        f"this state; last good checkpoint: {kept}. Lower "
        f"config.optimizer.learning_rate or raise config.optimizer.warmup_steps, then rerun.")


def _evaluate(run: _Run, eval_fn: Callable, metrics: dict) -> None:
    """The eval hook's metrics into the step's ("eval/" prefix); a StopTraining records the stop."""
    try:
        ev = eval_fn(run.trainer.model(), run.step)
    except StopTraining as stop:
        ev, run.stop_reason = stop.metrics, stop.reason
        metrics["early_stopped"] = True
    metrics.update({f"eval/{k}": v for k, v in ev.items()})


def _show_progress(run: _Run, metrics: dict) -> None:
    if run.bar is None:
        return
    post = {"loss": f"{metrics['loss']:.4g}" if "loss" in metrics else ""}
    if "tokens_per_s" in metrics:
        post["tok/s"] = f"{metrics['tokens_per_s']:.3g}"
    run.bar.set_postfix(post, refresh=False)
    run.bar.update(1)


def _say(run: _Run, message: str | None) -> None:
    """A warning the run's health watch raised during the run, printed at once (main process only)."""
    if message is None or not parallel.is_main_process():
        return
    line = f"WARNING [{run.desc}]: {message}"
    if run.bar is not None:
        run.bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def _steps_until_done(run: _Run, batches: Iterator, step_fn: StepFn, eval_fn: Callable | None,
                      base_rng: jax.Array, settings: LoopSettings) -> None:
    """Steps until run.steps, an early stop or a SIGTERM (each of the last two saves and ends the loop)."""
    eval_every = int(settings.eval_every or 0)
    log_every = max(1, int(settings.log_every or 1))
    with _Preemption() as preempt:
        while run.step < run.steps:
            metrics = _run_step(run, batches, step_fn, base_rng)
            _stop_if_diverged(run, metrics)
            _say(run, run.health.observe(run.step, metrics))
            evaluated = eval_every > 0 and run.step % eval_every == 0 and eval_fn is not None and run.step < run.steps
            if evaluated:
                _evaluate(run, eval_fn, metrics)
            if run.step % log_every == 0 or run.step == run.steps or evaluated or preempt.requested:
                run.logger.log(run.step, metrics)
            run.last = metrics
            _show_progress(run, metrics)
            if run.ckpt.should_save(run.step) or preempt.requested or run.stop_reason is not None:
                run.save(batches)
            if run.stop_reason is not None:
                if run.bar is not None:
                    run.bar.write(f"{run.desc}: stopped early at step {run.step}: {run.stop_reason}")
                return
            if preempt.requested:
                run.preempted = True
                run.preempted_by = preempt.signal_name
                return


def _finish(run: _Run, batches: Any, eval_fn: Callable | None) -> None:
    """After the last step: the final evaluation, then the final checkpoint (unless it already exists)."""
    if eval_fn is not None:
        ev = {f"eval/{k}": v for k, v in eval_fn(run.trainer.model(), run.step).items()}
        if ev:
            run.logger.log(run.step, ev)
            run.last.update(ev)
    if run.step > run.start or run.ckpt.latest_step() != run.step:
        run.save(batches)


def _summary(run: _Run, wall: float, learning_rate: Any) -> dict:
    warnings = run.health.warnings(lr=learning_rate)
    for w in warnings if parallel.is_main_process() else ():
        print(f"WARNING [{run.desc}]: {w}", file=sys.stderr, flush=True)
    return {
        "steps": run.step,
        "start_step": run.start,
        "resumed": run.start > 0,
        "preempted": run.preempted,
        "preempted_by": run.preempted_by,
        "early_stopped": run.stop_reason is not None,
        "stop_reason": run.stop_reason,
        "final_loss": run.last.get("loss"),
        "last_metrics": run.last,
        "tokens_per_s": run.total_tokens / wall if run.total_tokens else None,
        "wall_s": wall,
        "checkpoint_dir": os.path.join(run.output_dir, "checkpoints"),
        "metrics_path": os.path.join(run.output_dir, "metrics.jsonl"),
        "warnings": warnings,
    }


def train(model: nnx.Module, *, loss_fn: LossFn | None, batches: Iterator, settings: LoopSettings,
          optimizer: OptimizerSettings, output_dir: str, mesh: Mesh, rules: Any = None,
          tx: optax.GradientTransformation | None = None, schedule: optax.Schedule | None = None,
          step_fn: StepFn | None = None, eval_fn: Callable[[nnx.Module, int], Mapping[str, Any]] | None = None,
          on_trainer: Callable[[Trainer], None] | None = None, desc: str = "train") -> dict:
    """Train `model` for settings.steps loop steps; resumable; returns a summary.

    batches: iterator of host batches (dicts of arrays with a leading batch dim). With get_state()/set_state()
      (grain iterators) its position is checkpointed and restored.
    step_fn(trainer, batch, rng) -> metrics: one loop step; default = one `trainer.update`. GRPO passes its
      rollout + inner updates here (it may call trainer.update several times and uses trainer.model()).
    eval_fn(model, step) -> metrics: run every settings.eval_every steps and at the end ("eval/" prefix);
      it may raise StopTraining(reason, metrics) to end the run after this step (early stopping).
    tx/schedule: default make_optimizer(optimizer, steps); optimizer.grad_accum always sets the accumulation.
    on_trainer: called once with the Trainer after restore (e.g. to grab a reference copy of the params).
    The final model state is written back into `model` (nnx.update) before returning.
    """
    steps = _check_steps(settings.steps, desc)
    trainer, step_fn = _make_trainer(model, loss_fn, step_fn, optimizer, tx, schedule, steps, mesh, rules)
    ckpt = _open_checkpointer(settings, output_dir)
    start = _restore(trainer, ckpt, settings, batches)
    if on_trainer is not None:
        on_trainer(trainer)
    logger = MetricsLogger(output_dir, start_step=start, tensorboard=bool(settings.tensorboard))
    run = _Run(trainer, ckpt, logger, steps=steps, start=start, output_dir=output_dir, desc=desc, step=start)
    base_rng = jax.random.key(int(settings.seed))
    t_start = time.perf_counter()
    if parallel.is_main_process():
        run.bar = tqdm(total=steps, initial=start, desc=desc, dynamic_ncols=True, disable=None)
    try:
        _steps_until_done(run, batches, step_fn, eval_fn, base_rng, settings)
        if not run.preempted and run.stop_reason is None:
            _finish(run, batches, eval_fn)
    finally:
        ckpt.close()
        logger.close()
        if run.bar is not None:
            run.bar.close()
    nnx.update(model, trainer.params, trainer.rest)
    return _summary(run, time.perf_counter() - t_start, optimizer.learning_rate)
