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

from pathlib import Path
from typing import Any, Callable

from medkr_jax import parallel
from medkr_jax.config import require
from medkr_jax.eval import adversarial, evaluate, metrics
from medkr_jax.eval.adversarial import AdversarialSettings
from medkr_jax.jobs.evaluate import eval_records, gen_settings, prompt_settings, runtime_from_config


def adversarial_settings(config: Any) -> AdversarialSettings:
    """config.adversarial (the sources checked) and config.seed."""
    adv = config.adversarial
    return AdversarialSettings(
        sources=tuple(adversarial.parse_sources(adv.source)), cue=adv.cue, prefix_format=adv.prefix_format,
        template=adv.template, generator_prompt=adv.generator_prompt,
        generator_max_new_tokens=int(adv.generator_max_new_tokens), generator_path=adv.generator_path,
        seed=int(config.seed))


def run(config: Any, *, on_batch: Callable[[int], None] | None = None) -> dict:
    """Job "adversarial"; returns a summary with before / after / drop over all questions per source."""
    require(config, "output_dir")
    adv = adversarial_settings(config)
    out_dir = Path(config.output_dir)
    records = eval_records(config)
    rt = runtime_from_config(config)
    gen = gen_settings(config)
    prompt = prompt_settings(config)
    ci = config.eval.ci

    before_table, before_counts, before = evaluate.evaluate(rt, records, out_dir, prompt=prompt, gen=gen, ci=ci,
                                                            seed=adv.seed, desc="before", on_batch=on_batch)
    before_rows = {r["key"]: r for r in before}
    counts = {"before": before_counts}
    rows: list[dict] = []
    for source in adv.sources:
        source_rows, counts[source] = adversarial.run_source(source, records, before_rows, out_dir, adv=adv, rt=rt,
                                                             prompt=prompt, gen=gen, ci=ci, on_batch=on_batch)
        rows += source_rows
    if parallel.is_main_process():
        adversarial.write_outputs(out_dir, before_table, rows)
    overall = {r["source"]: {k: round(r[k], 4) for k in ("before", "after", "drop")}
               for r in adversarial.headline_rows(rows) if r["benchmark"] == metrics.OVERALL and r["split"] == "all"}
    return {"questions": len(records), "generated": counts, "overall": overall,
            "files": [str(out_dir / f) for f in ("adversarial.csv", "adversarial.md", "adversarial.png")]}
