"""GRPO's learner, one loop step at a time: rollout -> reward -> (filter groups) -> advantages -> update.

* rollout: sample G = num_generations completions of each of the step's prompts (MCQ records rendered like
  evaluation prompts; a trace-mix share of them prefilled with misleading reasoning, as in adversarial
  evaluation) from the current policy with the jitted KV-cache sampler (`rollout`);
* reward: 1 if the closing "The answer is X." names the right option, by letter or text, + format_reward if
  it names any one option, + DAPO's soft overlong penalty when settings.overlong_buffer > 0 (train/rewards.py;
  `rollout_rewards`);
* filter (DAPO's dynamic sampling, when settings.dynamic_sampling_rounds > 0): drop the groups whose rewards are
  all equal and sample more prompts to refill the batch (`dynamic_sampling`);
* advantages: the rewards normalised within each group by the advantage function named by settings.advantage
  (train/losses.py registry; `advantages`);
* update: the training rows of the rollout with old / reference log-probs, then mu optimizer updates of the
  RL loss named by settings.loss (`update_batch`, `update`). The frozen reference model (only when beta > 0)
  lives on the same mesh as the policy; its log-probs are computed once per rollout. Old-policy log-probs for
  mu > 1 are the sampler's own (old_logprobs="sampler") or a recomputed forward pass ("recompute"); for
  mu = 1 the ratio is exactly 1 (stop-gradient of the current log-probs). Only the completions are scored: the
  LM head runs on their positions alone, and (settings.shared_prompts, when micro-batches hold whole groups) each
  group's prompt runs once into a KV cache that its G completions share (`completion_logits`).

`make_step_fn` chains them into the `step_fn` of the shared loop. Per step it also logs why a step may carry no
signal (rollout_diagnostics: groups whose rewards are all equal, distinct completions per group), whether the
sampler drew from the distribution the trainer differentiates (logprob_agreement at the sampling weights), the
update size (the trainer's update_ratio), and how busy the rollout kept the engine's slots (rollout_decode_steps,
rollout_occupancy: emitted tokens over slot-steps, low when a few long completions hold the rollout up). Job
"grpo" (medkr_jax/jobs/grpo.py) reads the config and runs it.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medkr_jax.data.pipeline import bucket_length, make_loader
from medkr_jax.eval import prompts as P_
from medkr_jax.sampling import DEFAULT_PROMPT_BUCKETS, SampleOutput, Sampler
from medkr_jax.train.grpo_rows import (ROW_INPUTS, SHARED_INPUTS, completion_logits, completion_logps,
                                       forward_positions, round_up, rollout_batch)
from medkr_jax.train.losses import AGGREGATIONS, advantage_fn, aggregation_weight, rl_loss, token_logprobs_and_entropy
from medkr_jax.train.rewards import completion_rewards, overlong_penalty
from medkr_jax.train.traces import TraceExample
from medkr_jax.train.trainer import Trainer

OLD_LOGPROBS = ("sampler", "recompute")


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """config.grpo's learner settings as plain values (the job builds them; see medkr_jax.config).

    loss_aggregation "", epsilon_low / epsilon_high None and advantage "" take the defaults of the loss named by
    `loss` (train/losses.py); the settings hold the resolved values.
    """

    num_generations: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beta: float = 0.0
    epsilon_low: float | None = None
    epsilon_high: float | None = None
    mu: int = 1
    loss: str = "bnpo"
    loss_aggregation: str = ""
    advantage: str = ""
    format_reward: float = 0.0
    answer_source: str = "final"
    old_logprobs: str = "sampler"
    dynamic_sampling_rounds: int = 0
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    shared_prompts: bool = True

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(f"config.grpo.num_generations must be >= 2 (a group), got {self.num_generations}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"config.grpo.old_logprobs: expected 'sampler' or 'recompute', got {self.old_logprobs!r}")
        preset = rl_loss(self.loss)  # an unknown loss or advantage name fails here, before any model is loaded
        for key in ("loss_aggregation", "epsilon_low", "epsilon_high", "advantage"):
            if getattr(self, key) in ("", None):
                object.__setattr__(self, key, getattr(preset, key.removeprefix("loss_")))
        advantage_fn(self.advantage)
        if self.loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"config.grpo.loss_aggregation: expected one of {AGGREGATIONS} or '' (the loss's "
                             f"own), got {self.loss_aggregation!r}")
        if not (0.0 <= self.epsilon_low < 1.0 and self.epsilon_high >= 0.0):
            raise ValueError(f"config.grpo.epsilon_low / epsilon_high: expected 0 <= low < 1 and high >= 0, got "
                             f"{self.epsilon_low} / {self.epsilon_high}")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(f"config.grpo.overlong_buffer: expected 0 (off) to max_new_tokens={self.max_new_tokens}"
                             f" tokens, got {self.overlong_buffer}")
        if self.dynamic_sampling_rounds < 0:
            raise ValueError(f"config.grpo.dynamic_sampling_rounds must be >= 0, got {self.dynamic_sampling_rounds}")

    @property
    def sampler_old_logprobs(self) -> bool:
        """mu > 1 with the sampler's log-probs as the old policy's."""
        return self.mu > 1 and self.old_logprobs == "sampler"


def logprob_agreement(trainer_logps: jax.Array, sampler_logps: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """max and mean |trainer - sampler| log-prob of the same completion tokens (mask) at the same weights.

    On-policy GRPO assumes the sampler draws from the distribution the trainer differentiates; a gap here
    (other kernels, a padding or position bug, temperature) biases the gradient and the importance ratio.
    """
    mask = mask.astype(jnp.float32)
    diff = jnp.abs(trainer_logps - sampler_logps) * mask
    return {"logp_diff_max": diff.max(), "logp_diff_mean": diff.sum() / jnp.maximum(mask.sum(), 1.0)}


def flat_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """Per group (rows of a group contiguous): whether its rewards are all equal (every advantage 0)."""
    groups = np.asarray(rewards, np.float64).reshape(-1, group_size)
    return groups.max(axis=1) == groups.min(axis=1)


def rollout_diagnostics(rewards: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, group_size: int
                        ) -> dict[str, float]:
    """Per rollout batch (rows of a group contiguous): why a GRPO step may carry no signal.

    zero_std_groups: share of groups whose G rewards are all equal (every advantage 0: no gradient from them);
    distinct_completions: mean number of different completions (token sequences) per group;
    signal_rows: share of rows with a non-zero advantage.
    """
    flat = flat_groups(rewards, group_size)
    distinct = [len({tuple(tokens[g * group_size + j, :int(lengths[g * group_size + j])].tolist())
                     for j in range(group_size)}) for g in range(len(flat))]
    return {"zero_std_groups": float(flat.mean()), "distinct_completions": float(np.mean(distinct)),
            "signal_rows": float(1.0 - flat.mean())}


def make_loss_fn(settings: GRPOSettings):
    """The trainer's loss on a rollout batch (the RL objective + entropy, weights for exact accumulation)."""
    aggregation = settings.loss_aggregation
    beta = settings.beta
    objective = rl_loss(settings.loss)

    def loss_fn(model, batch, rng):
        logits = completion_logits(model, batch, settings.num_generations)
        logps, entropy = token_logprobs_and_entropy(logits, batch["targets"])
        mask = batch["completion_mask"]
        old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
        loss, metrics = objective(logps, old, batch["advantages"], mask, ref_logps=batch.get("ref_logps"),
                                  beta=beta, epsilon_low=settings.epsilon_low, epsilon_high=settings.epsilon_high,
                                  aggregation=aggregation, max_len=settings.max_new_tokens)
        n_tok = mask.sum()
        ent = (entropy * mask).sum() / jnp.maximum(n_tok, 1.0)
        weight = aggregation_weight(mask, aggregation)
        if "ref_logps" not in batch:
            metrics.pop("kl")
        if "sampler_logps" in batch:
            metrics.update(logprob_agreement(jax.lax.stop_gradient(logps), batch["sampler_logps"], mask))
        return loss, {**metrics, "entropy": ent, "weight": weight, "tokens": n_tok}

    return loss_fn


