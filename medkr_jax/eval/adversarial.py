"""Job "adversarial": accuracy when the answer is prefilled with misleading reasoning toward a wrong option.

    python -m medkr_jax.main --config configs/<x>.py --config.job=adversarial \\
        --config.model.path=/models/m \\
        --config.data.benchmarks="('biomed_r1_eval:/data/BioMed-R1-Eval?config=medqa',)" \\
        --config.adversarial.source=released,template

For each question the assistant turn is prefilled with ``config.adversarial.prefix_format`` (the misleading
reasoning, then the reconsideration cue ``config.adversarial.cue``) and the model continues from there. The
continuation decides the answer; when it names no option, the prefix's answer stands. Prefix sources
(``config.adversarial.source``, comma-separated for several):

* ``released``: the record's ``adversarial_traces`` (the released eval set has three per question); each
  trace is one run, and the report gives their mean, standard deviation, min and max;
* ``generated``: a model (``config.adversarial.generator_path``, default the evaluated one) is asked with
  ``config.adversarial.generator_prompt`` to argue for a wrong option (drawn per question from the seed);
  greedy, ``config.adversarial.generator_max_new_tokens`` tokens, its visible answer (after any think block);
* ``template``: ``config.adversarial.template`` filled with the wrong option.

For thinking models whose answers open with a reasoning block, put the prefix inside it, e.g.
``--config.adversarial.prefix_format='<think>\n{prefix}\n\n{cue}\n'``.

"Before" is the plain evaluation of the same questions (same settings as job "evaluate"). Outputs in
``config.output_dir``: ``generations.jsonl`` (before), ``adversarial_<source>.jsonl``, ``adversarial.csv``,
``adversarial.md``, ``adversarial.png``, ``before.csv|md``, ``metrics.jsonl``; every log resumes.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medkr_jax.eval import metrics, prompts, report
from medkr_jax.eval.evaluate import (GenSettings, Item, Runtime, build_items, chat_kwargs, item_key,
                                     load_eval_records, load_runtime, record_split, run_generation, score_rows,
                                     settings_fingerprint, write_accuracy_outputs, write_metrics)
from medkr_jax.eval.extract import LETTERS, extract_answer, split_think
from medkr_jax.eval.genlog import GenerationLog
from medkr_jax.parallel import is_main_process

SOURCES = ("released", "generated", "template")


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


def generated_prefixes(config: Any, gen_rt: Runtime, records: Sequence[Any], wrongs: Sequence[int],
                       out_dir: Path) -> list[str]:
    """Misleading reasoning written by ``gen_rt`` for each record's wrong option (logged and resumable)."""
    adv = config.adversarial
    items = []
    for r, w in zip(records, wrongs):
        try:
            ask = adv.generator_prompt.format(letter=LETTERS[w], option=r.options[w])
        except (KeyError, IndexError) as err:
            raise ValueError(f"config.adversarial.generator_prompt: unknown field {err}; use {{letter}} and "
                             "{option}") from None
        text = prompts.render_chat(gen_rt.tokenizer, prompts.format_question(r, config.eval.prompt_template)
                                   + "\n\n" + ask, chat_template_kwargs=chat_kwargs(config))
        items.append(Item(item_key(r, "argue"), r, prompts.encode(gen_rt.tokenizer, text), "argue",
                          extra={"target": w}))
    gen = GenSettings.from_config(config, max_new_tokens=int(adv.generator_max_new_tokens), temperature=0.0,
                                  top_k=0, top_p=1.0, num_samples=1)
    fp = settings_fingerprint(config, gen_rt, gen) | {"generator_prompt": adv.generator_prompt}
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


