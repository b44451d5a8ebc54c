"""GRPO reinforcement learning of the policy with a verifiable answer reward (job "grpo").

Per loop step: take config.grpo.prompts_per_step prompts (MCQ records rendered like evaluation prompts; a
config.traces share of them prefilled with misleading reasoning, as in adversarial evaluation), sample
config.grpo.num_generations completions each from the current policy with the jitted KV-cache sampler,
score them (1 if the closing "The answer is X." names the right option, by letter or text,
+ config.grpo.format_reward if it names any one option; see completion_rewards), normalise the rewards within
each group, then run config.grpo.mu optimizer updates of the GRPO objective (train/losses.py) on this rollout
batch. The frozen reference model (only when config.grpo.beta > 0) lives on the same mesh as the policy; its
log-probs are computed once per rollout.
Old-policy log-probs for mu > 1 are the sampler's own (config.grpo.old_logprobs="sampler") or a recomputed
forward pass ("recompute"); for mu = 1 the ratio is exactly 1 (stop-gradient of the current log-probs).

Per step it also logs why a step may carry no signal (rollout_diagnostics: groups whose rewards are all equal,
distinct completions per group), whether the sampler drew from the distribution the trainer differentiates
(logprob_agreement at the sampling weights), and the update size (the trainer's update_ratio).
"""

from __future__ import annotations

import os
import re
import time
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from medkr_jax import xla_options
from medkr_jax.train.losses import group_advantages, grpo_loss, token_logprobs, token_logprobs_and_entropy

WIDTH_MULTIPLE = 16


class GRPODataError(ValueError):
    """The GRPO prompts cannot be built."""


_LAST_STATEMENT = re.compile(r"the answer is (?!.*the answer is)[^\n]+?\.?\s*$", re.IGNORECASE)
ANSWER_SOURCES = ("final", "extract")


def final_statement_answer(text: str, options: Sequence[str]) -> int | None:
    """The option named by the completion's closing "The answer is X." (letter or option text), else None.

    Only the last such statement, ending the text, counts: a letter mentioned earlier ("At first sight (C)
    looks right") or a closing statement that names no option gives None.
    """
    from medkr_jax.eval.extract import extract_answer

    m = _LAST_STATEMENT.search(text.strip())
    return None if m is None else extract_answer(m.group(0), options)


def completion_rewards(texts: Sequence[str], options: Sequence[Sequence[str]], answers: Sequence[int], *,
                       format_reward: float = 0.0, answer_source: str = "final"
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reward, correct, well_formatted) per completion.

    well_formatted: the completion ends with "The answer is X." naming one option. correct: with
    answer_source="final", that closing statement names the right option (a verifiable reward that a stray
    letter cannot earn); with "extract", the evaluation's extractor (eval.extract) finds the right option
    anywhere by its fallback rules. reward = correct + format_reward * well_formatted.
    """
    from medkr_jax.eval.extract import extract_answer

    if answer_source not in ANSWER_SOURCES:
        raise ValueError(f"config.grpo.answer_source: expected one of {ANSWER_SOURCES}, got {answer_source!r}")
    final = [final_statement_answer(t, o) for t, o in zip(texts, options)]
    formatted = np.array([f is not None and f >= 0 for f in final], np.float32)
    if answer_source == "final":
        correct = np.array([f == a for f, a in zip(final, answers)], np.float32)
    else:
        correct = np.array([extract_answer(t, o) == a for t, o, a in zip(texts, options, answers)], np.float32)
    return correct + format_reward * formatted, correct, formatted


def rollout_batch(prompts: Sequence[Sequence[int]], completions: np.ndarray, lengths: np.ndarray,
                  prompt_index: np.ndarray, *, width: int, pad_id: int,
                  sampler_logprobs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Next-token training rows (prompt + completion, right-padded to `width`) with a completion mask.

    tokens/targets/positions/attention_mask: [R, width]; completion_mask marks targets that are generated
    tokens (stop token included); sampler_logps holds the sampler's log-probs at those targets when given.
    """
    r = len(prompt_index)
    out = {
        "tokens": np.full((r, width), pad_id, np.int32),
        "targets": np.full((r, width), pad_id, np.int32),
        "positions": np.zeros((r, width), np.int32),
        "attention_mask": np.zeros((r, width), bool),
        "completion_mask": np.zeros((r, width), np.float32),
    }
    if sampler_logprobs is not None:
        out["sampler_logps"] = np.zeros((r, width), np.float32)
    for i in range(r):
        p = list(prompts[prompt_index[i]])
        n = int(lengths[i])
        full = p + completions[i, :n].tolist()
        m = len(full) - 1
        if m > width:
            raise ValueError(f"rollout row of {m} tokens does not fit the training width {width}")
        out["tokens"][i, :m] = full[:-1]
        out["targets"][i, :m] = full[1:]
        out["positions"][i, :m] = np.arange(m)
        out["attention_mask"][i, :m] = True
        out["completion_mask"][i, len(p) - 1:m] = 1.0
        if sampler_logprobs is not None:
            out["sampler_logps"][i, len(p) - 1:m] = sampler_logprobs[i, :n]
    return out


