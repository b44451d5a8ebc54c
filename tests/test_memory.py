"""Dry-run memory plan: shard arithmetic checked by hand, presets checked against published sizes."""

import json
import math

import pytest

from medkr_jax.config import base_config
from medkr_jax.jobs import dry_run
from medkr_jax.models import memory, presets
from medkr_jax.models.lora import LoRASettings
from medkr_jax.models.memory import CHIP_HBM, GiB, MemoryPlanError, memory_plan


def test_published_parameter_counts():
    # Exact counts of the HF checkpoints (safetensors metadata) where known, else the model cards' rounding.
    assert presets.decoder_config("llama3.1-8b").num_params == 8_030_261_248
    assert presets.decoder_config("qwen2.5-7b").num_params == 7_615_616_512
    assert presets.decoder_config("smollm2-135m").num_params == 134_515_008
    for name, billions in [("qwen3-0.6b", 0.6), ("qwen3-1.7b", 1.7), ("qwen3-4b", 4.0), ("qwen3-8b", 8.2),
                           ("qwen3-14b", 14.8), ("qwen3-32b", 32.8), ("qwen2.5-32b", 32.8)]:
        n = presets.decoder_config(name).num_params / 1e9
        assert abs(n - billions) / billions < 0.03, (name, n)


def test_per_device_bytes_match_hand_computed_shards():
    cfg = presets.decoder_config("qwen3-8b")
    plan = memory_plan(cfg, {"data": 1, "fsdp": 16, "tensor": 4}, param_dtype="float32", dtype="bfloat16",
                       batch_size=64, seq_len=2048, remat=True, chip="v5p")
    # Default rules put every matrix over fsdp x tensor (64 ways) and replicate the norm scales.
    e, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    norms = layers * (2 * e + 2 * hd) + e
    per_device = (cfg.num_params - norms) / 64 + norms
    assert plan["params"] == per_device * 4
    assert plan["grads"] == plan["params"]
    assert plan["optimizer"] == 2 * per_device * 4  # AdamW mu and nu in float32
    assert plan["master"] == 0  # float32 params are their own master copy
    assert plan["total"] == sum(plan[k] for k in ("params", "grads", "optimizer", "master", "activations"))
    assert plan["num_devices"] == 64 and plan["fits"] and 0 < plan["hbm_fraction"] < 0.9


def test_bf16_params_add_a_float32_master_and_halve_params():
    cfg = presets.decoder_config("llama3.1-8b")
    mesh = {"data": 2, "fsdp": 8, "tensor": 4}
    f32 = memory_plan(cfg, mesh, param_dtype="float32", batch_size=16, seq_len=1024)
    bf16 = memory_plan(cfg, mesh, param_dtype="bfloat16", batch_size=16, seq_len=1024)
    assert bf16["params"] * 2 == f32["params"] and bf16["master"] == f32["params"]
    assert bf16["optimizer"] == f32["optimizer"]


def test_activations_grow_with_batch_and_shrink_with_remat():
    cfg = presets.decoder_config("qwen3-1.7b")
    mesh = {"data": 1, "fsdp": 4, "tensor": 2}
    base = memory_plan(cfg, mesh, batch_size=8, seq_len=1024, remat=False)["activations"]
    assert memory_plan(cfg, mesh, batch_size=16, seq_len=1024, remat=False)["activations"] == pytest.approx(2 * base)
    assert memory_plan(cfg, mesh, batch_size=8, seq_len=1024, remat=True)["activations"] < base / 3


def test_32b_does_not_fit_small_chips_and_fits_a_pod():
    cfg = presets.decoder_config("qwen2.5-32b")
    small = memory_plan(cfg, {"data": 1, "fsdp": 8, "tensor": 1}, batch_size=8, seq_len=2048, chip="v5e")
    assert not small["fits"] and small["params"] > 14 * GiB  # 32.8e9 * 4 B / 8
    pod = memory_plan(cfg, {"data": 1, "fsdp": 16, "tensor": 4}, param_dtype="bfloat16", batch_size=16,
                      seq_len=2048, chip="v5p")
    assert pod["fits"] and pod["hbm"] == CHIP_HBM["v5p"]


