"""The static-batch KV-cache sampler: batched ragged prompts, greedy or sampled, n samples per prompt.

Every row of a batch decodes until the batch's longest row stops, so a run over rows of very different output
lengths idles most of its rows; the continuous-batching engine (``sampling.engine.Sampler``), which all callers
use, refills a finished row's slot instead. This path stays as the reference the engine is checked and
benchmarked against (same answers, bench/engine.py).

One call of :meth:`StaticSampler.generate` runs, per batch of rows, one compiled program:

* prefill: the left-padded prompts (all but their last token) are written into a preallocated KV cache;
* decode: a ``jax.lax.while_loop`` feeds one token per step (first the prompt's last token, then each
  sampled token) until every row has emitted a stop id or ``max_new_tokens`` is reached.

Ragged prompts are left-padded to a common length with explicit positions (each row's tokens sit at
positions 0..L-1 whatever its padding), so the decoder's RoPE and cache mask see each row as if alone.

Shapes are bucketed: the batch to ``batch_size`` (or a power of two), the prompt length to the next
``prompt_buckets`` entry and the generation length to the next ``gen_buckets`` entry; ``max_new_tokens``,
temperature, top-k and top-p are runtime values. So a run over prompts of mixed lengths compiles one
program per (batch, prompt bucket, generation bucket, greedy/sampled) combination; ``num_compiles`` counts
them exactly (programs are compiled ahead of time and kept here, never re-traced behind our back). On CPU
one more small program per tied-embedding model lays out the LM head for decode steps (``Decoder.decode_head``;
``num_layout_compiles``).

Log-probs: ``logprobs[r, t]`` is ``log_softmax(raw logits)[token]`` of the model's logits at temperature 1
before any top-k / top-p filtering, i.e. the log-probability of the emitted token under the policy
itself, which is what GRPO's importance ratio and KL need. (For temperature != 1 or filtered sampling it is
not the log-probability under the distribution the token was drawn from.)

Sliding windows (Mistral, Gemma 3's local layers): the cache stays full length on every layer and a sliding
layer masks the slots outside its window (the model's own mask: prefill and every decode step attend only to
the last ``sliding_window`` slots there). Chosen over a ring buffer of window size for one cache layout across
layer kinds (so the scanned-layers path stacks them) and writes in place at the slot index. The price is memory
(``models.memory.kv_cache_bytes`` reports both): for a 32k-token generation MedGemma-27B's cache is 15.5 GiB
per row in bfloat16 where a ring buffer on its 52 sliding layers (window 1024) would need 2.9 GiB;
MedGemma-4B 4.25 vs 0.74 GiB; Mistral-7B (all 32 layers sliding, window 4096) 4.0 vs 0.5 GiB. For the
evaluation lengths here (<= 2k tokens) the two differ by at most a factor of ~2.

Sharding: rows are split over the ("data", "fsdp") mesh axes, the KV cache's kv-heads over "tensor" when
they divide it; the model's parameters keep whatever sharding they were loaded with. The model is passed on
every call, so a policy that is being trained is sampled with its current weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from medkr_jax.data.pipeline import bucket_length
from medkr_jax.sampling.base import (DEFAULT_GEN_BUCKETS, DEFAULT_PROMPT_BUCKETS, SampleOutput, SamplerBase,
                                     checked_prompts, host, next_pow2, row_keys, signature)
from medkr_jax.sampling.ops import sample_next, token_logprob


class StaticSampler(SamplerBase):
    """Prefill + while_loop decode with a preallocated KV cache; see the module docstring."""

    def __init__(self, cfg: Any, *, mesh: Mesh | None = None, rules: Any = None, pad_id: int,
                 stop_ids: Sequence[int], prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                 gen_buckets: Sequence[int] = DEFAULT_GEN_BUCKETS, cache_dtype: Any = None):
        super().__init__(cfg, mesh=mesh, rules=rules, pad_id=pad_id, stop_ids=stop_ids,
                         prompt_buckets=prompt_buckets, gen_buckets=gen_buckets, cache_dtype=cache_dtype)

    # ---------------------------------------------------------------- the program

    def _build(self, graphdef, *, batch: int, prompt_len: int, gen_len: int, greedy: bool, filtered: bool):
        pad_id, stop_ids = self.pad_id, jnp.asarray(self.stop_ids, jnp.int32)
        max_len = prompt_len + gen_len

        def program(state, head, tokens, positions, mask, active, keys, max_new, temperature, top_k, top_p):
            model = nnx.merge(graphdef, state)
            # The model's own layout (one array per layer, or stacked for scanned layers): every layer
            # then updates its cache in place inside the decode loop.
            cache = model.init_cache(batch, max_len, self.cache_dtype_for(model))
            cache = dataclasses.replace(cache, k=jax.tree.map(self.placement.constrain_cache, cache.k),
                                        v=jax.tree.map(self.placement.constrain_cache, cache.v))
            if prompt_len > 1:
                # The prefill's logits are unused (XLA drops the LM head); the last prompt token is fed
                # by the first decode step, whose logits give the first generated token. The prompt
                # fills an empty cache, so it attends within itself, not over the generation slots.
                _, cache = model(tokens[:, :-1], positions[:, :-1], attention_mask=mask[:, :-1], cache=cache,
                                 kv_len=prompt_len - 1)
            keys = jax.random.wrap_key_data(keys)
            ones = jnp.ones((batch, 1), jnp.bool_)

            def cond(carry):
                step, _, _, _, done, *_ = carry
                return (step < max_new) & ~jnp.all(done)

            def body(carry):
                step, cache, tok, pos, done, lengths, out_tok, out_lp = carry
                logits, cache = nnx.merge(graphdef, state)(tok[:, None], pos[:, None], attention_mask=ones,
                                                           cache=cache, head=head)
                logits = logits[:, -1].astype(jnp.float32)
                step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
                nxt = sample_next(logits, step_keys, temperature=temperature, top_k=top_k, top_p=top_p,
                                  greedy=greedy, filtered=filtered)
                lp = token_logprob(logits, nxt)
                nxt = jnp.where(done, pad_id, nxt)
                lp = jnp.where(done, 0.0, lp)
                out_tok = jax.lax.dynamic_update_slice(out_tok, nxt[:, None], (0, step))
                out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, step))
                lengths = lengths + (~done).astype(jnp.int32)
                done = done | jnp.isin(nxt, stop_ids)
                return step + 1, cache, nxt, pos + 1, done, lengths, out_tok, out_lp

            carry = (jnp.int32(0), cache, tokens[:, -1], positions[:, -1], ~active,
                     jnp.zeros((batch,), jnp.int32), jnp.full((batch, gen_len), pad_id, jnp.int32),
                     jnp.zeros((batch, gen_len), jnp.float32))
            _, _, _, _, _, lengths, out_tok, out_lp = jax.lax.while_loop(cond, body, carry)
            return out_tok, out_lp, lengths

        return program

    def _compiled(self, graphdef, state, args, *, batch, prompt_len, gen_len, greedy, filtered):
        key = (graphdef, signature((state, args[0])), batch, prompt_len, gen_len, greedy, filtered)
        prog = self._programs.get(key)
        if prog is None:
            fn = self._build(graphdef, batch=batch, prompt_len=prompt_len, gen_len=gen_len, greedy=greedy,
                             filtered=filtered)
            prog = self.placement.compile(jax.jit(fn, out_shardings=self.placement.replicated()), state, *args)
            self._programs[key] = prog
        return prog

    # ---------------------------------------------------------------- public API

    def generate(self, model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, n: int = 1, seed: int = 0,
                 batch_size: int | None = None, prompt_keys: Sequence[int] | None = None) -> SampleOutput:
        """Continue each prompt ``n`` times; temperature 0 is greedy.

        Row (p, j) draws its randomness from ``fold_in(fold_in(key(seed), prompt_keys[p]), j)``
        (``prompt_keys`` defaults to 0..N-1), so what a prompt gets does not depend on which other prompts
        share its batch: pass stable ids (e.g. hashed question ids) to make resumed runs reproduce.
        """
        prompts = checked_prompts(prompts, max_new_tokens=max_new_tokens, n=n, temperature=temperature,
                                   top_k=top_k, top_p=top_p)
        if not isinstance(max_new_tokens, (int, np.integer)):
            raise ValueError(f"StaticSampler takes one max_new_tokens for all prompts, got {max_new_tokens!r}")
        if prompt_keys is None:
            prompt_keys = range(len(prompts))
        if len(prompt_keys) != len(prompts):
            raise ValueError(f"{len(prompt_keys)} prompt_keys for {len(prompts)} prompts")
        greedy = temperature == 0.0
        filtered = (not greedy) and (top_k > 0 or top_p < 1.0)
        gen_len = bucket_length(max_new_tokens, self.gen_buckets, past_top="grow")

        num_rows = len(prompts) * n
        prompt_index = np.repeat(np.arange(len(prompts), dtype=np.int32), n)
        sample_index = np.tile(np.arange(n, dtype=np.int32), len(prompts))
        keys = row_keys(seed, np.asarray(prompt_keys, np.int64)[prompt_index], sample_index)

        div = self.placement.divisor()
        if batch_size is None:
            batch = next_pow2(num_rows)
        else:
            batch = min(int(batch_size), next_pow2(num_rows))
        batch = max(div, math.ceil(batch / div) * div)

        chunks = self._chunks(np.array([len(prompts[p]) for p in prompt_index]), batch)
        out_tok = np.full((num_rows, gen_len), self.pad_id, np.int32)
        out_lp = np.zeros((num_rows, gen_len), np.float32)
        out_len = np.zeros((num_rows,), np.int32)

        graphdef, state = nnx.split(model)
        head = self._head(model, graphdef, state, batch)
        scalars = (np.int32(max_new_tokens), np.float32(temperature if not greedy else 1.0), np.int32(top_k),
                   np.float32(top_p))
        for prompt_len, rows in chunks:
            inputs = self._pack(prompts, prompt_index, rows, keys, batch=batch, prompt_len=prompt_len)
            args = (head,) + tuple(self.placement.put_rows(a) for a in inputs) + tuple(
                jnp.asarray(s) for s in scalars)
            prog = self._compiled(graphdef, state, args, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
                                  greedy=greedy, filtered=filtered)
            toks, lps, lengths = prog(state, *args)
            toks, lps, lengths = (host(x) for x in (toks, lps, lengths))
            n_real = len(rows)
            out_tok[rows], out_lp[rows], out_len[rows] = toks[:n_real], lps[:n_real], lengths[:n_real]
        return SampleOutput(tokens=out_tok[:, :max_new_tokens], logprobs=out_lp[:, :max_new_tokens],
                            lengths=out_len, prompt_index=prompt_index)

    def _chunks(self, lens: np.ndarray, batch: int) -> list[tuple[int, np.ndarray]]:
        """(prompt bucket, row indices) batches: rows grouped by prompt bucket (longest first) and batched within
        a group, so one long prompt never pads a batch of short ones up to its bucket."""
        order = np.argsort(-lens, kind="stable")
        row_bucket = np.array([self.prompt_bucket(int(n)) for n in lens])
        chunks = []
        for bucket in sorted(set(row_bucket.tolist()), reverse=True):
            group = order[row_bucket[order] == bucket]
            chunks += [(bucket, group[i:i + batch]) for i in range(0, len(group), batch)]
        return chunks

    def _pack(self, prompts: list[list[int]], prompt_index: np.ndarray, rows: np.ndarray, keys_of_rows: np.ndarray,
              *, batch: int, prompt_len: int) -> tuple[np.ndarray, ...]:
        """(tokens, positions, mask, active, keys) of one batch: prompts left-padded to ``prompt_len``."""
        tokens = np.full((batch, prompt_len), self.pad_id, np.int32)
        positions = np.zeros((batch, prompt_len), np.int32)
        mask = np.zeros((batch, prompt_len), bool)
        active = np.zeros((batch,), bool)
        keys = np.zeros((batch,) + keys_of_rows.shape[1:], keys_of_rows.dtype)
        for b, r in enumerate(rows):
            p = prompts[prompt_index[r]]
            tokens[b, prompt_len - len(p):] = p
            positions[b, prompt_len - len(p):] = np.arange(len(p))
            mask[b, prompt_len - len(p):] = True
            active[b] = True
            keys[b] = keys_of_rows[r]
        # Filler rows repeat the last real row's prompt (well-formed input) and start finished.
        for b in range(len(rows), batch):
            tokens[b], positions[b], mask[b] = tokens[len(rows) - 1], positions[len(rows) - 1], mask[len(rows) - 1]
        return tokens, positions, mask, active, keys