# ------------------------------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """The training prompts: examples, their token ids, the sampler's stable per-prompt keys, and the widest
    training row a rollout of them can need."""

    examples: Sequence[TraceExample]
    ids: list[list[int]]
    keys: list[int]
    max_width: int


def build_prompts(examples: Sequence[TraceExample], tokenizer: Any, *, system_prompt: str,
                  max_new_tokens: int) -> PromptSet:
    """Each example rendered as evaluation renders it (chat template, system prompt, prefilled prefix)."""
    ids = [P_.encode(tokenizer, P_.build_prompt(tokenizer, e.record, system_prompt=system_prompt,
                                                assistant_prefix=e.assistant_prefix)) for e in examples]
    keys = [zlib.crc32(f"{e.record_id}/{i}".encode()) for i, e in enumerate(examples)]
    max_width = bucket_length(max(map(len, ids)), DEFAULT_PROMPT_BUCKETS, past_top="grow") + max_new_tokens - 1
    return PromptSet(examples, ids, keys, max_width)


def prompt_batches(num_prompts: int, prompts_per_step: int, *, seed: int) -> Any:
    """Endless shuffled batches of prompt indices ({"index": [prompts_per_step]}), a checkpointable grain iterator.

    The same global prompt batch on every process (the sampler takes global prompts); each process then trains
    on its slice of the rollout rows (`process_rows`).
    """
    return make_loader([{"index": np.int64(i)} for i in range(num_prompts)], batch_size=prompts_per_step,
                       seed=seed, num_epochs=None, shard=grain.sharding.ShardOptions(0, 1))


def process_rows(rows: int) -> slice:
    """This process's slice of a rollout's `rows` training rows."""
    nproc, pid = jax.process_count(), jax.process_index()
    if rows % nproc:
        raise ValueError(f"prompts_per_step*num_generations = {rows} must be divisible by {nproc} processes")
    return slice(pid * rows // nproc, (pid + 1) * rows // nproc)


# ---------------------------------------------------------------------- rollout -> reward -> advantages -> update


@dataclasses.dataclass(frozen=True)
class Rollout:
    """G completions of each of a step's prompts: samples.prompt_index indexes `prompts` / `examples`."""

    samples: SampleOutput
    texts: list[str]
    prompts: list[list[int]]
    examples: list[TraceExample]


