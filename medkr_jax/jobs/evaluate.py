"""Job "evaluate": accuracy of a causal LM on the knowledge-heavy and reasoning-heavy questions of each benchmark.

    python -m medkr_jax.main --config configs/<x>.py --config.job=evaluate \\
        --config.model.path=/models/Qwen3-8B --config.data.eval_path=runs/split/labelled.jsonl

Questions come from ``config.data.benchmarks`` (benchmark spec strings, see ``medkr_jax.data.readers``)
and/or ``config.data.eval_path`` (canonical records); their split is ``record.label`` or, when unset, the
released classifier's ``record.is_reasoning``. Each question is rendered with the tokenizer's chat template
(``config.eval.system_prompt``, ``config.eval.prompt_template``), continued ``config.eval.num_samples``
times by the generation engine (continuous batching; ``config.eval.thinking_budget`` caps a reasoning model's
thinking), and scored with ``extract_answer``; with several samples, also majority vote and pass@k.

Outputs in ``config.output_dir``: ``generations.jsonl`` (appended as batches finish; a rerun skips what is
there), ``results.csv``, ``results.md``, ``knowledge_vs_reasoning.png``, ``metrics.jsonl``.

The settings builders here (``model_settings``, ``runtime_from_config``, ``gen_settings``,
``prompt_settings``, ``eval_records``) serve the other jobs and pipeline stages that generate the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from medkr_jax import parallel
from medkr_jax.config import require
from medkr_jax.eval import evaluate, metrics
from medkr_jax.eval.evaluate import GenSettings, ModelSettings, PromptSettings, Runtime, ThinkingSettings


def model_settings(config: Any) -> ModelSettings:
    """How the decoder is loaded: config.mesh, config.model dtypes / allow_pickle, config.eval.stop_strings."""
    return ModelSettings(mesh=parallel.make_mesh(config.mesh), rules=parallel.logical_rules(config),
                         dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                         allow_pickle=config.model.allow_pickle, stop_strings=tuple(config.eval.stop_strings))


def runtime_from_config(config: Any, *, model_path: str | None = None) -> Runtime:
    """The model of ``model_path`` (default config.model.path, with config.tokenizer_path when set), its
    tokenizer and sampler."""
    tokenizer_path = None
    if model_path is None:
        require(config, "model.path")
        model_path = config.model.path
        tokenizer_path = config.tokenizer_path or None
    return evaluate.load_runtime(model_path, model_settings(config), tokenizer_path=tokenizer_path)


def thinking_settings(config: Any) -> ThinkingSettings | None:
    """config.eval.thinking_* as a thinking budget, or None when neither a budget nor budget forcing is set."""
    e = config.eval
    if int(e.thinking_budget) <= 0 and int(e.thinking_max_waits) <= 0:
        return None
    return ThinkingSettings(budget=int(e.thinking_budget), start=e.thinking_start, end=e.thinking_end,
                            cue=e.answer_cue, wait=e.thinking_wait, max_waits=int(e.thinking_max_waits))


def gen_settings(config: Any, **overrides: Any) -> GenSettings:
    """Sampling settings from config.eval and config.seed (``overrides`` replace fields)."""
    e = config.eval
    kw = dict(max_new_tokens=int(e.max_new_tokens), temperature=float(e.temperature), top_k=int(e.top_k),
              top_p=float(e.top_p), num_samples=int(e.num_samples), batch_size=int(e.batch_size),
              seed=int(config.seed), thinking=thinking_settings(config))
    kw.update(overrides)
    return GenSettings(**kw)


def chat_template_kwargs(raw: str) -> dict:
    """config.eval.chat_template_kwargs (a JSON object, "" for none) as a dict."""
    if not raw:
        return {}
    try:
        out = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"config.eval.chat_template_kwargs must be a JSON object, e.g. "
                         f"'{{\"enable_thinking\": false}}'; got {raw!r} ({err})") from None
    if not isinstance(out, dict):
        raise ValueError(f"config.eval.chat_template_kwargs must be a JSON object, got {raw!r}")
    return out


def prompt_settings(config: Any) -> PromptSettings:
    """How questions become prompts: config.eval.system_prompt, prompt_template, chat_template_kwargs."""
    e = config.eval
    return PromptSettings(system_prompt=e.system_prompt, template=e.prompt_template,
                          chat_template_kwargs=chat_template_kwargs(e.chat_template_kwargs))


def eval_records(config: Any) -> list:
    """The questions of config.data.benchmarks and config.data.eval_path (config.data.limit per benchmark)."""
    d = config.data
    return evaluate.load_eval_records(tuple(d.benchmarks), d.eval_path, int(d.limit or 0))


def run(config: Any, *, on_batch: Callable[[int], None] | None = None) -> dict:
    """Job "evaluate"; returns a summary (overall accuracy per split, counts, output files)."""
    require(config, "output_dir")
    out_dir = Path(config.output_dir)
    records = eval_records(config)
    rt = runtime_from_config(config)
    gen = gen_settings(config)
    prompt = prompt_settings(config)
    table, counts, _ = evaluate.evaluate(rt, records, out_dir, prompt=prompt, gen=gen, ci=config.eval.ci,
                                         seed=int(config.seed), on_batch=on_batch,
                                         pass_k=tuple(int(k) for k in config.eval.pass_k))
    if parallel.is_main_process():
        evaluate.write_accuracy_outputs(out_dir, table)
        evaluate.write_metrics(out_dir, [{"kind": "accuracy", **r} for r in table])
    overall = {r["split"]: round(r["accuracy"], 4) for r in table if r["benchmark"] == metrics.OVERALL}
    return {"questions": len(records), **counts, "accuracy": overall,
            "files": [str(out_dir / f) for f in ("results.csv", "results.md", "knowledge_vs_reasoning.png",
                                                 "generations.jsonl")]}
