"""Job "budget_sweep": accuracy against the thinking budget, knowledge- vs reasoning-heavy questions (test-time
scaling: does thinking longer help reasoning-heavy questions more?).

    python -m medkr_jax.main --config configs/budget_sweep.py

The questions (config.data, as the evaluate job) are evaluated once per budget in config.eval.thinking_budgets
(tokens; 0 = no budget) with config.eval.thinking_budget set to it, so with the same prompts, sampling and
thinking markers (config.eval.thinking_*; ``sampling.thinking`` for what a budget does). The model is loaded
once; each budget has its own generation log, so an interrupted sweep resumes where it stopped.

Outputs in config.output_dir: ``generations_budget<B>.jsonl`` per budget, ``budget_sweep.csv`` (a row per budget x
benchmark x split: accuracy, 95% CI, mean generated tokens), ``budget_sweep.md`` (the table and, per benchmark, the
gain from the smallest to the largest budget on each split with the reasoning-minus-knowledge difference and its
bootstrap CI), ``accuracy_vs_budget.png``, ``metrics.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medkr_jax import parallel
from medkr_jax.config import ConfigError, require
from medkr_jax.eval import evaluate, metrics, report
from medkr_jax.eval.evaluate import ThinkingSettings
from medkr_jax.jobs.evaluate import eval_records, gen_settings, prompt_settings, runtime_from_config


def sweep_budgets(config: Any) -> list[int]:
    """config.eval.thinking_budgets as distinct ints >= 0, in sweep order: increasing, no budget (0) last."""
    raw = tuple(config.eval.thinking_budgets)
    try:
        budgets = [int(b) for b in raw]
    except (TypeError, ValueError):
        raise ConfigError(f"config.eval.thinking_budgets must be integers (tokens; 0 = no budget), got {raw!r}") from None
    if not budgets or min(budgets) < 0 or len(set(budgets)) != len(budgets):
        raise ConfigError(f"config.eval.thinking_budgets must list distinct budgets >= 0 (tokens; 0 = no budget), "
                          f"e.g. (32, 64, 128, 0); got {raw!r}")
    return sorted(budgets, key=lambda b: (b == 0, b))


def thinking_for(config: Any, budget: int) -> ThinkingSettings | None:
    """config.eval.thinking_* with this budget (None: no budget and no budget forcing)."""
    e = config.eval
    if budget == 0 and int(e.thinking_max_waits) <= 0:
        return None
    return ThinkingSettings(budget=budget, start=e.thinking_start, end=e.thinking_end, cue=e.answer_cue,
                            wait=e.thinking_wait, max_waits=int(e.thinking_max_waits))


def sweep_table(rows_by_budget: dict[int, list[dict]], tables: dict[int, list[dict]]) -> list[dict]:
    """Each budget's accuracy rows (its evaluation's metrics.accuracy_table), with the budget and the mean generated
    tokens of the row's questions."""
    table = []
    for budget, rows in rows_by_budget.items():
        groups = metrics.group_rows(rows)
        for row in tables[budget]:
            group = groups[(row["benchmark"], row["split"])]
            table.append({"budget": budget, **row,
                          "mean_tokens": float(np.mean([t for r in group for t in r["tokens"]]))})
    return table


def sweep_gains(rows_by_budget: dict[int, list[dict]], *, seed: int) -> list[dict]:
    """Per benchmark (and overall): each split's gain from the first budget of the sweep to the last, and the
    reasoning-minus-knowledge difference with its bootstrap CI (metrics.split_gain_difference)."""
    budgets = list(rows_by_budget)
    if len(budgets) < 2:
        return []
    first, last = rows_by_budget[budgets[0]], rows_by_budget[budgets[-1]]
    benches = sorted({r["benchmark"] for r in first})
    out = []
    for bench in benches + ([metrics.OVERALL] if len(benches) > 1 else []):
        pick = (lambda rows: rows) if bench == metrics.OVERALL else (
            lambda rows, b=bench: [r for r in rows if r["benchmark"] == b])
        out.append({"benchmark": bench, "from": budgets[0], "to": budgets[-1],
                    **metrics.split_gain_difference(pick(first), pick(last), seed=seed)})
    return out


def run(config: Any) -> dict:
    """Job "budget_sweep"; returns the accuracy per budget and split (overall) and the output files."""
    require(config, "output_dir")
    budgets = sweep_budgets(config)
    out_dir = Path(config.output_dir)
    records = eval_records(config)
    rt = runtime_from_config(config)
    prompt = prompt_settings(config)
    ci, seed = config.eval.ci, int(config.seed)
    rows_by_budget, tables, generated = {}, {}, {}
    for budget in budgets:
        gen = gen_settings(config, thinking=thinking_for(config, budget))
        tables[budget], counts, rows = evaluate.evaluate(
            rt, records, out_dir, prompt=prompt, gen=gen, ci=ci, seed=seed,
            log_name=f"generations_budget{budget}.jsonl", desc=f"budget {report.budget_label(budget)}")
        rows_by_budget[budget], generated[budget] = rows, counts["generated"]
    table = sweep_table(rows_by_budget, tables)
    gains = sweep_gains(rows_by_budget, seed=seed)
    if parallel.is_main_process():
        report.write_csv(table, out_dir / "budget_sweep.csv")
        (out_dir / "budget_sweep.md").write_text(report.budget_markdown(table, gains))
        report.plot_accuracy_vs_budget(table, out_dir / "accuracy_vs_budget.png")
        evaluate.write_metrics(out_dir, [{"kind": "budget_accuracy", **r} for r in table]
                               + [{"kind": "budget_gain", **g} for g in gains])
    overall: dict[str, dict] = {}
    for r in table:
        if r["benchmark"] == metrics.OVERALL:
            overall.setdefault(report.budget_label(r["budget"]), {})[r["split"]] = round(r["accuracy"], 4)
    return {"questions": len(records), "budgets": budgets, "generated": generated, "accuracy": overall,
            "gains": gains, "files": [str(out_dir / f) for f in ("budget_sweep.csv", "budget_sweep.md",
                                                                 "accuracy_vs_budget.png")]}
