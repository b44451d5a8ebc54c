"""Input pipelines on grain: seeded shuffle, epochs, global batches split per JAX process, padding.

The pipeline is defined on the *global* batch: every process walks the same seeded sequence of
global batches and keeps its own contiguous slice of rows. So the data a step sees does not depend
on the number of processes, every process pads to the same length (arrays can be assembled with
``jax.make_array_from_process_local_data``), and the iterator state is one small dict
(``{"next_index": k}``) that can be saved with a checkpoint and restored to resume exactly.

Typical use::

    tok = load_tokenizer(config.tokenizer_path)
    examples = tokenize_texts(tok, [r.question for r in records], max_length=256,
                              label=[int(r.label == "reasoning") for r in records])
    loader = make_loader(examples, batch_size=32, seed=0,
                         collate=Collator({"input_ids": tok.pad_token_id}, buckets=(64, 128, 256)))
    batch = next(loader)              # dict of np arrays, rows of this process only
    state = loader.get_state()        # save with the model checkpoint
    loader.set_state(state)           # ... and resume later
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import grain
import numpy as np
from transformers import AutoTokenizer

Example = Mapping[str, Any]
Batch = dict[str, np.ndarray]


class PipelineError(ValueError):
    """A pipeline was configured inconsistently or was fed examples of the wrong shape."""


# ---------------------------------------------------------------------------------------------
# Padding and collation


def bucket_length(n: int, buckets: Sequence[int], *, past_top: str = "clip") -> int:
    """The smallest bucket >= ``n`` (few distinct shapes, so few compilations).

    Past the largest bucket: ``past_top="clip"`` gives the largest (the caller truncates to it);
    ``"grow"`` gives the next multiple of the largest (the caller keeps every token).
    """
    if not buckets:
        raise PipelineError("buckets must be a non-empty sequence of lengths")
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    top = int(max(buckets))
    if past_top == "clip":
        return top
    if past_top == "grow":
        return top * math.ceil(n / top)
    raise PipelineError(f"past_top: expected 'clip' or 'grow', got {past_top!r}")


def pad_to_length(
    seq: np.ndarray | Sequence[int],
    length: int,
    pad_value: int | float = 0,
    *,
    side: Literal["right", "left"] = "right",
    truncate: bool = False,
    name: str = "sequence",
) -> np.ndarray:
    """Pad a 1-d array to ``length`` on ``side`` (truncating the same side only if ``truncate``)."""
    arr = np.asarray(seq)
    if arr.ndim != 1:
        raise PipelineError(f"{name}: expected a 1-d sequence, got shape {arr.shape}")
    if arr.shape[0] > length:
        if not truncate:
            raise PipelineError(f"{name}: length {arr.shape[0]} exceeds the padded length {length} "
                                "(raise the length/buckets or pass truncate=True)")
        arr = arr[:length] if side == "right" else arr[-length:]
    pad = np.full((length - arr.shape[0],), pad_value, dtype=arr.dtype)
    return np.concatenate([arr, pad] if side == "right" else [pad, arr])


class Collator:
    """Turns a list of examples (dicts of arrays) into one batch dict of stacked arrays.

    1-d entries are padded to a common length: ``length`` if given, else the smallest of
    ``buckets`` that fits the longest sequence (few distinct shapes -> few compilations), else the
    longest sequence. 0-d entries (labels, ids) are stacked. If ``mask_key`` is set and absent
    from the examples, a bool mask of real (non-pad) positions of ``length_key`` is added.
    """

    def __init__(
        self,
        pad_values: Mapping[str, int | float] | None = None,
        *,
        length: int | None = None,
        buckets: Sequence[int] | None = None,
        side: Literal["right", "left"] = "right",
        truncate: bool = False,
        mask_key: str | None = "attention_mask",
        length_key: str = "input_ids",
    ):
        if length is not None and buckets is not None:
            raise PipelineError("give either a fixed length or buckets, not both")
        if side not in ("right", "left"):
            raise PipelineError(f"side must be 'right' or 'left', got {side!r}")
        self.pad_values = dict(pad_values or {})
        self.length, self.buckets = length, (tuple(sorted(buckets)) if buckets else None)
        self.side, self.truncate = side, truncate
        self.mask_key, self.length_key = mask_key, length_key

    def target_length(self, examples: Sequence[Example]) -> int:
        """The padded length for these examples (computed from all rows of a global batch)."""
        if self.length is not None:
            return self.length
        longest = max((np.shape(v)[0] for ex in examples for v in ex.values() if np.ndim(v) == 1), default=0)
        return bucket_length(longest, self.buckets) if self.buckets else longest

    def __call__(self, examples: Sequence[Example], length: int | None = None) -> Batch:
        if not examples:
            raise PipelineError("cannot collate an empty list of examples")
        length = self.target_length(examples) if length is None else length
        keys = list(examples[0].keys())
        out: Batch = {}
        for i, ex in enumerate(examples):
            if set(ex) != set(keys):
                raise PipelineError(f"example {i} has keys {sorted(ex)}, expected {sorted(keys)}")
        for key in keys:
            vals = [np.asarray(ex[key]) for ex in examples]
            ndims = {v.ndim for v in vals}
            if ndims == {1}:
                pad = self.pad_values.get(key, 0)
                out[key] = np.stack([pad_to_length(v, length, pad, side=self.side, truncate=self.truncate,
                                                   name=f"example {i} {key!r}") for i, v in enumerate(vals)])
            elif ndims == {0} or len({v.shape for v in vals}) == 1:
                out[key] = np.stack(vals)
            else:
                raise PipelineError(f"{key!r}: cannot batch entries of shapes {sorted({v.shape for v in vals})}")
        if self.mask_key and self.mask_key not in out and self.length_key in keys:
            lens = np.array([min(np.shape(ex[self.length_key])[0], length) for ex in examples])
            pos = np.arange(length)[None, :]
            out[self.mask_key] = pos < lens[:, None] if self.side == "right" else pos >= (length - lens)[:, None]
        return out


def default_collate(examples: Sequence[Example]) -> Batch:
    """Stack examples of equal shapes into a batch (no padding)."""
    return Collator(mask_key=None)(examples)


# ---------------------------------------------------------------------------------------------
# Datasets and loaders


def process_shard(shard: grain.sharding.ShardOptions | None = None) -> grain.sharding.ShardOptions:
    """``shard`` or this JAX process's shard (``ShardByJaxProcess``: jax.process_index / process_count)."""
    return shard if shard is not None else grain.sharding.ShardByJaxProcess(drop_remainder=True)


