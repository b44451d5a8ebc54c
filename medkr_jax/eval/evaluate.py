"""Job "evaluate": accuracy of a causal LM on the knowledge-heavy and reasoning-heavy questions of each benchmark.

    python -m medkr_jax.main --config configs/<x>.py --config.job=evaluate \\
        --config.model.path=/models/Qwen3-8B --config.data.eval_path=runs/split/labelled.jsonl

Questions come from ``config.data.benchmarks`` (benchmark spec strings, see ``medkr_jax.data.benchmarks``)
and/or ``config.data.eval_path`` (canonical records); their split is ``record.label`` or, when unset, the
released classifier's ``record.is_reasoning``. Each question is rendered with the tokenizer's chat template
(``config.eval.system_prompt``, ``config.eval.prompt_template``), continued ``config.eval.num_samples``
times by the jitted sampler, and scored with ``extract_answer``.

Outputs in ``config.output_dir``: ``generations.jsonl`` (appended as batches finish; a rerun skips what is
there), ``results.csv``, ``results.md``, ``knowledge_vs_reasoning.png``, ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medkr_jax.eval import metrics, prompts, report
from medkr_jax.eval.extract import answer_letter, extract_answer
from medkr_jax.eval.genlog import GenerationLog
from medkr_jax.parallel import is_main_process

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- records


def record_split(record: Any) -> str | None:
    """"reasoning" / "knowledge" from the record's label, else from the released classifier's flag."""
    if record.label in ("reasoning", "knowledge"):
        return record.label
    if record.is_reasoning is not None:
        return "reasoning" if record.is_reasoning else "knowledge"
    return None


def load_eval_records(config: Any) -> list:
    """Records of ``config.data.benchmarks`` specs and ``config.data.eval_path``; ``config.data.limit``
    keeps the first N questions of each benchmark. Duplicate (benchmark, id) pairs are an error."""
    from medkr_jax.data.benchmarks import load_benchmark_spec
    from medkr_jax.data.records import read_records

    records = []
    for spec in config.data.benchmarks:
        records += list(load_benchmark_spec(spec))
    if config.data.eval_path:
        records += read_records(config.data.eval_path)
    if not records:
        raise ValueError("no questions to evaluate: set config.data.benchmarks (spec strings) or "
                         "config.data.eval_path (canonical records)")
    limit = int(config.data.limit or 0)
    if limit > 0:
        seen: dict[str, int] = {}
        kept = []
        for r in records:
            if seen.get(r.benchmark, 0) < limit:
                kept.append(r)
                seen[r.benchmark] = seen.get(r.benchmark, 0) + 1
        records = kept
    keys = [item_key(r) for r in records]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"question {dup!r} appears more than once in the evaluation data "
                         "(config.data.benchmarks / config.data.eval_path); ids must be unique per benchmark")
    return records


def item_key(record: Any, variant: str = "") -> str:
    return f"{record.benchmark}/{record.id}" + (f"#{variant}" if variant else "")


# ------------------------------------------------------------------------------------------- model


@dataclasses.dataclass
class Runtime:
    """A loaded model with its tokenizer and a sampler for it."""

    model: Any
    cfg: Any
    tokenizer: Any
    sampler: Any
    path: str


def load_tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    if not Path(folder, "tokenizer_config.json").is_file() and not Path(folder, "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {folder!r} (expected tokenizer.json / tokenizer_config.json); "
                                "set config.tokenizer_path to a folder with the model's tokenizer")
    return AutoTokenizer.from_pretrained(folder)


def load_runtime(config: Any, *, model_path: str | None = None, tokenizer_path: str | None = None,
                 mesh: Any = None) -> Runtime:
    """Decoder from ``model_path`` (default config.model.path), tokenizer from ``tokenizer_path`` (default
    config.tokenizer_path or the model folder), and a Sampler with the tokenizer's stop ids."""
    import jax.numpy as jnp

    from medkr_jax import parallel
    from medkr_jax.config import require
    from medkr_jax.models.hf import check_tokenizer_fits, load_decoder, read_hf_config
    from medkr_jax.sampling import Sampler

    if model_path is None:
        require(config, "model.path")
        model_path = config.model.path
        tokenizer_path = tokenizer_path or config.tokenizer_path or model_path
    tokenizer_path = tokenizer_path or model_path
    mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    rules = parallel.logical_rules(config)
    read_hf_config(model_path)  # a missing model folder is named as such, not as a missing tokenizer
    tokenizer = load_tokenizer(tokenizer_path)
    check_tokenizer_fits(tokenizer, model_path, tokenizer_dir=tokenizer_path)
    model, cfg = load_decoder(model_path, mesh=mesh, rules=rules, dtype=jnp.dtype(config.model.dtype),
                              param_dtype=jnp.dtype(config.model.param_dtype),
                              allow_pickle=config.model.allow_pickle)
    stop_ids = prompts.stop_token_ids(tokenizer, cfg.eos_token_ids, tuple(config.eval.stop_strings))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        cfg.pad_token_id if cfg.pad_token_id is not None else stop_ids[0])
    sampler = Sampler(cfg, mesh=mesh, rules=rules, pad_id=pad, stop_ids=stop_ids,
                      cache_dtype=jnp.dtype(config.model.dtype))
    return Runtime(model, cfg, tokenizer, sampler, str(model_path))