def test_plan_errors():
    cfg = presets.decoder_config("qwen3-8b")
    with pytest.raises(MemoryPlanError, match="unknown chip 'tpu9'"):
        memory_plan(cfg, {"data": 1, "fsdp": 1, "tensor": 1}, chip="tpu9")
    with pytest.raises(MemoryPlanError, match=r"does not divide"):
        memory_plan(cfg, {"data": 1, "fsdp": 1, "tensor": 3})
    # an uneven batch is planned (rounded up per device) and flagged rather than refused
    plan = memory_plan(cfg, {"data": 2, "fsdp": 4, "tensor": 1}, batch_size=12)
    assert plan["problems"] and "not divisible by data*fsdp = 8" in plan["problems"][0]
    assert "PROBLEM" in memory.format_plan(plan)
    assert plan["activations"] == memory_plan(cfg, {"data": 2, "fsdp": 4, "tensor": 1}, batch_size=16)["activations"]
    with pytest.raises(presets.PresetError, match="qwen3-8b"):
        presets.decoder_config("qwen3-9b")


def test_dry_run_job_from_config(tmp_path, capsys):
    config = base_config()
    config.job = "dry_run"
    config.output_dir = str(tmp_path)
    config.model.preset = "qwen3-32b"
    config.model.param_dtype = "bfloat16"
    config.model.remat = True
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 4
    config.dry_run.num_devices = 64
    config.dry_run.chip = "v5p"
    config.train.batch_size, config.train.seq_len = 32, 2048
    summary = dry_run.run(config)
    assert summary["mesh"] == {"data": 1, "fsdp": 16, "tensor": 4} and summary["model"] == "qwen3-32b"
    assert summary["fits"] is True
    written = json.loads((tmp_path / "memory_plan.json").read_text())
    assert written["total"] == summary["total"]
    out = capsys.readouterr().out
    assert "qwen3-32b" in out and "fits" in out and "optimizer" in out
    # a 32B model in float32 would need ~131 GB: the plan never allocated it
    assert summary["num_params"] * 4 > 100 * GiB and math.isfinite(summary["hbm_fraction"])


def test_gemma3_and_mistral_presets():
    # Gemma 3 4B's text decoder (MedGemma-4B's) and 27B: the model cards' 4B (with a ~0.4B vision tower) and 27B
    for name, billions in [("medgemma-4b", 3.88), ("medgemma-27b", 27.0), ("mistral-7b", 7.24),
                           ("qwen2.5-coder-0.5b", 0.63)]:
        n = presets.decoder_config(name).num_params / 1e9
        assert abs(n - billions) / billions < 0.01, (name, n)
    g = presets.decoder_config("medgemma-27b")
    assert g.sliding_layers.count(False) == 10 and not g.sliding_layers[5] and g.sliding_layers[6]
    assert (g.sliding_window, g.local_rope_theta, g.query_pre_attn_scalar) == (1024, 1e4, 168)
    assert presets.decoder_config("mistral-7b").sliding_layers == (True,) * 32


def test_kv_cache_of_sliding_layers_and_what_a_ring_buffer_would_save():
    """The cache is full length on every layer (sliding layers mask); a window-sized ring buffer on the sliding
    layers would keep min(length, window) slots there. MedGemma-27B, one row of 32k tokens in bfloat16."""
    g = presets.decoder_config("medgemma-27b")
    per_slot = 2 * 16 * 128 * 2  # keys and values, 16 kv heads of 128, bfloat16
    one = memory.abstract_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    kw = dict(rows=1, length=32768, dtype="bfloat16", pad_rows=False)
    full = memory.kv_cache_bytes(g, one, **kw)
    ring = memory.kv_cache_bytes(g, one, ring=True, **kw)
    assert full == 62 * 32768 * per_slot == 15.5 * GiB
    assert ring == (10 * 32768 + 52 * 1024) * per_slot and ring / GiB == pytest.approx(2.906, abs=1e-3)
    # kv heads split over "tensor" when they divide it; no sliding layer: the ring changes nothing
    tensor4 = memory.abstract_mesh({"data": 1, "fsdp": 1, "tensor": 4})
    assert memory.kv_cache_bytes(g, tensor4, **kw) == full / 4
    q = presets.decoder_config("qwen3-8b")
    kw = dict(rows=2, length=4096, dtype="float32")
    assert memory.kv_cache_bytes(q, one, ring=True, **kw) == memory.kv_cache_bytes(q, one, **kw) > 0


