"""The study (job "study", jobs/study.py): the BioMed-R1 recipe's ablation on the synthetic world, over several seeds, with paired tests.

    python -m medkr_jax.main --config configs/study.py

Arms (each an SFT or GRPO stage of the pipeline, evaluated on the held-out test split with the adversarial
evaluation):
  (a) sft_plain   SFT on plain traces only
  (b) sft         SFT on plain + adversarial + backtracking traces
  (c) grpo        (b) + GRPO on reasoning-heavy prompts
  (d) sft_more    (b) + more SFT on (b)'s mixture, as many training tokens as (c)'s GRPO updates processed

Every seed draws its own world, question splits, policy init and data order (config.seed, config.synthetic.seed
and config.traces.seed are all set to it). GRPO's settings are chosen first, on a search seed that is not
scored: each candidate in config.study.grpo_candidates (a partial config.pipeline.grpo tree) runs GRPO from
that seed's (b) and is scored on its validation split; the best reasoning accuracy there wins. The test
questions of the scored seeds are never seen by the search. Every seed's stages resume like the demo's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import ml_collections

from medkr_jax import parallel
from medkr_jax.data.records import write_records
from medkr_jax.jobs import grpo as grpo_job
from medkr_jax.pipeline import runner, study_report
from medkr_jax.pipeline.demo import adversarial_stage, grpo_job_config
from medkr_jax.pipeline.report import eval_rows
from medkr_jax.pipeline.stages import job_config, merge, out_of, run_job, stage, summary_of
from medkr_jax.train.metrics_log import read_metrics


# ------------------------------------------------------------------------------------------------ stages


@stage("sft_plain")
def sft_plain_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """Arm (a): SFT of the random-init policy on plain traces (config.pipeline.sft_plain over config.pipeline.sft)."""
    sub = job_config(config, "sft", "sft", out, {
        "model.path": summary_of(results, "policy_init")["path"],
        "sft.train_path": summary_of(results, "data")["synthetic_files"]["policy_train"]})
    merge(sub, config.pipeline.get("sft_plain"))
    res = run_job(sub)
    res["headline"] = f"{res.get('steps')} steps, final loss {float(res.get('final_loss') or 'nan'):.3f}"
    return res


def grpo_training_tokens(grpo_dir: Path) -> float:
    """Tokens the GRPO updates processed (rows x padded width, summed over steps and inner updates)."""
    return float(sum(m.get("train_tokens", 0.0) for m in read_metrics(str(grpo_dir))))


@stage("sft_more")
def sft_more_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """Arm (d): continue (b)'s SFT on its mixture for as many training tokens as GRPO's updates processed."""
    base = job_config(config, "sft", "sft", out)
    tokens = grpo_training_tokens(out_of(config, "grpo"))
    if tokens <= 0:
        raise ValueError(f"sft_more: no train_tokens in {out_of(config, 'grpo') / 'metrics.jsonl'}; run grpo first")
    steps = max(1, math.ceil(tokens / (int(base.train.batch_size) * int(base.train.seq_len))))
    sub = job_config(config, "sft", "sft", out, {
        "model.path": summary_of(results, "sft")["export_dir"],
        "sft.train_path": summary_of(results, "data")["synthetic_files"]["policy_train"],
        "train.steps": steps, "sft.epochs": 0.0})
    merge(sub, config.pipeline.get("sft_more"))
    res = run_job(sub)
    res["grpo_train_tokens"] = tokens
    res["headline"] = f"{steps} more steps ({tokens:.0f} tokens, as GRPO's updates)"
    return res


def _eval_stage(name: str, model_stage: str, split_file: str):
    @stage(name)
    def fn(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
        return adversarial_stage(config, out, results, name, summary_of(results, model_stage)["export_dir"],
                                  summary_of(results, "data")["synthetic_files"][split_file])
    fn.__doc__ = f"{model_stage}'s policy on the {split_file} split: knowledge vs reasoning, then adversarial."
    return fn


eval_sft_plain_stage = _eval_stage("eval_sft_plain", "sft_plain", "policy_eval")
eval_sft_more_stage = _eval_stage("eval_sft_more", "sft_more", "policy_eval")
val_sft_stage = _eval_stage("val_sft", "sft", "policy_val")
val_grpo_stage = _eval_stage("val_grpo", "grpo", "policy_val")


def _grpo_prompts(config: ml_collections.ConfigDict, out: Path, results: dict) -> str:
    """The questions GRPO trained on (grpo.visited_records), written to <out>/grpo_prompts.jsonl."""
    visited = grpo_job.visited_records(grpo_job_config(config, out_of(config, "grpo"), results))
    return str(write_records(out / "grpo_prompts.jsonl", visited))


def _test_split(config: ml_collections.ConfigDict, out: Path, results: dict) -> str:
    return summary_of(results, "data")["synthetic_files"]["policy_eval"]


def _evaluate_stage(name: str, model_stage: str, questions, settings: str, doc: str):
    """A stage running the evaluate job on `model_stage`'s policy over `questions(config, out, results)` (a records
    file) with config.pipeline.<settings>."""
    @stage(name)
    def fn(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
        sub = job_config(config, settings, "evaluate", out, {
            "model.path": summary_of(results, model_stage)["export_dir"],
            "data.eval_path": questions(config, out, results)})
        res = run_job(sub)
        res["headline"] = f"{res['questions']} questions, reasoning {res['accuracy'].get('reasoning', float('nan')):.1%}"
        return res
    fn.__doc__ = f"{model_stage}'s policy {doc}"
    return fn


_OWN = "greedy, on the questions GRPO trained on (does GRPO learn its own prompts more than held-out ones?)."
_SAMPLED = ("on the test split with sampling (temperature, samples, pass@k per config.pipeline.sampled_*): does GRPO "
            "change the greedy answer or only sharpen the sampled distribution?")
own_sft_stage = _evaluate_stage("own_sft", "sft", _grpo_prompts, "eval_sft", _OWN)
own_grpo_stage = _evaluate_stage("own_grpo", "grpo", _grpo_prompts, "eval_sft", _OWN)
sampled_sft_stage = _evaluate_stage("sampled_sft", "sft", _test_split, "sampled_sft", _SAMPLED)
sampled_grpo_stage = _evaluate_stage("sampled_grpo", "grpo", _test_split, "sampled_grpo", _SAMPLED)


# ------------------------------------------------------------------------------------------------ the job


def overlay(partial: ml_collections.ConfigDict, extra: Any) -> None:
    """Set the keys of `extra` on a partial per-stage tree, adding the ones it lacks (the stage's merge over the
    full config checks every key later)."""
    for key, value in extra.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            if key not in partial:
                partial[key] = ml_collections.ConfigDict()
            overlay(partial[key], value)
        else:
            partial[key] = value


def seed_config(config: ml_collections.ConfigDict, seed: int, out: Path) -> ml_collections.ConfigDict:
    sub = copy.deepcopy(config)
    with sub.unlocked():
        sub.job = "pipeline"
        sub.output_dir = str(out)
        sub.seed = seed
        sub.synthetic.seed = seed
        sub.traces.seed = seed
    return sub


def _val_reasoning(run_dir: Path, stage_name: str) -> float:
    cfg = ml_collections.ConfigDict({"output_dir": str(run_dir)})
    before, _ = eval_rows(cfg, stage_name)
    return float(before["reasoning"]["accuracy"])


def candidate_key(cand: Any, data: Any = None) -> tuple[str, str]:
    """(the candidate as sorted JSON, a short hash of it and of `data`, the synthetic split settings it trains and
    is scored on): its run directory is named by content, so editing or reordering config.study.grpo_candidates,
    or resizing the GRPO / validation splits, never reuses another run's finished stages."""
    text = json.dumps(cand.to_dict() if hasattr(cand, "to_dict") else dict(cand), sort_keys=True)
    salt = "" if data is None else json.dumps(_plain(data), sort_keys=True)
    return text, hashlib.sha1((text + salt).encode()).hexdigest()[:8]


