"""HF folder reading (lazy, sharded), loading errors, and export that transformers loads."""

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from medkr_jax import parallel
from medkr_jax.models.decoder import UnsupportedModelError
from medkr_jax.models.hf import export_decoder, load_decoder, load_params, read_hf_config
from medkr_jax.models.safetensors_io import CheckpointError, SafetensorsCheckpoint
from tests.helpers_models import (SLIDING_WINDOW, hf_logits, make_tiny_hf_model, ragged_batch,  # noqa: F401
                                  tiny_decoder_folder, tiny_hf_config)

_FWD = nnx.jit(lambda m, t, p, a: m(t, p, attention_mask=a)[0])


def _forward(model, batch):
    tokens, mask, positions = batch
    return np.asarray(_FWD(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama_hf")
    hf_model = make_tiny_hf_model("llama", folder, seed=3)
    return folder, hf_model


def _copy(folder, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


# -------------------------------------------------------------------------------------- bad input


def test_read_hf_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_hf_config(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no config.json in model folder"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        read_hf_config(tmp_path)


def test_unsupported_architecture_is_named(tiny, tmp_path):
    folder = _copy(tiny[0], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, architectures=["Gemma2ForCausalLM"])))
    with pytest.raises(UnsupportedModelError) as e:
        load_decoder(folder)
    msg = str(e.value)
    assert "Gemma2ForCausalLM" in msg and "LlamaForCausalLM" in msg and "Gemma3ForCausalLM" in msg


def test_wrong_shape_tensor_names_tensor_file_and_shapes(tiny, tmp_path):
    folder = _copy(tiny[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    expected = tensors[name].shape
    tensors[name] = tensors[name][:-4]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_decoder(folder)
    msg = str(e.value)
    assert name in msg and "model.safetensors" in msg
    assert str(tensors[name].shape) in msg and str(expected) in msg


def test_missing_tensor_is_named(tiny, tmp_path):
    folder = _copy(tiny[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.0.mlp.up_proj.weight'"):
        load_decoder(folder)


def test_truncated_safetensors_names_the_file(tiny, tmp_path):
    folder = _copy(tiny[0], tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*truncated or corrupt"):
        load_decoder(folder)
    path.write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match=r"model.safetensors"):
        SafetensorsCheckpoint(folder)


def test_missing_weights_and_missing_shard(tiny, tmp_path):
    folder = _copy(tiny[0], tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in"):
        load_decoder(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"shard 'shard-1.safetensors'.*tensor 'a'"):
        SafetensorsCheckpoint(folder)


def test_pickle_checkpoint_refused_unless_allowed(tiny, tmp_path):
    import torch

    folder = _copy(tiny[0], tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(tiny[1].state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle.*allow_pickle=True"):
        load_decoder(folder)
    model, cfg = load_decoder(folder, allow_pickle=True)
    ref, _ = load_decoder(tiny[0])
    batch = ragged_batch(cfg.vocab_size, lengths=(5, 3))
    np.testing.assert_array_equal(_forward(model, batch), _forward(ref, batch))


def test_unused_tensors_are_reported(tiny, tmp_path):
    folder = _copy(tiny[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.9.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.warns(UserWarning, match=r"1 checkpoint tensors.*model.layers.9.extra.weight"):
        load_decoder(folder)


# -------------------------------------------------------------------------------------- reading


def test_lazy_slices_match_full_tensors_f32_and_bf16(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 10)).astype(np.float32)
    b = rng.normal(size=(4, 8)).astype(ml_dtypes.bfloat16)
    save_file({"a": a, "b": b}, tmp_path / "model.safetensors")
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert sorted(ckpt.names()) == ["a", "b"]
    assert ckpt.shape("a") == (6, 10) and ckpt.dtype("b") == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(ckpt.read("a", (slice(2, 5), slice(3, 9))), a[2:5, 3:9])
    got = ckpt.read("b", (slice(1, 3), slice(0, 4)))
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), b[1:3, :4].astype(np.float32))
    np.testing.assert_array_equal(ckpt.read("a"), a)


@pytest.mark.devices(8)
def test_load_params_reads_only_each_devices_slices(tmp_path):
    """Each device's callback asks for exactly its shard, and the result is placed as the rules say."""
    w = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    save_file({"w": w, "b": np.arange(8, dtype=np.float32)}, tmp_path / "model.safetensors")

    class Lin(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.zeros
            self.kernel = nnx.Param(nnx.with_partitioning(init, ("embed", "mlp"))(rngs.params(), (6, 8)))
            self.bias = nnx.Param(nnx.with_partitioning(init, ("mlp",))(rngs.params(), (8,)))

    mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    with parallel.sharding_context(mesh):
        abstract = nnx.eval_shape(lambda: Lin(nnx.Rngs(0)))
    ckpt = SafetensorsCheckpoint(tmp_path)
    reads = []
    original = ckpt.read
    ckpt.read = lambda name, index=None: reads.append((name, index)) or original(name, index)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_params(abstract, ckpt, {"kernel": ("w", True), "bias": ("b", False)}, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(model.kernel[...]), w.T)
    assert model.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # kernel (6, 8) over fsdp=2 x tensor=4 -> blocks of (3, 2), read from the HF (8, 6) tensor as (2, 3)
    kernel_reads = [idx for name, idx in reads if name == "w"]
    assert len(kernel_reads) == 8
    assert all((s0.stop - s0.start, s1.stop - s1.start) == (2, 3) for s0, s1 in kernel_reads)


# -------------------------------------------------------------------------------------- export


def test_export_round_trip_sharded_loads_in_transformers(tiny, tmp_path):
    import torch
    import transformers

    folder, hf_model = tiny
    model, cfg = load_decoder(folder)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    out = export_decoder(model, cfg, tmp_path / "export", tokenizer_dir=tmp_path / "tok", max_shard_bytes=60_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = ragged_batch(cfg.vocab_size, lengths=(9, 4), seed=5)
    tokens, mask, positions = batch
    np.testing.assert_allclose(hf_logits(reloaded, tokens, mask, positions)[mask],
                               hf_logits(hf_model, tokens, mask, positions)[mask], atol=1e-6)
    ours_again, cfg_again = load_decoder(out)
    assert cfg_again == cfg
    np.testing.assert_array_equal(_forward(ours_again, batch), _forward(model, batch))


def test_export_of_every_family_loads_in_transformers_with_equal_logits(tiny_decoder_folder, tmp_path):
    """Our export of each family (sliding windows, Gemma 3's norms and RoPE bases included) is the model
    transformers loads: same logits as the checkpoint it came from, on prompts longer than the window."""
    import torch
    import transformers

    kind, folder, hf_model = tiny_decoder_folder
    model, cfg = load_decoder(folder)
    out = export_decoder(model, cfg, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(hf_model)
    tokens, mask, positions = ragged_batch(cfg.vocab_size, lengths=(11, 6), seed=7)
    assert tokens.shape[1] > SLIDING_WINDOW
    diff = np.abs(hf_logits(reloaded, tokens, mask, positions) - hf_logits(hf_model, tokens, mask, positions))[mask]
    assert diff.max() <= 1e-6, f"{kind}: {diff.max():.2e}"
    again, cfg_again = load_decoder(out)
    assert cfg_again == cfg


@pytest.mark.parametrize("layout", ["language_model.model.", "model.language_model."])
def test_gemma3_multimodal_checkpoint_loads_its_text_decoder(tmp_path, layout):
    """A Gemma 3 / MedGemma image-text checkpoint: the text decoder is loaded alone (vision tower left unread),
    from either tensor layout transformers has saved, and gives the multimodal model's text-only logits."""
    import torch
    import transformers

    torch.manual_seed(0)
    # transformers' Gemma3ForConditionalGeneration does not soft-cap its logits (its CausalLM does); the released
    # checkpoints set no cap either
    text = tiny_hf_config("gemma3", final_logit_softcapping=None)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4)
    hf_model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if "norm" in name else 0.0))
    hf_model.save_pretrained(tmp_path / "mm")
    tensors = load_file(tmp_path / "mm" / "model.safetensors")
    assert "language_model.model.embed_tokens.weight" in tensors and any("vision_tower" in n for n in tensors)
    if layout != "language_model.model.":
        tensors = {n.replace("language_model.model.", layout).replace("vision_tower.", "model.vision_tower."): t
                   for n, t in tensors.items()}
        save_file(tensors, tmp_path / "mm" / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unused-tensor warning: the vision tower is expected
        model, cfg = load_decoder(tmp_path / "mm")
    assert cfg.architecture == "Gemma3ForCausalLM" and cfg.sliding_layers == (True, False, True)
    tokens, mask, positions = ragged_batch(cfg.vocab_size, lengths=(10, 5), seed=8)
    ref = hf_logits(hf_model, tokens, mask, positions)
    assert np.abs(_forward(model, (tokens, mask, positions)) - ref)[mask].max() <= 1e-4


def test_export_into_the_tokenizer_folder(tiny, tmp_path):
    """tokenizer_dir == out_dir (re-exporting into a folder that already holds the tokenizer) keeps the files."""
    import transformers

    folder, _ = tiny
    model, cfg = load_decoder(folder)
    out = tmp_path / "same"
    out.mkdir()
    template = json.dumps({"chat_template": "{{ messages }}", "model_max_length": 77})
    (out / "tokenizer_config.json").write_text(template)
    assert export_decoder(model, cfg, out, tokenizer_dir=out) == out
    assert (out / "tokenizer_config.json").read_text() == template  # neither lost nor truncated
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == cfg.num_layers
    assert transformers.AutoConfig.from_pretrained(out).num_hidden_layers == cfg.num_layers
    # the same folder given by another spelling of its path
    export_decoder(model, cfg, out, tokenizer_dir=tmp_path / "same" / ".." / "same")
    assert (out / "tokenizer_config.json").read_text() == template


@pytest.mark.devices(8)
def test_export_bf16_from_sharded_model(tiny, tmp_path):
    import torch
    import transformers

    folder, _ = tiny
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model, cfg = load_decoder(folder, mesh=mesh)
    out = export_decoder(model, cfg, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    w = reloaded.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16
    ours = np.asarray(model.layers[0].attn.q_proj.kernel[...]).T
    np.testing.assert_array_equal(w.detach().float().numpy(), ours.astype(ml_dtypes.bfloat16).astype(np.float32))
    # and our loader reads bf16 files back (memory-mapped path for dtypes numpy lacks)
    back, _ = load_decoder(out, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert back.layers[0].attn.q_proj.kernel[...].dtype == jnp.bfloat16


@pytest.mark.devices(8)
def test_export_job_writes_trained_checkpoint_params(tiny, tmp_path):
    """Job "export": the params of a train.loop checkpoint (not the base weights) end up in the HF folder."""
    from medkr_jax.config import base_config
    from medkr_jax.jobs import export as export_job
    from medkr_jax.train.checkpoint import Checkpointer
    from medkr_jax.jobs.training import optimizer_settings
    from medkr_jax.train.optim import make_optimizer
    from medkr_jax.train.trainer import Trainer

    folder, _ = tiny
    config = base_config()
    config.job, config.output_dir = "export", str(tmp_path / "run")
    config.model.path = str(folder)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 1e-2, 0
    mesh = parallel.make_mesh(config.mesh)
    model, cfg = load_decoder(folder, mesh=mesh)
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (8, 6)).astype(np.int32)

    def loss_fn(m, batch, rng):
        logits, _ = m(batch[:, :-1], jnp.broadcast_to(jnp.arange(5), (batch.shape[0], 5)))
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, batch[:, 1:, None], -1).mean(), {}

    trainer = Trainer(model, loss_fn=loss_fn, tx=make_optimizer(optimizer_settings(config), 10), mesh=mesh)
    trainer.update(trainer.place_batch(tokens), jax.random.key(0))
    trained = jax.tree.map(np.asarray, nnx.state(trainer.model(), nnx.Param))
    with Checkpointer(str(tmp_path / "run" / "checkpoints"), save_every=1) as ckpt:
        ckpt.save(3, trainer.checkpoint_state(3), force=True)

    summary = export_job.run(config)
    assert summary["step"] == 3 and summary["out_dir"] == str(tmp_path / "run" / "hf")
    exported, _ = load_decoder(tmp_path / "run" / "hf")
    got = jax.tree.map(np.asarray, nnx.state(exported, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, trained)
    base = np.asarray(load_decoder(folder)[0].layers[0].attn.q_proj.kernel[...])
    assert np.abs(got["layers"][0]["attn"]["q_proj"]["kernel"].get_value() - base).max() > 1e-4


# -------------------------------------------------------------------------------------- #17 rough edges


@pytest.mark.parametrize("fname", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors", 3])
def test_index_shard_names_outside_the_folder_are_refused(tiny, tmp_path, fname):
    folder = _copy(tiny[0], tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": fname}}))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json names shard .*not a file name inside"):
        SafetensorsCheckpoint(folder)


@pytest.mark.parametrize("payload, needle", [
    ("namespace", r"pytorch_model.bin is not a PyTorch weights file \(torch.load .*UnpicklingError"),
    ("dict", r"pytorch_model.bin holds a dict, not a state dict of name -> tensor"),
])
def test_pickle_that_is_not_weights_is_one_error_naming_the_file(tiny, tmp_path, payload, needle):
    import argparse

    import torch

    folder = _copy(tiny[0], tmp_path)
    (folder / "model.safetensors").unlink()
    obj = argparse.Namespace(lr=1.0) if payload == "namespace" else {"step": 3}
    torch.save(obj, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=needle):
        load_decoder(folder, allow_pickle=True)


def test_tokenizer_larger_than_the_embedding_is_refused(tiny, tmp_path):
    from medkr_jax.config import base_config
    from medkr_jax.data.tokenizer import train_bpe_tokenizer
    from medkr_jax.jobs.evaluate import runtime_from_config
    from medkr_jax.models.hf import check_tokenizer_fits
    from medkr_jax.jobs.training import load_policy_from_config

    tok_dir = tmp_path / "tok"
    tok = train_bpe_tokenizer(["the answer is liver", "kidney and spleen"] * 3, tok_dir, vocab_size=400)
    assert len(tok) > 96  # the tiny model's vocab_size
    config = base_config()
    config.model.path, config.tokenizer_path = str(tiny[0]), str(tok_dir)
    needle = rf"tokenizer in '{tok_dir}' has {len(tok)} tokens but the model in '{tiny[0]}' has vocab_size 96"
    with pytest.raises(CheckpointError, match=needle):
        runtime_from_config(config)
    with pytest.raises(CheckpointError, match=needle):
        load_policy_from_config(config, None, None)
    check_tokenizer_fits(list(range(96)), tiny[0], tokenizer_dir="t")  # as many tokens as rows: fine
