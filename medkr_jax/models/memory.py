"""Dry-run memory plan: per-device bytes of a training step on a named mesh, without allocating.

The model is built abstractly (``nnx.eval_shape``) under an ``AbstractMesh`` of the requested
shape with the given logical sharding rules, so each parameter's shard shape is exactly what
the real run would place on a device, and no device of that shape needs to exist here.

Counted per device: parameters, gradients (same sharding and dtype as the parameters), AdamW's two
moments (float32), an optional float32 master copy (when parameters are stored in a lower
precision), and an activation estimate for one micro-batch (see ``activation_bytes``). With LoRA
(``lora`` settings) the adapters are built on the abstract model as a run builds them: the base
counts once (frozen: no gradient, moments or master copy), gradients and moments are the adapters'
alone. A GRPO rollout's KV cache (``kv_rows`` sequences of ``kv_len`` tokens, laid out as the
sampler lays it out) is planned beside the training step: the two alternate, so the total is the
persistent state plus the larger of the two. An inference plan (``train=False``) counts the parameters
and the sampler's KV cache (``kv_cache_bytes``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from medkr_jax import parallel
from medkr_jax.models import lora as lora_lib
from medkr_jax.models.decoder import Decoder, DecoderConfig

GiB = 1024 ** 3
# HBM per device (one JAX device: a TPU chip, or one GPU).
CHIP_HBM = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB, "h100": 80 * GiB,
            "h200": 141 * GiB}
# Fraction of HBM a plan may use: XLA needs scratch space, and fragmentation is real.
USABLE_FRACTION = 0.9


class MemoryPlanError(ValueError):
    """The requested plan is inconsistent (unknown chip, mesh that does not divide a tensor ...)."""


def _dtype(name_or_dtype) -> np.dtype:
    try:
        return np.dtype(jnp.dtype(name_or_dtype))
    except TypeError:
        raise MemoryPlanError(f"unknown dtype {name_or_dtype!r}") from None


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    """An AbstractMesh over ("data", "fsdp", "tensor") with the given (positive) sizes."""
    shape = tuple(int(sizes.get(a, 1)) for a in parallel.MESH_AXES)
    if any(s < 1 for s in shape):
        raise MemoryPlanError("mesh sizes must be positive after resolving -1, got "
                              f"{dict(zip(parallel.MESH_AXES, shape))}")
    return AbstractMesh(shape, parallel.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def param_shards(cfg: DecoderConfig, mesh: AbstractMesh, rules=None, param_dtype=jnp.float32,
                 lora: lora_lib.LoRASettings | None = None) -> list[dict]:
    """For every parameter: path, global shape, per-device shard shape, partition spec, dtype, whether it is a
    LoRA adapter (with ``lora`` settings of rank > 0, built as a run builds them)."""
    def build():
        model = Decoder(cfg, param_dtype=param_dtype, scan_layers=True, rngs=nnx.Rngs(0))
        return lora_lib.apply_lora(model, lora) if lora is not None else model

    with jax.sharding.use_abstract_mesh(mesh), nnx.logical_axis_rules(parallel.logical_rules(rules)):
        # The stacked layout has the same bytes per device and far fewer entries to walk.
        model = nnx.eval_shape(build)
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        name = ".".join(map(str, path))
        spec = value.sharding.spec
        for dim, axes in zip(value.shape, spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                raise MemoryPlanError(f"parameter {name!r} dim of size {dim} is split over mesh axes {axes} "
                                      f"(size {size}), which does not divide it; change the mesh or "
                                      "config.sharding_rules")
        out.append({"name": name, "shape": tuple(value.shape), "spec": spec, "dtype": np.dtype(value.dtype),
                    "shard_shape": tuple(value.sharding.shard_shape(value.shape)),
                    "adapter": isinstance(var, lora_lib.LoRAParam)})
    return out


def activation_bytes(cfg: DecoderConfig, *, batch_per_device: int, seq_len: int, tensor: int, dtype,
                     remat: bool, lora_per_token: float = 0.0) -> dict[str, int]:
    """Estimate of activation memory for one forward+backward on one device.

    Per layer and token, without remat the backward pass keeps: the residual input and the two
    normed inputs (3 x embed), q/k/v and the attention output (split by tensor), attention scores
    and probabilities (float32, heads/tensor x seq_len each), and the MLP's gate, up, silu(gate)
    and product (4 x mlp/tensor), plus ``lora_per_token`` elements of the adapters (their rank-r
    products, and their dropped-out inputs when dropout is on). With remat only each layer's input
    survives, plus one layer's full set while it is recomputed. Logits (float32, vocab split by
    tensor) are kept with their log-softmax for the loss.
    """
    b = np.dtype(jnp.dtype(dtype)).itemsize
    tok = batch_per_device * seq_len
    e, hd = cfg.hidden_size, cfg.head_dim
    heads_t = math.ceil(cfg.num_heads / tensor)
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd / tensor + cfg.num_heads * hd / tensor
    per_layer_tok = (b * (3 * e + qkv + 4 * cfg.intermediate_size / tensor + lora_per_token)
                     + 2 * 4 * heads_t * seq_len)
    per_layer = int(tok * per_layer_tok)
    residual = int(tok * e * b)
    if remat:
        layers = cfg.num_layers * residual + per_layer
    else:
        layers = cfg.num_layers * per_layer
    logits = int(2 * tok * math.ceil(cfg.vocab_size / tensor) * 4)
    return {"layers": layers, "logits": logits, "total": layers + logits}


def kv_cache_bytes(cfg: DecoderConfig, mesh: AbstractMesh, *, rows: int, length: int, dtype="float32",
                   ring: bool = False, pad_rows: bool = True) -> int:
    """Per-device bytes of the sampler's KV cache for ``rows`` sequences of ``length`` tokens: keys and values
    of every layer.

    Rows are split over data x fsdp, padded first as the GRPO sampler pads them (a power of two, a multiple of
    data*fsdp) unless ``pad_rows`` is False; KV heads over "tensor" when they divide it. The cache is full
    length on every layer: sliding layers only mask the slots outside their window (see ``decoder.model``).
    ``ring``: the bytes a ring buffer of ``sliding_window`` slots on the sliding layers would take instead (what
    that choice leaves on the table; e.g. MedGemma-27B, 52 of its 62 layers sliding with a 1024 window, for a
    32k-token generation: 15.5 GiB -> 2.9 GiB per row in bfloat16).
    """
    if rows <= 0 or length <= 0:
        return 0
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if pad_rows:
        rows = 1 << max(0, (rows - 1).bit_length())
        rows = max(batch_shards, -(-rows // batch_shards) * batch_shards)
    tensor = mesh.shape["tensor"]
    heads = cfg.num_kv_heads // tensor if cfg.num_kv_heads % tensor == 0 else cfg.num_kv_heads
    per_slot = 2 * heads * cfg.head_dim * _dtype(dtype).itemsize
    slots = sum(min(length, cfg.sliding_window) if (ring and local) else length for local in cfg.sliding_layers)
    return -(-rows // batch_shards) * per_slot * slots


def _train_bytes(shards: list[dict], pdt: np.dtype, master_weights: bool) -> dict[str, int]:
    """Per-device params, grads, AdamW moments and master copy. Without adapters every parameter trains; with
    them only the adapters (float32) do, and the base (param dtype) is frozen."""
    adapters = sum(math.prod(s["shard_shape"]) for s in shards if s["adapter"])
    base = sum(math.prod(s["shard_shape"]) for s in shards if not s["adapter"])
    trained, trained_bytes = (adapters, 4) if adapters else (base, pdt.itemsize)
    return {"params": base * pdt.itemsize + adapters * 4, "adapters": adapters * 4,
            "grads": trained * trained_bytes, "optimizer": trained * 4 * 2,
            "master": trained * 4 if (master_weights and trained_bytes < 4) else 0}


def memory_plan(cfg: DecoderConfig, mesh_sizes: dict[str, int], *, rules=None, param_dtype="float32",
                dtype="bfloat16", batch_size: int = 8, seq_len: int = 2048, remat: bool = True,
                master_weights: bool = True, chip: str | None = None, train: bool = True,
                lora: lora_lib.LoRASettings | None = None, kv_rows: int = 0, kv_len: int = 0,
                kv_dtype=None) -> dict[str, Any]:
    """Per-device memory of a training step (or, with train=False, of inference weights only).

    Args:
      cfg: decoder hyper-parameters (e.g. ``presets.decoder_config("qwen3-32b")``).
      mesh_sizes: {"data", "fsdp", "tensor"} sizes (all positive).
      rules: logical sharding rules (default ``sharding_rules.DEFAULT_SHARDING_RULES``).
      param_dtype / dtype: parameter storage and compute dtypes.
      batch_size, seq_len: global batch (rows) and sequence length of one micro-batch.
      remat: rematerialise each layer in the backward pass.
      master_weights: keep a float32 master copy when param_dtype is lower precision.
      chip: one of CHIP_HBM's names, to check that the plan fits.
      train: False plans inference: the parameters and the KV cache of ``batch_size`` rows of ``seq_len`` tokens
        (cache in the compute dtype), with what a window-sized ring buffer would take (``kv_cache_ring``).
      lora: LoRA settings; rank > 0 trains adapters on the frozen base (see the module doc).
      kv_rows, kv_len, kv_dtype: a GRPO rollout's KV cache (``kv_cache_bytes``); 0 rows = none; kv_dtype None:
        the compute dtype, as the sampler keeps it.
    """
    if chip is not None and chip not in CHIP_HBM:
        raise MemoryPlanError(f"unknown chip {chip!r}; known: {sorted(CHIP_HBM)}")
    mesh = abstract_mesh(mesh_sizes)
    pdt = _dtype(param_dtype)
    shards = param_shards(cfg, mesh, rules, pdt, lora if lora is not None and lora.enabled else None)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    problems = []
    if train and batch_size % batch_shards:
        # Still plan (with the per-device batch rounded up), but say that the run would refuse it.
        problems.append(f"global batch {batch_size} is not divisible by data*fsdp = {batch_shards}; "
                        "the training step needs a multiple")
    state = _train_bytes(shards, pdt, master_weights)
    plan: dict[str, Any] = {
        "num_params": sum(math.prod(s["shape"]) for s in shards if not s["adapter"]),
        "adapter_params": sum(math.prod(s["shape"]) for s in shards if s["adapter"]),
        "num_devices": math.prod(mesh.shape.values()),
        "mesh": dict(mesh.shape),
        "param_dtype": pdt.name,
        "dtype": _dtype(dtype).name,
        "params": state["params"],
        "adapters": state["adapters"],
    }
    if plan["adapter_params"]:
        plan["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                        "modules": sorted({s["name"].rsplit(".", 1)[0].removeprefix("layers.")
                                           for s in shards if s["adapter"]})}
    if train:
        plan.update({k: state[k] for k in ("grads", "optimizer", "master")})
        act = activation_bytes(cfg, batch_per_device=-(-batch_size // batch_shards), seq_len=seq_len,
                               tensor=mesh.shape["tensor"], dtype=dtype, remat=remat,
                               lora_per_token=_lora_activations(shards, lora))
        plan["activations"] = act["total"]
        plan["activation_detail"] = act
        plan.update(batch_size=batch_size, seq_len=seq_len, remat=bool(remat))
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        plan["kv_cache"] = kv_cache_bytes(cfg, mesh, rows=kv_rows, length=kv_len, dtype=kv_dtype)
        if plan["kv_cache"]:
            plan.update(kv_rows=kv_rows, kv_len=kv_len, kv_dtype=_dtype(kv_dtype).name)
    else:
        kw = dict(rows=batch_size, length=seq_len, dtype=dtype, pad_rows=False)
        plan["kv_cache"] = kv_cache_bytes(cfg, mesh, **kw)
        plan["kv_cache_ring"] = kv_cache_bytes(cfg, mesh, ring=True, **kw)
        plan.update(batch_size=batch_size, seq_len=seq_len)
    plan["problems"] = problems
    persistent = sum(plan.get(k, 0) for k in ("params", "optimizer", "master"))
    plan["total"] = persistent + max(plan.get("grads", 0) + plan.get("activations", 0), plan["kv_cache"])
    if chip is not None:
        plan["chip"] = chip
        plan["hbm"] = CHIP_HBM[chip]
        plan["fits"] = plan["total"] <= USABLE_FRACTION * CHIP_HBM[chip]
        plan["hbm_fraction"] = plan["total"] / CHIP_HBM[chip]
    return plan


def _lora_activations(shards: list[dict], lora: lora_lib.LoRASettings | None) -> float:
    """Adapter activation elements per token and layer: each adapted module's rank-r product, plus its input
    again when dropout keeps a masked copy."""
    if lora is None or not lora.enabled:
        return 0.0
    a = [s for s in shards if s["adapter"] and s["name"].endswith("lora_a")]
    return float(sum(lora.rank + (s["shard_shape"][-2] if lora.dropout > 0 else 0) for s in a))


def format_plan(plan: dict[str, Any], name: str = "") -> str:
    """A readable table of a plan."""
    gib = lambda n: f"{n / GiB:9.2f} GiB"  # noqa: E731
    mesh = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    lines = [f"memory plan {name}: {plan['num_params'] / 1e9:.2f}B params on {plan['num_devices']} devices ({mesh})",
             f"  param dtype {plan['param_dtype']}, compute dtype {plan['dtype']}"]
    if "remat" in plan:
        lines.append(f"  global batch {plan['batch_size']} x seq {plan['seq_len']}, remat={plan['remat']}")
    elif "batch_size" in plan:
        lines.append(f"  inference: {plan['batch_size']} rows x {plan['seq_len']} tokens of KV cache")
    if plan.get("lora"):
        lo = plan["lora"]
        lines.append(f"  LoRA r={lo['rank']} alpha={lo['alpha']:g} dropout={lo['dropout']:g} on "
                     f"{', '.join(lo['modules'])}: {plan['adapter_params'] / 1e6:.1f}M trained params (base frozen)")
    lines.append("  per device:")
    for key in ("params", "adapters", "grads", "optimizer", "master", "activations", "kv_cache"):
        if plan.get(key) or (key in plan and key not in ("adapters", "kv_cache")):
            note = " (of params)" if key == "adapters" else ""
            if key == "kv_cache" and "kv_rows" in plan:
                note = (f" ({plan['kv_rows']} rollout rows x {plan['kv_len']} tokens, {plan['kv_dtype']}; in turn "
                        "with grads + activations)")
            lines.append(f"    {key:12s}{gib(plan[key])}{note}")
    if plan.get("kv_cache_ring", plan.get("kv_cache")) != plan.get("kv_cache"):
        lines.append(f"    (a ring buffer of the sliding window on the sliding layers: kv_cache {gib(plan['kv_cache_ring'])})")
    lines.append(f"    {'total':12s}{gib(plan['total'])}")
    if "chip" in plan:
        verdict = "fits" if plan["fits"] else "DOES NOT FIT"
        lines.append(f"  {plan['chip']} HBM {plan['hbm'] / GiB:.0f} GiB: {100 * plan['hbm_fraction']:.1f}% used "
                     f"-> {verdict} (limit {100 * USABLE_FRACTION:.0f}%)")
    lines.extend(f"  PROBLEM: {p}" for p in plan.get("problems", ()))
    return "\n".join(lines)

