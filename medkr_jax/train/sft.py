"""Supervised fine-tuning of the policy on reasoning traces: the data, the loss, the policy loader.

Records (the reasoning-heavy ones when asked: `filter_records`) become plain / adversarial / backtracking
examples (train/traces.py). Each example is rendered with the tokenizer's chat template exactly as evaluation
renders prompts, followed by the response and the EOS token; only response tokens are targets
(`tokenize_example`). Examples are packed into rows of seq_len with segment ids and per-segment positions
(the decoder keeps attention inside a segment), or padded one per row without packing (`pack_sequences`).
Only the positions whose targets are scored reach the LM head (`scored_positions`).
Rows are shuffled and batched by grain (per-process shard, checkpointable iterator: `make_batches`) and
trained with the shared loop on `sft_loss`. Job "sft" (medkr_jax/jobs/sft.py) reads the config and runs it.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medkr_jax.data.answer import ANSWER_STATEMENT
from medkr_jax.data.pipeline import load_tokenizer, make_loader
from medkr_jax.eval import prompts
from medkr_jax.models.hf import check_tokenizer_fits, load_decoder, read_hf_config
from medkr_jax.train.losses import masked_cross_entropy


class SFTDataError(ValueError):
    """The SFT data cannot be built (no records, nothing fits config.train.seq_len ...)."""


# ----------------------------------------------------------------------------------------------- data


def tokenize_example(tokenizer: Any, example: Any, *, system_prompt: str,
                     eos_id: int) -> tuple[list[int], int, tuple[int, ...]]:
    """(token ids of prompt + response + EOS, number of prompt tokens, indices into the ids of the tokens
    spelling the answer of the response's last "The answer is X." statement; empty when it has none)."""
    prompt = prompts.build_prompt(tokenizer, example.record, system_prompt=system_prompt,
                                  assistant_prefix=example.assistant_prefix)
    p_ids = prompts.encode(tokenizer, prompt)
    enc = tokenizer(example.response, add_special_tokens=False, return_offsets_mapping=True)
    r_ids = list(enc["input_ids"]) + [int(eos_id)]
    found = [m for m in ANSWER_STATEMENT.finditer(example.response) if m.group(1).strip()]
    answer: tuple[int, ...] = ()
    if found:
        a, b = found[-1].span(1)
        answer = tuple(len(p_ids) + i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < b and e > a)
    return p_ids + r_ids, len(p_ids), answer


def pack_sequences(seqs: Sequence[tuple], seq_len: int, *, pad_id: int, packing: bool = True,
                   answer_weight: float = 1.0) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Rows of `seq_len` next-token examples from (ids, prompt_len) or (ids, prompt_len, answer_indices) tuples
    (as `tokenize_example` returns).

    Each sequence contributes inputs ids[:-1] and targets ids[1:]; loss_mask weights the targets that are
    response tokens (1, or `answer_weight` for the tokens of the final answer (letter or option text): the
    decision the evaluation scores, otherwise a token or two among a trace's dozens); answer_mask marks them. With
    packing, sequences are placed first-fit (longest first) into rows, each with its own
    segment id (1, 2, ...; 0 = padding) and positions restarting at 0. Sequences longer than seq_len + 1
    lose the end of their response; those whose prompt alone fills the row are dropped.
    Returns (arrays [rows, seq_len], stats).
    """
    stats = collections.Counter()
    if answer_weight <= 0:
        raise SFTDataError(f"config.sft.answer_weight must be > 0, got {answer_weight}")
    items = []
    for ids, p, *rest in seqs:
        ids = list(ids)
        answer = [j for j in (rest[0] if rest else ()) if p <= j <= seq_len]
        if p >= seq_len:
            stats["dropped"] += 1
            continue
        if len(ids) > seq_len + 1:
            ids = ids[:seq_len + 1]
            stats["truncated"] += 1
        items.append((ids, p, answer))
    if not items:
        raise SFTDataError(f"no example fits config.train.seq_len={seq_len} (all {len(seqs)} prompts are longer)")
    rows: list[list[tuple[list[int], int, list[int]]]] = []
    free: list[int] = []
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0])) if packing else range(len(items))
    for i in order:
        need = len(items[i][0]) - 1
        slot = next((r for r, f in enumerate(free) if f >= need), None) if packing else None
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(items[i])
        free[slot] -= need
    n = len(rows)
    out = {
        "tokens": np.full((n, seq_len), pad_id, np.int32),
        "targets": np.full((n, seq_len), pad_id, np.int32),
        "positions": np.zeros((n, seq_len), np.int32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
        "loss_mask": np.zeros((n, seq_len), np.float32),
        "answer_mask": np.zeros((n, seq_len), np.float32),
    }
    for r, row in enumerate(rows):
        at = 0
        for seg, (ids, p, answer) in enumerate(row, start=1):
            m = len(ids) - 1
            sl = slice(at, at + m)
            out["tokens"][r, sl] = ids[:-1]
            out["targets"][r, sl] = ids[1:]
            out["positions"][r, sl] = np.arange(m)
            out["segment_ids"][r, sl] = seg
            out["loss_mask"][r, sl] = (np.arange(m) >= p - 1).astype(np.float32)
            for j in answer:  # target ids[j] sits at input position j - 1
                out["answer_mask"][r, at + j - 1] = 1.0
                out["loss_mask"][r, at + j - 1] = answer_weight
            at += m
    stats.update(examples=len(items), rows=n, target_tokens=int((out["loss_mask"] > 0).sum()),
                 answer_tokens=int(out["answer_mask"].sum()),
                 filled_tokens=int((out["segment_ids"] > 0).sum()))
    return out, dict(stats)


def scored_positions(rows: dict[str, np.ndarray], *, multiple: int = 16) -> dict[str, np.ndarray]:
    """`rows` with the targets scored in their own coordinates: `loss_at` [n, K] the positions whose logits predict
    a response token (loss_mask > 0), K = the most any row has, rounded up to `multiple`; targets, loss_mask and
    answer_mask [n, K] at those positions (0 past a row's count). The model then runs its final norm and LM head
    on K positions a row instead of seq_len (``Decoder(..., logits_at=)``): the prompts' logits are never
    scored. The same loss. `rows` itself when every position could be scored (K = seq_len)."""
    scored = rows["loss_mask"] > 0
    n, seq_len = scored.shape
    k = min(seq_len, -(-max(int(scored.sum(1).max()), 1) // multiple) * multiple)
    if k == seq_len:
        return rows
    at = np.zeros((n, k), np.int32)
    valid = np.zeros((n, k), bool)
    for r in range(n):
        idx = np.nonzero(scored[r])[0]
        at[r, :len(idx)], valid[r, :len(idx)] = idx, True
    out = dict(rows, loss_at=at)
    for key in ("targets", "loss_mask", "answer_mask"):
        if key in rows:
            picked = np.take_along_axis(rows[key], at, axis=1)
            out[key] = np.where(valid, picked, np.zeros_like(picked))
    return out


def make_batches(rows: dict[str, np.ndarray], batch_size: int, *, seed: int) -> Any:
    """Endless shuffled global batches (reshuffled every epoch) of packed rows, this process's slice of each.

    A grain iterator (medkr_jax.data.pipeline) whose get_state()/set_state() go into checkpoints.
    """
    examples = [{k: v[i] for k, v in rows.items()} for i in range(len(rows["tokens"]))]
    return make_loader(examples, batch_size=batch_size, seed=seed, num_epochs=None)


def filter_records(records: Sequence[Any], reasoning_only: bool, source: str, *, key: str = "config.sft") -> list[Any]:
    """The reasoning-heavy records (gold label, else the classifier's is_reasoning) when asked; `key` is the config
    section whose reasoning_only asked (named in the error)."""
    if not reasoning_only:
        return list(records)
    keep = [r for r in records if r.label == "reasoning" or (r.label is None and r.is_reasoning)]
    if not keep:
        raise SFTDataError(
            f"{key}.reasoning_only=True but no record of {source} is reasoning-heavy (label == 'reasoning' "
            f"or is_reasoning); run the split job first or set {key}.reasoning_only=False")
    return keep


# ----------------------------------------------------------------------------------------------- loss


def sft_loss(model: Any, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """Weighted next-token cross-entropy on the response tokens of (packed) rows (weights: loss_mask), at the
    positions `loss_at` only when the batch has them (`scored_positions`).

    Metrics: token_accuracy over all response targets, answer_accuracy over the final answers' tokens
    (teacher forced: did the model name the right option after "The answer is"), when the batch has answer_mask.
    """
    seg = batch["segment_ids"]
    logits, _ = model(batch["tokens"], batch["positions"], attention_mask=seg > 0, segment_ids=seg,
                      logits_at=batch.get("loss_at"))
    loss, n = masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    mask = (batch["loss_mask"] > 0).astype(jnp.float32)
    # The target is the model's top choice iff its logit is the row's maximum (a tie counts as right): one max
    # reduction, which XLA shares with the log-normaliser's, instead of an argmax pass over the vocabulary.
    logits = jax.lax.stop_gradient(logits)
    picked = jnp.take_along_axis(logits, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
    correct = (picked >= logits.max(-1)).astype(jnp.float32)
    acc = (correct * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    metrics = {"weight": n, "tokens": (seg > 0).sum().astype(jnp.float32), "token_accuracy": acc}
    if "answer_mask" in batch:
        am = batch["answer_mask"].astype(jnp.float32)
        metrics["answer_accuracy"] = (correct * am).sum() / jnp.maximum(am.sum(), 1.0)
    return loss, metrics


# ------------------------------------------------------------------------------------------------ policy


def load_policy(model_path: str, tokenizer_path: str = "", *, mesh: Any, rules: Any, dtype: str = "float32",
                param_dtype: str = "float32", remat: bool = False, allow_pickle: bool = False):
    """(model, DecoderConfig, tokenizer, tokenizer_dir) of the HF folder `model_path` (tokenizer from
    `tokenizer_path`, or the model folder when empty)."""
    read_hf_config(model_path)  # a missing model folder is named as such, not as a missing tokenizer
    tok_dir = tokenizer_path or model_path
    if not os.path.isdir(tok_dir):
        raise FileNotFoundError(f"config.tokenizer_path: {tok_dir!r} is not a folder with an HF tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    check_tokenizer_fits(tokenizer, model_path, tokenizer_dir=tok_dir)
    model, cfg = load_decoder(model_path, mesh=mesh, rules=rules, dtype=jnp.dtype(dtype),
                              param_dtype=jnp.dtype(param_dtype), remat=remat, allow_pickle=allow_pickle)
    return model, cfg, tokenizer, tok_dir
