"""Shared config pieces: the full config tree with defaults, used by every file under configs/.

A config file under configs/ calls `base_config()`, sets what its job needs and returns it. The tree is
locked by main.py, so a typo in a `--config.key=value` override is an error rather than a silent new key.
Each job reads its own section (config.classifier, config.eval, config.sft, ...).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from medkr_jax.sharding_rules import DEFAULT_SHARDING_RULES

# Tuple keys that also take a comma-separated string on the command line (main.py rewrites it before parsing):
# "names" split at every comma; "specs" too, except that a piece without "/" or ":" after a spec with a query
# continues that query's list ("mmlu_flat:?subjects=anatomy,virology" stays one spec).
COMMA_LIST_KEYS = {"data.benchmarks": "specs", "data.subjects": "names", "pipeline.stages": "names",
                   "lora.target_modules": "names"}


def split_comma_list(key: str, value: str) -> tuple[str, ...]:
    """The items of a comma-separated override of a COMMA_LIST_KEYS key."""
    items: list[str] = []
    for part in (p.strip() for p in value.split(",")):
        if COMMA_LIST_KEYS[key] == "specs" and items and "?" in items[-1] and not re.search(r"[/:]", part):
            items[-1] += "," + part
        elif part:
            items.append(part)
    return tuple(items)


def _mesh_section() -> ml_collections.ConfigDict:
    # data * fsdp * tensor must equal the device count; one of them may be -1 = "the rest".
    return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})


def _distributed_section() -> ml_collections.ConfigDict:
    # Empty = single process, or auto-detected on TPU pods / SLURM (see parallel.initialize_distributed).
    return ml_collections.ConfigDict({"coordinator_address": "", "num_processes": 0, "process_id": -1})


def _model_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "preset": "",          # a name from medkr_jax.models.presets, or "" to read the HF folder's config
        "path": "",            # local Hugging Face folder (config.json + *.safetensors)
        "cache_dir": "",       # where a preset converted from a packaged file goes ("" = $MEDKR_CACHE or ~/.cache)
        "dtype": "float32",    # compute dtype
        "param_dtype": "float32",
        "remat": False,        # rematerialise each layer in the backward pass
        "allow_pickle": False,  # refuse pytorch_model.bin unless set
    })


def _optimizer_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "learning_rate": 1e-4,
        "schedule": "cosine",  # cosine | constant | linear
        "warmup_steps": 10,
        "min_lr_ratio": 0.1,
        "weight_decay": 0.0,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "grad_clip": 1.0,
        "grad_accum": 1,
        # Regexes over parameter names exempt from weight decay; empty = train.optim.NO_DECAY_PATTERNS
        # (biases and norm parameters, as transformers.Trainer does).
        "no_decay_patterns": (),
    })


def _train_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "steps": 100,
        "batch_size": 8,
        "seq_len": 256,
        "log_every": 1,
        "eval_every": 0,        # 0 = only at the end
        "checkpoint_every": 50,
        "keep_checkpoints": 3,
        "async_checkpoint": True,
        "resume": True,
    })


def _data_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # Benchmarks as "reader_name:path" strings (see medkr_jax.data.readers.READERS), or canonical JSONL.
        "benchmarks": (),
        "train_path": "",
        "eval_path": "",
        "subjects": (),         # MMLU subject filter
        "limit": 0,             # 0 = all records
    })


def _classifier_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "train_path": "",
        "val_fraction": 0.1,
        "test_path": "",
        "max_len": 256,
        "num_labels": 2,
        "class_weighting": True,
        "dropout": 0.1,
        "early_stopping_patience": 3,
        "second_labels_path": "",   # optional second annotation for Cohen's kappa
        "test_fraction": 0.1,       # held-out test share of train_path when test_path is ""
        "text": "question",         # classifier input: question | question_options
        "epochs": 0.0,              # > 0: train this many passes over the training split (overrides train.steps)
        "early_stopping_metric": "macro_f1",  # macro_f1 | accuracy | loss (validation)
        "eval_batch_size": 64,
        "export_dir": "",           # "" = <output_dir>/classifier
    })


def _split_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "classifier_path": "",
        "threshold": 0.5,
        "batch_size": 64,
        "max_len": 256,
        "text": "question",         # must match what the classifier was trained on
        "reasoning_index": -1,      # class id meaning reasoning-heavy; -1 = the label named like "reasoning"
        "group_by": "benchmark",    # rows of the table/files: "benchmark", or a meta key such as "subject"
    })


def _eval_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "system_prompt": ("You are a medical expert. Think step by step, then end your reply with "
                          "'The answer is X.' where X is the letter of the correct option."),
        "max_new_tokens": 256,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
        "num_samples": 1,
        "batch_size": 16,         # the engine's decode slots (rows generating at once; a finished row's slot is refilled)
        # User turn; fields {context} ("Context: ...\n\n" or ""), {question}, {options} ("A. ...\nB. ...").
        "prompt_template": "{context}Question: {question}\n\nOptions:\n{options}",
        "chat_template_kwargs": "",  # JSON object passed to apply_chat_template, e.g. '{"enable_thinking": false}'
        "stop_strings": (),       # extra single-token stop strings besides EOS, e.g. ("<|im_end|>",)
        "ci": "auto",             # auto | wilson | bootstrap (95% CI; auto = Wilson for 1 sample, else bootstrap)
        # Thinking budget (reasoning models): after thinking_budget tokens inside thinking_start ... thinking_end the
        # engine writes thinking_end + answer_cue and lets the row answer (0 = no budget). thinking_max_waits > 0:
        # s1 budget forcing, an early thinking_end is replaced by thinking_wait up to that many times per row.
        "thinking_budget": 0,
        "thinking_start": "<think>",
        "thinking_end": "</think>",
        "answer_cue": "\n\nThe answer is",
        "thinking_wait": "Wait",
        "thinking_max_waits": 0,
        "thinking_budgets": (),   # job budget_sweep: the budgets to evaluate, e.g. (32, 64, 128, 0); 0 = no budget
        # Self-consistency (num_samples > 1): maj@num_samples and unbiased pass@k for each k here (k <= num_samples)
        "pass_k": (1,),
    })


def _adversarial_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "source": "template",   # released | generated | template
        "cue": "Wait, let me re-check this.",
        "generator_path": "",   # for source=generated: model that writes the misleading reasoning ("" = same)
        # Comma-separated sources are evaluated one after another, e.g. "released,template".
        # The prefilled assistant text: the misleading reasoning, then the reconsideration cue.
        "prefix_format": "{prefix}\n\n{cue}\n",
        "generator_prompt": ("Argue that the correct answer is ({letter}) {option}. Explain step by step, "
                             "confidently, and end with 'The answer is {letter}.'"),
        "generator_max_new_tokens": 256,
        "template": ("Let me think step by step. The key findings in this question point to {option}. "
                     "The other options do not fit the presentation as well. The answer is {letter}."),
    })


def _traces_section() -> ml_collections.ConfigDict:
    # answer_format: "letter" ("The answer is B.") or "option" ("The answer is <option text>.") in SFT targets.
    return ml_collections.ConfigDict({"plain": 1.0, "adversarial": 0.0, "backtracking": 0.0, "seed": 0,
                                      "answer_format": "letter"})


def _sft_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "train_path": "",
        "packing": True,
        "reasoning_only": True,   # the BioMed-R1 recipe trains on reasoning-heavy examples
        "export_dir": "",         # "" = <output_dir>/hf
        "epochs": 0.0,            # > 0: train this many passes over the packed rows (overrides config.train.steps)
        "answer_weight": 1.0,     # loss weight of the final answer's tokens, letter or option text (1 = token mean)
    })


def _grpo_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "train_path": "",
        "num_generations": 8,     # G completions per prompt
        "prompts_per_step": 4,
        "max_new_tokens": 256,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "beta": 0.0,              # KL coefficient; 0 keeps no reference model
        # The RL loss by name, TRL's names (train/losses.py RL_LOSSES; each a clipped ratio + k3 KL with its own
        # aggregation, clip bounds and advantage, which the keys below override when set):
        #   bnpo (token-level mean, clip 0.2/0.2) | grpo (per-sequence mean, then over sequences) |
        #   dapo (token-level, clip-higher 0.2/0.28) | dr_grpo (sum / (rows * max_new_tokens), advantage r - mean) |
        #   gspo (one length-normalised ratio per sequence, clipped per sequence at 3e-4/4e-4) | gspo_token
        "loss": "bnpo",
        "loss_aggregation": "",   # "" = the loss's own | token | sequence | constant (sum / (rows * max_new_tokens))
        "epsilon_low": -1.0,      # clip range 1 - epsilon_low .. 1 + epsilon_high; < 0 = the loss's own
        "epsilon_high": -1.0,
        "advantage": "",          # "" = the loss's own | grpo ((r - mean) / std) | dr_grpo (r - mean, no std)
        "scale_rewards": True,    # False = advantage "dr_grpo" (the older spelling)
        "mu": 1,                  # inner updates per rollout batch
        # DAPO's rollout side (with any loss): dynamic sampling drops the groups whose rewards are all equal (no
        # signal) and samples up to this many more batches of prompts to refill the step's batch; 0 = off
        "dynamic_sampling_rounds": 0,
        # DAPO's soft overlong penalty: completions longer than max_new_tokens - overlong_buffer tokens lose up to
        # overlong_penalty reward, linearly over the buffer (train/rewards.py); 0 = off
        "overlong_buffer": 0,
        "overlong_penalty": 1.0,
        "format_reward": 0.0,
        # what earns the correctness reward: "final" = the closing "The answer is X." names the right option;
        # "extract" = the evaluation's extractor, whose fallbacks also credit a letter mentioned anywhere
        "answer_source": "final",
        "export_dir": "",
        "old_logprobs": "sampler",  # mu > 1: old-policy log-probs from the sampler, or "recompute" (a forward pass)
        # score each group's shared prompt once (its keys and values reused by the group's completions) instead of
        # once per completion, where every micro-batch holds whole groups; False = every row prompt + completion
        "shared_prompts": True,
        "reasoning_only": True,   # train on reasoning-heavy records (label or is_reasoning), as BioMed-R1
        "num_prompts": 0,         # > 0: train on the first N of those questions only (more visits per question)
    })


def _lora_section() -> ml_collections.ConfigDict:
    # LoRA adapters for the sft and grpo jobs (medkr_jax/models/lora.py): the decoder's base weights stay frozen
    # (config.model.param_dtype may then be bfloat16), only the adapters are trained, in the optimizer state and
    # in the checkpoints. The jobs export the merged weights (sft/grpo export_dir) and the adapters as a PEFT
    # folder (peft_dir); with grpo.beta > 0 the reference model is the base with the adapters switched off.
    return ml_collections.ConfigDict({
        "rank": 0,                # r; 0 = no adapters (full fine-tuning)
        "alpha": 16.0,            # the adapter product is scaled by alpha / rank (PEFT's lora_alpha)
        "dropout": 0.0,           # dropout on the adapters' input during training (PEFT's lora_dropout)
        # Regular expressions searched in module paths with the layer index left out, e.g. "layers.attn.q_proj",
        # "layers.mlp.down_proj"; a pattern selects the same projections in every layer. Default: all attention
        # and MLP projections. On the command line also a comma-separated list:
        # --config.lora.target_modules=q_proj,v_proj
        "target_modules": (r"attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"),
        "peft_dir": "",           # "" = <output_dir>/peft
    })


def _synthetic_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "seed": 0,
        "n_diseases": 8,
        "n_classes": 4,
        "drugs_per_class": 2,
        "reasoning_fraction": 0.5,
        "classifier_questions": 400,     # labelled questions for the reasoning/knowledge classifier
        "policy_train_questions": 600,   # SFT / GRPO training questions for the tiny policy
        "policy_eval_questions": 200,    # held-out questions for its evaluation (the scored test split)
        "policy_val_questions": 0,       # > 0: a validation split, disjoint from the others, for choosing settings
        "policy_rl_questions": 0,        # > 0: GRPO's own questions (answers only), disjoint from SFT's
    })


def _study_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "seeds": (0, 1, 2),       # scored seeds: each its own world, splits, policy init and data order
        "search_seed": 100,       # GRPO settings are chosen on this seed's validation split (not scored)
        "grpo_candidates": (),    # partial config.pipeline.grpo trees to choose from; () = config.pipeline.grpo
    })


def _dry_run_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "chip": "v5p",            # v4 | v5e | v5p | v6e | h100 | h200
        "num_devices": 0,         # 0 = the mesh's product (with no -1), else this many devices
        "batch_size": 0,          # 0 = config.train.batch_size
        "seq_len": 0,             # 0 = config.train.seq_len
        "train": True,            # False: plan inference (parameters + the sampler's KV cache of batch x seq_len)
        # The sampler's KV cache of a GRPO rollout, planned beside the training step (they alternate):
        # kv_rows sequences (0 = no KV cache in the plan; -1 = grpo.prompts_per_step * grpo.num_generations) of
        # kv_len tokens (0 = config.train.seq_len: prompt bucket + generation bucket) in kv_dtype (empty =
        # config.model.dtype, the compute dtype the sampler keeps its cache in)
        "kv_rows": 0,
        "kv_len": 0,
        "kv_dtype": "",
    })


def _export_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"checkpoint_dir": "", "out_dir": "", "max_shard_bytes": 5_000_000_000})


def _import_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"gguf_path": "", "out_dir": ""})


def _pipeline_section() -> ml_collections.ConfigDict:
    # Per-stage settings go in config.pipeline.<stage_name> as a partial config tree (see medkr_jax.pipeline.stages),
    # e.g. config.pipeline.sft = ConfigDict({"train": {"steps": 200}}).
    return ml_collections.ConfigDict({
        "stages": (),
        "eval_questions_per_split": 32,  # real questions per split (reasoning / knowledge) for the LM evaluation
        "policy": {  # the tiny policy built for the synthetic world
            "vocab_size": 1024,
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_layers": 4,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_position_embeddings": 1024,
        },
    })


def base_config() -> ml_collections.ConfigDict:
    """The whole config tree with defaults; configs/*.py start from this."""
    return ml_collections.ConfigDict({
        "job": "",
        "output_dir": "",
        "seed": 0,
        "mesh": _mesh_section(),
        "sharding_rules": DEFAULT_SHARDING_RULES,  # (logical, mesh axis) pairs; set ones merge over the defaults
        "distributed": _distributed_section(),
        "model": _model_section(),
        "tokenizer_path": "",     # "" = the model folder
        "data": _data_section(),
        "optimizer": _optimizer_section(),
        "train": _train_section(),
        "classifier": _classifier_section(),
        "split": _split_section(),
        "eval": _eval_section(),
        "adversarial": _adversarial_section(),
        "traces": _traces_section(),
        "sft": _sft_section(),
        "grpo": _grpo_section(),
        "lora": _lora_section(),
        "synthetic": _synthetic_section(),
        "study": _study_section(),
        "dry_run": _dry_run_section(),
        "export": _export_section(),
        "import_": _import_section(),
        "pipeline": _pipeline_section(),
    })


def config_from_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """The get_config() of another config file: configs build on each other (demo_smoke on demo, study on demo)."""
    spec = importlib.util.spec_from_file_location(f"medkr_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


class ConfigError(ValueError):
    """A config value is missing or invalid; the message names the key."""


def require(config: ml_collections.ConfigDict, *keys: str) -> None:
    """Raise one ConfigError naming every dotted key that is empty."""
    missing = []
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node[part]
        if node in ("", None, ()) or (isinstance(node, config_dict.FieldReference) and node.get() is None):
            missing.append(key)
    if missing:
        raise ConfigError(
            f"config.job={config.job!r} needs these keys set: "
            + ", ".join(f"config.{k}" for k in missing)
            + " (set them in the config file or with --config.<key>=<value>)")