# ------------------------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class GenSettings:
    """Sampling settings of one evaluation (config.eval)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    num_samples: int
    batch_size: int
    seed: int

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> "GenSettings":
        e = config.eval
        kw = dict(max_new_tokens=int(e.max_new_tokens), temperature=float(e.temperature), top_k=int(e.top_k),
                  top_p=float(e.top_p), num_samples=int(e.num_samples), batch_size=int(e.batch_size),
                  seed=int(config.seed))
        kw.update(overrides)
        if kw["num_samples"] < 1 or kw["batch_size"] < 1 or kw["max_new_tokens"] < 1:
            raise ValueError("config.eval.num_samples, batch_size and max_new_tokens must be >= 1, got "
                             f"{kw['num_samples']}, {kw['batch_size']}, {kw['max_new_tokens']}")
        return cls(**kw)


@dataclasses.dataclass
class Item:
    """One prompt to generate for: a question, or a question x adversarial variant."""

    key: str
    record: Any
    prompt: list[int]
    variant: str = ""
    prefix: str = ""          # prefilled assistant text (adversarial), part of the prompt
    extra: dict = dataclasses.field(default_factory=dict)


def chat_kwargs(config: Any) -> dict:
    raw = config.eval.chat_template_kwargs
    if not raw:
        return {}
    try:
        out = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"config.eval.chat_template_kwargs must be a JSON object, e.g. "
                         f"'{{\"enable_thinking\": false}}'; got {raw!r} ({err})") from None
    if not isinstance(out, dict):
        raise ValueError(f"config.eval.chat_template_kwargs must be a JSON object, got {raw!r}")
    return out


def build_items(config: Any, tokenizer: Any, records: Sequence[Any], *, variant: str = "",
                prefixes: Sequence[str] | None = None) -> list[Item]:
    """Prompts of ``records`` (with one assistant prefix each when given)."""
    items = []
    kwargs = chat_kwargs(config)
    for i, r in enumerate(records):
        prefix = prefixes[i] if prefixes is not None else ""
        text = prompts.build_prompt(tokenizer, r, system_prompt=config.eval.system_prompt,
                                    template=config.eval.prompt_template, assistant_prefix=prefix,
                                    chat_template_kwargs=kwargs)
        items.append(Item(item_key(r, variant), r, prompts.encode(tokenizer, text), variant, prefix))
    return items


def _prompt_hash(tokens: Sequence[int]) -> str:
    return hashlib.sha1(np.asarray(tokens, np.int64).tobytes()).hexdigest()[:16]


def _remaining_mask(items: Sequence[Item], glog: GenerationLog) -> np.ndarray:
    """Items still to generate, decided by the main process and shared with all (they must agree)."""
    import jax

    mask = np.array([it.key not in glog for it in items], bool)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        mask = np.asarray(multihost_utils.broadcast_one_to_all(mask)).astype(bool)
    return mask


def run_generation(rt: Runtime, items: Sequence[Item], glog: GenerationLog, gen: GenSettings, *,
                   desc: str = "generate", on_batch: Callable[[int], None] | None = None) -> dict[str, int]:
    """Generate every item not yet in ``glog``, appending each batch to it as soon as it finishes.

    Items are processed shortest prompt first, in a fixed order, up to ``batch_size // num_samples`` prompts
    of one prompt-length bucket per batch; a question's randomness comes from its key, not from its batch,
    so a resumed run reproduces an uninterrupted one. ``on_batch(items_done_this_run)`` is called after each
    batch is durable.
    """
    from tqdm import tqdm

    for it in items:
        if it.key in glog and glog.entries[it.key].get("prompt_hash") != _prompt_hash(it.prompt):
            raise ValueError(f"{glog.path}: item {it.key!r} was generated from a different prompt; use a new "
                             "output_dir or delete the log to start over")
    todo_mask = _remaining_mask(items, glog)
    todo = sorted((it for it, m in zip(items, todo_mask) if m), key=lambda it: (len(it.prompt), it.key))
    per_batch = max(1, gen.batch_size // gen.num_samples)
    # Batches never mix prompt-length buckets: a long prompt would pad its whole batch to its bucket.
    chunks, group = [], []
    for it in todo:
        if group and (len(group) == per_batch or rt.sampler.prompt_bucket(len(it.prompt))
                      != rt.sampler.prompt_bucket(len(group[0].prompt))):
            chunks.append(group)
            group = []
        group.append(it)
    chunks += [group] if group else []
    done = 0
    bar = tqdm(total=len(todo), desc=desc, unit="q", disable=not todo or not is_main_process(),
               dynamic_ncols=True)
    for chunk in chunks:
        out = rt.sampler.generate(
            rt.model, [it.prompt for it in chunk], max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, n=gen.num_samples, seed=gen.seed,
            batch_size=per_batch * gen.num_samples, prompt_keys=[zlib.crc32(it.key.encode()) for it in chunk])
        entries = []
        for p, it in enumerate(chunk):
            samples = []
            for r in np.nonzero(out.prompt_index == p)[0]:
                toks = out.row_tokens(int(r))
                text = rt.tokenizer.decode(toks, skip_special_tokens=True)
                stopped = bool(toks) and toks[-1] in rt.sampler.stop_ids
                samples.append({"text": text, "pred": answer_letter(score_text(text, it)),
                                "tokens": len(toks), "stopped": stopped,
                                "logprob": float(out.logprobs[r, :len(toks)].sum())})
            entries.append({"key": it.key, "id": it.record.id, "benchmark": it.record.benchmark,
                            "label": record_split(it.record), "answer": int(it.record.answer),
                            "options": list(it.record.options), "variant": it.variant, "prefix": it.prefix,
                            "prompt_tokens": len(it.prompt), "prompt_hash": _prompt_hash(it.prompt),
                            **it.extra, "samples": samples})
        glog.append(entries)
        done += len(chunk)
        bar.update(len(chunk))
        if on_batch is not None:
            on_batch(done)
    bar.close()
    return {"generated": done, "resumed": len(items) - len(todo)}


def score_text(text: str, item_or_entry: Any) -> int | None:
    """The option a continuation commits to. With an assistant prefix, the continuation alone decides;
    when it names no option the prefix's own answer stands (the model let the misleading answer stand)."""
    if isinstance(item_or_entry, dict):
        options, prefix = item_or_entry["options"], item_or_entry.get("prefix", "")
    else:
        options, prefix = item_or_entry.record.options, item_or_entry.prefix
    got = extract_answer(text, options)
    if got is None and prefix:
        got = extract_answer(prefix + text, options)
    return got


