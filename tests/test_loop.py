"""The shared training loop: optimizer, accumulation, logging, resume, SIGTERM, NaN stop, sharding."""

import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from medkr_jax import parallel
from medkr_jax.models.hf import one_device_mesh
from medkr_jax.train import loop
from medkr_jax.train.metrics_log import UPDATE_RATIO_LIMIT, RunHealth, read_metrics
from medkr_jax.train.optim import OptimizerSettings, make_optimizer, make_schedule, param_path
from medkr_jax.train.trainer import Trainer


class MLP(nnx.Module):
    """Tiny model whose kernels carry logical axes, so fsdp x tensor meshes really shard them."""

    def __init__(self, rngs: nnx.Rngs, din: int = 8, hidden: int = 16, dout: int = 4):
        init = nnx.initializers.lecun_normal()
        self.l1 = nnx.Linear(din, hidden, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
        self.l2 = nnx.Linear(hidden, dout, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.gelu(self.l1(x)))


def mse_loss(model, batch, rng):
    """Masked squared error with a per-example weight: a stand-in for token-level losses."""
    err = ((model(batch["x"]) - batch["y"]) ** 2).mean(-1)
    n = batch["mask"].sum()
    return (err * batch["mask"]).sum() / jnp.maximum(n, 1.0), {"weight": n, "tokens": n}


class Batches:
    """Deterministic checkpointable iterator (the grain iterator protocol: get_state/set_state)."""

    def __init__(self, n_batches=64, batch=8, seed=0, nan_at=None):
        rng = np.random.default_rng(seed)
        w = rng.normal(size=(8, 4))
        self.data = []
        for i in range(n_batches):
            x = rng.normal(size=(batch, 8)).astype(np.float32)
            y = np.tanh(x @ w).astype(np.float32)
            mask = (rng.random(batch) < 0.8).astype(np.float32)
            mask[0] = 1.0
            if nan_at is not None and i >= nan_at:
                x[:] = np.nan
            self.data.append({"x": x, "y": y, "mask": mask})
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        b = self.data[self.i % len(self.data)]
        self.i += 1
        return b

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = int(s["i"])


def make_config(steps=6, checkpoint_every=2, grad_accum=1, lr=5e-2, warmup_steps=2, **loop_settings):
    """loop.train's settings and optimizer keyword arguments."""
    optimizer = OptimizerSettings(learning_rate=lr, warmup_steps=warmup_steps, weight_decay=0.01, b1=0.9, b2=0.99,
                                  eps=1e-8, grad_clip=1.0, grad_accum=grad_accum, schedule="cosine")
    settings = loop.LoopSettings(**{"steps": steps, "seed": 0, "log_every": 1, "eval_every": 0,
                                    "checkpoint_every": checkpoint_every, "keep_checkpoints": 3, **loop_settings})
    return {"settings": settings, "optimizer": optimizer}


def make_model(mesh, seed=0):
    with parallel.sharding_context(mesh):
        return MLP(nnx.Rngs(seed))


def test_schedule_and_optimizer_match_formula():
    opt = OptimizerSettings(learning_rate=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    sched = make_schedule(opt, 110)
    assert float(sched(0)) == pytest.approx(0.0)
    assert float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    # cosine from peak to 0.1*peak over the remaining 100 steps
    t = 50 / 100
    assert float(sched(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * t)), rel=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        make_schedule(OptimizerSettings(schedule="bogus"), 10)
    # clipping: a huge gradient produces an update of at most lr (Adam's normalised step) on each entry
    tx = make_optimizer(OptimizerSettings(learning_rate=0.1, warmup_steps=0, schedule="constant", grad_clip=1.0,
                                          weight_decay=0.0), 10)
    p = {"w": jnp.ones((2, 2))}
    upd, _ = tx.update({"w": jnp.full((2, 2), 1e6)}, tx.init(p), p)
    assert np.allclose(np.abs(upd["w"]), 0.1, rtol=1e-4)


def test_grad_accumulation_equals_full_batch():
    """Token-weighted micro-batches: 4 accumulated micro-batches == one batch, despite unequal masks."""
    mesh = one_device_mesh()
    batch = Batches(n_batches=1, batch=8).data[0]
    batch["mask"] = np.array([1, 1, 1, 0, 1, 0, 0, 1], np.float32)
    results = []
    for k in (1, 4):
        model = make_model(mesh)
        tx = optax.sgd(0.1)
        tr = Trainer(model, loss_fn=mse_loss, tx=tx, mesh=mesh, grad_accum=k)
        m = tr.update(batch, jax.random.key(0))
        results.append((float(m["loss"]), float(m["tokens"]), jax.tree.map(np.asarray, nnx.to_pure_dict(tr.params))))
    (l1, t1, p1), (l4, t4, p4) = results
    assert l1 == pytest.approx(l4, rel=1e-5)
    assert t1 == t4 == 5.0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p4)


def test_update_ratio_is_update_norm_over_param_norm():
    """update_ratio = ||delta theta|| / ||theta|| (before the update), by hand for plain SGD: lr * ||g|| / ||theta||."""
    mesh = one_device_mesh()
    batch = Batches(n_batches=1, batch=8).data[0]
    model = make_model(mesh)
    tr = Trainer(model, loss_fn=mse_loss, tx=optax.sgd(0.1), mesh=mesh)
    before = [np.asarray(x, np.float64) for x in jax.tree.leaves(nnx.to_pure_dict(tr.params))]
    m = tr.update(batch, jax.random.key(0))
    after = [np.asarray(x, np.float64) for x in jax.tree.leaves(nnx.to_pure_dict(tr.params))]
    delta = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before)))
    norm = np.sqrt(sum((b ** 2).sum() for b in before))
    assert float(m["update_ratio"]) == pytest.approx(delta / norm, rel=1e-4)
    assert float(m["update_ratio"]) == pytest.approx(0.1 * float(m["grad_norm"]) / norm, rel=1e-4)


