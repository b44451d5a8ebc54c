"""SFT: packing/masking oracles, memorisation, kill -9 resume, 1 vs 8 devices, export."""

import contextlib
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medkr_jax import parallel
from medkr_jax.config import base_config
from medkr_jax.data.records import MCQRecord, write_records
from medkr_jax.jobs import sft as sft_job
from medkr_jax.models.decoder import Decoder
from medkr_jax.models.hf import one_device_mesh
from medkr_jax.models.presets import TINY
from medkr_jax.train import sft
from medkr_jax.train.metrics_log import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = "Answer with the letter."
DRUGS = ["aspirin", "heparin", "warfarin", "insulin", "metformin", "digoxin"]


# ------------------------------------------------------------------------------------------ shared fixtures


def toy_records(n=8, seed=0, trace=True):
    """Small MCQs with a short trace; the answer is written into the trace."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        opts = list(rng.choice(DRUGS, size=4, replace=False))
        ans = int(rng.integers(4))
        out.append(MCQRecord(id=f"t{i}", benchmark="toy", question=f"Case {i}: which drug?", options=opts,
                             answer=ans, label="reasoning",
                             trace=f"Case {i} needs {opts[ans]}." if trace else None))
    return out


def make_policy_folder(folder, corpus, *, vocab_size=320, hidden=64, layers=2, seed=0):
    """A tiny random Llama-style policy + a BPE tokenizer with a chat template, saved as one HF folder."""
    from medkr_jax.data.tokenizer import train_bpe_tokenizer
    from medkr_jax.models.decoder import Decoder, DecoderConfig
    from medkr_jax.models.hf import export_decoder

    folder = str(folder)
    tok_dir = folder + "_tokenizer"
    tok = train_bpe_tokenizer(corpus, tok_dir, vocab_size=vocab_size, min_frequency=1)
    vocab = int(np.ceil(len(tok) / 8) * 8)
    cfg = DecoderConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                        num_heads=4, num_kv_heads=2, head_dim=hidden // 4, rope_theta=10000.0,
                        rms_norm_eps=1e-5, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                        eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    mesh = one_device_mesh()
    with parallel.sharding_context(mesh):
        model = Decoder(cfg, rngs=nnx.Rngs(seed))
    export_decoder(model, cfg, folder, tokenizer_dir=tok_dir)
    return folder


def corpus_for(records):
    from medkr_jax.eval.prompts import format_question
    texts = [SYSTEM, "The answer is A. B. C. D. Wait, let me re-check this. At first sight looks right."]
    for r in records:
        texts += [format_question(r), r.trace or ""] + list(r.options)
    return texts * 3


def sft_config(tmp_path, data_path, model_dir, *, steps=40, batch=4, seq_len=96, lr=3e-3, ckpt_every=10):
    c = base_config()
    c.job = "sft"
    c.output_dir = str(tmp_path / "run")
    c.seed = 0
    c.model.path = str(model_dir)
    c.sft.train_path = str(data_path)
    c.eval.system_prompt = SYSTEM
    c.optimizer.learning_rate = lr
    c.optimizer.warmup_steps = 5
    c.optimizer.min_lr_ratio = 0.1
    c.train.steps = steps
    c.train.batch_size = batch
    c.train.seq_len = seq_len
    c.train.checkpoint_every = ckpt_every
    return c


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_world")
    recs = toy_records()
    write_records(str(d / "train.jsonl"), recs)
    make_policy_folder(d / "policy", corpus_for(recs))
    return d, recs


# ------------------------------------------------------------------------------------------------- tests


def test_packing_layout_and_truncation():
    seqs = [([1, 2, 3, 4, 5], 2), ([6, 7, 8], 1), ([9, 10, 11, 12, 13, 14, 15, 16, 17, 18], 3), (list(range(20)), 9)]
    rows, stats = sft.pack_sequences(seqs, 8, pad_id=0)
    assert stats["dropped"] == 1 and stats["truncated"] == 1 and stats["examples"] == 3
    # longest (truncated to 9 tokens -> 8 inputs) fills row 0; the other two share row 1
    assert rows["tokens"].shape == (2, 8)
    np.testing.assert_array_equal(rows["tokens"][0], [9, 10, 11, 12, 13, 14, 15, 16])
    np.testing.assert_array_equal(rows["targets"][0], [10, 11, 12, 13, 14, 15, 16, 17])
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(rows["tokens"][1], [1, 2, 3, 4, 6, 7, 0, 0])
    np.testing.assert_array_equal(rows["targets"][1], [2, 3, 4, 5, 7, 8, 0, 0])
    np.testing.assert_array_equal(rows["segment_ids"][1], [1, 1, 1, 1, 2, 2, 0, 0])
    np.testing.assert_array_equal(rows["positions"][1], [0, 1, 2, 3, 0, 1, 0, 0])
    np.testing.assert_array_equal(rows["loss_mask"][1], [0, 1, 1, 1, 1, 1, 0, 0])
    unpacked, _ = sft.pack_sequences(seqs, 8, pad_id=0, packing=False)
    assert unpacked["tokens"].shape == (3, 8)
    with pytest.raises(sft.SFTDataError, match="seq_len"):
        sft.pack_sequences([(list(range(20)), 9)], 8, pad_id=0)


def test_scored_positions_gather_the_response_targets_and_keep_the_loss():
    seqs = [([1, 2, 3, 4, 5, 6], 2, (4, 5)), ([7, 8, 9], 1), ([10, 11, 12, 13, 14, 15, 16], 5)]
    rows, _ = sft.pack_sequences(seqs, 16, pad_id=0, answer_weight=3.0)
    scored = sft.scored_positions(rows, multiple=5)
    # one row: the 7-token sequence (targets 15, 16 scored), then the 6-token one (answer targets 5, 6 weighted 3),
    # then the 3-token one; 8 scored positions, rounded up to 10
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 0, 0, 1, 1, 0, 1, 1, 3, 3, 1, 1, 0, 0, 0])
    assert scored["loss_at"].shape == (1, 10)
    np.testing.assert_array_equal(scored["loss_at"][0, :8], [4, 5, 7, 8, 9, 10, 11, 12])
    np.testing.assert_array_equal(scored["targets"][0], [15, 16, 3, 4, 5, 6, 8, 9, 0, 0])
    np.testing.assert_array_equal(scored["loss_mask"][0], [1, 1, 1, 1, 3, 3, 1, 1, 0, 0])
    np.testing.assert_array_equal(scored["answer_mask"][0], [0, 0, 0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(scored["tokens"], rows["tokens"])  # the model's inputs stay whole
    assert sft.scored_positions(rows, multiple=16) is rows  # nothing to skip: the rows as they are
    # the loss, its gradient and the metrics are those of the whole rows
    model = Decoder(TINY, rngs=nnx.Rngs(0))
    batch = {k: np.concatenate([v, v]) for k, v in rows.items()}  # two rows
    fast = {k: np.concatenate([v, v]) for k, v in scored.items()}
    (a, ma), ga = nnx.value_and_grad(sft.sft_loss, has_aux=True)(model, batch, None)
    (b, mb), gb = nnx.value_and_grad(sft.sft_loss, has_aux=True)(model, fast, None)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    for key in ma:
        np.testing.assert_allclose(float(ma[key]), float(mb[key]), rtol=1e-6, err_msg=key)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7), ga, gb)


def test_answer_tokens_are_marked_and_weighted():
    seqs = [([1, 2, 3, 4, 5, 6], 2, (4, 5)), ([7, 8, 9], 1)]  # ids[4], ids[5] spell the answer
    rows, stats = sft.pack_sequences(seqs, 8, pad_id=0, answer_weight=3.0)
    assert stats["answer_tokens"] == 2 and stats["target_tokens"] == 6
    # row 0 = the longer sequence: targets ids[1:], answer targets ids[4], ids[5] at positions 3, 4
    np.testing.assert_array_equal(rows["answer_mask"][0], [0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 1, 1, 3, 3, 1, 1, 0])  # then [7, 8, 9]
    plain, _ = sft.pack_sequences(seqs, 8, pad_id=0)
    np.testing.assert_array_equal(plain["loss_mask"][0], [0, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(plain["answer_mask"][0], rows["answer_mask"][0])
    with pytest.raises(sft.SFTDataError, match="answer_weight"):
        sft.pack_sequences(seqs, 8, pad_id=0, answer_weight=0.0)


@pytest.mark.parametrize("answer_format", ["letter", "option"])
def test_tokenize_example_finds_the_final_answer_tokens(world, answer_format):
    from transformers import AutoTokenizer

    from medkr_jax.train import traces

    d, recs = world
    tok = AutoTokenizer.from_pretrained(str(d / "policy"))
    for kind in traces.KINDS:
        ex = traces.make_example(recs[0], kind, np.random.default_rng(1), answer_format)
        ids, p, answer = sft.tokenize_example(tok, ex, system_prompt=SYSTEM, eos_id=tok.eos_token_id)
        want = recs[0].answer_letter if answer_format == "letter" else recs[0].options[recs[0].answer]
        assert answer and min(answer) >= p
        assert tok.decode([ids[j] for j in answer]).strip() == want
        assert tok.decode(ids[max(answer) + 1:]).startswith(".")  # the statement's last answer token


def test_weighted_loss_is_the_weighted_token_mean(world):
    """loss = sum(w * nll) / sum(w); answer_accuracy reads only the answer targets."""
    from transformers import AutoTokenizer

    from medkr_jax.models.hf import load_decoder
    from medkr_jax.train import traces
    from medkr_jax.train.losses import token_logprobs

    d, recs = world
    model, _ = load_decoder(str(d / "policy"))
    tok = AutoTokenizer.from_pretrained(str(d / "policy"))
    seqs = [sft.tokenize_example(tok, e, system_prompt=SYSTEM, eos_id=tok.eos_token_id)
            for e in traces.build_examples(recs[:3], traces.TraceMix(plain=1.0))]
    rows, _ = sft.pack_sequences(seqs, 256, pad_id=tok.pad_token_id, answer_weight=4.0)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    loss, aux = sft.sft_loss(model, batch, None)
    logits, _ = model(batch["tokens"], batch["positions"], attention_mask=batch["segment_ids"] > 0,
                      segment_ids=batch["segment_ids"])
    nll = -np.asarray(token_logprobs(logits, batch["targets"]), np.float64)
    w = rows["loss_mask"].astype(np.float64)
    assert (w == 4.0).sum() == rows["answer_mask"].sum() > 0
    np.testing.assert_allclose(float(loss), (w * nll).sum() / w.sum(), rtol=1e-5)
    pred = np.asarray(jnp.argmax(logits, -1)) == rows["targets"]
    am = rows["answer_mask"] > 0
    np.testing.assert_allclose(float(aux["answer_accuracy"]), pred[am].mean(), rtol=1e-6)


def test_loss_masking_and_packing_isolation(world):
    """Prompt targets do not affect the loss; a packed row's loss equals its examples' losses computed alone."""
    from transformers import AutoTokenizer

    from medkr_jax.models.hf import load_decoder
    from medkr_jax.train import traces

    d, recs = world
    model, cfg = load_decoder(str(d / "policy"))
    tok = AutoTokenizer.from_pretrained(str(d / "policy"))
    exs = traces.build_examples(recs[:3], traces.TraceMix(plain=1.0))
    seqs = [sft.tokenize_example(tok, e, system_prompt=SYSTEM, eos_id=tok.eos_token_id) for e in exs]
    # the response (trace + answer + EOS) is exactly the masked part
    ids, p, _ = seqs[0]
    assert tok.decode(ids[p:]) == exs[0].response + tok.eos_token
    packed, st = sft.pack_sequences(seqs, 256, pad_id=tok.pad_token_id)
    assert st["rows"] == 1 and packed["segment_ids"].max() == 3
    batch = {k: jnp.asarray(v) for k, v in packed.items()}
    loss_fn = jax.jit(lambda b: sft.sft_loss(model, b, None))
    loss, aux = loss_fn(batch)

    rng = np.random.default_rng(0)
    scrambled = dict(batch)
    t = np.asarray(batch["targets"]).copy()
    prompt_pos = np.asarray(batch["loss_mask"]) == 0
    t[prompt_pos] = rng.integers(0, cfg.vocab_size, size=prompt_pos.sum())
    scrambled["targets"] = jnp.asarray(t)
    assert float(loss_fn(scrambled)[0]) == float(loss)
    t2 = np.asarray(batch["targets"]).copy()
    resp = np.argwhere(np.asarray(batch["loss_mask"]) > 0)[0]
    t2[tuple(resp)] = (t2[tuple(resp)] + 1) % cfg.vocab_size
    assert float(loss_fn(dict(batch, targets=jnp.asarray(t2)))[0]) != float(loss)

    # one example per row (no packing): token-weighted mean of the same per-token losses
    single, _ = sft.pack_sequences(seqs, 256, pad_id=tok.pad_token_id, packing=False)
    loss_single, aux_single = loss_fn({k: jnp.asarray(v) for k, v in single.items()})
    assert float(aux_single["weight"]) == float(aux["weight"])
    np.testing.assert_allclose(float(loss_single), float(loss), rtol=2e-5)


def test_sft_memorises_and_exports(world, tmp_path, tmp_path_factory):
    from transformers import AutoTokenizer

    from medkr_jax.eval.prompts import build_prompt, encode
    from medkr_jax.models.hf import load_decoder
    from medkr_jax.sampling import Sampler

    d, recs = world
    # 250 steps: at 150 (final losses ~0.02) one machine's rounding left record 0's prompt continued with the trace
    # of record 7 (7 of the 8 prompts reproduced); at 250 (~0.006) all 8 were
    cfg = sft_config(tmp_path, d / "train.jsonl", d / "policy", steps=250, lr=1e-2, ckpt_every=1000)
    cfg.optimizer.grad_accum = 2
    with compilation_cache(tmp_path_factory):
        summary = sft_job.run(cfg, mesh=one_device_mesh())
    losses = [r["loss"] for r in read_metrics(cfg.output_dir) if "loss" in r]
    assert losses[0] > 2.0
    assert np.mean(losses[-3:]) < 0.05, losses[-5:]
    assert summary["examples"] == len(recs)
    assert os.path.exists(os.path.join(cfg.output_dir, "report.md"))
    assert os.path.exists(os.path.join(cfg.output_dir, "loss.png"))
    # the exported folder loads back and greedily reproduces a memorised answer
    model, mcfg = load_decoder(summary["export_dir"])
    tok = AutoTokenizer.from_pretrained(summary["export_dir"])
    prompt = encode(tok, build_prompt(tok, recs[0], system_prompt=SYSTEM))
    out = Sampler(mcfg, pad_id=tok.pad_token_id, stop_ids=(tok.eos_token_id,)).generate(
        model, [prompt], max_new_tokens=24)
    text = tok.decode(out.row_tokens(0), skip_special_tokens=True)
    assert text.strip().endswith(f"The answer is {recs[0].answer_letter}."), text


@pytest.mark.devices(8)
def test_same_losses_on_one_and_eight_devices(world, tmp_path, tmp_path_factory):
    d, _ = world
    curves = []
    for name, mesh in (("one", one_device_mesh()),
                       ("eight", parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}))):
        cfg = sft_config(tmp_path / name, d / "train.jsonl", d / "policy", steps=4, ckpt_every=100)
        cfg.optimizer.grad_accum = 2
        with compilation_cache(tmp_path_factory):
            sft_job.run(cfg, mesh=mesh)
        curves.append([r["loss"] for r in read_metrics(cfg.output_dir) if "loss" in r])
    np.testing.assert_allclose(curves[0], curves[1], rtol=2e-5)


def write_config_file(path, cfg):
    """A config file for `python -m medkr_jax.main` reproducing `cfg`."""
    overrides = json.loads(cfg.to_json_best_effort())
    path.write_text(
        "import json\nfrom medkr_jax.config import base_config\n\n"
        "def _merge(c, d):\n"
        "    for k, v in d.items():\n"
        "        if isinstance(v, dict):\n"
        "            _merge(c[k], v)\n"
        "        else:\n"
        "            c[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v\n\n"
        "def get_config():\n"
        "    c = base_config()\n"
        f"    _merge(c, json.loads({json.dumps(json.dumps(overrides))}))\n"
        "    return c\n")


def _job_env(cache_dir):
    # The runs share a persistent compilation cache with the in-process reference run: same XLA flags, same
    # matmul precision as tests/conftest.py, hence the same programs, compiled once.
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_DEFAULT_MATMUL_PRECISION="highest")


def run_job(cfg_file, cache_dir):
    """Run `python -m medkr_jax.main --config=cfg_file` to completion."""
    cmd = [sys.executable, "-m", "medkr_jax.main", f"--config={cfg_file}"]
    res = subprocess.run(cmd, cwd=REPO, env=_job_env(cache_dir), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


def run_killed_then_resumed(cfg_file, output_dir, kill_after_checkpoint, cache_dir):
    """Start the job, SIGKILL it once checkpoint `kill_after_checkpoint` exists, restart it to completion.

    Returns the last step the killed run had logged.
    """
    cmd = [sys.executable, "-m", "medkr_jax.main", f"--config={cfg_file}"]
    ckdir = os.path.join(output_dir, "checkpoints")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_job_env(cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            done = [int(n) for n in (os.listdir(ckdir) if os.path.isdir(ckdir) else []) if n.isdigit()]
            if any(s >= kill_after_checkpoint for s in done) or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.kill()  # SIGKILL: no handler runs, no final checkpoint
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    killed_at = max(r["step"] for r in read_metrics(output_dir))
    run_job(cfg_file, cache_dir)
    return killed_at


def cache_dir_of(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "jax_cache"


@contextlib.contextmanager
def compilation_cache(tmp_path_factory):
    """Persistent compilation cache for in-process runs of identical programs (restored afterwards)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(cache_dir_of(tmp_path_factory)))
    jax.config.update(keys[1], 0)
    jax.config.update(keys[2], 0)
    cc.reset_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()


