"""Evaluating a causal LM on multiple-choice questions: prompts, resumable generation, scoring, accuracy tables.

Each question is rendered with the tokenizer's chat template (``PromptSettings``), continued
``GenSettings.num_samples`` times by the generation engine (``sampling.Sampler``: continuous batching, optional
thinking budget), logged as items finish (``GenerationLog``: a killed run resumes) and scored with ``extract_answer``; accuracy is tabulated per benchmark and knowledge / reasoning split
(``record.label``, or the released classifier's ``record.is_reasoning``). The jobs "evaluate" and
"adversarial" (medkr_jax.jobs) build the settings from the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from medkr_jax.data.answer import answer_letter, extract_answer
from medkr_jax.data.pipeline import load_tokenizer
from medkr_jax.data.readers import load_benchmark_spec
from medkr_jax.data.records import read_records
from medkr_jax.eval import metrics, prompts, report
from medkr_jax.eval.genlog import GenerationLog
from medkr_jax.models.hf import check_tokenizer_fits, load_decoder, read_hf_config
from medkr_jax.parallel import is_main_process
from medkr_jax.sampling import Finished, Sampler, ThinkingBudget


# ------------------------------------------------------------------------------------------- records


def record_split(record: Any) -> str | None:
    """"reasoning" / "knowledge" from the record's label, else from the released classifier's flag."""
    if record.label in ("reasoning", "knowledge"):
        return record.label
    if record.is_reasoning is not None:
        return "reasoning" if record.is_reasoning else "knowledge"
    return None


def load_eval_records(benchmarks: Sequence[str], eval_path: str = "", limit: int = 0) -> list:
    """Records of the ``benchmarks`` specs and the canonical records file ``eval_path`` (config.data.benchmarks,
    config.data.eval_path); ``limit`` > 0 keeps the first N questions of each benchmark. Duplicate
    (benchmark, id) pairs are an error."""
    records = []
    for spec in benchmarks:
        records += list(load_benchmark_spec(spec))
    if eval_path:
        records += read_records(eval_path)
    if not records:
        raise ValueError("no questions to evaluate: set config.data.benchmarks (spec strings) or "
                         "config.data.eval_path (canonical records)")
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


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """How a decoder is loaded for generation (config.model, config.mesh, config.eval.stop_strings)."""

    mesh: Any
    rules: tuple
    dtype: str
    param_dtype: str
    allow_pickle: bool = False
    stop_strings: tuple[str, ...] = ()


@dataclasses.dataclass
class Runtime:
    """A loaded model with its tokenizer and a sampler for it."""

    model: Any
    cfg: Any
    tokenizer: Any
    sampler: Any
    path: str
    settings: ModelSettings   # how it was loaded (a second model, e.g. an adversarial generator, loads alike)


def load_runtime(model_path: str, settings: ModelSettings, *, tokenizer_path: str | None = None) -> Runtime:
    """Decoder from ``model_path``, tokenizer from ``tokenizer_path`` (default the model folder), and a
    Sampler with the tokenizer's stop ids."""
    tokenizer_path = tokenizer_path or model_path
    read_hf_config(model_path)  # a missing model folder is named as such, not as a missing tokenizer
    tokenizer = load_tokenizer(tokenizer_path)
    check_tokenizer_fits(tokenizer, model_path, tokenizer_dir=tokenizer_path)
    model, cfg = load_decoder(model_path, mesh=settings.mesh, rules=settings.rules,
                              dtype=jnp.dtype(settings.dtype), param_dtype=jnp.dtype(settings.param_dtype),
                              allow_pickle=settings.allow_pickle)
    stop_ids = prompts.stop_token_ids(tokenizer, cfg.eos_token_ids, tuple(settings.stop_strings))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        cfg.pad_token_id if cfg.pad_token_id is not None else stop_ids[0])
    sampler = Sampler(cfg, mesh=settings.mesh, rules=settings.rules, pad_id=pad, stop_ids=stop_ids)
    return Runtime(model, cfg, tokenizer, sampler, str(model_path), settings)


# ------------------------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class ThinkingSettings:
    """A thinking budget as text (config.eval.thinking_*; see ``sampling.thinking``): after ``budget`` tokens
    inside ``start`` ... ``end``, the engine writes ``end`` + ``cue``; ``max_waits`` > 0 replaces an early
    ``end`` by ``wait`` up to that many times (s1 budget forcing)."""

    budget: int
    start: str = "<think>"
    end: str = "</think>"
    cue: str = "\n\nThe answer is"
    wait: str = "Wait"
    max_waits: int = 0

    def tokens(self, tokenizer: Any) -> ThinkingBudget:
        """The budget in the tokenizer's ids (markers and texts encoded without special tokens)."""
        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False)) if text else ()
        try:
            return ThinkingBudget(self.budget, ids(self.start), ids(self.end), ids(self.cue), ids(self.wait),
                                  self.max_waits)
        except ValueError as err:
            raise ValueError(f"config.eval.thinking_*: {err}") from None


