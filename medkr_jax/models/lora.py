"""LoRA adapters on the decoder by module surgery: each targeted ``Dense`` projection becomes a ``LoRADense``.

``apply_lora(model, settings)`` replaces the decoder's attention / MLP projections whose module path matches one
of ``settings.target_modules`` (regular expressions searched in paths such as ``layers.attn.q_proj``, the layer
index left out) with a ``LoRADense``: the same kernel and bias objects (the base, frozen), plus ``lora_a`` [in, r]
and ``lora_b`` [r, out] (``LoRAParam``, float32), y = x W (+ b) + dropout(x) A B * alpha / r, as PEFT computes it.
A starts uniform in +-1/sqrt(in) (PEFT's default), B at zero, so a fresh adapter leaves the model unchanged.
Adapters follow the base's layout: a stacked kernel [L, in, out] (``scan_layers``) gets stacked adapters
[L, in, r] / [L, r, out]; each carries the base kernel's logical axes on its in / out dimension (the rank
dimension replicated), so the adapters shard like the base on any mesh. Parameter paths of the base are
unchanged (HF loading, export and sharding rules read them as before); the adapters sit beside the kernel
(``layers.attn.q_proj.lora_a``). A layer's modules share one graph definition, so a pattern selects the same
projections in every layer (no per-layer targeting).

Training: ``trainable_filter`` says what the trainer optimises (only ``LoRAParam`` once a model has adapters);
dropout draws its masks from a key set for one training forward pass with ``dropout_key`` (the trainer does),
per layer and module, and is off everywhere else (sampling, reference log-probs, export). ``adapters_off``
gives the base model (GRPO's reference) sharing the same arrays, ``merged_kernels`` the kernels with the
adapters folded in (the HF export), ``peft_tensors`` / ``peft_config`` the PEFT adapter folder's contents.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medkr_jax import parallel
from medkr_jax.models.decoder.layers import Dense

# The attention and MLP projections of every decoder family (PEFT's "all-linear" minus the LM head).
DEFAULT_TARGETS = (r"attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$")
_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_key", default=None)
_DROPOUT_SALT = 0x10A4  # folded into the step's key: the dropout stream differs from other users of that key


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """config.lora as plain values (the job builds it; see medkr_jax.config). rank 0 = no adapters."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(str(p) for p in self.target_modules))
        if self.rank < 0:
            raise ValueError(f"config.lora.rank must be >= 0 (0 = off), got {self.rank}")
        if self.rank and self.alpha <= 0:
            raise ValueError(f"config.lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config.lora.dropout must lie in [0, 1), got {self.dropout}")
        if self.rank and not self.target_modules:
            raise ValueError("config.lora.target_modules is empty: name the projections to adapt (regexes)")
        for pattern in self.target_modules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"config.lora.target_modules: {pattern!r} is not a regular expression: {e}") from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """PEFT's scaling of the adapter product, alpha / rank."""
        return self.alpha / self.rank


class LoRAParam(nnx.Param):
    """An adapter matrix: once a model has adapters, the only parameters training updates and checkpoints."""


class LoRALayer(nnx.Variable):
    """The layer index of an adapter (stacked: 0..L-1): each layer draws its own dropout masks. Not trained."""


class LoRADense(Dense):
    """A decoder ``Dense`` with a low-rank adapter: x W (+ b) + dropout(x) A B * scale (see the module doc)."""

    def __init__(self, base: Dense, *, rank: int, alpha: float, dropout: float, name: str, adapter_a: jax.Array,
                 layer: jax.Array):
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        axes = base.kernel.get_metadata().get("out_sharding") or (None,) * base.kernel.ndim
        *lead, _, dout = base.kernel.shape
        lead_axes = tuple(axes[:-2])
        self.lora_a = LoRAParam(adapter_a, out_sharding=lead_axes + (axes[-2], None))
        self.lora_b = LoRAParam(jnp.zeros((*lead, rank, dout), jnp.float32), out_sharding=lead_axes + (None, axes[-1]))
        self.layer = LoRALayer(layer)
        self.scale, self.dropout, self.enabled = alpha / rank, float(dropout), True
        self.module_id = zlib.crc32(name.encode()) & 0x7FFFFFFF  # static: the same in every layer

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        if not self.enabled:
            return y
        h = x.astype(self.dtype)
        key = _DROPOUT_KEY.get()
        if self.dropout > 0 and key is not None:
            key = jax.random.fold_in(jax.random.fold_in(key, self.module_id), self.layer[...])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0).astype(self.dtype)
        # 2-D products over the flattened rows, as Dense's (XLA:CPU runs their backward faster than the einsum's)
        rows = h.reshape(-1, h.shape[-1])
        down = rows @ self.lora_a[...].astype(self.dtype)
        up = (down @ self.lora_b[...].astype(self.dtype)).reshape(*h.shape[:-1], -1)
        return y + (up * self.scale).astype(y.dtype)