@pytest.mark.devices(8)
def test_kill9_resume_matches_uninterrupted(world, tmp_path, tmp_path_factory):
    """SIGKILL a running SFT job, rerun the same command: it resumes and the loss curve is the uninterrupted one."""
    d, _ = world
    steps = 60
    cfg = sft_config(tmp_path / "ref", d / "train.jsonl", d / "policy", steps=steps, ckpt_every=5)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 2, 4
    cfg.optimizer.grad_accum = 2
    with compilation_cache(tmp_path_factory):
        sft_job.run(cfg)
    want = [r["loss"] for r in read_metrics(cfg.output_dir) if "loss" in r]

    cfg.output_dir = str(tmp_path / "killed" / "run")
    write_config_file(tmp_path / "killed.py", cfg)
    killed_at = run_killed_then_resumed(tmp_path / "killed.py", cfg.output_dir, kill_after_checkpoint=10,
                                        cache_dir=cache_dir_of(tmp_path_factory))
    assert 10 <= killed_at < steps
    got = {r["step"]: r["loss"] for r in read_metrics(cfg.output_dir) if "loss" in r}
    assert sorted(got) == list(range(1, steps + 1))
    np.testing.assert_allclose([got[s] for s in range(1, steps + 1)], want, rtol=1e-5, atol=1e-6)