def test_update_step_updates_the_donated_weights_in_place(monkeypatch):
    """The compiled step copies none of the weights it overwrites (the metrics' reads of the old weights, unordered
    against the in-place update, made XLA copy every parameter at the start of the step: 39 copies in the benchmark's
    SFT step, 272 in SmolLM2's), and the weights it computes are bit for bit those of the step without the ordering."""
    import medkr_jax.train.trainer as trainer_module

    mesh = one_device_mesh()
    batches = Batches(n_batches=2, batch=8).data
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))

    def run(tr):
        hlo = tr.compiled_update(batches[0], jax.random.key(0)).as_text()
        for b in batches:
            m = tr.update(b, jax.random.key(0))
        return hlo, [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(tr.params))], float(m["update_ratio"])

    hlo, params, ratio = run(Trainer(make_model(mesh), loss_fn=mse_loss, tx=tx, mesh=mesh))
    assert "copy(%params" not in hlo
    monkeypatch.setattr(trainer_module, "_after", lambda params, values: params)
    hlo_unordered, params_unordered, ratio_unordered = run(Trainer(make_model(mesh), loss_fn=mse_loss, tx=tx,
                                                                   mesh=mesh))
    assert "copy(%params" in hlo_unordered  # what the ordering removes, so the check above can fail
    for a, b in zip(params, params_unordered):
        np.testing.assert_array_equal(a, b)
    assert ratio == ratio_unordered