def rollout(sampler: Sampler, model: nnx.Module, tokenizer: Any, prompt_set: PromptSet, indices: Sequence[int], *,
            settings: GRPOSettings, seed: int) -> Rollout:
    """Sample settings.num_generations completions of the prompts `indices` (rows of a prompt contiguous)."""
    examples = [prompt_set.examples[int(i)] for i in indices]
    prompts = [prompt_set.ids[int(i)] for i in indices]
    out = sampler.generate(model, prompts, max_new_tokens=settings.max_new_tokens,
                           temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                           n=settings.num_generations, seed=seed,
                           prompt_keys=[prompt_set.keys[int(i)] for i in indices])
    texts = [tokenizer.decode(out.row_tokens(r), skip_special_tokens=True) for r in range(len(out.lengths))]
    return Rollout(out, texts, prompts, examples)


def rollout_rewards(ro: Rollout, settings: GRPOSettings) -> dict[str, np.ndarray]:
    """Per rollout row: correct, formatted (`completion_rewards` against its prompt's record), overlong (DAPO's
    penalty, <= 0; 0 unless settings.overlong_buffer) and reward = correct + format_reward * formatted + overlong."""
    pi = ro.samples.prompt_index
    reward, correct, formatted = completion_rewards(
        ro.texts, [ro.examples[j].record.options for j in pi], [ro.examples[j].answer for j in pi],
        format_reward=settings.format_reward, answer_source=settings.answer_source)
    overlong = overlong_penalty(ro.samples.lengths, max_new_tokens=settings.max_new_tokens,
                                buffer=settings.overlong_buffer, penalty=settings.overlong_penalty)
    return {"reward": reward + overlong, "correct": correct, "formatted": formatted, "overlong": overlong}


