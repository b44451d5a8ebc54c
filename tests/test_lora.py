"""LoRA: module surgery and its errors, exports that transformers and peft load (same logits), only the adapters
trained / in the optimizer state / checkpointed, adapters sharded like the base, 1 vs 8 devices, dropout. The jobs
with LoRA (learning, kill -9 resume, export job) are tested in tests/test_grpo.py on its warm policy."""

import dataclasses
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from medkr_jax import parallel
from medkr_jax.config import base_config
from medkr_jax.data.records import write_records
from medkr_jax.jobs import sft as sft_job
from medkr_jax.models import lora
from medkr_jax.models.decoder import Decoder, DecoderConfig
from medkr_jax.models.hf import export_decoder, export_peft, load_decoder
from medkr_jax.train import sft
from medkr_jax.train.trainer import Trainer
from tests.helpers_models import hf_logits, make_tiny_hf_model, ragged_batch
from tests.test_sft import one_device_mesh, sft_config, toy_records

CFG = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8)
ALL = ["layers.attn.k_proj", "layers.attn.o_proj", "layers.attn.q_proj", "layers.attn.v_proj",
       "layers.mlp.down_proj", "layers.mlp.gate_proj", "layers.mlp.up_proj"]


def tiny_model(mesh, *, scan_layers=False, seed=0):
    with parallel.sharding_context(mesh):
        return Decoder(CFG, scan_layers=scan_layers, rngs=nnx.Rngs(seed))


def randomise_b(model, seed=0, scale=0.1):
    """Non-zero B matrices (a fresh adapter is a no-op, which no parity check could tell from a bug), drawn per
    module name for the whole stack: the same values in the per-layer and the stacked layout."""
    for path, m in lora.lora_modules(model):
        parts = path.split(".")
        layer = int(parts[1]) if parts[1].isdigit() else None
        name = ".".join(p for p in parts if not p.isdigit())
        b = m.lora_b.get_value()
        stacked = b.shape if layer is None else (len(model.layers), *b.shape)
        value = np.random.default_rng([seed, zlib.crc32(name.encode())]).normal(size=stacked) * scale
        value = value if layer is None else value[layer]
        m.lora_b.set_value(jax.device_put(jnp.asarray(value, b.dtype), b.sharding))