def test_train_logs_learns_and_resumes(tmp_path):
    """Loss drops; metrics.jsonl/TensorBoard written; a second run resumes and matches an uninterrupted run."""
    mesh = one_device_mesh()
    cfg = make_config(steps=8, checkpoint_every=2)
    evals = []
    full = loop.train(make_model(mesh), loss_fn=mse_loss, batches=Batches(), **cfg,
                      output_dir=str(tmp_path / "full"), mesh=mesh,
                      eval_fn=lambda m, s: evals.append(s) or {"n": 1.0})
    recs = read_metrics(str(tmp_path / "full"))
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, 9))
    assert train_recs[-1]["loss"] < 0.6 * train_recs[0]["loss"]
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(train_recs[0])
    assert all(r["host_page_faults"] >= 0 and r["host_page_faults"] == int(r["host_page_faults"]) for r in train_recs)
    assert evals == [8] and recs[-1]["step"] == 8 and recs[-1]["eval/n"] == 1.0 and "loss" not in recs[-1]
    assert os.listdir(tmp_path / "full" / "tb")
    assert full["steps"] == 8 and not full["resumed"]

    # interrupted: the first run dies during step 6 (checkpoints at 2 and 4) -> the restart resumes at 4
    class Crash(Exception):
        pass

    def crashing_step(trainer, batch, rng):
        if trainer.opt_steps == 5:
            raise Crash()
        return trainer.update(batch, rng)

    part = str(tmp_path / "part")
    with pytest.raises(Crash):
        loop.train(make_model(mesh), loss_fn=mse_loss, batches=Batches(), **cfg, output_dir=part, mesh=mesh,
                   step_fn=crashing_step)
    assert [r["step"] for r in read_metrics(part)] == [1, 2, 3, 4, 5]
    s2 = loop.train(make_model(mesh, seed=123), loss_fn=mse_loss, batches=Batches(), **cfg,
                    output_dir=part, mesh=mesh)
    assert s2["resumed"] and s2["start_step"] == 4 and s2["steps"] == 8
    got = [r["loss"] for r in read_metrics(part) if "loss" in r]
    want = [r["loss"] for r in train_recs]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.fixture
