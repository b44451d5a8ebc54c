"""The study's report: per arm accuracy over seeds with 95% CIs, paired tests between arms, the GRPO search.

Read only from the files the study's stages wrote (evaluation metrics and generation logs, GRPO metrics).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from scipy import stats as st

from medkr_jax import parallel
from medkr_jax.eval.report import pyplot
from medkr_jax.pipeline.demo import reward_trend as slope_trend
from medkr_jax.pipeline.report import correct_by_question, eval_rows, grpo_diagnostics, jsonl_rows
from medkr_jax.pipeline.stages import out_of
from medkr_jax.train.metrics_log import read_metrics

ARMS = (("a", "sft_plain", "SFT, plain traces"),
        ("b", "sft", "SFT, plain + adversarial + backtracking traces"),
        ("c", "grpo", "(b) + GRPO on reasoning-heavy prompts"),
        ("d", "sft_more", "(b) + more SFT, GRPO's training tokens"))


SPLITS = ("knowledge", "reasoning", "all")


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over seeds (NaN bounds for a single seed)."""
    x = np.asarray(values, np.float64)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    half = float(st.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test on discordant pairs): P(as extreme | p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_counts(x: dict[str, float], y: dict[str, float]) -> tuple[int, int, int]:
    """(y better, x better, shared keys) over the keys both dicts score; values are per-question scores."""
    keys = set(x) & set(y)
    return sum(y[k] > x[k] for k in keys), sum(x[k] > y[k] for k in keys), len(keys)


EVAL_OF = {"sft_plain": "eval_sft_plain", "sft": "eval_sft", "grpo": "eval_grpo", "sft_more": "eval_sft_more"}


def _cfg(run_dir: Path) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"output_dir": str(run_dir)})


def arm_rows(run_dir: Path, arm_stage: str) -> dict[str, float]:
    """{"<split>": accuracy, "adv_<split>": adversarial accuracy, "drop_all": drop} of one arm on one seed."""
    before, adv = eval_rows(_cfg(run_dir), EVAL_OF[arm_stage])
    out = {s: before[s]["accuracy"] for s in SPLITS if s in before}
    out.update({f"adv_{s}": adv[s]["after"] for s in SPLITS if s in adv})
    if "all" in adv:
        out["drop_all"] = adv["all"]["drop"]
    return out


def per_question(run_dir: Path, arm_stage: str, split: str, log: str) -> dict[str, float]:
    """{seed-qualified question key: share of samples right} for one arm's evaluation log (an adversarial
    log's "<key>#<variant>" counted as its question's key)."""
    got = correct_by_question(_cfg(run_dir), EVAL_OF[arm_stage], split, log=log)
    return {f"{run_dir.name}/{k.split('#')[0]}": v for k, v in got.items()}