def test_targets_by_pattern_and_errors():
    model = lora.apply_lora(Decoder(CFG, rngs=nnx.Rngs(0)), lora.LoRASettings(rank=2, target_modules=(r"q_proj",
                                                                                                    r"mlp\.down")))
    assert [p for p, _ in lora.lora_modules(model)] == [f"layers.{i}.{n}" for i in (0, 1)
                                                        for n in ("attn.q_proj", "mlp.down_proj")]
    assert lora.trainable_filter(model) is lora.LoRAParam
    # 2 layers x (q: (32 + 32) * 2, down: (48 + 32) * 2)
    assert lora.adapter_count(model) == 2 * (64 * 2 + 80 * 2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply_lora(model, lora.LoRASettings(rank=2))
    plain = Decoder(CFG, scan_layers=True, rngs=nnx.Rngs(0))
    assert lora.trainable_filter(plain) is nnx.Param and lora.target_names(plain, lora.DEFAULT_TARGETS) == ALL
    with pytest.raises(ValueError) as e:
        lora.apply_lora(plain, lora.LoRASettings(rank=2, target_modules=("q_proj", "qkv_proj")))
    assert "pattern 'qkv_proj' matches no module" in str(e.value) and str(ALL) in str(e.value)
    assert not lora.has_adapters(lora.apply_lora(plain, lora.LoRASettings(rank=0)))  # rank 0 = off
    # the stacked layout draws the same adapters: layer i's A is row i of the stacked A
    stacked = {p: np.asarray(m.lora_a[...]) for p, m in lora.lora_modules(
        lora.apply_lora(plain, lora.LoRASettings(rank=2, target_modules=(r"q_proj", r"mlp\.down"))))}
    for path, m in lora.lora_modules(model):
        _, layer, name = path.split(".", 2)
        np.testing.assert_array_equal(np.asarray(m.lora_a[...]), stacked[f"layers.{name}"][int(layer)])
    for bad, match in [(dict(rank=-1), "rank must be >= 0"), (dict(rank=4, alpha=0), "alpha must be > 0"),
                       (dict(rank=4, dropout=1.0), r"dropout must lie in \[0, 1\)"),
                       (dict(rank=4, target_modules=("q_proj(",)), "'q_proj\\(' is not a regular expression")]:
        with pytest.raises(ValueError, match=match):
            lora.LoRASettings(**bad)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_merged_and_peft_exports_match_transformers_and_peft(tmp_path, scan_layers):
    import peft
    import torch
    import transformers

    base_hf = make_tiny_hf_model("qwen2", tmp_path / "base")  # q/k/v biases: the merged kernels keep them
    model, cfg = load_decoder(tmp_path / "base", scan_layers=scan_layers)
    settings = lora.LoRASettings(rank=4, alpha=8.0, target_modules=(r"attn\.(q|v|o)_proj", r"mlp\.up_proj"))
    lora.apply_lora(model, settings, seed=1)
    randomise_b(model)
    tokens, mask, positions = ragged_batch(cfg.vocab_size)

    def ours(m):
        return np.asarray(m(jnp.asarray(tokens), jnp.asarray(positions), attention_mask=jnp.asarray(mask))[0])[mask]

    got = ours(model)
    export_decoder(model, cfg, tmp_path / "merged")
    export_peft(model, cfg, tmp_path / "peft", settings=settings, base_model=str(tmp_path / "base"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    diff_merged = np.abs(hf_logits(merged, tokens, mask, positions)[mask] - got).max()
    adapted = peft.PeftModel.from_pretrained(base_hf, tmp_path / "peft").eval()
    diff_peft = np.abs(hf_logits(adapted, tokens, mask, positions)[mask] - got).max()
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["o_proj", "q_proj", "up_proj", "v_proj"] and config["r"] == 4
    # the adapters off: the base, as transformers computes it without them
    with adapted.disable_adapter():
        base_logits = hf_logits(adapted, tokens, mask, positions)[mask]
    diff_base = np.abs(base_logits - ours(lora.adapters_off(model))).max()
    print(f"LoRA parity (scan_layers={scan_layers}): merged {diff_merged:.2e}, peft {diff_peft:.2e}, "
          f"adapters off vs base {diff_base:.2e}; adapters move logits by {np.abs(base_logits - got).max():.2f}")
    assert diff_merged <= 1e-4 and diff_peft <= 1e-4 and diff_base <= 1e-4
    assert np.abs(base_logits - got).max() > 0.1  # the adapters matter, so the checks above could fail


def toy_batch(rows=4, t=16, seed=0):
    rng = np.random.default_rng(seed)
    seq = rng.integers(1, CFG.vocab_size, size=(rows, t + 1)).astype(np.int32)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "positions": np.tile(np.arange(t, dtype=np.int32), (rows, 1)),
            "segment_ids": np.ones((rows, t), np.int32), "loss_mask": np.ones((rows, t), np.float32)}


@pytest.mark.devices(8)
def test_only_adapters_train_sharded_like_the_base_on_one_and_eight_devices():
    """The base (bfloat16) is frozen, absent from the optimizer state and the checkpoint; on fsdp=2 x tensor=4 each
    adapter splits the base kernel's in / out dimension as the kernel does; 1 vs 8 devices: the same losses and
    adapter updates. (Dropout off: its random bits double the 8-device compile time; it is tested below and in
    the resumed LoRA-SFT run of tests/test_grpo.py.)"""
    runs, cfg = [], dataclasses.replace(CFG, num_layers=1, layer_types=())  # one layer: half the compile time
    for mesh in (one_device_mesh(), parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})):
        base_model = Decoder(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))  # a bfloat16 base, float32 adapters
        model = lora.apply_lora(base_model, lora.LoRASettings(rank=4))
        # SGD with momentum: updates linear in the gradient (Adam's first steps, g / |g|, would amplify float32
        # summation-order differences of near-zero gradient entries between the meshes)
        trainer = Trainer(model, loss_fn=sft.sft_loss, tx=optax.sgd(0.5, momentum=0.9), mesh=mesh)
        base = jax.device_get(trainer.frozen)
        assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
        assert {x.dtype for x in jax.tree.leaves(trainer.params)} == {jnp.dtype(jnp.float32)}
        losses = [float(trainer.update(toy_batch(seed=s), jax.random.key(s))["loss"]) for s in range(3)]
        paths = [".".join(str(k.key) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(trainer.checkpoint_state(3)["params"])[0]]
        assert paths and all(p.endswith((".lora_a.value", ".lora_b.value")) for p in paths), paths  # adapters only
        n_adapters = sum(x.size for x in jax.tree.leaves(trainer.params))
        assert sum(x.size for x in jax.tree.leaves(trainer.opt_state)) == n_adapters  # the momentum of adapters
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(trainer.frozen)))
        modules = lora.lora_modules(trainer.model())
        for path, m in modules:
            k, a, b = (tuple(v.get_value().sharding.spec) + (None, None) for v in (m.kernel, m.lora_a, m.lora_b))
            assert a[:2] == (k[0], None) and b[:2] == (None, k[1]), (path, k, a, b)
        runs.append((losses, {p: np.asarray(m.lora_b[...]) for p, m in modules}))
    (one, b_one), (eight, b_eight) = runs
    print(f"LoRA 1 vs 8 devices: losses {one} vs {eight}")
    np.testing.assert_allclose(one, eight, rtol=1e-5)
    for p, b in b_one.items():
        assert np.abs(b).max() > 0  # B moved off zero
        np.testing.assert_allclose(b, b_eight[p], rtol=1e-4, atol=1e-6)
    assert any("tensor" in str(m.lora_b.get_value().sharding.spec) for _, m in modules)
    assert any("fsdp" in str(m.lora_a.get_value().sharding.spec) for _, m in modules)