def make_variants(config: Any, source: str, records: Sequence[Any], rt: Runtime, out_dir: Path) -> list[Variant]:
    adv, seed = config.adversarial, int(config.seed)
    if source == "released":
        n = max((len(r.adversarial_traces) for r in records), default=0)
        if n == 0:
            raise ValueError(f"config.adversarial.source=released needs records with adversarial_traces (the released "
                             f"BioMed-R1-Eval layout); none of the {len(records)} questions has any")
        out = []
        for k in range(n):
            recs = [r for r in records if len(r.adversarial_traces) > k]
            pre = [str(r.adversarial_traces[k]).strip() for r in recs]
            out.append(Variant(source, f"trace{k}", recs, pre, [extract_answer(p, r.options) for p, r in
                                                                zip(pre, recs)]))
        return out
    wrongs = [wrong_option(r, seed) for r in records]
    if source == "template":
        pre = [template_prefix(adv.template, r, w) for r, w in zip(records, wrongs)]
        return [Variant(source, "template", list(records), pre, list(wrongs))]
    gen_rt = rt if not adv.generator_path else load_runtime(config, model_path=adv.generator_path)
    pre = generated_prefixes(config, gen_rt, records, wrongs, out_dir)
    return [Variant(source, "generated", list(records), pre, [extract_answer(p, r.options) for p, r in
                                                              zip(pre, records)])]


def _prefill(config: Any, prefix: str) -> str:
    try:
        return config.adversarial.prefix_format.format(prefix=prefix, cue=config.adversarial.cue)
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


def run(config: Any, *, on_batch: Callable[[int], None] | None = None) -> dict:
    """Job "adversarial"; returns a summary with before / after / drop over all questions per source."""
    from medkr_jax.config import require

    require(config, "output_dir")
    sources = parse_sources(config.adversarial.source)
    out_dir = Path(config.output_dir)
    records = load_eval_records(config)
    rt = load_runtime(config)
    gen = GenSettings.from_config(config)
    fp = settings_fingerprint(config, rt, gen)

    before_items = build_items(config, rt.tokenizer, records)
    before_log = GenerationLog(out_dir / "generations.jsonl", fp, writable=is_main_process())
    counts = {"before": run_generation(rt, before_items, before_log, gen, desc="before", on_batch=on_batch)}
    before_rows = {r["key"]: r for r in score_rows(before_log, [it.key for it in before_items])}
    before_table = metrics.accuracy_table(list(before_rows.values()), ci=config.eval.ci, seed=int(config.seed))

    all_rows: list[dict] = []
    for source in sources:
        variants = make_variants(config, source, records, rt, out_dir)
        adv_fp = fp | {"source": source, "cue": config.adversarial.cue,
                       "prefix_format": config.adversarial.prefix_format}
        adv_log = GenerationLog(out_dir / f"adversarial_{source}.jsonl", adv_fp, writable=is_main_process())
        items: list[Item] = []
        for v in variants:
            vi = build_items(config, rt.tokenizer, v.records, variant=v.name,
                             prefixes=[_prefill(config, p) for p in v.prefixes])
            for it, t in zip(vi, v.targets):
                it.extra = {"source": source, "target": t}
            items += vi
        counts[source] = run_generation(rt, items, adv_log, gen, desc=f"adversarial ({source})", on_batch=on_batch)
        source_rows = []
        for v in variants:
            keys = [item_key(r, v.name) for r in v.records]
            after = metrics.accuracy_table(score_rows(adv_log, keys), ci=config.eval.ci, seed=int(config.seed))
            before = metrics.accuracy_table([before_rows[item_key(r)] for r in v.records], ci=config.eval.ci,
                                            seed=int(config.seed))
            source_rows += compare_tables(before, after, source=source, variant=v.name,
                                          on_target=_on_target(v.records, v.targets))
        all_rows += source_rows
        if len(variants) > 1:
            all_rows += aggregate_variants(source_rows, source)

    headline = [r for r in all_rows if r["variant"] == "mean" or r["source"] != "released"]
    if is_main_process():
        write_accuracy_outputs(out_dir, before_table, stem="before", title="Accuracy before (%)")
        report.write_csv(all_rows, out_dir / "adversarial.csv")
        (out_dir / "adversarial.md").write_text(report.adversarial_markdown(headline))
        report.plot_adversarial(headline, out_dir / "adversarial.png")
        write_metrics(out_dir, [{"kind": "before", **r} for r in before_table]
                      + [{"kind": "adversarial", **r} for r in all_rows])
    overall = {r["source"]: {k: round(r[k], 4) for k in ("before", "after", "drop")}
               for r in headline if r["benchmark"] == metrics.OVERALL and r["split"] == "all"}
    return {"questions": len(records), "generated": counts, "overall": overall,
            "files": [str(out_dir / f) for f in ("adversarial.csv", "adversarial.md", "adversarial.png")]}