def score_rows(glog: GenerationLog, keys: Sequence[str]) -> list[dict]:
    """Per-question rows for ``metrics``: re-extracted from the logged texts (so scoring can change without
    regenerating)."""
    rows = []
    for k in keys:
        e = glog.entries[k]
        preds = [score_text(s["text"], e) for s in e["samples"]]
        rows.append({"key": k, "benchmark": e["benchmark"], "label": e["label"], "pred": preds,
                     "correct": [p == e["answer"] for p in preds]})
    return rows


def settings_fingerprint(config: Any, rt: Runtime, gen: GenSettings) -> dict:
    """What decides a generation; a log made with other settings is not resumed."""
    return {"model": os.path.abspath(rt.path), "tokenizer": str(getattr(rt.tokenizer, "name_or_path", "")),
            "dtype": config.model.dtype, "system_prompt": config.eval.system_prompt,
            "prompt_template": config.eval.prompt_template, "chat_template_kwargs": chat_kwargs(config),
            "stop_ids": list(rt.sampler.stop_ids), **dataclasses.asdict(gen)}


def write_accuracy_outputs(out_dir: Path, table: list[dict], *, stem: str = "results",
                           title: str = "Accuracy (%)") -> None:
    """``<stem>.csv``, ``<stem>.md`` and the knowledge-vs-reasoning bar plot ``<stem>_knowledge_vs_reasoning.png``
    (``knowledge_vs_reasoning.png`` for the main results)."""
    report.write_csv(table, out_dir / f"{stem}.csv")
    (out_dir / f"{stem}.md").write_text(report.accuracy_markdown(table, title))
    plot = "knowledge_vs_reasoning.png" if stem == "results" else f"{stem}_knowledge_vs_reasoning.png"
    report.plot_knowledge_vs_reasoning(table, out_dir / plot, title=title)


