"""Adversarial evaluation: accuracy when the answer is prefilled with misleading reasoning toward a wrong option.

For each question the assistant turn is prefilled with ``AdversarialSettings.prefix_format`` (the misleading
reasoning, then the reconsideration cue) and the model continues from there. The continuation decides the
answer; when it names no option, the prefix's answer stands. Prefix sources (``SOURCES``):

* ``released``: the record's ``adversarial_traces`` (the released eval set has three per question); each
  trace is one run, and the report gives their mean, standard deviation, min and max;
* ``generated``: a model (the generator, default the evaluated one) is asked with the generator prompt to
  argue for a wrong option (drawn per question from the seed); greedy, its visible answer (after any think
  block);
* ``template``: a fixed template filled with the wrong option.

"Before" is the plain evaluation of the same questions. The job (medkr_jax.jobs.adversarial) builds the
settings from config.adversarial and writes the tables.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medkr_jax.data.answer import LETTERS, extract_answer, split_think
from medkr_jax.eval import metrics, prompts, report
from medkr_jax.eval.evaluate import (GenSettings, Item, PromptSettings, Runtime, build_items,
                                     item_key, load_runtime, record_split, run_generation, score_rows,
                                     settings_fingerprint, write_accuracy_outputs, write_metrics)
from medkr_jax.eval.genlog import GenerationLog
from medkr_jax.parallel import is_main_process

SOURCES = ("released", "generated", "template")


@dataclasses.dataclass(frozen=True)
class AdversarialSettings:
    """The prefix sources and how prefixes are written and prefilled (config.adversarial; seed = config.seed)."""

    sources: tuple[str, ...]
    cue: str
    prefix_format: str            # fields {prefix}, {cue}
    template: str                 # source "template": fields {letter}, {option}
    generator_prompt: str         # source "generated": fields {letter}, {option}
    generator_max_new_tokens: int
    generator_path: str = ""      # source "generated": the model that argues ("" = the evaluated one)
    seed: int = 0


def parse_sources(value: str) -> list[str]:
    """``"released,template"`` -> ["released", "template"]; unknown names are a config error."""
    names = [s.strip() for s in str(value).split(",") if s.strip()]
    bad = [s for s in names if s not in SOURCES]
    if not names or bad:
        raise ValueError(f"config.adversarial.source={value!r}: expected one or more of {SOURCES}, comma-separated")
    return list(dict.fromkeys(names))


def wrong_option(record: Any, seed: int) -> int:
    """A wrong option index for ``record``, drawn from (seed, question) so every run picks the same one."""
    wrong = [i for i in range(len(record.options)) if i != record.answer]
    rng = np.random.default_rng([seed, zlib.crc32(item_key(record).encode())])
    return int(wrong[rng.integers(len(wrong))])


def template_prefix(template: str, record: Any, wrong: int) -> str:
    try:
        return template.format(letter=LETTERS[wrong], option=record.options[wrong])
    except (KeyError, IndexError) as err:
        raise ValueError(f"config.adversarial.template: unknown field {err}; use {{letter}} and {{option}}") from None


def generated_prefixes(gen_rt: Runtime, records: Sequence[Any], wrongs: Sequence[int], out_dir: Path, *,
                       adv: AdversarialSettings, prompt: PromptSettings, gen: GenSettings) -> list[str]:
    """Misleading reasoning written by ``gen_rt`` for each record's wrong option (logged and resumable)."""
    items = []
    for r, w in zip(records, wrongs):
        try:
            ask = adv.generator_prompt.format(letter=LETTERS[w], option=r.options[w])
        except (KeyError, IndexError) as err:
            raise ValueError(f"config.adversarial.generator_prompt: unknown field {err}; use {{letter}} and "
                             "{option}") from None
        text = prompts.render_chat(gen_rt.tokenizer, prompts.format_question(r, prompt.template) + "\n\n" + ask,
                                   chat_template_kwargs=prompt.chat_template_kwargs)
        items.append(Item(item_key(r, "argue"), r, prompts.encode(gen_rt.tokenizer, text), "argue",
                          extra={"target": w}))
    # greedy, one sample, no thinking budget (the argument is the visible text after any think block)
    gen = dataclasses.replace(gen, max_new_tokens=adv.generator_max_new_tokens, temperature=0.0, top_k=0,
                              top_p=1.0, num_samples=1, thinking=None)
    fp = settings_fingerprint(gen_rt, gen, prompt) | {"generator_prompt": adv.generator_prompt}
    glog = GenerationLog(out_dir / "adversarial_prefixes.jsonl", fp, writable=is_main_process())
    run_generation(gen_rt, items, glog, gen, desc="write misleading prefixes")
    out = []
    for it in items:
        text = glog.entries[it.key]["samples"][0]["text"]
        think, visible = split_think(text)
        out.append((visible or think).strip())
    return out