def logprob_agreement(trainer_logps: jax.Array, sampler_logps: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """max and mean |trainer - sampler| log-prob of the same completion tokens (mask) at the same weights.

    On-policy GRPO assumes the sampler draws from the distribution the trainer differentiates; a gap here
    (other kernels, a padding or position bug, temperature) biases the gradient and the importance ratio.
    """
    mask = mask.astype(jnp.float32)
    diff = jnp.abs(trainer_logps - sampler_logps) * mask
    return {"logp_diff_max": diff.max(), "logp_diff_mean": diff.sum() / jnp.maximum(mask.sum(), 1.0)}


def rollout_diagnostics(rewards: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, group_size: int
                        ) -> dict[str, float]:
    """Per rollout batch (rows of a group contiguous): why a GRPO step may carry no signal.

    zero_std_groups: share of groups whose G rewards are all equal (every advantage 0: no gradient from them);
    distinct_completions: mean number of different completions (token sequences) per group;
    signal_rows: share of rows with a non-zero advantage.
    """
    groups = np.asarray(rewards, np.float64).reshape(-1, group_size)
    flat = groups.max(axis=1) == groups.min(axis=1)
    distinct = [len({tuple(tokens[g * group_size + j, :int(lengths[g * group_size + j])].tolist())
                     for j in range(group_size)}) for g in range(groups.shape[0])]
    return {"zero_std_groups": float(flat.mean()), "distinct_completions": float(np.mean(distinct)),
            "signal_rows": float(1.0 - flat.mean())}


def make_loss_fn(gcfg: Any):
    """The trainer's loss on a rollout batch (GRPO objective + entropy, weights for exact accumulation)."""
    aggregation = str(gcfg.loss_aggregation)
    beta = float(gcfg.beta)

    def loss_fn(model, batch, rng):
        logits, _ = model(batch["tokens"], batch["positions"], attention_mask=batch["attention_mask"])
        logps, entropy = token_logprobs_and_entropy(logits, batch["targets"])
        mask = batch["completion_mask"]
        old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
        loss, metrics = grpo_loss(logps, old, batch["advantages"], mask, ref_logps=batch.get("ref_logps"),
                                  beta=beta, epsilon_low=float(gcfg.epsilon_low),
                                  epsilon_high=float(gcfg.epsilon_high), aggregation=aggregation,
                                  max_len=int(gcfg.max_new_tokens))
        n_tok = mask.sum()
        ent = (entropy * mask).sum() / jnp.maximum(n_tok, 1.0)
        weight = n_tok if aggregation == "token" else jnp.asarray(mask.shape[0], jnp.float32)
        if "ref_logps" not in batch:
            metrics.pop("kl")
        if "sampler_logps" in batch:
            metrics.update(logprob_agreement(jax.lax.stop_gradient(logps), batch["sampler_logps"], mask))
        return loss, {**metrics, "entropy": ent, "weight": weight, "tokens": n_tok}

    return loss_fn


@xla_options.jit_dense(static_argnums=0)
def _forward_logps(graphdef, state, tokens, positions, attention_mask, targets):
    logits, _ = nnx.merge(graphdef, state)(tokens, positions, attention_mask=attention_mask)
    return token_logprobs(logits, targets)


def _prompt_bucket(n: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if n <= b:
            return b
    return int(np.ceil(n / 64) * 64)


def run(config: Any, *, mesh: Any = None) -> dict:
    """Job "grpo": GRPO on MCQ prompts with a correctness reward; exports the policy; returns a summary."""
    from medkr_jax import parallel
    from medkr_jax.config import require
    from medkr_jax.data.pipeline import make_loader
    from medkr_jax.data.records import read_records
    from medkr_jax.eval import prompts as P_
    from medkr_jax.models.hf import export_decoder, load_decoder
    from medkr_jax.sampling import DEFAULT_PROMPT_BUCKETS, Sampler
    from medkr_jax.train import loop, traces
    from medkr_jax.train.sft import filter_records, load_policy

    import grain

    require(config, "output_dir", "grpo.train_path")
    g = config.grpo
    G = int(g.num_generations)
    if G < 2:
        raise ValueError(f"config.grpo.num_generations must be >= 2 (a group), got {G}")
    if str(g.old_logprobs) not in ("sampler", "recompute"):
        raise ValueError(f"config.grpo.old_logprobs: expected 'sampler' or 'recompute', got {g.old_logprobs!r}")
    mu = int(g.mu)
    mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    rules = parallel.logical_rules(config)

    records = filter_records(read_records(g.train_path), bool(g.reasoning_only), g.train_path, key="config.grpo")
    if int(g.num_prompts) > 0:  # a pool of the first N questions, each visited more often in the same steps
        records = records[:int(g.num_prompts)]
    examples = traces.build_examples(records, config.traces, require_trace=False)
    model, cfg, tokenizer, tok_dir = load_policy(config, mesh, rules)
    stop_ids = P_.stop_token_ids(tokenizer, cfg.eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    prompt_ids = [P_.encode(tokenizer, P_.build_prompt(tokenizer, e.record, system_prompt=config.eval.system_prompt,
                                                       assistant_prefix=e.assistant_prefix)) for e in examples]
    prompt_keys = [zlib.crc32(f"{e.record_id}/{i}".encode()) for i, e in enumerate(examples)]
    max_new = int(g.max_new_tokens)
    max_width = _prompt_bucket(max(map(len, prompt_ids)), DEFAULT_PROMPT_BUCKETS) + max_new - 1
    sampler = Sampler(cfg, mesh=mesh, rules=rules, pad_id=pad, stop_ids=stop_ids)

    ref_state = None
    if float(g.beta) != 0.0:
        ref_model, _ = load_decoder(config.model.path, mesh=mesh, rules=rules,
                                    dtype=jnp.dtype(config.model.dtype),
                                    param_dtype=jnp.dtype(config.model.param_dtype),
                                    allow_pickle=config.model.allow_pickle)
        ref_graphdef, ref_state = nnx.split(ref_model)

    # The same global prompt batch on every process (the sampler takes global prompts); each process then
    # trains on its slice of the rollout rows.
    n_pp = int(g.prompts_per_step)
    prompt_iter = make_loader([{"index": np.int64(i)} for i in range(len(examples))], batch_size=n_pp,
                              seed=int(config.seed), num_epochs=None, shard=grain.sharding.ShardOptions(0, 1))
    nproc, pid = jax.process_count(), jax.process_index()
    rows = n_pp * G
    if rows % nproc:
        raise ValueError(f"prompts_per_step*num_generations = {rows} must be divisible by {nproc} processes")
    local = slice(pid * rows // nproc, (pid + 1) * rows // nproc)
    batch_axes = dict(rules).get("batch", parallel.BATCH_AXES)
    flat = NamedSharding(mesh, P(batch_axes))
    loss_fn = make_loss_fn(g)

    def place(x):
        return jax.make_array_from_process_local_data(flat, np.asarray(x))

    def step_fn(trainer, prompt_batch, rng):
        t0 = time.perf_counter()
        idx = prompt_batch["index"]
        exs = [examples[int(i)] for i in idx]
        seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
        out = sampler.generate(trainer.model(), [prompt_ids[int(i)] for i in idx], max_new_tokens=max_new,
                               temperature=float(g.temperature), top_k=int(g.top_k), top_p=float(g.top_p), n=G,
                               seed=seed, prompt_keys=[prompt_keys[int(i)] for i in idx])
        t_gen = time.perf_counter() - t0
        texts = [tokenizer.decode(out.row_tokens(r), skip_special_tokens=True) for r in range(len(out.lengths))]
        pi = out.prompt_index
        reward, correct, formatted = completion_rewards(
            texts, [exs[j].record.options for j in pi], [exs[j].answer for j in pi],
            format_reward=float(g.format_reward), answer_source=str(g.answer_source))
        adv = group_advantages(reward, G, scale=bool(g.scale_rewards))  # numpy in, numpy out (host)
        use_sampler_old = mu > 1 and g.old_logprobs == "sampler"
        diagnostics = rollout_diagnostics(reward, out.tokens, out.lengths, G)
        step_prompts = [prompt_ids[int(i)] for i in idx]
        # train on the rows' real length rounded up to a multiple of 16 (a few compiled shapes), not on the
        # padded maximum: short prompts and early stops then cost no compute
        need = max(len(step_prompts[j]) + int(n) - 1 for j, n in zip(pi, out.lengths))
        width = min(max_width, -(-need // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
        batch = rollout_batch(step_prompts, out.tokens, out.lengths, pi, width=width,
                              pad_id=pad, sampler_logprobs=out.logprobs)
        if use_sampler_old:
            batch["old_logps"] = batch["sampler_logps"]
        batch["advantages"] = adv.astype(np.float32)
        batch = {k: v[local] for k, v in batch.items()}
        t_score = time.perf_counter() - t0 - t_gen
        fwd_args = [place(batch[k]) for k in ("tokens", "positions", "attention_mask", "targets")]
        if ref_state is not None:
            batch["ref_logps"] = _forward_logps(ref_graphdef, ref_state, *fwd_args)
        if mu > 1 and not use_sampler_old:
            pol_graphdef, pol_state = nnx.split(trainer.model())
            batch["old_logps"] = _forward_logps(pol_graphdef, pol_state, *fwd_args)
        inner = [trainer.update(batch, jax.random.fold_in(rng, it)) for it in range(mu)]
        inner = [{k: float(v) for k, v in jax.device_get(m).items()} for m in inner]
        metrics = {k: float(np.mean([m[k] for m in inner])) for k in inner[0] if k not in ("weight", "tokens")}
        # entropy / kl of the rollout policy: the first inner update sees the sampling-time weights
        for k in ("entropy", "kl", "logp_diff_max", "logp_diff_mean"):
            if k in inner[0]:
                metrics[k] = inner[0][k]
        metrics.update(diagnostics)
        dt = time.perf_counter() - t0
        groups = reward.reshape(-1, G)
        metrics.update(
            reward_mean=float(reward.mean()), reward_std=float(reward.std()),
            group_reward_std=float(groups.std(axis=1).mean()), accuracy=float(correct.mean()),
            format_rate=float(formatted.mean()), response_length=float(out.lengths.mean()),
            tokens=float(out.lengths.sum()), train_tokens=float(rows * width * mu), samples_per_s=len(reward) / dt,
            generate_s=t_gen,
            score_s=t_score, update_s=dt - t_gen - t_score,
        )
        return metrics

    steps = int(config.train.steps)
    opt_steps = steps * mu
    summary = loop.train(model, loss_fn=loss_fn, batches=prompt_iter, config=config,
                         output_dir=config.output_dir, mesh=mesh, rules=rules, steps=steps,
                         tx=loop.make_optimizer(config.optimizer, opt_steps),
                         schedule=loop.make_schedule(config.optimizer, opt_steps), step_fn=step_fn, desc="grpo")
    summary.update(prompts=len(examples), sampler_compiles=sampler.num_compiles)
    if not summary["preempted"]:
        export_dir = g.export_dir or os.path.join(config.output_dir, "hf")
        export_decoder(model, cfg, export_dir, tokenizer_dir=tok_dir)
        summary["export_dir"] = export_dir
    last = summary.get("last_metrics") or {}
    loop.write_report(config.output_dir, "GRPO", summary,
                      extra_rows=[("prompts", len(examples)), ("generations per prompt", G),
                                  ("final reward mean", last.get("reward_mean")),
                                  ("final accuracy", last.get("accuracy"))],
                      plots=[("reward_mean", "reward.png"), ("accuracy", "accuracy.png"), ("kl", "kl.png"),
                             ("response_length", "response_length.png"), ("entropy", "entropy.png")])
    return summary