@dataclasses.dataclass(frozen=True)
class GenSettings:
    """Sampling settings of one evaluation (config.eval; seed = config.seed). batch_size: the engine's decode
    slots; thinking: a thinking budget, or None."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    num_samples: int
    batch_size: int
    seed: int
    thinking: ThinkingSettings | None = None

    def __post_init__(self):
        if self.num_samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("config.eval.num_samples, batch_size and max_new_tokens must be >= 1, got "
                             f"{self.num_samples}, {self.batch_size}, {self.max_new_tokens}")
        if self.thinking is not None and self.thinking.budget >= self.max_new_tokens:
            raise ValueError(f"config.eval.thinking_budget={self.thinking.budget} leaves no room to answer within "
                             f"config.eval.max_new_tokens={self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """How a question becomes a prompt (config.eval.system_prompt, prompt_template, chat_template_kwargs)."""

    system_prompt: str = prompts.DEFAULT_SYSTEM_PROMPT
    template: str = prompts.DEFAULT_TEMPLATE
    chat_template_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Item:
    """One prompt to generate for: a question, or a question x adversarial variant."""

    key: str
    record: Any
    prompt: list[int]
    variant: str = ""
    prefix: str = ""          # prefilled assistant text (adversarial), part of the prompt
    extra: dict = dataclasses.field(default_factory=dict)


def build_items(prompt: PromptSettings, tokenizer: Any, records: Sequence[Any], *, variant: str = "",
                prefixes: Sequence[str] | None = None) -> list[Item]:
    """Prompts of ``records`` (with one assistant prefix each when given)."""
    items = []
    for i, r in enumerate(records):
        prefix = prefixes[i] if prefixes is not None else ""
        text = prompts.build_prompt(tokenizer, r, system_prompt=prompt.system_prompt, template=prompt.template,
                                    assistant_prefix=prefix, chat_template_kwargs=prompt.chat_template_kwargs)
        items.append(Item(item_key(r, variant), r, prompts.encode(tokenizer, text), variant, prefix))
    return items


def _prompt_hash(tokens: Sequence[int]) -> str:
    return hashlib.sha1(np.asarray(tokens, np.int64).tobytes()).hexdigest()[:16]


def _remaining_mask(items: Sequence[Item], glog: GenerationLog) -> np.ndarray:
    """Items still to generate, decided by the main process and shared with all (they must agree)."""
    mask = np.array([it.key not in glog for it in items], bool)
    if jax.process_count() > 1:
        mask = np.asarray(multihost_utils.broadcast_one_to_all(mask)).astype(bool)
    return mask


def run_generation(rt: Runtime, items: Sequence[Item], glog: GenerationLog, gen: GenSettings, *,
                   desc: str = "generate", on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Generate every item not yet in ``glog`` with the engine, appending items to it as they finish.

    The engine keeps ``batch_size`` rows decoding and streams each item once its samples have all stopped; items
    are made durable ``batch_size // num_samples`` at a time (and the rest at the end). A question's randomness
    comes from its key, not from its neighbours, so a resumed run reproduces an uninterrupted one.
    ``on_batch(items_done_this_run)`` is called after each append. Returns the counts (generated, resumed) and,
    when something was generated, the engine's ``RunStats`` of the call ("engine").
    """
    for it in items:
        if it.key in glog and glog.entries[it.key].get("prompt_hash") != _prompt_hash(it.prompt):
            raise ValueError(f"{glog.path}: item {it.key!r} was generated from a different prompt; use a new "
                             "output_dir or delete the log to start over")
    todo_mask = _remaining_mask(items, glog)
    todo = sorted((it for it, m in zip(items, todo_mask) if m), key=lambda it: (len(it.prompt), it.key))
    per_batch = max(1, gen.batch_size // gen.num_samples)
    done, tokens, start, pending = 0, 0, time.perf_counter(), []
    bar = tqdm(total=len(todo), desc=desc, unit="q", disable=not todo or not is_main_process(),
               dynamic_ncols=True)
    if todo:  # the first items also wait for the engine's programs to compile: say so meanwhile
        bar.set_postfix_str(f"compiling + first batch of {min(per_batch, len(todo))} questions", refresh=True)
    thinking = None if gen.thinking is None else gen.thinking.tokens(rt.tokenizer)
    stream = rt.sampler.stream(rt.model, [it.prompt for it in todo], max_new_tokens=gen.max_new_tokens,
                               temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, n=gen.num_samples,
                               seed=gen.seed, batch_size=gen.batch_size, thinking=thinking,
                               prompt_keys=[zlib.crc32(it.key.encode()) for it in todo])
    for fin in itertools.chain(stream, [None]):
        if fin is not None:
            pending.append(_entry(rt, todo[fin.prompt], fin))
        if pending and (len(pending) == per_batch or fin is None):
            glog.append(pending)
            done += len(pending)
            tokens += sum(smp["tokens"] for e in pending for smp in e["samples"])
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.0f} generated tok/s", refresh=False)
            bar.update(len(pending))
            pending = []
            if on_batch is not None:
                on_batch(done)
    bar.close()
    counts: dict[str, Any] = {"generated": done, "resumed": len(items) - len(todo)}
    if todo:  # what the engine did: how busy its slots were, how much of the prefill was padding
        st = rt.sampler.last_stats
        counts["engine"] = st.as_dict()
        if is_main_process():
            tqdm.write(f"{desc}: {st.tokens:,} tokens in {st.steps:,} decode steps of {st.slots} slots (occupancy "
                       f"{100 * st.occupancy:.0f}%), cache {st.cache_length} tokens a slot; {st.prefill_calls} "
                       f"prefill calls, {100 * st.prefill_padding:.0f}% of their positions padding")
    return counts