@dataclasses.dataclass
class Variant:
    """One adversarial run: a prefix per question (questions without one are left out)."""

    source: str
    name: str
    records: list
    prefixes: list[str]
    targets: list[int | None]   # the option each prefix argues for


def _released_variants(records: Sequence[Any]) -> list[Variant]:
    n = max((len(r.adversarial_traces) for r in records), default=0)
    if n == 0:
        raise ValueError(f"config.adversarial.source=released needs records with adversarial_traces (the released "
                         f"BioMed-R1-Eval layout); none of the {len(records)} questions has any")
    out = []
    for k in range(n):
        recs = [r for r in records if len(r.adversarial_traces) > k]
        pre = [str(r.adversarial_traces[k]).strip() for r in recs]
        out.append(Variant("released", f"trace{k}", recs, pre, [extract_answer(p, r.options) for p, r in
                                                                zip(pre, recs)]))
    return out


def make_variants(source: str, records: Sequence[Any], out_dir: Path, *, adv: AdversarialSettings, rt: Runtime,
                  prompt: PromptSettings, gen: GenSettings) -> list[Variant]:
    """The runs of one prefix source; source "generated" loads its generator (as ``rt`` was loaded) when it
    has its own path."""
    if source == "released":
        return _released_variants(records)
    wrongs = [wrong_option(r, adv.seed) for r in records]
    if source == "template":
        pre = [template_prefix(adv.template, r, w) for r, w in zip(records, wrongs)]
        return [Variant(source, "template", list(records), pre, list(wrongs))]
    gen_rt = rt if not adv.generator_path else load_runtime(adv.generator_path, rt.settings)
    pre = generated_prefixes(gen_rt, records, wrongs, out_dir, adv=adv, prompt=prompt, gen=gen)
    return [Variant(source, "generated", list(records), pre, [extract_answer(p, r.options) for p, r in
                                                              zip(pre, records)])]


def prefill(adv: AdversarialSettings, prefix: str) -> str:
    """The prefilled assistant text: ``prefix_format`` with the misleading prefix and the cue."""
    try:
        return adv.prefix_format.format(prefix=prefix, cue=adv.cue)
    except (KeyError, IndexError) as err:
        raise ValueError(f"config.adversarial.prefix_format: unknown field {err}; use {{prefix}} and {{cue}}") from None


def compare_tables(before: list[dict], after: list[dict], *, source: str, variant: str,
                   on_target: dict[tuple[str, str], float]) -> list[dict]:
    """Join before/after accuracy tables on (benchmark, split)."""
    by = {(r["benchmark"], r["split"]): r for r in before}
    rows = []
    for a in after:
        b = by[(a["benchmark"], a["split"])]
        rows.append({"source": source, "variant": variant, "benchmark": a["benchmark"], "split": a["split"],
                     "n_questions": a["n_questions"], "before": b["accuracy"], "after": a["accuracy"],
                     "drop": b["accuracy"] - a["accuracy"], "after_ci_low": a["ci_low"], "after_ci_high": a["ci_high"],
                     "after_std": None, "after_min": None, "after_max": None,
                     "after_no_answer_rate": a["no_answer_rate"],
                     "prefix_on_target": on_target.get((a["benchmark"], a["split"]))})
    return rows