class _LocalBatch:
    """grain batch_fn: keeps this process's rows of a global batch, padded as the whole batch."""

    def __init__(self, collate: Callable, shard: grain.sharding.ShardOptions, local: int, global_size: int,
                 pad_remainder: bool):
        self.collate, self.shard, self.local = collate, shard, local
        self.global_size, self.pad_remainder = global_size, pad_remainder

    def __call__(self, elements: Sequence[Example]) -> Batch:
        elements = list(elements)
        valid = np.ones(self.global_size, dtype=bool)
        if len(elements) < self.global_size:  # the last, partial batch of a finite run
            valid[len(elements):] = False
            elements += [elements[0]] * (self.global_size - len(elements))
        start = self.shard.shard_index * self.local
        mine = elements[start : start + self.local]
        if isinstance(self.collate, Collator):
            batch = self.collate(mine, length=self.collate.target_length(elements))
        else:
            batch = self.collate(mine)
        if self.pad_remainder:
            if "valid" in batch:
                raise PipelineError("examples already have a 'valid' key, which drop_remainder=False adds")
            batch["valid"] = valid[start : start + self.local]
        return batch


def make_dataset(
    examples: Sequence[Example],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    collate: Callable[[Sequence[Example]], Batch] | None = None,
    shard: grain.sharding.ShardOptions | None = None,
) -> grain.MapDataset:
    """A grain ``MapDataset`` of this process's part of each global batch.

    ``batch_size`` is the global batch size; each of the ``shard.shard_count`` processes gets
    ``batch_size // shard_count`` rows per step. Shuffling is seeded and differs per epoch;
    ``num_epochs=None`` repeats forever. With ``drop_remainder=False`` the last partial batch is
    padded (by repeating an example) and every batch carries a bool ``"valid"`` row mask.
    """
    if len(examples) == 0:
        raise PipelineError("no examples to load")
    shard = process_shard(shard)
    if batch_size <= 0 or batch_size % shard.shard_count:
        raise PipelineError(f"global batch_size {batch_size} must be a positive multiple of the number of "
                            f"processes ({shard.shard_count})")
    if num_epochs is not None and num_epochs <= 0:
        raise PipelineError(f"num_epochs must be positive or None, got {num_epochs}")
    if drop_remainder and num_epochs is not None and len(examples) * num_epochs < batch_size:
        raise PipelineError(f"{len(examples)} examples x {num_epochs} epoch(s) do not fill one batch of {batch_size}")
    ds = grain.MapDataset.source(examples)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    batch_fn = _LocalBatch(collate or default_collate, shard, batch_size // shard.shard_count, batch_size,
                           pad_remainder=not drop_remainder)
    return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)


