"""Classifier inference: batched, sharded class probabilities of questions, and the reasoning/knowledge split.

`split_records` applies a classifier (ours, or the released BioMedBERT-Knowledge-vs-Reasoning as-is) to
benchmark questions and sets `reasoning_prob` / `is_reasoning`; `summarize_split` gives the fraction table,
the agreement with released `is_reasoning` labels and the accuracy against gold labels; `write_split_files`
writes per-benchmark reasoning.jsonl / knowledge.jsonl. The classify job's validation uses `Predictor` too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from medkr_jax import parallel, xla_options
from medkr_jax.data.answer import LETTERS
from medkr_jax.data.pipeline import bucket_length, tokenize_texts
from medkr_jax.data.records import MCQRecord, write_records
from medkr_jax.eval.classification import LABEL_NAMES, ClassifierError, cohen_kappa, label_agreement, reasoning_index

TEXT_MODES = ("question", "question_options")


# ------------------------------------------------------------------------------------------------- inputs


def record_text(record: MCQRecord, mode: str = "question") -> str:
    """The text the classifier reads for a record: the question, optionally followed by lettered options."""
    if mode == "question":
        return record.question
    if mode == "question_options":
        return record.question + " " + " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(record.options))
    raise ClassifierError(f"classifier text mode {mode!r} is unknown; expected one of {TEXT_MODES}")


def tokenize_records(tokenizer, records: Sequence[MCQRecord], *, max_len: int, text: str = "question",
                     with_labels: bool = False) -> list[dict[str, np.ndarray]]:
    """Per-record dicts of unpadded input_ids / token_type_ids (truncated to max_len) [+ label id]."""
    fields = {}
    if with_labels:
        fields["label"] = [LABEL_NAMES.index(r.label) for r in records]
    return tokenize_texts(tokenizer, [record_text(r, text) for r in records], max_length=max_len, **fields)


def length_buckets(max_len: int) -> tuple[int, ...]:
    """Padded lengths used for inference batches: few shapes (few compilations), little padding."""
    return tuple(b for b in (32, 64, 128, 256, 512) if b < max_len) + (int(max_len),)


# ---------------------------------------------------------------------------------------------- inference


class Predictor:
    """Batched, sharded classifier inference: rows split over the mesh's batch axes, lengths bucketed.

    One jitted forward per padded length; params are passed per call, so the same Predictor serves every
    evaluation during training (new params, same shapes: no recompilation).
    """

    def __init__(self, graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, *, batch_size: int, max_len: int,
                 pad_id: int = 0, desc: str = "classify"):
        self.graphdef, self.mesh, self.desc = graphdef, mesh, desc
        div = parallel.batch_divisor(mesh)
        self.batch_size = max(div, int(math.ceil(batch_size / div) * div))
        self.buckets = length_buckets(max_len)
        self.pad_id = int(pad_id)
        graphdef_ = graphdef

        def forward(state, ids, mask, types):
            logits = nnx.merge(graphdef_, state)(ids, mask, types)
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

        self._forward = jax.jit(forward, out_shardings=parallel.replicated(mesh),
                                compiler_options=xla_options.dense_program_options())

    def _batch(self, examples: Sequence[Mapping[str, np.ndarray]], idx: np.ndarray, t: int) -> tuple:
        """Padded (ids, mask, types) of the examples `idx`, filler rows up to the batch size."""
        ids = np.full((self.batch_size, t), self.pad_id, np.int32)
        types = np.zeros((self.batch_size, t), np.int32)
        mask = np.zeros((self.batch_size, t), bool)
        mask[:, 0] = True  # filler rows attend to one token (never all-masked)
        for row, i in enumerate(idx):
            ex = examples[i]
            k = min(len(ex["input_ids"]), t)
            ids[row, :k] = ex["input_ids"][:k]
            mask[row, :k] = True
            if "token_type_ids" in ex:
                types[row, :k] = ex["token_type_ids"][:k]
        return ids, mask, types

    def __call__(self, state: nnx.State, examples: Sequence[Mapping[str, np.ndarray]], *,
                 progress: bool = False) -> np.ndarray:
        """Class probabilities float32[N, num_labels] for tokenised examples, in input order."""
        n = len(examples)
        lengths = np.array([len(ex["input_ids"]) for ex in examples])
        order = np.argsort(-lengths, kind="stable")  # similar lengths together: little padding
        out = None
        bar = None
        if progress and parallel.is_main_process():
            bar = tqdm(total=n, desc=self.desc, unit="q", dynamic_ncols=True)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            t = bucket_length(int(lengths[idx].max()), self.buckets)
            batch = parallel.shard_batch(self._batch(examples, idx, t), self.mesh)
            probs = np.asarray(jax.device_get(self._forward(state, *batch)))
            if out is None:
                out = np.zeros((n, probs.shape[-1]), np.float32)
            out[idx] = probs[:len(idx)]
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out if out is not None else np.zeros((0, 0), np.float32)


# ------------------------------------------------------------------------------------------------- split


def split_records(records: Sequence[MCQRecord], model, id2label, mesh, *, tokenizer, threshold: float,
                  batch_size: int, max_len: int, text: str = "question", reasoning_id: int = -1,
                  progress: bool = True) -> list[MCQRecord]:
    """Copies of `records` with reasoning_prob / is_reasoning from the classifier; released values (if any)
    move to meta["released_reasoning_prob"] / meta["released_is_reasoning"]."""
    r_id = reasoning_index(id2label, reasoning_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = tokenize_records(tokenizer, records, max_len=max_len, text=text)
    predictor = Predictor(nnx.graphdef(model), mesh, batch_size=batch_size, max_len=max_len, pad_id=pad_id,
                          desc="split")
    probs = predictor(nnx.state(model), examples, progress=progress)[:, r_id] if records else np.zeros(0)
    out = []
    for r, p in zip(records, probs):
        meta = dict(r.meta)
        if r.is_reasoning is not None:
            meta["released_is_reasoning"] = r.is_reasoning
        if r.reasoning_prob is not None:
            meta["released_reasoning_prob"] = r.reasoning_prob
        out.append(dataclasses.replace(r, meta=meta, reasoning_prob=float(p), is_reasoning=bool(p >= threshold)))
    return out


def group_records(records: Iterable[MCQRecord], group_by: str = "benchmark") -> dict[str, list[MCQRecord]]:
    """Records per benchmark, or per value of meta[group_by] (records without the key keep their benchmark)."""
    groups: dict[str, list[MCQRecord]] = {}
    for r in records:
        # e.g. group_by="subject": one row per MMLU subject
        key = r.benchmark if group_by == "benchmark" else str(r.meta.get(group_by) or r.benchmark)
        groups.setdefault(key, []).append(r)
    return groups


def split_groups(groups: Mapping[str, Sequence[MCQRecord]], model, id2label, mesh,
                 **split_kw: Any) -> dict[str, list[MCQRecord]]:
    """`split_records` of every group in one pass (groups sorted by name); the same groups, labelled."""
    names = sorted(groups)
    labelled = split_records([r for n in names for r in groups[n]], model, id2label, mesh, **split_kw)
    out, pos = {}, 0
    for name in names:
        out[name] = labelled[pos:pos + len(groups[name])]
        pos += len(groups[name])
    return out


def _group_tables(name: str, recs: Sequence[MCQRecord]) -> tuple[dict, dict | None, dict | None]:
    """One group's fraction row, agreement with the released labels, and accuracy against gold labels."""
    reasoning = sum(1 for r in recs if r.is_reasoning)
    row = {"benchmark": name, "n": len(recs), "reasoning": reasoning, "knowledge": len(recs) - reasoning,
           "reasoning_fraction": reasoning / len(recs),
           "mean_reasoning_prob": float(np.mean([r.reasoning_prob for r in recs]))}
    agreement = accuracy = None
    rel = [(r.is_reasoning, r.meta["released_is_reasoning"]) for r in recs if "released_is_reasoning" in r.meta]
    if rel:
        ours, theirs = (np.array(x, int) for x in zip(*rel))
        agreement = {"benchmark": name, **label_agreement(ours, theirs),
                     "released_reasoning_fraction": float(theirs.mean())}
    gold = [(int(r.is_reasoning), int(r.label == "reasoning")) for r in recs if r.label is not None]
    if gold:
        ours, truth = (np.array(x) for x in zip(*gold))
        accuracy = {"benchmark": name, "n": len(gold), "accuracy": float((ours == truth).mean()),
                    "kappa": cohen_kappa(ours, truth)}
    return row, agreement, accuracy