def write_metrics(out_dir: Path, rows: Sequence[dict]) -> None:
    """``metrics.jsonl``: every table row of this job, rewritten whole so a resumed run leaves one copy."""
    with open(out_dir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------- job


def evaluate(config: Any, rt: Runtime, records: Sequence[Any], out_dir: Path, *, log_name: str = "generations.jsonl",
             on_batch: Callable[[int], None] | None = None) -> tuple[list[dict], dict]:
    """Generate (resuming), score and tabulate ``records``; returns (accuracy table, counts)."""
    gen = GenSettings.from_config(config)
    items = build_items(config, rt.tokenizer, records)
    glog = GenerationLog(out_dir / log_name, settings_fingerprint(config, rt, gen),
                         writable=is_main_process())
    counts = run_generation(rt, items, glog, gen, desc="evaluate", on_batch=on_batch)
    rows = score_rows(glog, [it.key for it in items])
    return metrics.accuracy_table(rows, ci=config.eval.ci, seed=int(config.seed)), counts


def run(config: Any, *, on_batch: Callable[[int], None] | None = None) -> dict:
    """Job "evaluate"; returns a summary (overall accuracy per split, counts, output files)."""
    from medkr_jax.config import require

    require(config, "output_dir")
    out_dir = Path(config.output_dir)
    records = load_eval_records(config)
    rt = load_runtime(config)
    table, counts = evaluate(config, rt, records, out_dir, on_batch=on_batch)
    if is_main_process():
        write_accuracy_outputs(out_dir, table)
        write_metrics(out_dir, [{"kind": "accuracy", **r} for r in table])
    overall = {r["split"]: round(r["accuracy"], 4) for r in table if r["benchmark"] == metrics.OVERALL}
    return {"questions": len(records), **counts, "accuracy": overall,
            "files": [str(out_dir / f) for f in ("results.csv", "results.md", "knowledge_vs_reasoning.png",
                                                 "generations.jsonl")]}