def reward_trend(run_dir: Path) -> tuple[float, float, list[float]] | None:
    """(mean reward of the first 10% of GRPO steps, of the last 10%, the whole curve)."""
    rewards = [m["reward_mean"] for m in read_metrics(str(out_of(_cfg(run_dir), "grpo")))
               if "reward_mean" in m]
    if not rewards:
        return None
    k = max(1, len(rewards) // 10)
    return float(np.mean(rewards[:k])), float(np.mean(rewards[-k:])), rewards


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ci_cell(values: list[float]) -> str:
    if not values:
        return "–"
    m, lo, hi = mean_ci(values)  # an accuracy's interval shown within [0, 100]%
    return f"{_pct(m)} [{_pct(max(lo, 0.0))}, {_pct(min(hi, 1.0))}]"


def _paired(seed_dirs: list[Path], x_arm: str, y_arm: str, split: str, log: str = "generations.jsonl") -> dict:
    x, y = {}, {}
    for d in seed_dirs:
        x.update(per_question(d, x_arm, split, log))
        y.update(per_question(d, y_arm, split, log))
    wins, losses, n = paired_counts(x, y)
    diff = (sum(y.values()) - sum(x.values())) / max(len(y), 1) if len(x) == len(y) else float("nan")
    return {"wins": wins, "losses": losses, "n": n, "diff": diff, "p": sign_test(wins, losses)}


def _paired_drop(seed_dirs: list[Path], x_arm: str, y_arm: str) -> dict:
    """Per question drop = right before - right after the adversarial prefill; y wins where its drop is smaller."""
    wins = losses = n = 0
    dx, dy = [], []
    for d in seed_dirs:
        bx, by = per_question(d, x_arm, "all", "generations.jsonl"), per_question(d, y_arm, "all", "generations.jsonl")
        ax = per_question(d, x_arm, "all", "adversarial_template.jsonl")
        ay = per_question(d, y_arm, "all", "adversarial_template.jsonl")
        for k in set(bx) & set(by) & set(ax) & set(ay):
            drop_x, drop_y = bx[k] - ax[k], by[k] - ay[k]
            dx.append(drop_x)
            dy.append(drop_y)
            wins += drop_y < drop_x
            losses += drop_y > drop_x
            n += 1
    diff = float(np.mean(dy) - np.mean(dx)) if n else float("nan")
    return {"wins": wins, "losses": losses, "n": n, "diff": diff, "p": sign_test(wins, losses)}


def write(config: ml_collections.ConfigDict, root: Path, *, search: list[dict], chosen: int | None) -> dict:
    """report.md (+ grpo_reward.png) in the study folder; returns the headline numbers."""
    sc = config.study
    seed_dirs = [root / f"seed{int(s)}" for s in sc.seeds]
    syn = config.synthetic
    lines = ["# medkr_jax study: SFT traces and GRPO on the synthetic world", "",
             f"Seeds {', '.join(str(int(s)) for s in sc.seeds)} (each: its own world, question splits, policy init and "
             f"data order). Per seed: {int(syn.policy_train_questions)} training questions, "
             f"{int(syn.policy_val_questions)} validation questions (GRPO settings chosen here, on search seed "
             f"{int(sc.search_seed)}, which is not scored), {int(syn.policy_eval_questions)} test questions (scored "
             "below, never seen by the search); half of each split reasoning-heavy. Greedy decoding; adversarial = the "
             "answer prefilled with reasoning for a wrong option, then a reconsideration cue.", ""]
    if search:
        lines += ["## GRPO settings, chosen on the validation split", "",
                  "| candidate (config.pipeline.grpo overrides) | validation reasoning accuracy |", "|---|---:|"]
        for i, row in enumerate(search):
            mark = " **(chosen)**" if chosen is not None and i == chosen + 1 else ""
            lines.append(f"| `{row['candidate']}`{mark} | {_pct(row['val_reasoning'])} |")
        lines.append("")

    per_arm = {arm: [arm_rows(d, arm) for d in seed_dirs] for _, arm, _ in ARMS}
    lines += ["## Accuracy per arm (test split; mean over seeds, 95% t-interval over seeds, clipped to [0, 100])", "",
              "| arm | knowledge | reasoning | all | knowledge - reasoning | adversarial (all) | adversarial drop |",
              "|---|---|---|---|---:|---|---:|"]
    for letter, arm, title in ARMS:
        rows = per_arm[arm]
        gap = [r["knowledge"] - r["reasoning"] for r in rows]
        lines.append(f"| ({letter}) {title} | {_ci_cell([r['knowledge'] for r in rows])} | "
                     f"{_ci_cell([r['reasoning'] for r in rows])} | {_ci_cell([r['all'] for r in rows])} | "
                     f"{_pct(float(np.mean(gap)))} | {_ci_cell([r['adv_all'] for r in rows])} | "
                     f"{_pct(float(np.mean([r['drop_all'] for r in rows])))} |")
    lines += ["", "Reasoning accuracy per seed:", "",
              "| arm | " + " | ".join(d.name for d in seed_dirs) + " |", "|---|" + "---:|" * len(seed_dirs)]
    for letter, arm, _ in ARMS:
        lines.append(f"| ({letter}) | " + " | ".join(_pct(r["reasoning"]) for r in per_arm[arm]) + " |")

    tests = {
        "c_vs_b": _paired(seed_dirs, "sft", "grpo", "reasoning"),
        "c_vs_d": _paired(seed_dirs, "sft_more", "grpo", "reasoning"),
        "d_vs_b": _paired(seed_dirs, "sft", "sft_more", "reasoning"),
        "b_vs_a_drop": _paired_drop(seed_dirs, "sft_plain", "sft"),
    }
    targets = {"c_vs_b": "(c) beats (b) on reasoning by >= 5 points, p < 0.01",
               "c_vs_d": "(c) beats (d) on reasoning by >= 5 points, p < 0.01",
               "d_vs_b": "(no target: does more SFT alone help?)",
               "b_vs_a_drop": "(b) has a smaller adversarial drop than (a), p < 0.05"}
    met = {"c_vs_b": tests["c_vs_b"]["diff"] >= 0.05 and tests["c_vs_b"]["p"] < 0.01,
           "c_vs_d": tests["c_vs_d"]["diff"] >= 0.05 and tests["c_vs_d"]["p"] < 0.01,
           "b_vs_a_drop": tests["b_vs_a_drop"]["diff"] < 0 and tests["b_vs_a_drop"]["p"] < 0.05}
    lines += ["", "## Paired tests, pooled over seeds (same questions; exact sign / McNemar test)", "",
              "| comparison | questions | better | worse | difference (points) | p | target | met |",
              "|---|---:|---:|---:|---:|---:|---|---|"]
    names = {"c_vs_b": "(c) vs (b), reasoning", "c_vs_d": "(c) vs (d), reasoning", "d_vs_b": "(d) vs (b), reasoning",
             "b_vs_a_drop": "(b) vs (a), adversarial drop (all)"}
    for key, t in tests.items():
        status = "–" if key not in met else ("yes" if met[key] else "**no**")
        lines.append(f"| {names[key]} | {t['n']} | {t['wins']} | {t['losses']} | {100 * t['diff']:+.1f} | "
                     f"{t['p']:.3g} | {targets[key]} | {status} |")

    lines += kind_lines(seed_dirs)
    lines += own_prompt_lines(seed_dirs, per_arm)
    lines += sampled_lines(seed_dirs, per_arm)
    trends = {d.name: reward_trend(d) for d in seed_dirs}
    lines += ["", "## GRPO training reward (first 10% of steps -> last 10%; least-squares slope and its t)", "",
              "| seed | first | last | rise | slope per step | t | trend |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, t in trends.items():
        if t:
            slope, tstat, verdict = slope_trend(t[2])
            lines.append(f"| {name} | {t[0]:.3f} | {t[1]:.3f} | {t[1] - t[0]:+.3f} | {slope:+.4f} | {tstat:.1f} | "
                         f"{verdict} |")
    if _plot_rewards(trends, root / "grpo_reward.png"):
        lines += ["", "![GRPO reward per seed](grpo_reward.png)"]
    for d in seed_dirs:
        lines += ["", f"{d.name}: " + "\n".join(grpo_diagnostics(out_of(_cfg(d), "grpo")))]
    lines += compute_lines(root)
    text = "\n".join(lines) + "\n"
    if parallel.is_main_process():
        (root / "report.md").write_text(text)
    return {"text": text, "tests": tests, "targets_met": met,
            "reasoning": {arm: [r["reasoning"] for r in per_arm[arm]] for _, arm, _ in ARMS}}


def own_prompt_lines(seed_dirs: list[Path], per_arm: dict[str, list[dict]]) -> list[str]:
    """Reasoning accuracy of (b) and (c) on the questions GRPO trained on (stages own_sft / own_grpo) beside the
    held-out test split: a gain on its own prompts that does not carry over is GRPO learning those prompts."""
    rows = []
    for i, d in enumerate(seed_dirs):
        own = {}
        for name in ("own_sft", "own_grpo"):
            marker = d / name / "stage.json"
            if marker.exists():
                own[name] = json.loads(marker.read_text())["summary"]
        if len(own) == 2:
            b, c = (100 * own[n]["accuracy"].get("reasoning", float("nan")) for n in ("own_sft", "own_grpo"))
            tb, tc = per_arm["sft"][i]["reasoning"], per_arm["grpo"][i]["reasoning"]
            rows.append(f"| {d.name} | {own['own_sft']['questions']} | {b:.1f} | {c:.1f} | {c - b:+.1f} | {_pct(tb)} | "
                        f"{_pct(tc)} | {100 * (tc - tb):+.1f} |")
    if not rows:
        return []
    return ["", "## GRPO's own prompts vs held-out questions (reasoning accuracy, greedy)", "",
            "| seed | GRPO prompts | (b) on them | (c) on them | gain | (b) test | (c) test | gain |",
            "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
            "GRPO prompts: the reasoning-heavy questions its step batches drew (policy_rl split, never in SFT)."]


def _sampled_row(seed_dir: Path, name: str) -> dict | None:
    path = seed_dir / name / "metrics.jsonl"
    if not (seed_dir / name / "stage.json").exists():
        return None
    return next((r for r in jsonl_rows(path) if r.get("benchmark") == "overall" and r.get("split") == "reasoning"),
                None)


def sampled_lines(seed_dirs: list[Path], per_arm: dict[str, list[dict]]) -> list[str]:
    """(b) and (c) on the test split's reasoning questions, greedy beside sampled (pass@1, maj@n, pass@n):
    GRPO raising pass@1 toward the greedy answer while pass@n stays or falls is sharpening, not new answers."""
    rows = []
    for i, d in enumerate(seed_dirs):
        b, c = _sampled_row(d, "sampled_sft"), _sampled_row(d, "sampled_grpo")
        if b is None or c is None:
            continue
        n = next(k.split("@")[1] for k in b if k.startswith("maj@") and "_ci" not in k)
        cells = [f"{_pct(per_arm['sft'][i]['reasoning'])} -> {_pct(per_arm['grpo'][i]['reasoning'])}"]
        cells += [f"{_pct(b[k])} -> {_pct(c[k])}" for k in ("pass@1", f"maj@{n}", f"pass@{n}")]
        rows.append(f"| {d.name} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", f"## Greedy vs sampled answers, (b) -> (c) (test split, reasoning; temperature 1, {n} samples)", "",
            f"| seed | greedy | pass@1 | maj@{n} | pass@{n} |", "|---|---|---|---|---|", *rows, "",
            "pass@1 is what GRPO's training reward measures. A GRPO that raises pass@1 up to the greedy accuracy while "
            f"pass@{n} stays or falls has sharpened the policy's distribution around the answers it already gave, "
            "without finding new ones."]


def stage_seconds(root: Path) -> dict[str, dict[str, float]]:
    """Wall seconds of every completed stage under the study folder, {run folder (relative): {stage: seconds}}, from
    each stage's stage.json. The search seed's candidate runs are folders of their own, holding copies of the seed's
    shared stages' markers (``search_grpo``); a copy, identical to the marker of the same stage in the folder above,
    is not counted again."""
    out: dict[str, dict[str, float]] = {}
    for marker in sorted(root.glob("**/stage.json")):
        text = marker.read_text()
        above = marker.parent.parent.parent / marker.parent.name / "stage.json"
        if marker.parent.parent != root and above.is_file() and above.read_text() == text:
            continue
        wall = json.loads(text).get("wall_s")
        if wall is not None:
            run = marker.parent.parent.relative_to(root).as_posix()
            out.setdefault(run, {})[marker.parent.name] = float(wall)
    return out


def compute_lines(root: Path) -> list[str]:
    """The study's compute: wall minutes per run folder (search seed, its candidates, each scored seed) and in all,
    summed over the stages that ran (a resumed study counts each stage once, at the run that completed it)."""
    runs = stage_seconds(root)
    if not runs:
        return []
    lines = ["", "## Compute (wall minutes of the completed stages, summed)", "", "| run | stages | minutes |",
             "|---|---:|---:|"]
    for run, stages in runs.items():
        lines.append(f"| {run} | {len(stages)} | {sum(stages.values()) / 60:.1f} |")
    total = sum(sum(stages.values()) for stages in runs.values())
    lines += [f"| **all** | {sum(len(stages) for stages in runs.values())} | **{total / 60:.1f}** |", "",
              "Wall time on the machine that ran each stage, with whatever else it ran beside it."]
    return lines


# The synthetic world's reasoning questions by the step they hinge on (data/synthetic/questions.py meta).
KIND_GROUPS = (("dose", "dose: first-line drug's mg/kg x weight"),
               ("switch", "treatment: condition rules out the first-line class (switch)"),
               ("other", "treatment: a condition that does not (keep first-line)"),
               ("none", "treatment: no condition (keep first-line)"))


def kind_group(meta: dict) -> str | None:
    if meta.get("kind") == "dose":
        return "dose"
    if meta.get("kind") != "treatment":
        return None
    return "none" if meta.get("condition") is None else "switch" if meta.get("switched") else "other"


def _eval_split_file(seed_dir: Path) -> Path:
    """The seed's test split file, found in its data stage's folder (the summary's path may be relative to
    another working directory)."""
    summary = json.loads((seed_dir / "data" / "stage.json").read_text())["summary"]
    return seed_dir / "data" / Path(summary["synthetic_files"]["policy_eval"]).name


def kind_lines(seed_dirs: list[Path]) -> list[str]:
    """Reasoning accuracy per question kind and arm (test split, pooled over seeds): which step each arm gets wrong."""
    counts = {arm: {g: [0, 0] for g, _ in KIND_GROUPS} for _, arm, _ in ARMS}
    for d in seed_dirs:
        meta = {r["id"]: r.get("meta") or {} for r in jsonl_rows(_eval_split_file(d))}
        for _, arm, _ in ARMS:
            right = correct_by_question(_cfg(d), EVAL_OF[arm], "reasoning")
            for key, v in right.items():
                g = kind_group(meta.get(key.split("/", 1)[-1], {}))
                if g is not None:
                    counts[arm][g][0] += v > 0.5
                    counts[arm][g][1] += 1
    lines = ["", "## Reasoning accuracy by question kind (test split, pooled over seeds)", "",
             "| arm | " + " | ".join(title for _, title in KIND_GROUPS) + " |", "|---|" + "---:|" * len(KIND_GROUPS)]
    for letter, arm, _ in ARMS:
        cells = [f"{_pct(r / n)} (n={n})" if n else "–" for r, n in (counts[arm][g] for g, _ in KIND_GROUPS)]
        lines.append(f"| ({letter}) | " + " | ".join(cells) + " |")
    return lines


def _plot_rewards(trends: dict[str, Any], path: Path) -> bool:
    curves = {k: v[2] for k, v in trends.items() if v}
    if not curves or not parallel.is_main_process():
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, rewards in curves.items():
        w = max(1, len(rewards) // 10)
        smooth = np.convolve(rewards, np.ones(w) / w, mode="valid")
        ax.plot(range(w, len(rewards) + 1), smooth, label=f"{name} ({w}-step mean)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