# ---------------------------------------------------------------------------------------------- surgery


@dataclasses.dataclass(frozen=True)
class _Site:
    """A projection LoRA can wrap: its parent module, attribute, name for patterns ("layers.attn.q_proj", also for
    the per-layer "layers.0.attn.q_proj") and layer (index, count) for per-layer modules, None when stacked."""

    parent: Any
    attr: str
    name: str
    layer: tuple[int, int] | None


def _sites(model: nnx.Module) -> list[_Site]:
    """Every Dense inside the decoder's layers (the LM head is read directly by the logits code: not wrapped)."""
    out = []
    for path, module in nnx.iter_modules(model):
        if not (isinstance(module, Dense) and path and path[0] == "layers"):
            continue
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        per_layer = len(path) > 1 and isinstance(path[1], int)
        layer = (path[1], len(model.layers)) if per_layer else None
        name = ".".join(str(k) for k in path if not isinstance(k, int))
        out.append(_Site(parent, str(path[-1]), name, layer))
    return out


def target_names(model: nnx.Module, patterns: tuple[str, ...]) -> list[str]:
    """The module names (layer index left out) the patterns select; a pattern that selects none is an error
    naming it and the names there are."""
    names = sorted({s.name for s in _sites(model)})
    chosen = set()
    for pattern in patterns:
        hits = [n for n in names if re.search(pattern, n)]
        if not hits:
            raise ValueError(f"config.lora.target_modules: pattern {pattern!r} matches no module; the modules LoRA "
                             f"can adapt are {names}")
        chosen.update(hits)
    return sorted(chosen)


def apply_lora(model: nnx.Module, settings: LoRASettings, *, mesh: jax.sharding.Mesh | None = None, rules: Any = None,
               seed: int = 0) -> nnx.Module:
    """Wrap the targeted projections of ``model`` (in place; returned) with adapters; a no-op for rank 0.

    ``mesh`` / ``rules``: where the adapters are placed (the model's own mesh and rules); without a mesh the
    current sharding context is used. A module's A is drawn from ``seed`` and its name, the whole stack at once,
    so per-layer and stacked (scan_layers) models start from the same adapters.
    """
    if not settings.enabled:
        return model
    if has_adapters(model):
        raise ValueError("the model already has LoRA adapters")
    chosen = set(target_names(model, settings.target_modules))
    drawn: dict[str, jax.Array] = {}  # module name -> A of the whole stack [L, in, r]

    def draw(site: _Site, kernel_shape: tuple) -> jax.Array:
        if site.name not in drawn:
            shape = kernel_shape if site.layer is None else (site.layer[1], *kernel_shape)
            key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(site.name.encode()) & 0x7FFFFFFF)
            bound = 1.0 / math.sqrt(shape[-2])  # PEFT's kaiming_uniform(a=sqrt(5)) bound, 1 / sqrt(fan_in)
            drawn[site.name] = jax.random.uniform(key, (*shape[:-1], settings.rank), jnp.float32, -bound, bound)
        return drawn[site.name] if site.layer is None else drawn[site.name][site.layer[0]]

    context = parallel.sharding_context(mesh, rules) if mesh is not None else contextlib.nullcontext()
    with context, nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
        for site in (s for s in _sites(model) if s.name in chosen):
            base = getattr(site.parent, site.attr)
            layer = (jnp.arange(base.kernel.shape[0], dtype=jnp.int32) if site.layer is None
                     else jnp.int32(site.layer[0]))
            setattr(site.parent, site.attr, LoRADense(base, rank=settings.rank, alpha=settings.alpha,
                                                      dropout=settings.dropout, name=site.name,
                                                      adapter_a=draw(site, base.kernel.shape), layer=layer))
    return model