def ctrl_c_enabled():
    """Ctrl-C as in a terminal: processes started in the background (CI, `cmd &`) inherit SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_checkpoints_and_returns(tmp_path, sig, capsys, ctrl_c_enabled):
    """SIGTERM (a TPU preemption notice) or a first Ctrl-C: save after this step and return, saying which."""
    mesh = one_device_mesh()
    cfg = make_config(steps=10, checkpoint_every=100)

    def step_fn(trainer, batch, rng):
        m = trainer.update(batch, rng)
        if trainer.opt_steps == 3:
            os.kill(os.getpid(), sig)
        return m

    s = loop.train(make_model(mesh), loss_fn=mse_loss, batches=Batches(), **cfg, output_dir=str(tmp_path),
                   mesh=mesh, step_fn=step_fn)
    assert s["preempted"] and s["steps"] == 3 and s["preempted_by"] == sig.name
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    assert ("Ctrl-C: stopping after this step" in capsys.readouterr().err) == (sig == signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_second_ctrl_c_interrupts_at_once(tmp_path, ctrl_c_enabled):
    mesh = one_device_mesh()
    cfg = make_config(steps=10, checkpoint_every=100)

    def step_fn(trainer, batch, rng):
        m = trainer.update(batch, rng)
        if trainer.opt_steps == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return m

    with pytest.raises(KeyboardInterrupt):
        loop.train(make_model(mesh), loss_fn=mse_loss, batches=Batches(), **cfg, output_dir=str(tmp_path),
                   mesh=mesh, step_fn=step_fn)


def test_ctrl_c_ignored_at_start_stays_ignored(tmp_path):
    """A run started with SIGINT ignored (in the background) keeps ignoring it, and gets it back so."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    seen = []

    def step_fn(trainer, batch, rng):
        seen.append(signal.getsignal(signal.SIGINT))
        return trainer.update(batch, rng)

    try:
        s = loop.train(make_model(one_device_mesh()), loss_fn=mse_loss, batches=Batches(),
                       **make_config(steps=2, checkpoint_every=100), output_dir=str(tmp_path), step_fn=step_fn,
                       mesh=one_device_mesh())
        assert not s["preempted"] and seen == [signal.SIG_IGN] * 2
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_eval_fn_stop_request_ends_the_run_with_a_checkpoint(tmp_path):
    mesh = one_device_mesh()
    cfg = make_config(steps=20, checkpoint_every=100, eval_every=2)
    seen = []

    def eval_fn(model, step):
        seen.append(step)
        if step == 6:
            raise loop.StopTraining("no improvement", {"score": 0.5})
        return {"score": 1.0}

    s = loop.train(make_model(mesh), loss_fn=mse_loss, batches=Batches(), **cfg, output_dir=str(tmp_path),
                   mesh=mesh, eval_fn=eval_fn)
    assert seen == [2, 4, 6]  # no final evaluation after the stop
    assert s["early_stopped"] and s["stop_reason"] == "no improvement" and s["steps"] == 6
    assert not s["preempted"] and s["last_metrics"]["eval/score"] == 0.5
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6"]
    last = read_metrics(str(tmp_path))[-1]
    assert last["step"] == 6 and last["early_stopped"] is True and last["eval/score"] == 0.5


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    mesh = one_device_mesh()
    cfg = make_config(steps=10, checkpoint_every=2)
    with pytest.raises(loop.TrainingDiverged, match="non-finite loss .* step 6.*last good checkpoint: step 4"):
        loop.train(make_model(mesh), loss_fn=mse_loss, batches=Batches(nan_at=5), **cfg,
                   output_dir=str(tmp_path), mesh=mesh)
    from medkr_jax.train.checkpoint import Checkpointer
    ck = Checkpointer(str(tmp_path / "checkpoints"), save_every=2)
    assert ck.all_steps() == [2, 4]
    tr = Trainer(make_model(mesh), loss_fn=mse_loss, tx=make_optimizer(cfg["optimizer"], 10), mesh=mesh)
    state, data = ck.restore(None, tr.checkpoint_state(0))
    ck.close()
    assert data == {"i": 4}
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.devices(8)
def test_same_losses_on_one_and_eight_devices(tmp_path):
    cfg = make_config(steps=4, checkpoint_every=100, grad_accum=2)
    curves = []
    for name, mesh in (("one", one_device_mesh()),
                       ("eight", parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))):
        model = make_model(mesh)
        if name == "eight":
            spec = model.l1.kernel.value.sharding.spec
            assert tuple(spec) == ("fsdp", "tensor")
        loop.train(model, loss_fn=mse_loss, batches=Batches(), **cfg, output_dir=str(tmp_path / name),
                   mesh=mesh)
        curves.append([r["loss"] for r in read_metrics(str(tmp_path / name)) if "loss" in r])
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-5)


