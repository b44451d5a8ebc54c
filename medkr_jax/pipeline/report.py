"""The pipeline's report stage: report.md with every stage's numbers, read back from the files the stages wrote,
and the readers of those files that the study's report shares (per-question correctness, paired flips)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import ml_collections
import numpy as np

from medkr_jax import parallel
from medkr_jax.data.records import iter_jsonl
from medkr_jax.eval.report import pyplot
from medkr_jax.eval.evaluate import score_text
from medkr_jax.pipeline.stages import out_of, stage, summary_of
from medkr_jax.train.metrics_log import read_metrics

# the real-model recipe's evaluation stages (pipeline.recipe), reported in their own section
RECIPE_EVALS = ("eval_base", "eval_sft_smollm", "eval_grpo_smollm")


def jsonl_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file an earlier stage wrote (records.iter_jsonl); none if it is missing or empty."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    return [row for _, row in iter_jsonl(path)]


def overall_rows(path: Path) -> list[dict]:
    """The rows of an evaluation's metrics.jsonl pooled over benchmarks ("overall")."""
    return [row for row in jsonl_rows(path) if row.get("benchmark") == "overall"]


def eval_rows(config: ml_collections.ConfigDict, stage_name: str) -> tuple[dict, dict]:
    """(before, adversarial) rows of an evaluation stage keyed by split, pooled over benchmarks."""
    before, adv = {}, {}
    for row in overall_rows(out_of(config, stage_name) / "metrics.jsonl"):
        if row.get("kind") == "before":
            before[row["split"]] = row
        elif row.get("kind") == "adversarial" and row.get("variant") in ("mean", "template", row.get("source")):
            adv.setdefault(row["split"], row)
    return before, adv


def correct_by_question(config: ml_collections.ConfigDict, stage_name: str, split: str, *,
                        log: str = "generations.jsonl") -> dict[str, float]:
    """{question key: fraction of its samples answered right} for one split ("all" = every question) of an
    evaluation's generation log (or its adversarial log), scored by the evaluation's own scorer (as its
    accuracy table is)."""
    out: dict[str, float] = {}
    for row in jsonl_rows(out_of(config, stage_name) / log):
        if (split != "all" and row.get("label") != split) or not row.get("samples"):
            continue
        right = [score_text(s["text"], row) == row["answer"] for s in row["samples"]]
        out[row["key"]] = sum(right) / len(right)
    return out


def paired_flips(config: ml_collections.ConfigDict, before: str, after: str, split: str) -> dict | None:
    """Questions of `split` right only after / only before (majority of samples), with McNemar's exact p-value.

    Both evaluations score the same questions, so the paired test sees a change that overlapping per-model
    confidence intervals cannot.
    """
    a, b = correct_by_question(config, before, split), correct_by_question(config, after, split)
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    gained = sum(1 for k in keys if b[k] > 0.5 >= a[k])
    lost = sum(1 for k in keys if a[k] > 0.5 >= b[k])
    n = gained + lost
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n) if n else 1.0
    return {"questions": len(keys), "gained": gained, "lost": lost, "p_value": p}


GRPO_DIAGNOSTICS = (("reward_mean", "mean reward"), ("accuracy", "sampled accuracy"),
                    ("zero_std_groups", "groups with equal rewards (no signal)"),
                    ("distinct_completions", "distinct completions per group"), ("entropy", "entropy per token"),
                    ("update_ratio", "update size, norm(dθ) / norm(θ)"),
                    ("logp_diff_max", "max abs(sampler - trainer) log-prob"))


def grpo_diagnostics(grpo_dir: Path) -> list[str]:
    """A table of a GRPO run's signal diagnostics: mean over its first and last 10% of steps."""
    rows = [m for m in read_metrics(str(grpo_dir)) if "reward_mean" in m]
    if not rows:
        return []
    k = max(1, len(rows) // 10)
    lines = [f"GRPO diagnostics (mean of the first / last {k} of {len(rows)} steps):", "",
             "| metric | first | last |", "|---|---:|---:|"]
    for key, name in GRPO_DIAGNOSTICS:
        vals = [m[key] for m in rows if key in m]
        if len(vals) == len(rows):
            lines.append(f"| {name} | {sum(vals[:k]) / k:.4g} | {sum(vals[-k:]) / k:.4g} |")
    return lines + [""]


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}"


def _plot_lines(config: ml_collections.ConfigDict, rel: Callable[[Path], str],
                plots: dict[str, tuple[str, ...]]) -> list[str]:
    """Markdown image lines for the training plots {stage: file names} that exist."""
    return [f"![{st} {name}]({rel(out_of(config, st) / name)})" for st, names in plots.items() for name in names
            if (out_of(config, st) / name).exists()]


def acc_cell(row: dict | None) -> str:
    if not row:
        return "–"
    return f"{_pct(row['accuracy'])} [{_pct(row['ci_low'])}, {_pct(row['ci_high'])}] (n={row['n_questions']})"


