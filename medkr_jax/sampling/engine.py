"""The generation engine: continuous batching over a fixed number of decode slots, on one device or a mesh.

Every generating caller (evaluation, adversarial evaluation, GRPO rollouts) runs through :class:`Sampler`. It
keeps ``slots`` rows decoding at once, each in its own rows of one preallocated KV cache with its own write
position. When a row stops (a stop id, or its own ``max_new_tokens``) its slot takes the next waiting row: the
row's prompt is prefilled into that slot's cache rows while the other slots keep their state, and decoding
goes on. Decoding runs as compiled chunks of up to ``chunk_steps`` steps (``programs.decode``), so the host
reads tokens back once per chunk, not once per token; a chunk hands back early once enough slots are free for
a refill. Rows wait longest first (``scheduler``).

Same answers as the static-batch path (``static.StaticSampler``): a row's prompt is left-padded into a bucket
with explicit positions (the model sees each row as if alone), row (p, j) draws its t-th token from
``fold_in(fold_in(fold_in(key(seed), prompt_keys[p]), j), t)`` whatever its slot, chunk or neighbours, and
``logprobs`` are ``log_softmax`` of the raw logits at the emitted token (what GRPO's ratio and KL need; not the
filtered, tempered distribution the token was drawn from). Sliding-window layers mask the slots outside their
window in the full-length cache, as in the model (a row's tokens sit in consecutive slots).

Cost: every decode step attends over the whole cache length of every slot (the longest prompt bucket + the
generation bucket), as the static path does over its batch's, and so reads the whole cache from memory
(bench/sampler.py's model, 16 rows, 1 thread: 6.8 ms a step at 128 cache slots, 9.3 at 576, 13.9 at 1,088, 20.5
at 2,112). A decode program per live-length bucket would cut that on runs of mostly short rows; not done: it
would add programs, and on XLA:CPU attention over a prefix of the cache first copies that prefix (measured: a
per-layer switch over windows gained nothing on bench/engine.py; a loop over 128-slot cache blocks, 16 rows x 768
slots x 4 layers, took 3.1 ms against 3.9 for the whole cache when every row held 200 tokens, 8.4 against 3.8 at
768).

What a call did (``last_stats``, a :class:`RunStats`): decode steps and chunks, the share of slot-steps that
emitted a token (``occupancy``: how well refills keep the slots busy), and the prefill's model rows against the
prompt tokens they carry (``prefill_padding``: the share of prefilled positions that are bucket padding).

Compiled programs (``num_compiles``): one empty state per (slots, cache length, thinking) shape, one prefill
per prompt bucket, one decode chunk per greedy / sampled / filtered mode; temperature, top-k, top-p and every
row's max_new_tokens are runtime values. On CPU one more small program per tied-embedding model lays out the LM
head for decode steps (``Decoder.decode_head``, ``num_layout_compiles``).

Sharding: slots are split over the ("data", "fsdp") mesh axes, the cache's KV heads over "tensor" when they
divide it; the model's parameters keep their own sharding, and the model is passed on every call, so a policy
being trained is sampled with its current weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from medkr_jax import xla_options
from medkr_jax.data.pipeline import bucket_length
from medkr_jax.sampling import programs
from medkr_jax.sampling.base import (DEFAULT_GEN_BUCKETS, DEFAULT_PROMPT_BUCKETS, SampleOutput, SamplerBase,
                                     checked_prompts, host, next_pow2, row_keys, signature)
from medkr_jax.sampling.scheduler import Finished, Scheduler
from medkr_jax.sampling.thinking import ThinkingBudget


@dataclasses.dataclass
class RunStats:
    """What one ``stream`` / ``generate`` call did (``Sampler.last_stats``): its ``slots`` and ``cache_length``, the
    decode ``chunks`` and ``steps`` run, the ``tokens`` its rows emitted, and the prefill's ``prefill_calls``,
    ``prompt_tokens`` (real) and ``prefill_positions`` (model rows x bucket length: padding included)."""

    slots: int = 0
    cache_length: int = 0
    chunks: int = 0
    steps: int = 0
    tokens: int = 0
    prefill_calls: int = 0
    prompt_tokens: int = 0
    prefill_positions: int = 0

    @property
    def occupancy(self) -> float:
        """Emitted tokens over slot-steps: 1 when every slot emits a token at every decode step."""
        return self.tokens / (self.steps * self.slots) if self.steps else 0.0

    @property
    def prefill_padding(self) -> float:
        """Share of the prefilled positions that hold no prompt token (bucket padding, filler rows)."""
        return 1.0 - self.prompt_tokens / self.prefill_positions if self.prefill_positions else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "occupancy": self.occupancy, "prefill_padding": self.prefill_padding}


class Sampler(SamplerBase):
    """Continuous-batching generation engine; see the module docstring.

    slots: rows decoding at once (default: ``batch_size`` of the call, else the rows rounded up to a power of
    two); chunk_steps: decode steps per compiled chunk; prefill_tokens: prompt tokens per prefill call (a bucket
    of L tokens prefills max(1, prefill_tokens // L) prompts at once); min_refill: free slots a chunk waits for
    before handing back to refill them (default slots // 8); cache_dtype: the KV cache's dtype (default: the
    model's compute dtype, ``SamplerBase.cache_dtype_for``).
    """

    def __init__(self, cfg: Any, *, mesh: Mesh | None = None, rules: Any = None, pad_id: int,
                 stop_ids: Sequence[int], prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                 gen_buckets: Sequence[int] = DEFAULT_GEN_BUCKETS, cache_dtype: Any = None,
                 chunk_steps: int = 32, prefill_tokens: int = 128, min_refill: int | None = None):
        super().__init__(cfg, mesh=mesh, rules=rules, pad_id=pad_id, stop_ids=stop_ids,
                         prompt_buckets=prompt_buckets, gen_buckets=gen_buckets, cache_dtype=cache_dtype)
        if chunk_steps < 1 or prefill_tokens < 1 or (min_refill is not None and min_refill < 1):
            raise ValueError(f"chunk_steps, prefill_tokens and min_refill must be >= 1, got {chunk_steps}, "
                             f"{prefill_tokens}, {min_refill}")
        self.chunk_steps, self.prefill_tokens, self.min_refill = chunk_steps, prefill_tokens, min_refill
        self.last_stats = RunStats()

    # ---------------------------------------------------------------- public API

    def generate(self, model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                 **kwargs: Any) -> SampleOutput:
        """Continue each prompt ``n`` times (rows of a prompt contiguous); see :meth:`stream` for the arguments.
        ``tokens`` / ``logprobs`` are as wide as the largest max_new_tokens."""
        n = int(kwargs.get("n", 1))
        checked_prompts(prompts, max_new_tokens=max_new_tokens, n=n, temperature=kwargs.get("temperature", 0.0),
                        top_k=kwargs.get("top_k", 0), top_p=kwargs.get("top_p", 1.0))
        width = int(np.max(max_new_tokens)) if len(prompts) else 0
        rows = len(prompts) * n
        tokens = np.full((rows, width), self.pad_id, np.int32)
        logprobs = np.zeros((rows, width), np.float32)
        lengths = np.zeros((rows,), np.int32)
        for fin in self.stream(model, prompts, max_new_tokens=max_new_tokens, **kwargs):
            for j, (toks, lps) in enumerate(zip(fin.tokens, fin.logprobs)):
                r = fin.prompt * n + j
                tokens[r, :len(toks)], logprobs[r, :len(toks)], lengths[r] = toks, lps, len(toks)
        return SampleOutput(tokens=tokens, logprobs=logprobs, lengths=lengths,
                            prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), n))

    def stream(self, model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, n: int = 1, seed: int = 0,
               batch_size: int | None = None, prompt_keys: Sequence[int] | None = None,
               thinking: ThinkingBudget | None = None) -> Iterator[Finished]:
        """Yield each prompt's ``n`` continuations as soon as all of them have stopped; temperature 0 is greedy.

        max_new_tokens: one for all prompts or one per prompt. Row (p, j) draws its randomness from its own key
        (``prompt_keys`` default 0..N-1; pass stable ids, e.g. hashed question ids, so resumed runs reproduce).
        batch_size: the number of slots. thinking: a thinking budget (``sampling.thinking``), or None.
        """
        prompts = checked_prompts(prompts, max_new_tokens=max_new_tokens, n=n, temperature=temperature,
                                  top_k=top_k, top_p=top_p)
        if not prompts:
            return
        prompt_keys = range(len(prompts)) if prompt_keys is None else prompt_keys
        if len(prompt_keys) != len(prompts):
            raise ValueError(f"{len(prompt_keys)} prompt_keys for {len(prompts)} prompts")
        limits = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (len(prompts),))
        rows = len(prompts) * n
        keys = row_keys(seed, np.repeat(np.asarray(prompt_keys, np.int64), n), np.tile(np.arange(n), len(prompts)))
        div = self.placement.divisor()
        slots = min(int(batch_size), next_pow2(rows)) if batch_size else next_pow2(rows)
        slots = max(div, math.ceil(slots / div) * div)
        need = (max(self.prompt_bucket(len(p)) for p in prompts)
                + bucket_length(int(limits.max()), self.gen_buckets, past_top="grow"))
        shape = self._shape(programs.Shape(slots, need, bool(getattr(model, "scan_layers", False)),
                                           self.cache_dtype_for(model), thinking))
        greedy = temperature == 0.0
        mode = (greedy, (not greedy) and (top_k > 0 or top_p < 1.0))
        scalars = tuple(jnp.asarray(x) for x in (np.float32(1.0 if greedy else temperature), np.int32(top_k),
                                                  np.float32(top_p)))
        graphdef, params = nnx.split(model)
        head = self._head(model, graphdef, params, slots)
        state = self._program(("init", shape), lambda: self._init_program(shape))()
        sched = Scheduler([len(p) for p in prompts], limits, n, slots)
        stats = self.last_stats = RunStats(slots=slots, cache_length=shape.length)
        min_refill = self.min_refill or max(1, slots // 8)
        # This call's programs, looked up once (a program's key hashes the model's graph: ~2 ms a lookup).
        decode = self._decode(graphdef, params, head, state, shape, scalars, mode)
        prefills: dict[tuple[int, int], Any] = {}
        while not sched.finished():
            placed = sched.assign()
            if placed:
                state = self._refill(graphdef, params, state, shape, placed, prompts, keys, limits, n, prefills,
                                     stats)
            state, toks, lps, count, done, ran = decode(params, head, state, *scalars,
                                                        jnp.asarray(np.int32(sched.want_done(min_refill))))
            stats.chunks, stats.steps = stats.chunks + 1, stats.steps + int(host(ran))
            for p in sched.record(*(host(x) for x in (toks, lps, count, done))):
                fin = sched.result(p)
                stats.tokens += sum(len(t) for t in fin.tokens)
                yield fin

    # ---------------------------------------------------------------- programs

    def _program(self, key: Any, build):
        prog = self._programs.get(key)
        if prog is None:
            prog = self._programs[key] = build()
        return prog

    def _shape(self, shape: programs.Shape) -> programs.Shape:
        """``shape``, or one already compiled for with a longer cache of at most twice the length (so calls whose
        longest prompts fall in different buckets, e.g. GRPO's rollouts, share their programs)."""
        fits = [key[1] for key in self._programs if key[0] == "init" and key[1].length >= shape.length
                and key[1].length <= 2 * shape.length and key[1] == dataclasses.replace(shape, length=key[1].length)]
        return min(fits, key=lambda s: s.length, default=shape)

    def _state_shardings(self, shape: programs.Shape):
        return programs.state_shardings(self.placement, shape, self.cfg)

    def _init_program(self, shape: programs.Shape):
        jitted = jax.jit(lambda: programs.empty_state(self.cfg, shape), out_shardings=self._state_shardings(shape))
        return self.placement.compile(jitted)

    def _decode(self, graphdef, params, head, state, shape, scalars, mode):
        key = ("decode", graphdef, signature((params, head)), shape, self.chunk_steps, mode)

        def build():
            fn = programs.decode(graphdef, shape, steps=self.chunk_steps, pad_id=self.pad_id,
                                 stop_ids=self.stop_ids, greedy=mode[0], filtered=mode[1])
            rep = self.placement.replicated()
            out = None if self.mesh is None else (self._state_shardings(shape), rep, rep, rep, rep, rep)
            jitted = jax.jit(fn, donate_argnums=(2,), out_shardings=out)
            return self.placement.compile(jitted, params, head, state, *scalars, jnp.int32(0))

        return self._program(key, build)

    def _refill(self, graphdef, params, state, shape, placed, prompts, keys, limits, n, prefills, stats):
        """Prefill the prompts of the newly ``placed`` (slot, row) pairs into their slots, one call per bucket;
        a prompt placed in several slots is prefilled once. ``prefills``: the call's programs by (bucket, width);
        ``stats``: the call's RunStats, updated."""
        by_prompt: dict[int, list[tuple[int, int]]] = {}
        for slot, row in placed:
            by_prompt.setdefault(row // n, []).append((slot, row))
        by_bucket: dict[int, list[int]] = {}
        for p in by_prompt:
            by_bucket.setdefault(self.prompt_bucket(len(prompts[p])), []).append(p)
        for bucket, group in sorted(by_bucket.items(), reverse=True):
            width = self._prefill_rows(bucket, shape.slots)
            args = self._prefill_args(group, by_prompt, prompts, keys, limits, shape, bucket, width)
            if (bucket, width) not in prefills:
                prefills[bucket, width] = self._program(
                    ("prefill", graphdef, signature(params), shape, bucket, width),
                    lambda: self._prefill_program(graphdef, params, state, shape, bucket, width, args))
            state = prefills[bucket, width](params, state, *args)
            stats.prefill_calls += 1
            stats.prompt_tokens += sum(len(prompts[p]) for p in group)
            stats.prefill_positions += math.ceil(len(group) / width) * width * bucket  # model rows x bucket
        return state

    def _prefill_rows(self, bucket: int, slots: int) -> int:
        """Prompts the model takes at once in a prefill of this bucket: ``prefill_tokens // bucket``, at least 1,
        at most ``slots`` (a multiple of the mesh's batch divisor on a mesh)."""
        div = self.placement.divisor()
        width = max(1, min(slots, self.prefill_tokens // bucket))
        return math.ceil(width / div) * div if self.mesh is not None else width

    def _prefill_program(self, graphdef, params, state, shape, bucket, width, args):
        fn = programs.prefill(graphdef, shape, bucket, width)
        # A prefill runs the model over whole prompts: a dense program (xla_options), unlike the decode steps.
        # SmolLM2-135M, 8 prompts into bucket 64, 1 thread: a one-token call 1.32 -> 1.17 s.
        jitted = jax.jit(fn, donate_argnums=(1,), out_shardings=self._state_shardings(shape),
                         compiler_options=xla_options.dense_program_options())
        return self.placement.compile(jitted, params, state, *args)

    def _prefill_args(self, group, by_prompt, prompts, keys, limits, shape, bucket, width) -> tuple:
        """(tokens, positions, mask [P, bucket], src [B], new fields, calls) of one prefill call: the ``group``'s
        prompts in rows 0.., P = ``width`` x the calls that ``shape.slots`` prompts need (one shape per bucket)."""
        calls = math.ceil(len(group) / width)
        rows = width * math.ceil(shape.slots / width)
        tokens = np.full((rows, bucket), self.pad_id, np.int32)
        positions = np.zeros((rows, bucket), np.int32)
        mask = np.zeros((rows, bucket), bool)
        src = np.full((shape.slots,), -1, np.int32)
        new = {"keys": np.zeros((shape.slots, 2), np.uint32), "limit": np.zeros((shape.slots,), np.int32)}
        if shape.budget is not None:
            new["thinking"] = shape.budget.fields(shape.slots)
        # Filler rows repeat a real prompt, only where the last model call reads them; rows past it stay unread.
        for i, p in enumerate(group + [group[0]] * (calls * width - len(group))):
            tokens[i, bucket - len(prompts[p]):] = prompts[p]
            positions[i, bucket - len(prompts[p]):] = np.arange(len(prompts[p]))
            mask[i, bucket - len(prompts[p]):] = True
        for i, p in enumerate(group):
            fields = None if shape.budget is None else shape.budget.prompt_fields(prompts[p])
            for slot, row in by_prompt[p]:
                src[slot], new["keys"][slot], new["limit"][slot] = i, keys[row], limits[p]
                for k, v in (fields or {}).items():
                    new["thinking"][k][slot] = v
        put = self.placement.replicated()
        fields = jax.tree.map(self.placement.put_rows, new)
        tokens, positions, mask, count = (jnp.asarray(a) if put is None else jax.device_put(a, put)
                                          for a in (tokens, positions, mask, np.int32(calls)))
        return tokens, positions, mask, self.placement.put_rows(src), fields, count