def _entry(rt: Runtime, it: Item, fin: Finished) -> dict:
    """The log entry of one finished item: the question, and per sample its text, prediction, length, whether
    it stopped by itself, and its log-probability."""
    samples = []
    for toks, lps in zip(fin.tokens, fin.logprobs):
        text = rt.tokenizer.decode(toks, skip_special_tokens=True)
        samples.append({"text": text, "pred": answer_letter(score_text(text, it)), "tokens": len(toks),
                        "stopped": bool(toks) and toks[-1] in rt.sampler.stop_ids, "logprob": float(lps.sum())})
    return {"key": it.key, "id": it.record.id, "benchmark": it.record.benchmark, "label": record_split(it.record),
            "answer": int(it.record.answer), "options": list(it.record.options), "variant": it.variant,
            "prefix": it.prefix, "prompt_tokens": len(it.prompt), "prompt_hash": _prompt_hash(it.prompt),
            **it.extra, "samples": samples}


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
                     "answer": e["answer"], "correct": [p == e["answer"] for p in preds],
                     "tokens": [int(s["tokens"]) for s in e["samples"]]})
    return rows


def settings_fingerprint(rt: Runtime, gen: GenSettings, prompt: PromptSettings) -> dict:
    """What decides a generation; a log made with other settings is not resumed."""
    return {"model": os.path.abspath(rt.path), "tokenizer": str(getattr(rt.tokenizer, "name_or_path", "")),
            "dtype": rt.settings.dtype, "system_prompt": prompt.system_prompt, "prompt_template": prompt.template,
            "chat_template_kwargs": dict(prompt.chat_template_kwargs), "stop_ids": list(rt.sampler.stop_ids),
            **{k: v for k, v in dataclasses.asdict(gen).items() if not (k == "thinking" and v is None)}}


def write_accuracy_outputs(out_dir: Path, table: list[dict], *, stem: str = "results",
                           title: str = "Accuracy (%)") -> None:
    """``<stem>.csv``, ``<stem>.md`` (accuracy, then maj@n / pass@k when present) and the knowledge-vs-reasoning
    bar plot ``<stem>_knowledge_vs_reasoning.png`` (``knowledge_vs_reasoning.png`` for the main results)."""
    report.write_csv(table, out_dir / f"{stem}.csv")
    (out_dir / f"{stem}.md").write_text(report.accuracy_markdown(table, title)
                                        + report.self_consistency_markdown(table))
    plot = "knowledge_vs_reasoning.png" if stem == "results" else f"{stem}_knowledge_vs_reasoning.png"
    report.plot_knowledge_vs_reasoning(table, out_dir / plot, title=title)


def write_metrics(out_dir: Path, rows: Sequence[dict]) -> None:
    """``metrics.jsonl``: every table row of this job, rewritten whole so a resumed run leaves one copy."""
    with open(out_dir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(rt: Runtime, records: Sequence[Any], out_dir: Path, *, prompt: PromptSettings, gen: GenSettings,
             ci: str = "auto", seed: int = 0, log_name: str = "generations.jsonl", desc: str = "evaluate",
             on_batch: Callable[[int], None] | None = None,
             pass_k: Sequence[int] = ()) -> tuple[list[dict], dict, list[dict]]:
    """Generate (resuming), score and tabulate ``records``; returns (accuracy table, counts, per-question rows).
    With several samples per question the table also has maj@n and pass@k for each k in ``pass_k``."""
    items = build_items(prompt, rt.tokenizer, records)
    glog = GenerationLog(out_dir / log_name, settings_fingerprint(rt, gen, prompt), writable=is_main_process())
    counts = run_generation(rt, items, glog, gen, desc=desc, on_batch=on_batch)
    rows = score_rows(glog, [it.key for it in items])
    return metrics.accuracy_table(rows, ci=ci, seed=seed, pass_k=pass_k), counts, rows