def _plot_policy(config: ml_collections.ConfigDict, stages: list[str], path: Path) -> bool:
    plt = pyplot()
    data = {s: eval_rows(config, s) for s in stages}
    data = {s: d for s, d in data.items() if d[0]}
    if not data:
        return False
    groups = [("knowledge", 0), ("reasoning", 0), ("knowledge", 1), ("reasoning", 1)]
    labels = ["knowledge", "reasoning", "knowledge\n(adversarial)", "reasoning\n(adversarial)"]
    x = np.arange(len(groups))
    width = 0.8 / len(data)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (s, (before, adv)) in enumerate(data.items()):
        vals = [100 * ((before if k == 0 else adv).get(split, {}).get("accuracy" if k == 0 else "after") or 0)
                for split, k in groups]
        ax.bar(x + (i - (len(data) - 1) / 2) * width, vals, width, label=s)
    ax.set_xticks(x, labels)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Tiny policy on held-out synthetic questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def recipe_report(config: ml_collections.ConfigDict, results: dict, rel: Callable[[Path], str]) -> list[str]:
    """The report section of the real-model recipe: held-out accuracy after each step, STaR yield."""
    h = results.get("mmlu_holdout", {}).get("summary", {})
    lines = ["## Real model: SFT then GRPO of SmolLM2-135M-Instruct on MMLU medical questions", "",
             f"Held-out part: {h.get('heldout')} questions, never trained on (training part: {h.get('train')} "
             f"questions; all with prompts of at most {h.get('max_prompt_tokens')} tokens). Accuracy in % with "
             "95% CI, greedy decoding; chance is 25% (4 options).", "",
             "| model | held-out accuracy | no answer | predicted letters | stage wall time |",
             "|---|---|---:|---|---:|"]
    names = {"eval_base": "base (SmolLM2-135M-Instruct)", "eval_sft_smollm": "after SFT on STaR traces",
             "eval_grpo_smollm": "after SFT + GRPO"}
    for st in RECIPE_EVALS:
        if st not in results:
            continue
        s = results[st]["summary"]
        row = s.get("overall")
        lines.append(f"| {names[st]} | {acc_cell(row)} | {_pct((row or {}).get('no_answer_rate'))} | "
                     f"{s.get('predicted_letters', '')} | {results[st]['wall_s']:.0f}s |")
    key = h.get("answer_letters", {}).get("heldout") or {}
    lines += [f"| (held-out answer key) | | | {key} | |", ""]
    if key:
        top = max(key, key=key.get)
        lines += [f"Always answering the held-out part's most frequent letter ({top}) would score "
                  f"{_pct(key[top] / sum(key.values()))}%: a model that favours one letter is measured against "
                  "that, not only against chance.", ""]
    if "star" in results:
        s = results["star"]["summary"]
        lines += [f"STaR traces: {s['questions']} training questions x {s['samples_per_question']} samples; "
                  f"{s['sample_accuracy']:.1%} of the samples were correct; {s['kept_from_samples']} questions kept a "
                  f"correct sample, {s['kept_from_rationalization']} of the other {s['rationalization_questions']} "
                  f"a rationalization (answer given as a hint); yield {s['yield']:.1%}; answer letters of the "
                  f"traces {s['trace_answer_letters']}.", ""]
    if "grpo_smollm" in results:
        s = results["grpo_smollm"]["summary"]
        lines += [f"GRPO: {s.get('headline', '')}.", ""]
        lines += grpo_diagnostics(out_of(config, "grpo_smollm"))
    lines += _plot_lines(config, rel, {"sft_smollm": ("loss.png",), "grpo_smollm": ("reward.png", "accuracy.png")})
    lines.append("")
    return lines


def _classifier_section(config: ml_collections.ConfigDict, results: dict, rel: Callable[[Path], str]) -> list[str]:
    s = summary_of(results, "classifier")
    final = s.get("test") or s.get("val") or {}
    which = "held-out test" if "test" in s else "validation"
    lines = ["## 1. Reasoning / knowledge classifier", "",
             f"MiniLM (all-MiniLM-L6-v2) fine-tuned on {s.get('train_questions')} labelled synthetic questions; "
             f"{which} set of {final.get('n')} questions.", "",
             "| accuracy | macro-F1 | ECE | steps |", "|---:|---:|---:|---:|",
             f"| {final.get('accuracy', float('nan')):.3f} | {final.get('macro_f1', float('nan')):.3f} | "
             f"{final.get('ece', float('nan')):.3f} | {s.get('steps')} |", ""]
    cm = out_of(config, "classifier") / "confusion_matrix.png"
    if cm.exists():
        lines += [f"![confusion matrix]({rel(cm)})", ""]
    return lines


def _split_section(config: ml_collections.ConfigDict, results: dict, rel: Callable[[Path], str]) -> list[str]:
    s = summary_of(results, "split_mmlu")
    lines = ["## 2. Reasoning-heavy share of the real MMLU medical questions", "",
             "| subject | questions | reasoning-heavy | fraction |", "|---|---:|---:|---:|"]
    for r in s["per_benchmark"]:
        lines.append(f"| {r['benchmark']} | {r['n']} | {r['reasoning']} | {r['reasoning_fraction']:.1%} |")
    lines += [f"| **all** | {s['questions']} | {s['reasoning']} | **{s['reasoning_fraction']:.1%}** |", "",
              "The paper's PubMedBERT classifier finds 32.8% reasoning-heavy questions over 11 benchmarks; "
              "ours is trained on synthetic labels only, so its split of real questions is illustrative.", ""]
    plot = out_of(config, "split_mmlu") / "reasoning_fraction.png"
    if plot.exists():
        lines += [f"![reasoning fraction]({rel(plot)})", ""]
    return lines