def aggregate_variants(rows: list[dict], source: str) -> list[dict]:
    """Mean over a source's variants (the released traces) per (benchmark, split), with std / min / max."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["benchmark"], r["split"]), []).append(r)
    out = []
    for (bench, split), rs in groups.items():
        after = np.array([r["after"] for r in rs])
        before = float(np.mean([r["before"] for r in rs]))
        ot = [r["prefix_on_target"] for r in rs if r["prefix_on_target"] is not None]
        out.append({"source": source, "variant": "mean", "benchmark": bench, "split": split,
                    "n_questions": max(r["n_questions"] for r in rs), "before": before, "after": float(after.mean()),
                    "drop": before - float(after.mean()), "after_ci_low": None, "after_ci_high": None,
                    "after_std": float(after.std(ddof=1)) if len(rs) > 1 else 0.0,
                    "after_min": float(after.min()), "after_max": float(after.max()),
                    "after_no_answer_rate": float(np.mean([r["after_no_answer_rate"] for r in rs])),
                    "prefix_on_target": float(np.mean(ot)) if ot else None})
    return out


def _on_target(records: Sequence[Any], targets: Sequence[int | None]) -> dict[tuple[str, str], float]:
    """Per (benchmark, split): fraction of prefixes that argue for a wrong option."""
    rows = [{"benchmark": r.benchmark, "label": record_split(r), "hit": t is not None and t != r.answer}
            for r, t in zip(records, targets)]
    return {k: float(np.mean([x["hit"] for x in v])) for k, v in metrics.group_rows(rows).items()}


def run_source(source: str, records: Sequence[Any], before_rows: dict[str, dict], out_dir: Path, *,
               adv: AdversarialSettings, rt: Runtime, prompt: PromptSettings, gen: GenSettings, ci: str = "auto",
               on_batch: Callable[[int], None] | None = None) -> tuple[list[dict], dict[str, int]]:
    """Generate (resuming) and score every variant of one prefix source; returns (before / after rows per
    variant, then their mean when there are several; generation counts). ``before_rows``: the plain
    evaluation's per-question rows by key."""
    variants = make_variants(source, records, out_dir, adv=adv, rt=rt, prompt=prompt, gen=gen)
    adv_fp = settings_fingerprint(rt, gen, prompt) | {"source": source, "cue": adv.cue,
                                                      "prefix_format": adv.prefix_format}
    adv_log = GenerationLog(out_dir / f"adversarial_{source}.jsonl", adv_fp, writable=is_main_process())
    items: list[Item] = []
    for v in variants:
        vi = build_items(prompt, rt.tokenizer, v.records, variant=v.name,
                         prefixes=[prefill(adv, p) for p in v.prefixes])
        for it, t in zip(vi, v.targets):
            it.extra = {"source": source, "target": t}
        items += vi
    counts = run_generation(rt, items, adv_log, gen, desc=f"adversarial ({source})", on_batch=on_batch)
    rows = []
    for v in variants:
        keys = [item_key(r, v.name) for r in v.records]
        after = metrics.accuracy_table(score_rows(adv_log, keys), ci=ci, seed=adv.seed)
        before = metrics.accuracy_table([before_rows[item_key(r)] for r in v.records], ci=ci, seed=adv.seed)
        rows += compare_tables(before, after, source=source, variant=v.name,
                               on_target=_on_target(v.records, v.targets))
    return rows + (aggregate_variants(rows, source) if len(variants) > 1 else []), counts


def headline_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per source and (benchmark, split): the released traces' mean, the other sources' only run."""
    return [r for r in rows if r["variant"] == "mean" or r["source"] != "released"]


def write_outputs(out_dir: Path, before_table: list[dict], rows: list[dict]) -> None:
    """before.csv|md and its plot, adversarial.csv (every row), adversarial.md / adversarial.png (headline rows)
    and metrics.jsonl."""
    headline = headline_rows(rows)
    write_accuracy_outputs(out_dir, before_table, stem="before", title="Accuracy before (%)")
    report.write_csv(rows, out_dir / "adversarial.csv")
    (out_dir / "adversarial.md").write_text(report.adversarial_markdown(headline))
    report.plot_adversarial(headline, out_dir / "adversarial.png")
    write_metrics(out_dir, [{"kind": "before", **r} for r in before_table]
                  + [{"kind": "adversarial", **r} for r in rows])