def test_dropout_is_keyed_unbiased_and_off_without_a_key():
    """A LoRADense's adapter input is dropped only under a dropout key (the trainer's loss sets one; sampling and
    reference forwards have none): the same key gives the same output, another key another, and inverted dropout
    is unbiased (the mean over keys is the output without dropout)."""
    model = lora.apply_lora(Decoder(CFG, rngs=nnx.Rngs(0)), lora.LoRASettings(rank=4, dropout=0.5,
                                                                              target_modules=("q_proj",)))
    randomise_b(model, scale=1.0)
    layer = model.layers[0].attn.q_proj
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, CFG.hidden_size)), jnp.float32)
    plain = np.asarray(layer(x))

    @jax.jit
    def keyed(keys):
        def one(key):
            with lora.dropout_key(key):
                return layer(x)
        return jax.vmap(one)(keys)

    out = np.asarray(keyed(jax.random.split(jax.random.key(0), 2000)))
    again = np.asarray(keyed(jax.random.split(jax.random.key(0), 2)))
    np.testing.assert_allclose(out[:2], again, rtol=1e-5, atol=1e-5)  # another batch of keys: another sum order
    assert np.abs(out[0] - plain).max() > 1e-2 and np.abs(out[0] - out[1]).max() > 1e-2
    spread = out.std(0) / np.sqrt(len(out))  # the mean's standard error, per entry
    assert np.all(np.abs(out.mean(0) - plain) < 5 * spread + 1e-6)
    np.testing.assert_array_equal(np.asarray(layer(x)), plain)  # no key: no dropout


# ------------------------------------------------------------------------------------------------ the jobs
# (LoRA-SFT and LoRA-GRPO learning, kill -9 resume, the checkpoint and the export job: tests/test_grpo.py)


def test_bad_lora_config_fails_before_the_model_is_read(tmp_path):
    write_records(str(tmp_path / "train.jsonl"), toy_records())
    cfg = sft_config(tmp_path, tmp_path / "train.jsonl", tmp_path / "no_such_model")
    cfg.lora.rank, cfg.lora.target_modules = 4, ("attn.(q|k",)
    with pytest.raises(ValueError, match=r"config.lora.target_modules: 'attn.\(q\|k' is not a regular expression"):
        sft_job.run(cfg, mesh=one_device_mesh())
    assert base_config().lora.rank == 0  # off unless asked for
