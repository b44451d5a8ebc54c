"""The real-model recipe: SFT then GRPO of a real instruct model (configs/smollm_grpo.py: SmolLM2-135M-Instruct)
on a training part of the MMLU medical questions, evaluated on a held-out part before and after each step.

The SFT traces are the model's own (STaR: rejection-sampled self-traces), since MMLU ships no reasoning
traces. Settings of these stages live in config.pipeline.recipe; per-stage job settings in
config.pipeline.<stage> as elsewhere.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import random
from pathlib import Path

import ml_collections

from medkr_jax.data.answer import LETTERS
from medkr_jax.data.pipeline import load_tokenizer
from medkr_jax.data.records import read_records, write_records
from medkr_jax.data.splits import holdout_split
from medkr_jax.eval import evaluate, prompts
from medkr_jax.eval.evaluate import score_text
from medkr_jax.eval.genlog import GenerationLog
from medkr_jax.jobs import evaluate as evaluate_job
from medkr_jax.pipeline.demo import add_reward_trend, trend_phrase
from medkr_jax.pipeline.report import acc_cell, jsonl_rows, overall_rows
from medkr_jax.pipeline.stages import job_config, run_job, stage, summary_of


def _recipe_model(config: ml_collections.ConfigDict, results: dict) -> str:
    """The base model's HF folder: the converted SmolLM2 when import_smollm ran, else config.model.path."""
    if "import_smollm" in results:
        return summary_of(results, "import_smollm")["out_dir"]
    if not config.model.path:
        raise ValueError("the real-model recipe needs a base model: add the stage 'import_smollm' to "
                         "config.pipeline.stages or set config.model.path to an HF folder")
    return str(config.model.path)


def _recipe_files(results: dict) -> dict:
    return summary_of(results, "mmlu_holdout")["files"]


@stage("mmlu_holdout")
def mmlu_holdout_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """The MMLU medical questions whose prompt fits config.pipeline.recipe.max_prompt_tokens, split into a
    training part and a held-out part (duplicate questions stay on one side: data.splits.holdout_split)."""
    rc = config.pipeline.recipe
    records = [r for f in summary_of(results, "data")["mmlu_files"].values() for r in read_records(f)]
    tokenizer = load_tokenizer(_recipe_model(config, results))
    limit = int(rc.max_prompt_tokens)
    lengths = [len(prompts.encode(tokenizer, prompts.build_prompt(
        tokenizer, r, system_prompt=config.eval.system_prompt, template=config.eval.prompt_template)))
        for r in records]
    # long vignettes cost most of the CPU time per question in every later stage; 0 keeps them all
    kept = [r for r, n in zip(records, lengths) if limit <= 0 or n <= limit]
    train, heldout = holdout_split(kept, test_fraction=float(rc.heldout_fraction), seed=int(config.seed))
    if not train or not heldout:
        raise ValueError(f"config.pipeline.recipe.heldout_fraction={rc.heldout_fraction} leaves an empty side "
                         f"({len(train)} training / {len(heldout)} held-out of {len(kept)} questions)")
    files = {"train": str(write_records(out / "train.jsonl", train)),
             "heldout": str(write_records(out / "heldout.jsonl", heldout))}
    letters = {name: dict(sorted(collections.Counter(r.answer_letter for r in recs).items()))
               for name, recs in (("train", train), ("heldout", heldout))}
    return {"files": files, "questions": len(records), "kept": len(kept), "train": len(train),
            "heldout": len(heldout), "max_prompt_tokens": limit, "answer_letters": letters,
            "headline": f"{len(kept)} of {len(records)} MMLU medical questions (prompt <= {limit} tokens): "
                        f"{len(train)} training, {len(heldout)} held-out"}


def _recipe_eval(config: ml_collections.ConfigDict, out: Path, results: dict, stage_name: str,
                 model_path: str) -> dict:
    """Job "evaluate" of `model_path` on the held-out questions; the overall row and the predicted letters."""
    sub = job_config(config, stage_name, "evaluate", out, {
        "model.path": model_path, "data.eval_path": _recipe_files(results)["heldout"]})
    res = run_job(sub)
    row = _recipe_overall(out)
    preds = collections.Counter(s["pred"] or "none" for e in jsonl_rows(out / "generations.jsonl")
                                for s in e["samples"])
    res.update(model_path=model_path, overall=row, predicted_letters=dict(sorted(preds.items())))
    res["headline"] = f"held-out accuracy {acc_cell(row)}"
    return res