def test_resume_false_refuses_existing_checkpoints_and_log_every(tmp_path):
    mesh = one_device_mesh()
    cfg = make_config(steps=5, checkpoint_every=2, log_every=2)
    loop.train(make_model(mesh), loss_fn=mse_loss, batches=Batches(), **cfg, output_dir=str(tmp_path),
               mesh=mesh)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [2, 4, 5]  # every 2nd step and the last
    cfg = make_config(steps=5, checkpoint_every=2, log_every=2, resume=False)
    with pytest.raises(ValueError, match="resume=False .* already holds checkpoints"):
        loop.train(make_model(mesh), loss_fn=mse_loss, batches=Batches(), **cfg, output_dir=str(tmp_path),
                   mesh=mesh)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_skips_norms_and_biases_by_name(scan_layers):
    """Decay hits kernels and embeddings only, also when stacked layers make norm scales rank 2."""
    import dataclasses

    from medkr_jax.models.bert import BertConfig, init_bert_classifier
    from medkr_jax.models.decoder import Decoder
    from medkr_jax.models.presets import TINY

    cfg = dataclasses.replace(TINY, qkv_bias=True, qk_norm=True, tie_word_embeddings=False)
    dec = nnx.split(Decoder(cfg, scan_layers=scan_layers, rngs=nnx.Rngs(0)), nnx.Param, ...)[1]
    bert_cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                          max_position_embeddings=16)
    bert = nnx.split(init_bert_classifier(bert_cfg), nnx.Param, ...)[1]
    if scan_layers:  # the case a rank rule gets wrong
        assert dec["layers"]["attn_norm"]["scale"].get_value().ndim == 2
    for params in (dec, bert):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        names = [param_path(p) for p, _ in flat]
        expect = {n: n.rsplit(".", 1)[-1] in ("kernel", "embedding") for n in names}
        assert any(expect.values()) and not all(expect.values())
        # the optimizer really applies it: with zero gradients AdamW moves exactly the decayed parameters
        tx = make_optimizer(OptimizerSettings(learning_rate=0.1, warmup_steps=0, schedule="constant", grad_clip=0.0,
                                              weight_decay=0.5), 10)
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = tx.update(zeros, tx.init(params), params)
        for (path, upd), (_, p) in zip(jax.tree_util.tree_flatten_with_path(updates)[0], flat):
            name = param_path(path)
            want = -0.1 * 0.5 * np.asarray(p) if expect[name] else np.zeros_like(np.asarray(p))
            np.testing.assert_allclose(np.asarray(upd), want, rtol=1e-6, atol=1e-8, err_msg=name)
        layer_norms = [n for n in names if "norm" in n.lower()]
        assert layer_norms and not any(expect[n] for n in layer_norms)


class TokenBatches:
    """Endless copies of one packed next-token batch for a decoder (the sft_loss layout)."""

    def __init__(self, vocab, rows=4, seq=16, seed=0):
        ids = np.random.default_rng(seed).integers(3, vocab, size=(rows, seq + 1)).astype(np.int32)
        self.batch = {"tokens": ids[:, :-1], "targets": ids[:, 1:],
                      "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
                      "segment_ids": np.ones((rows, seq), np.int32), "loss_mask": np.ones((rows, seq), np.float32)}

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch


@pytest.mark.parametrize("lr, warns", [(1e6, True), (3e-3, False)])
def test_run_that_cannot_train_says_so(tmp_path, capsys, lr, warns):
    """SFT at learning_rate=1e6 used to exit 0 with a flat loss and exploded weights, no word about it."""
    from medkr_jax.models.decoder import Decoder
    from medkr_jax.models.presets import TINY
    from medkr_jax.train.sft import sft_loss

    mesh = one_device_mesh()
    with parallel.sharding_context(mesh):
        model = Decoder(TINY, rngs=nnx.Rngs(0))
    cfg = make_config(steps=3, checkpoint_every=0, lr=lr, warmup_steps=0)
    out = str(tmp_path / "run")
    summary = loop.train(model, loss_fn=sft_loss, batches=TokenBatches(TINY.vocab_size), **cfg, output_dir=out,
                         mesh=mesh)
    ratios = [r["update_ratio"] for r in read_metrics(out) if "update_ratio" in r]
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    err = capsys.readouterr().err
    if warns:
        assert max(ratios) > 1e3 and losses[-1] == pytest.approx(math.log(TINY.vocab_size), abs=0.01)  # flat: ln V
        assert "the loss did not move" in summary["warnings"][0]
        assert len(summary["warnings"]) == 1 and "the run did not train" in summary["warnings"][0]
        assert "learning_rate=1000000.0 is far too high" in summary["warnings"][0]
        assert "WARNING [train]: the run did not train" in err
    else:  # a healthy run (the loss falls) is far below the limit
        assert max(ratios) < UPDATE_RATIO_LIMIT / 10 and summary["final_loss"] < 0.9 * math.log(TINY.vocab_size)
        assert summary["warnings"] == [] and "WARNING" not in err