def _eval_section(config: ml_collections.ConfigDict, results: dict, title: str, stages: list[str],
                  note: str) -> list[str]:
    rows = ["| model | knowledge | reasoning | all | adversarial knowledge | adversarial reasoning | "
            "adversarial drop (all) |", "|---|---|---|---|---|---|---:|"]
    for st in stages:
        if st not in results:
            continue
        before, adv = eval_rows(config, st)
        drop = adv.get("all", {}).get("drop")
        rows.append(f"| {st} | {acc_cell(before.get('knowledge'))} | {acc_cell(before.get('reasoning'))} | "
                    f"{acc_cell(before.get('all'))} | {_pct(adv.get('knowledge', {}).get('after'))} | "
                    f"{_pct(adv.get('reasoning', {}).get('after'))} | {_pct(drop)} |")
    return [title, "", note, "", *rows, ""]


def _smollm_section(config: ml_collections.ConfigDict, results: dict, rel: Callable[[Path], str]) -> list[str]:
    lines = _eval_section(
        config, results, "## 3. SmolLM2-135M-Instruct on real questions", ["eval_smollm"],
        "Accuracy in % with 95% CI on a balanced sample of the split MMLU medical questions; adversarial = "
        "the assistant turn is prefilled with reasoning for a wrong option, then a reconsideration cue.")
    for name in ("before_knowledge_vs_reasoning.png", "adversarial.png"):
        p = out_of(config, "eval_smollm") / name
        if p.exists():
            lines += [f"![{name}]({rel(p)})", ""]
    return lines


def _policy_section(config: ml_collections.ConfigDict, results: dict, out: Path, policy: list[str],
                    rel: Callable[[Path], str]) -> list[str]:
    lines = _eval_section(
        config, results, "## 4. Tiny policy on the synthetic world: SFT then GRPO", policy,
        "Accuracy in % with 95% CI on held-out synthetic questions, after random init, SFT on traces "
        "(plain / adversarial / backtracking), and GRPO on reasoning-heavy questions.")
    if _plot_policy(config, policy, out / "policy_accuracy.png"):
        lines += [f"![policy accuracy]({rel(out / 'policy_accuracy.png')})", ""]
    b_sft, _ = eval_rows(config, "eval_sft")
    b_grpo, _ = eval_rows(config, "eval_grpo")
    if b_sft.get("reasoning") and b_grpo.get("reasoning"):
        lines += [f"Reasoning-split accuracy: SFT only {_pct(b_sft['reasoning']['accuracy'])}% -> after GRPO "
                  f"{_pct(b_grpo['reasoning']['accuracy'])}%.", ""]
        flips = paired_flips(config, "eval_sft", "eval_grpo", "reasoning")
        if flips:
            lines += [f"Paired, on the same {flips['questions']} reasoning questions: {flips['gained']} right only "
                      f"after GRPO, {flips['lost']} right only before it (McNemar exact p = "
                      f"{flips['p_value']:.3g}).", ""]
    lines += grpo_diagnostics(out_of(config, "grpo"))
    lines += _plot_lines(config, rel, {"sft": ("loss.png",), "grpo": ("reward.png", "accuracy.png", "kl.png")})
    lines.append("")
    return lines


@stage("report", always_rerun=True)
def report_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """report.md in the run folder: every stage's numbers, read from the files the stages wrote."""
    root = Path(config.output_dir)

    def rel(p: Path | str) -> str:
        return os.path.relpath(p, root)

    lines = ["# medkr_jax pipeline report", "",
             f"Run folder `{root}`, config `{root / 'config.json'}`. Every number below is read from the files the "
             "stages wrote in this run.", ""]
    if "classifier" in results:
        lines += _classifier_section(config, results, rel)
    if "split_mmlu" in results:
        lines += _split_section(config, results, rel)
    if "eval_smollm" in results:
        lines += _smollm_section(config, results, rel)
    policy = [s for s in ("eval_init", "eval_sft", "eval_grpo") if s in results]
    if policy:
        lines += _policy_section(config, results, out, policy, rel)
    if any(st in results for st in RECIPE_EVALS):
        lines += recipe_report(config, results, rel)

    lines += ["## Wall time per stage", "", "| stage | wall time | headline |", "|---|---:|---|"]
    total = 0.0
    for name, rec in results.items():
        total += rec["wall_s"]
        lines.append(f"| {name} | {rec['wall_s']:.1f}s | {rec['summary'].get('headline', '')} |")
    lines += [f"| **total (before this report)** | {total:.1f}s | |", ""]
    report = root / "report.md"
    if parallel.is_main_process():
        report.write_text("\n".join(lines))
    return {"report": str(report), "headline": f"wrote {report}"}