def _recipe_overall(out: Path) -> dict | None:
    """The evaluate job's overall accuracy row (all questions) from its metrics.jsonl."""
    return next((row for row in overall_rows(out / "metrics.jsonl") if row.get("split") == "all"), None)


@stage("eval_base")
def eval_base_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """The base model on the held-out questions (before any training)."""
    return _recipe_eval(config, out, results, "eval_base", _recipe_model(config, results))


def select_traces(entries: list[dict], *, require_stop: bool = True, per_question: int = 1,
                  forbidden: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """STaR's filter: per question (generation-log entry), the first `per_question` samples whose extracted
    answer is the correct option, that ended with a stop token (when `require_stop`) and mention none of
    `forbidden` (e.g. "hint", for rationalizations that would leak the hint into an unhinted prompt).
    Returns {question key: [trace texts]} for the questions with at least one kept sample."""
    kept: dict[str, list[str]] = {}
    for e in entries:
        texts = []
        for s in e["samples"]:
            if len(texts) >= per_question:
                break
            text = s["text"].strip()
            if not text or (require_stop and not s["stopped"]) or score_text(text, e) != e["answer"]:
                continue
            if any(word.lower() in text.lower() for word in forbidden):
                continue
            texts.append(text)
        if texts:
            kept[e["id"]] = texts
    return kept


@stage("star")
def star_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """Rejection-sampled self-traces (STaR, Zelikman et al. 2022) of the base model on training questions.

    config.pipeline.star.eval.num_samples completions per question (config.pipeline.star.eval.temperature);
    a completion is kept as the question's trace when its extracted answer is the correct option. With
    config.pipeline.recipe.rationalize, questions without a correct completion are asked again with the
    correct answer given as a hint (STaR's rationalization); a hinted completion that reaches that answer
    without mentioning the hint becomes the trace of the unhinted question. Writes traces.jsonl (records
    with `trace`), samples.jsonl / rationalize.jsonl (every completion, resumable).
    """
    rc = config.pipeline.recipe
    train = read_records(_recipe_files(results)["train"])
    n = int(rc.star_questions)
    if 0 < n < len(train):
        train = random.Random(f"star:{config.seed}").sample(train, n)
    sub = job_config(config, "star", "evaluate", out, {"model.path": _recipe_model(config, results)})
    rt = evaluate_job.runtime_from_config(sub)
    gen = evaluate_job.gen_settings(sub)
    if gen.temperature <= 0:
        raise ValueError("config.pipeline.star.eval.temperature must be > 0 (STaR samples several completions)")
    prompt = evaluate_job.prompt_settings(sub)
    glog = GenerationLog(out / "samples.jsonl", evaluate.settings_fingerprint(rt, gen, prompt))
    items = evaluate.build_items(prompt, rt.tokenizer, train)
    evaluate.run_generation(rt, items, glog, gen, desc="star")
    entries = [glog.entries[it.key] for it in items]
    require_stop = bool(rc.require_stop)
    per_q = int(rc.traces_per_question)
    kept = select_traces(entries, require_stop=require_stop, per_question=per_q)
    source = {k: "sample" for k in kept}

    rationalized = 0
    rat_entries: list[dict] = []
    if bool(rc.rationalize):
        missing = [r for r in train if r.id not in kept]
        rat_gen = dataclasses.replace(gen, num_samples=int(rc.rationalization_samples))
        rlog = GenerationLog(out / "rationalize.jsonl",
                             {**evaluate.settings_fingerprint(rt, rat_gen, prompt), "hint": rc.hint})
        kwargs = prompt.chat_template_kwargs
        rat_items = []
        for r in missing:
            hint = rc.hint.format(letter=LETTERS[r.answer], option=r.options[r.answer].strip())
            text = prompts.render_chat(rt.tokenizer, prompts.format_question(r, sub.eval.prompt_template) + hint,
                                       system_prompt=sub.eval.system_prompt, chat_template_kwargs=kwargs)
            rat_items.append(evaluate.Item(evaluate.item_key(r, "hint"), r, prompts.encode(rt.tokenizer, text),
                                           "hint"))
        evaluate.run_generation(rt, rat_items, rlog, rat_gen, desc="star rationalize")
        rat_entries = [rlog.entries[it.key] for it in rat_items]
        got = select_traces(rat_entries, require_stop=require_stop, per_question=per_q, forbidden=("hint",))
        rationalized = len(got)
        for k, v in got.items():
            kept[k] = v
            source[k] = "rationalization"

    traces = []
    for r in train:
        for j, text in enumerate(kept.get(r.id, ())):
            rec = copy.deepcopy(r)
            rec.id = r.id if j == 0 else f"{r.id}#star{j}"
            rec.trace = text
            rec.meta = {**r.meta, "star": source[r.id]}
            traces.append(rec)
    if not traces:
        raise ValueError(f"STaR kept no trace from {len(train)} questions x {gen.num_samples} samples: raise "
                         "config.pipeline.star.eval.num_samples or config.pipeline.recipe.star_questions, or "
                         "enable config.pipeline.recipe.rationalize")
    path = write_records(out / "traces.jsonl", traces)
    n_samples = sum(len(e["samples"]) for e in entries)
    sample_acc = sum(evaluate.score_text(s["text"], e) == e["answer"] for e in entries
                     for s in e["samples"]) / max(1, n_samples)
    from_samples = sum(v == "sample" for v in source.values())
    letters = dict(sorted(collections.Counter(r.answer_letter for r in traces).items()))
    return {"path": str(path), "questions": len(train), "samples_per_question": gen.num_samples,
            "sample_accuracy": sample_acc, "kept_from_samples": from_samples,
            "rationalization_questions": len(rat_entries), "kept_from_rationalization": rationalized,
            "traces": len(traces), "yield": len(kept) / len(train), "trace_answer_letters": letters,
            "headline": f"{len(kept)} of {len(train)} questions kept a correct self-trace ({from_samples} sampled, "
                        f"{rationalized} rationalized); {sample_acc:.1%} of {n_samples} samples correct"}


@stage("sft_smollm")
def sft_smollm_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """SFT of the base model on the STaR traces (plain / adversarial / backtracking mix from config.traces)."""
    sub = job_config(config, "sft_smollm", "sft", out, {
        "model.path": _recipe_model(config, results), "sft.train_path": summary_of(results, "star")["path"]})
    res = run_job(sub)
    res["headline"] = f"{res.get('steps')} steps on {res.get('examples')} traces, final loss " \
                      f"{float(res.get('final_loss') or 'nan'):.3f}"
    return res


@stage("eval_sft_smollm")
def eval_sft_smollm_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    return _recipe_eval(config, out, results, "eval_sft_smollm", summary_of(results, "sft_smollm")["export_dir"])


@stage("grpo_smollm")
def grpo_smollm_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """GRPO from the SFT export on the training questions, verifiable answer reward."""
    sub = job_config(config, "grpo_smollm", "grpo", out, {
        "model.path": summary_of(results, "sft_smollm")["export_dir"],
        "grpo.train_path": _recipe_files(results)["train"]})
    res = run_job(sub)
    k = add_reward_trend(res, out, parts=2)
    first, last = res.get("reward_first", float("nan")), res.get("reward_last", float("nan"))
    res["headline"] = (f"{res.get('steps')} steps x {sub.grpo.prompts_per_step} prompts x "
                       f"{sub.grpo.num_generations} samples; mean reward first {k} steps {first:.2f} -> "
                       f"last {k} {last:.2f}{trend_phrase(res)}")
    return res


@stage("eval_grpo_smollm")
def eval_grpo_smollm_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    return _recipe_eval(config, out, results, "eval_grpo_smollm", summary_of(results, "grpo_smollm")["export_dir"])