# format_rate / response_length of the DR-GRPO learning test's seed-1 run that collapsed (lr 2e-3, one device,
# two threads): the policy stopped closing its answers at step 11 and ran to the 16-token cap
COLLAPSED = [0.25, 0.31, 0.5, 0.63, 0.59, 0.78, 0.75, 0.91, 0.94, 0.84, 0.06, 0.41]
COLLAPSED_LENGTHS = [14.0, 13.2, 12.5, 12.0, 11.8, 11.6, 11.5, 11.4, 11.3, 11.3, 15.8, 14.1]


@pytest.mark.parametrize("rates, collapse_step", [
    (COLLAPSED, 11),
    ([0.1, 0.3, 0.6, 0.9, 0.86, 0.95, 0.81, 0.97, 0.9, 0.93], None),  # healthy: dips stay above half the best
    ([0.2, 0.45, 0.1, 0.3, 0.02, 0.4], None),                       # never in format: nothing to lose
    ([0.9, 0.46, 0.2, 0.9, 0.44, 0.88], 3),  # 0.46 is above half of 0.9; 0.2 and 0.44 collapse: the first reported
])
def test_run_health_reports_a_format_collapse(rates, collapse_step):
    health = RunHealth()
    lengths = COLLAPSED_LENGTHS if rates is COLLAPSED else [10.0] * len(rates)
    said = [health.observe(step, {"loss": 1.0, "format_rate": r, "response_length": n})
            for step, (r, n) in enumerate(zip(rates, lengths), start=1)]
    warnings = health.warnings(lr=2e-3)
    if collapse_step is None:
        assert warnings == [] and said == [None] * len(rates)
        return
    best = max(rates[:collapse_step - 1])
    below = sum(r < 0.5 * max(rates[:i]) for i, r in enumerate(rates) if i > 0 and max(rates[:i]) >= 0.5)
    assert sum(m is not None for m in said) == below
    first = said[collapse_step - 1]
    assert first.startswith(f"step {collapse_step}: format_rate fell to {rates[collapse_step - 1]:.2f} from {best:.2f}")
    assert len(warnings) == 1 and "the policy lost the answer format" in warnings[0]
    assert f"fell to {rates[collapse_step - 1]:.2f} at step {collapse_step}" in warnings[0]
    assert f"{below} step(s) below 0.5 x its best, {rates[-1]:.2f} at the last step" in warnings[0]
    assert "config.optimizer.learning_rate=0.002" in warnings[0]
    if rates is COLLAPSED:
        assert "from 0.94 (step 9)" in first and "completions 15.8 tokens long" in first


def test_format_collapse_is_printed_when_it_happens_and_in_the_summary(tmp_path, capsys):
    """An RL step_fn's format_rate collapses at step 3: the loop prints a warning then, and the summary has it."""
    mesh = one_device_mesh()
    rates = iter([0.8, 0.9, 0.1, 0.2])

    def step_fn(trainer, batch, rng):
        return {**trainer.update(batch, rng), "format_rate": next(rates)}

    s = loop.train(make_model(mesh), loss_fn=mse_loss, batches=Batches(), **make_config(steps=4, checkpoint_every=100),
                   output_dir=str(tmp_path), mesh=mesh, step_fn=step_fn)
    err = capsys.readouterr().err
    assert "WARNING [train]: step 3: format_rate fell to 0.10 from 0.90 (step 2)" in err
    assert "WARNING [train]: step 4:" in err  # still below half its best
    assert len(s["warnings"]) == 1
    assert "format_rate reached 0.90 at step 2 and fell to 0.10 at step 3" in s["warnings"][0]
    assert [r["format_rate"] for r in read_metrics(str(tmp_path))] == pytest.approx([0.8, 0.9, 0.1, 0.2])


def test_zero_steps_is_refused(tmp_path):
    mesh = one_device_mesh()
    with pytest.raises(ValueError, match=r"sft: 0 training steps .*set config.train.steps >= 1"):
        loop.train(make_model(mesh), loss_fn=mse_loss, batches=Batches(), **make_config(steps=0),
                   output_dir=str(tmp_path / "r"), mesh=mesh, desc="sft")
    assert not (tmp_path / "r").exists()