def lora_modules(model: nnx.Module) -> list[tuple[str, LoRADense]]:
    """(dotted path, module) of every adapted projection."""
    return [(".".join(map(str, p)), m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRADense)]


def has_adapters(model: nnx.Module) -> bool:
    return any(isinstance(m, LoRADense) for _, m in nnx.iter_modules(model))


def trainable_filter(model: nnx.Module):
    """What training updates: the adapters once the model has any (the base is frozen), else every nnx.Param."""
    return LoRAParam if has_adapters(model) else nnx.Param


# --------------------------------------------------------------------------------------- training views


@contextlib.contextmanager
def dropout_key(key: jax.Array):
    """Adapter dropout on, with masks drawn from ``key`` (per layer and module), for the forward passes inside."""
    token = _DROPOUT_KEY.set(jax.random.fold_in(key, _DROPOUT_SALT))
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


def with_dropout(loss_fn: Callable) -> Callable:
    """``loss_fn(model, batch, rng)`` with adapter dropout keyed by its ``rng`` (a no-op without adapters or
    with dropout 0)."""
    def loss(model, batch, rng):
        with dropout_key(rng):
            return loss_fn(model, batch, rng)
    return loss


def adapters_off(model: nnx.Module) -> nnx.Module:
    """The base model: a view of ``model`` with every adapter switched off, sharing its arrays (no copy)."""
    view = nnx.clone(model)
    for _, module in lora_modules(view):
        module.enabled = False
    return view


@jax.jit
def _merge(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    delta = jnp.einsum("...ir,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merged_kernels(model: nnx.Module) -> dict[str, Callable[[], jax.Array]]:
    """Kernel path ("layers.attn.q_proj.kernel") -> a function computing W + A B * scale in the kernel's dtype,
    one at a time (an export streams them, never holding a second copy of the model)."""
    return {f"{path}.kernel": (lambda m=m: _merge(m.kernel[...], m.lora_a[...], m.lora_b[...],
                                                  jnp.float32(m.scale)))
            for path, m in lora_modules(model)}


# ------------------------------------------------------------------------------------------------ PEFT


def peft_tensors(model: nnx.Module, hf_names: dict[str, Any]) -> dict[str, tuple[Any, bool]]:
    """Our adapter path -> (PEFT tensor name(s), transpose), from ``hf_names`` (our kernel path -> HF weight
    name(s), as ``hf_param_mapping`` gives them): ``base_model.model.<module>.lora_A.weight`` [r, in] and
    ``lora_B.weight`` [out, r], torch's Linear layout."""
    def rename(names, suffix):
        one = lambda n: "base_model.model." + n.removesuffix(".weight") + suffix  # noqa: E731
        return one(names) if isinstance(names, str) else [one(n) for n in names]

    out = {}
    for path, _ in lora_modules(model):
        names = hf_names[f"{path}.kernel"][0]
        out[f"{path}.lora_a"] = (rename(names, ".lora_A.weight"), True)
        out[f"{path}.lora_b"] = (rename(names, ".lora_B.weight"), True)
    return out


def peft_config(model: nnx.Module, settings: LoRASettings, base_model: str = "") -> dict:
    """adapter_config.json of a PEFT LoRA folder for these adapters (PEFT matches target names as suffixes of
    module names: the projections' own names, the same in every layer)."""
    targets = sorted({path.rsplit(".", 1)[-1] for path, _ in lora_modules(model)})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
            "lora_dropout": settings.dropout, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
            "base_model_name_or_path": base_model or None}


def adapter_count(model: nnx.Module) -> int:
    """Number of adapter parameters."""
    return int(sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, LoRAParam))))