def summarize_split(labelled: Mapping[str, Sequence[MCQRecord]], files: Mapping[str, Any], *,
                    classifier_path: str, threshold: float) -> dict[str, Any]:
    """The split's summary: per-group fractions, agreement with released labels, accuracy vs gold labels."""
    rows, agreement, accuracy = [], [], []
    for name in sorted(labelled):
        row, agree, acc = _group_tables(name, labelled[name])
        rows.append(row)
        agreement += [agree] if agree else []
        accuracy += [acc] if acc else []
    total = sum(r["n"] for r in rows)
    summary = {"classifier_path": classifier_path, "threshold": threshold, "questions": total,
               "reasoning": sum(r["reasoning"] for r in rows),
               "reasoning_fraction": sum(r["reasoning"] for r in rows) / total,
               "per_benchmark": rows, "agreement_with_released": agreement, "accuracy_vs_gold_labels": accuracy,
               "files": dict(files)}
    if agreement:
        released = [r for n in sorted(labelled) for r in labelled[n] if "released_is_reasoning" in r.meta]
        summary["agreement_overall"] = label_agreement([int(r.is_reasoning) for r in released],
                                                       [int(r.meta["released_is_reasoning"]) for r in released])
    return summary


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "benchmark"


def write_split_files(out_dir: str, labelled: Mapping[str, Sequence[MCQRecord]]) -> dict[str, dict[str, str]]:
    """split/<group>/reasoning.jsonl and knowledge.jsonl; returns {group: {kind: path}}.

    An empty class gets no file: an empty JSONL is not a valid record file (read_records rejects it).
    """
    files = {}
    for name in sorted(labelled):
        parts = (("reasoning", [r for r in labelled[name] if r.is_reasoning]),
                 ("knowledge", [r for r in labelled[name] if not r.is_reasoning]))
        d = os.path.join(out_dir, "split", _safe_name(name))
        files[name] = {kind: str(write_records(os.path.join(d, f"{kind}.jsonl"), part)) for kind, part in parts if part}
    return files