Scored = tuple[Rollout, dict[str, np.ndarray]]  # a rollout and its rows' rewards (`rollout_rewards`)


def merge_groups(parts: Sequence[Scored], picks: Sequence[tuple[int, int]], group_size: int) -> Scored:
    """One rollout (and its rows' rewards) of the groups `picks`, (part, group index) pairs, in that order."""
    def rows(x: np.ndarray, g: int) -> np.ndarray:
        return x[g * group_size:(g + 1) * group_size]

    def cat(get) -> np.ndarray:
        return np.concatenate([rows(get(parts[p]), g) for p, g in picks])

    prompt_of = [int(parts[p][0].samples.prompt_index[g * group_size]) for p, g in picks]
    samples = SampleOutput(tokens=cat(lambda s: s[0].samples.tokens), logprobs=cat(lambda s: s[0].samples.logprobs),
                           lengths=cat(lambda s: s[0].samples.lengths),
                           prompt_index=np.repeat(np.arange(len(picks), dtype=np.int32), group_size))
    ro = Rollout(samples, [t for p, g in picks for t in rows(np.asarray(parts[p][0].texts, object), g)],
                 [parts[p][0].prompts[j] for (p, _), j in zip(picks, prompt_of)],
                 [parts[p][0].examples[j] for (p, _), j in zip(picks, prompt_of)])
    return ro, {k: cat(lambda s, k=k: s[1][k]) for k in parts[0][1]}


def dynamic_sampling(draw, first: Scored, indices: Sequence[int], settings: GRPOSettings, *, num_prompts: int,
                     seed: int) -> tuple[Rollout, dict[str, np.ndarray], np.ndarray, dict[str, float]]:
    """DAPO's dynamic sampling: keep the groups whose rewards differ; while fewer than the step's prompts, sample
    (`draw(indices, seed) -> Scored`) as many more prompts, not yet drawn this step when the pool allows, at most
    settings.dynamic_sampling_rounds times; a batch still short is filled with groups of equal rewards that the
    loss leaves out (train_rows 0), so every step trains on one shape.

    Returns (rollout, its rows' rewards, train_rows [R], metrics: sampling_rounds, extra_prompts, groups_dropped
    (groups of equal rewards, left out of the loss), padding_groups (of those, the ones filling a short batch)).
    """
    group, want = settings.num_generations, len(indices)
    rng = np.random.default_rng(seed)
    parts, used = [first], {int(i) for i in indices}
    while len(parts) <= settings.dynamic_sampling_rounds:
        if sum(int((~flat_groups(s["reward"], group)).sum()) for _, s in parts) >= want:
            break
        fresh = np.array([i for i in range(num_prompts) if i not in used], np.int64)
        order = np.concatenate([rng.permutation(fresh), rng.permutation(np.array(sorted(used), np.int64))])
        more = np.resize(order, want)
        used.update(int(i) for i in more)
        parts.append(draw(more, (seed + len(parts)) % (2**31 - 1)))
    flags = [(p, g, bool(f)) for p, (_, s) in enumerate(parts) for g, f in enumerate(flat_groups(s["reward"], group))]
    keep = [(p, g) for p, g, f in flags if not f][:want]
    dropped = [(p, g) for p, g, f in flags if f]
    padding = dropped[:want - len(keep)]
    ro, scores = merge_groups(parts, keep + padding, group)
    train_rows = np.repeat(np.arange(want) < len(keep), group).astype(np.float32)
    metrics = {"sampling_rounds": float(len(parts)), "extra_prompts": float(want * (len(parts) - 1)),
               "groups_dropped": float(len(dropped)), "padding_groups": float(len(padding))}
    return ro, scores, train_rows, metrics