def make_loader(examples: Sequence[Example], *, num_threads: int = 0, **dataset_options: Any) -> grain.DatasetIterator:
    """Iterator over this process's batches of ``make_dataset(examples, **dataset_options)`` (batch_size, seed,
    shuffle, num_epochs, drop_remainder, collate, shard), with ``get_state``/``set_state``.

    ``num_threads=0`` reads in the calling thread, which is fastest for in-memory examples
    (no GIL contention); raise it when ``examples`` does I/O on access.
    """
    ds = make_dataset(examples, **dataset_options)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 0))
    return iter(ds.to_iter_dataset(read))


def steps_per_epoch(num_examples: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Number of global batches in one epoch of ``num_examples``."""
    return num_examples // batch_size if drop_remainder else math.ceil(num_examples / batch_size)


# ---------------------------------------------------------------------------------------------
# Tokenisation (transformers tokenizers from local folders)


def load_tokenizer(path: str | os.PathLike):
    """``transformers.AutoTokenizer`` from a local folder (never the hub): any folder it reads, e.g.
    tokenizer.json / tokenizer_config.json, or a BERT folder's vocab.txt."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: tokenizer folder not found (expected a local folder with tokenizer files)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                    "vocab.txt")):
            raise FileNotFoundError(f"no tokenizer in {str(path)!r} (expected tokenizer.json / tokenizer_config.json); "
                                    "set config.tokenizer_path to a folder with the model's tokenizer") from None
        raise FileNotFoundError(f"{path}: cannot load a tokenizer from this folder: {e}") from None


def tokenize_texts(
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    add_special_tokens: bool = True,
    text_pairs: Sequence[str] | None = None,
    dtype: np.dtype = np.int32,
    **fields: Sequence[Any],
) -> list[dict[str, np.ndarray]]:
    """Tokenise texts (optionally paired, e.g. question + context) into per-example dicts.

    Each example has ``input_ids`` (unpadded, truncated to ``max_length``), ``token_type_ids`` when
    the tokenizer produces them, and one 0-d array per extra keyword (e.g. ``label=[0, 1, ...]``).
    """
    n = len(texts)
    for key, values in fields.items():
        if len(values) != n:
            raise PipelineError(f"field {key!r} has {len(values)} values for {n} texts")
    if text_pairs is not None and len(text_pairs) != n:
        raise PipelineError(f"text_pairs has {len(text_pairs)} entries for {n} texts")
    enc = tokenizer(list(texts), list(text_pairs) if text_pairs is not None else None,
                    add_special_tokens=add_special_tokens, truncation=max_length is not None,
                    max_length=max_length, padding=False, return_attention_mask=False)
    keep = [k for k in ("input_ids", "token_type_ids") if k in enc]
    out = []
    for i in range(n):
        ex = {k: np.asarray(enc[k][i], dtype=dtype) for k in keep}
        for key, values in fields.items():
            ex[key] = np.asarray(values[i])
        out.append(ex)
    return out