def _plain(x: Any) -> Any:
    return x.to_dict() if hasattr(x, "to_dict") else x


def grpo_data(config: ml_collections.ConfigDict) -> dict:
    """The split settings a GRPO run depends on beyond its own config (its prompts are the policy_rl split,
    which is drawn after the validation split)."""
    syn = config.synthetic
    return {"policy_val_questions": int(syn.policy_val_questions), "policy_rl_questions": int(syn.policy_rl_questions)}


# A scored seed's stages that depend on the chosen GRPO settings (rerun when the choice changes).
GRPO_DEPENDENT_STAGES = ("grpo", "eval_grpo", "own_sft", "own_grpo", "sampled_grpo", "sft_more", "eval_sft_more")


def invalidate_stale_grpo(seed_dir: Path, chosen: str) -> None:
    """Remove a seed's GRPO-dependent stages when they were run with other GRPO settings (or GRPO data) than
    `chosen` (recorded in <seed_dir>/grpo_settings.json), so the runner reruns them instead of skipping them."""
    record = seed_dir / "grpo_settings.json"
    if record.exists() and json.loads(record.read_text()).get("chosen") != chosen:
        stale = [name for name in GRPO_DEPENDENT_STAGES if (seed_dir / name).exists()]
        print(f"[study] {seed_dir.name}: GRPO settings changed to {chosen}; rerunning {', '.join(stale) or 'nothing'}")
        for name in stale:
            shutil.rmtree(seed_dir / name)
    if parallel.is_main_process():
        seed_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"chosen": chosen}) + "\n")