def advantages(rewards: np.ndarray, settings: GRPOSettings) -> np.ndarray:
    """Per-row advantages from the rewards of each group, by settings.advantage (NumPy in, NumPy out: host)."""
    return advantage_fn(settings.advantage)(rewards, settings.num_generations)


def update_batch(ro: Rollout, adv: np.ndarray, settings: GRPOSettings, *, max_width: int, pad_id: int,
                 local: slice, train_rows: np.ndarray | None = None,
                 shared: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """(this process's training rows of the rollout with advantages (and the sampler's log-probs as the old
    policy's when so set), the rows' width: prompt + completion, whatever the layout). Rows where `train_rows` is 0
    get an empty completion mask: the loss leaves them out. ``shared``: the shared-prompt layout (`rollout_batch`),
    for micro-batches of whole groups."""
    out = ro.samples
    pi = out.prompt_index
    # widths are the rows' real lengths rounded up to a multiple of 16 (a few compiled shapes), not the padded
    # maxima: short prompts and early stops then cost no compute
    need = max(len(ro.prompts[j]) + int(n) - 1 for j, n in zip(pi, out.lengths))
    width = min(max_width, round_up(need))
    if shared:
        prompt_width = round_up(max(len(ro.prompts[j]) for j in pi))
        k = min(settings.max_new_tokens, round_up(int(out.lengths.max())))
        batch = rollout_batch(ro.prompts, out.tokens, out.lengths, pi, width=None, pad_id=pad_id, completion_width=k,
                              sampler_logprobs=out.logprobs, prompt_width=prompt_width)
    else:
        batch = rollout_batch(ro.prompts, out.tokens, out.lengths, pi, width=width, pad_id=pad_id,
                              completion_width=settings.max_new_tokens, sampler_logprobs=out.logprobs)
    if settings.sampler_old_logprobs:
        batch["old_logps"] = batch["sampler_logps"]
    batch["advantages"] = adv.astype(np.float32)
    if train_rows is not None:
        batch["completion_mask"] *= np.asarray(train_rows, np.float32)[:, None]
    return {k: v[local] for k, v in batch.items()}, width


def update(trainer: Trainer, batch: dict, rng: jax.Array, settings: GRPOSettings,
           reference: Any = None) -> dict[str, float]:
    """Reference (and recomputed old-policy) log-probs of the rows, then settings.mu optimizer updates.

    reference: nnx.split of the frozen reference model (beta > 0), or a function of the trainer giving one (a
    LoRA policy's base: `lora.adapters_off` of the current model, no second copy of the weights), else None.
    Returns the updates' mean metrics; entropy / kl / log-prob agreement are the first update's.
    """
    def place(x):
        return jax.make_array_from_process_local_data(trainer.row_sharding, np.asarray(x))

    group = settings.num_generations
    inputs = {k: place(batch[k]) for k in (SHARED_INPUTS if "prompt_tokens" in batch else ROW_INPUTS) + ("targets",)}
    batch.update(inputs)  # placed once: the trainer takes device arrays as they are
    if reference is not None:
        batch["ref_logps"] = completion_logps(*(reference(trainer) if callable(reference) else reference), inputs, group)
    if settings.mu > 1 and not settings.sampler_old_logprobs:
        pol_graphdef, pol_state = nnx.split(trainer.model())
        batch["old_logps"] = completion_logps(pol_graphdef, pol_state, inputs, group)
    inner = [trainer.update(batch, jax.random.fold_in(rng, it)) for it in range(settings.mu)]
    inner = [{k: float(v) for k, v in jax.device_get(m).items()} for m in inner]
    metrics = {k: float(np.mean([m[k] for m in inner])) for k in inner[0] if k not in ("weight", "tokens")}
    for k in ("entropy", "kl", "logp_diff_max", "logp_diff_mean"):
        if k in inner[0]:
            metrics[k] = inner[0][k]
    return metrics


def rollout_metrics(scored: Scored, group_size: int, settings: GRPOSettings) -> dict[str, float]:
    """The step's rollout (the loop's prompts) in numbers: reward, accuracy, format, length, why a step may carry
    no signal (`rollout_diagnostics`), and DAPO's overlong penalty when on."""
    ro, s = scored
    reward, lengths = s["reward"], ro.samples.lengths
    metrics = rollout_diagnostics(reward, ro.samples.tokens, lengths, group_size)
    metrics.update(reward_mean=float(reward.mean()), reward_std=float(reward.std()),
                   group_reward_std=float(reward.reshape(-1, group_size).std(axis=1).mean()),
                   accuracy=float(s["correct"].mean()), format_rate=float(s["formatted"].mean()),
                   response_length=float(lengths.mean()))
    if settings.overlong_buffer:
        metrics.update(overlong_penalty=float(s["overlong"].mean()), overlong_rate=float((s["overlong"] < 0).mean()))
    return metrics


def shared_prompts(trainer: Trainer, settings: GRPOSettings, local: slice) -> bool:
    """Whether this step's update runs each group's prompt once (settings.shared_prompts): only when this
    process's rows and every micro-batch of them (config.optimizer.grad_accum) hold whole groups."""
    group, rows = settings.num_generations, local.stop - local.start
    return (settings.shared_prompts and local.start % group == 0 and rows % trainer.grad_accum == 0
            and (rows // trainer.grad_accum) % group == 0)


def make_step_fn(sampler: Sampler, tokenizer: Any, prompt_set: PromptSet, settings: GRPOSettings, *, pad_id: int,
                 local: slice, reference: Any = None):
    """The loop's step_fn(trainer, {"index": prompt indices}, rng) -> metrics: one GRPO step."""
    group = settings.num_generations

    def step_fn(trainer: Trainer, prompt_batch: dict, rng: jax.Array) -> dict:
        t0 = time.perf_counter()
        seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
        model, drawn, engine = trainer.model(), [], []

        def draw(indices: Sequence[int], draw_seed: int) -> Scored:
            ro = rollout(sampler, model, tokenizer, prompt_set, indices, settings=settings, seed=draw_seed)
            drawn.append(ro.samples.lengths)
            engine.append(sampler.last_stats)
            return ro, rollout_rewards(ro, settings)

        first = draw(prompt_batch["index"], seed)
        (ro, scores), train_rows, sampling = first, None, {}
        if settings.dynamic_sampling_rounds:
            ro, scores, train_rows, sampling = dynamic_sampling(draw, first, prompt_batch["index"], settings,
                                                                num_prompts=len(prompt_set.ids), seed=seed)
        t_gen = time.perf_counter() - t0
        adv = advantages(scores["reward"], settings)
        batch, width = update_batch(ro, adv, settings, max_width=prompt_set.max_width, pad_id=pad_id, local=local,
                                    train_rows=train_rows, shared=shared_prompts(trainer, settings, local))
        t_score = time.perf_counter() - t0 - t_gen
        metrics = update(trainer, batch, rng, settings, reference)
        dt = time.perf_counter() - t0
        generated = np.concatenate(drawn)
        metrics.update(rollout_metrics(first, group, settings), **sampling)
        slot_steps = sum(st.steps * st.slots for st in engine)
        # train_tokens: the tokens the training rows hold (prompt + completion each), whatever the layout (the
        # study's extra-SFT arm matches it); update_positions: the positions the update's forward passes ran
        positions = forward_positions(batch, group) * len(adv) // len(batch["advantages"])
        metrics.update(tokens=float(generated.sum()), train_tokens=float(len(adv) * width * settings.mu),
                       update_positions=float(positions * settings.mu),
                       samples_per_s=len(generated) / dt, generate_s=t_gen, score_s=t_score,
                       update_s=dt - t_gen - t_score, rollout_decode_steps=float(sum(st.steps for st in engine)),
                       rollout_occupancy=sum(st.tokens for st in engine) / max(slot_steps, 1))
        return metrics

    return step_fn