@pytest.mark.parametrize("config_file, chip, train", [("configs/grpo_medgemma_27b.py", "v5p", True),
                                                      ("configs/evaluate_medgemma_4b.py", "v6e", False)])
def test_medgemma_configs_fit_their_slices(tmp_path, capsys, config_file, chip, train):
    from medkr_jax.config import config_from_file

    config = config_from_file(config_file)
    config.job, config.output_dir = "dry_run", str(tmp_path)
    summary = dry_run.run(config)
    assert summary["fits"] is True and summary["chip"] == chip and ("optimizer" in summary) == train
    if not train:  # inference: weights + a KV cache, and what the ring buffer would take
        assert 0 < summary["kv_cache_ring"] < summary["kv_cache"] and summary["total"] == summary["params"] + \
            summary["kv_cache"]
        assert "ring buffer" in capsys.readouterr().out


def test_lora_plan_by_hand_adapters_frozen_base_and_kv_cache():
    """Llama-3.1-8B, rank-16 adapters on its 7 projections: adapter count, a frozen bf16 base (no gradient, moments
    or master copy), the adapters' float32 state, and the rollout's KV cache, each computed by hand."""
    cfg = presets.decoder_config("llama3.1-8b")
    lora = LoRASettings(rank=16, alpha=32.0)
    kw = dict(param_dtype="bfloat16", batch_size=4, seq_len=2048, remat=True)
    one = memory_plan(cfg, {"data": 1, "fsdp": 1, "tensor": 1}, lora=lora, kv_rows=64, kv_len=2048, **kw)
    full = memory_plan(cfg, {"data": 1, "fsdp": 1, "tensor": 1}, **kw)
    e, m, q, kv = 4096, 14336, 32 * 128, 8 * 128
    adapters = 32 * 16 * ((e + q) * 2 + (e + kv) * 2 + (e + m) * 2 + (m + e))  # q o, k v, gate up, down
    assert one["adapter_params"] == adapters == 41_943_040 and one["num_params"] == cfg.num_params
    assert one["params"] == cfg.num_params * 2 + adapters * 4 and one["adapters"] == adapters * 4
    assert one["grads"] == adapters * 4 and one["optimizer"] == adapters * 8 and one["master"] == 0
    assert full["grads"] == cfg.num_params * 2 and full["master"] == cfg.num_params * 4
    # the adapters' rank-16 products of the one recomputed layer (remat), per token: 7 modules x 16, bfloat16
    assert one["activations"] - full["activations"] == pytest.approx(4 * 2048 * 7 * 16 * 2, abs=2)
    # 64 rows x 2048 tokens x 32 layers x (keys + values) x 8 KV heads x 128 in the compute dtype (bfloat16), as
    # the sampler keeps it; a float32 cache when asked for
    assert one["kv_cache"] == 64 * 2048 * 32 * 2 * 8 * 128 * 2 == 16 * GiB and one["kv_dtype"] == "bfloat16"
    wide = memory_plan(cfg, {"data": 1, "fsdp": 1, "tensor": 1}, lora=lora, kv_rows=64, kv_len=2048,
                       kv_dtype="float32", **kw)
    assert wide["kv_cache"] == 32 * GiB and wide["kv_dtype"] == "float32"
    assert one["total"] == (one["params"] + one["optimizer"]
                            + max(one["grads"] + one["activations"], one["kv_cache"]))
    # 48 rows pad to 64 (the sampler's power of two), split over fsdp=4; 8 KV heads over tensor=2
    four = memory_plan(cfg, {"data": 1, "fsdp": 4, "tensor": 2}, lora=lora, kv_rows=48, kv_len=1024, **kw)
    assert four["kv_cache"] == 64 // 4 * 1024 * 32 * 2 * (8 // 2) * 128 * 2
    assert four["adapters"] < one["adapters"] / 2  # the adapters split like the base kernels
    text = memory.format_plan(one)
    assert "LoRA r=16" in text and "41.9M trained params" in text and "kv_cache" in text