def search_grpo(config: ml_collections.ConfigDict, root: Path) -> tuple[int, list[dict]]:
    """Run each GRPO candidate from the search seed's (b) policy; score on its validation split."""
    sc = config.study
    seed_dir = root / f"search_seed{int(sc.search_seed)}"
    base = seed_config(config, int(sc.search_seed), seed_dir)
    with base.unlocked():
        base.pipeline.stages = ("data", "tokenizer", "policy_init", "sft", "val_sft")
    runner.run(base)
    rows = [{"candidate": "(b) no GRPO", "val_reasoning": _val_reasoning(seed_dir, "val_sft")}]
    for cand in sc.grpo_candidates:
        cand_dir = seed_dir / f"grpo_{candidate_key(cand, grpo_data(config))[1]}"
        for name in ("data", "tokenizer", "policy_init", "sft"):  # the candidates share the seed's earlier stages
            (cand_dir / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(seed_dir / name / "stage.json", cand_dir / name / "stage.json")
        sub = seed_config(config, int(sc.search_seed), cand_dir)
        with sub.unlocked():
            sub.pipeline.stages = ("data", "tokenizer", "policy_init", "sft", "grpo", "val_grpo")
        with sub.unlocked():
            overlay(sub.pipeline.grpo, cand)
        runner.run(sub)
        rows.append({"candidate": candidate_key(cand)[0],
                     "val_reasoning": _val_reasoning(cand_dir, "val_grpo"), "run_dir": str(cand_dir)})
    best = max(range(len(sc.grpo_candidates)), key=lambda i: rows[i + 1]["val_reasoning"])
    return best, rows


def run(config: ml_collections.ConfigDict) -> dict:
    """Job "study": the GRPO search on validation, then every arm on every seed, then report.md."""
    sc = config.study
    root = Path(config.output_dir)
    if int(sc.search_seed) in tuple(sc.seeds):
        raise ValueError(f"config.study.search_seed={sc.search_seed} is also a scored seed {tuple(sc.seeds)}; "
                         "choose settings on a seed whose test questions the report does not score")
    if int(config.synthetic.policy_val_questions) <= 0:
        raise ValueError("config.synthetic.policy_val_questions must be > 0: GRPO settings are chosen on it")
    chosen, search = (None, [])
    if len(sc.grpo_candidates):
        chosen, search = search_grpo(config, root)
    for seed in sc.seeds:
        seed_dir = root / f"seed{int(seed)}"
        sub = seed_config(config, int(seed), seed_dir)
        if chosen is not None:
            with sub.unlocked():
                overlay(sub.pipeline.grpo, sc.grpo_candidates[chosen])
        settings = (candidate_key(sc.grpo_candidates[chosen])[0] if chosen is not None
                    else json.dumps(sub.pipeline.grpo.to_dict(), sort_keys=True, default=str))
        invalidate_stale_grpo(seed_dir, f"{settings} on {json.dumps(grpo_data(config), sort_keys=True)}")
        runner.run(sub)
    report = study_report.write(config, root, search=search, chosen=chosen)
    if parallel.is_main_process():
        print(report["text"])
    return {k: v for k, v in report.items() if k != "text"}
