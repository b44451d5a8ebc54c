"""GRPO: the objective and SFT loss vs independent NumPy implementations written from the formulas, the RL
registries, the learner's steps (rollout -> reward -> advantages -> update) each alone, and the job end to end."""

import dataclasses
import os
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from medkr_jax import parallel
from medkr_jax.config import base_config
from medkr_jax.data.answer import LETTERS
from medkr_jax.data.records import MCQRecord, write_records
from medkr_jax.jobs import grpo as grpo_job, sft as sft_job
from medkr_jax.models import lora
from medkr_jax.models.decoder import Decoder
from medkr_jax.models.presets import TINY
from medkr_jax.sampling import SampleOutput, Sampler
from medkr_jax.train import grpo, grpo_rows, loop, losses, sft, traces
from medkr_jax.train.metrics_log import read_metrics
from medkr_jax.train.rewards import completion_rewards
from medkr_jax.train.trainer import Trainer
from tests.test_sft import (cache_dir_of, compilation_cache, make_policy_folder, one_device_mesh,
                            run_killed_then_resumed, sft_config, write_config_file)

COLORS = ["red", "blue", "green", "gold"]
WAYS = ["north", "south", "east", "west"]


def np_advantages(rewards, g, scale, eps=1e-4):
    out = np.empty_like(rewards, dtype=np.float64)
    for s in range(0, len(rewards), g):
        grp = rewards[s:s + g].astype(np.float64)
        a = grp - grp.mean()
        if scale:
            a = a / (np.sqrt(((grp - grp.mean()) ** 2).sum() / (g - 1)) + eps)
        out[s:s + g] = a
    return out


def np_grpo(logp, old, ref, adv, mask, beta, el, eh, agg, max_len):
    """Loss and analytic d loss / d logp, token by token, in float64."""
    b, t = logp.shape
    per = np.zeros((b, t))
    dper = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            r = np.exp(logp[i, j] - old[i, j])
            unclipped, clipped = r * adv[i], min(max(r, 1 - el), 1 + eh) * adv[i]
            # the derivative flows only through the unclipped branch when it is the smaller one,
            # or when the ratio lies inside the clip range (both branches are equal there)
            inside = 1 - el <= r <= 1 + eh
            per[i, j] = -min(unclipped, clipped)
            dper[i, j] = -adv[i] * r if (unclipped <= clipped or inside) else 0.0
            d = ref[i, j] - logp[i, j]
            per[i, j] += beta * (np.exp(d) - d - 1)
            dper[i, j] += beta * (-np.exp(d) + 1)
    m = mask.astype(np.float64)
    rows = (m.sum(1) > 0).sum()  # rows without a completion token count in no denominator
    if agg == "token":
        w = m / m.sum()
    elif agg == "sequence":
        w = m / np.maximum(m.sum(1, keepdims=True), 1) / rows
    else:
        w = m / (rows * max_len)
    return (per * w).sum(), dper * w


@pytest.mark.parametrize("agg", ["token", "sequence", "constant"])
@pytest.mark.parametrize("beta,scale", [(0.0, True), (0.04, True), (0.1, False)])
def test_grpo_loss_and_gradient_match_numpy(agg, beta, scale):
    rng = np.random.default_rng(hash((agg, beta)) % 2**32)
    g, n, t = 4, 3, 7
    b = g * n
    rewards = rng.integers(0, 2, size=b).astype(np.float32) + rng.normal(scale=0.1, size=b).astype(np.float32)
    old = rng.normal(-2.0, 0.5, size=(b, t))
    logp = old + rng.normal(0, 0.3, size=(b, t))  # ratios spread on both sides of the clip range
    ref = old + rng.normal(0, 0.3, size=(b, t))
    lengths = rng.integers(1, t + 1, size=b)
    lengths[4] = 0  # a row without completion tokens (a group left out by dynamic sampling)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    max_len = t + 3

    adv_np = np_advantages(rewards, g, scale)
    adv = losses.group_advantages(jnp.asarray(rewards), g, scale=scale)
    np.testing.assert_allclose(np.asarray(adv), adv_np, rtol=1e-4, atol=1e-5)

    def f(lp):
        return losses.grpo_loss(lp, jnp.asarray(old, jnp.float32), adv, jnp.asarray(mask),
                                ref_logps=jnp.asarray(ref, jnp.float32), beta=beta, epsilon_low=0.2,
                                epsilon_high=0.28, aggregation=agg, max_len=max_len)[0]

    loss, grad = jax.value_and_grad(f)(jnp.asarray(logp, jnp.float32))
    want_loss, want_grad = np_grpo(logp, old, ref, adv_np, mask, beta, 0.2, 0.28, agg, max_len)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-3, atol=1e-6)
    assert np.all(np.asarray(grad)[mask == 0] == 0)

    # the analytic NumPy gradient itself agrees with central differences of the NumPy loss
    h = 1e-6
    for (i, j) in [(0, 0), (b - 1, 0), (2, 1), (5, 3)]:
        lp_p, lp_m = logp.copy(), logp.copy()
        lp_p[i, j] += h
        lp_m[i, j] -= h
        fd = (np_grpo(lp_p, old, ref, adv_np, mask, beta, 0.2, 0.28, agg, max_len)[0]
              - np_grpo(lp_m, old, ref, adv_np, mask, beta, 0.2, 0.28, agg, max_len)[0]) / (2 * h)
        assert fd == pytest.approx(want_grad[i, j], rel=1e-4, abs=1e-7)


def test_grpo_metrics_and_errors():
    lp = jnp.log(jnp.array([[0.5, 0.5], [0.5, 0.5]]))
    old = jnp.log(jnp.array([[0.25, 0.5], [0.5, 0.25]]))  # ratios 2, 1 / 1, 2
    adv = jnp.array([1.0, -1.0])
    mask = jnp.ones((2, 2))
    loss, m = losses.grpo_loss(lp, old, adv, mask)
    # clipped only where ratio > 1.2 and A > 0: one token of four
    assert float(m["clip_fraction"]) == pytest.approx(0.25)
    assert float(m["kl"]) == 0.0
    with pytest.raises(ValueError, match="loss_aggregation"):
        losses.grpo_loss(lp, old, adv, mask, aggregation="bogus")
    with pytest.raises(ValueError, match="ref_logps"):
        losses.grpo_loss(lp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="at least 2"):
        losses.group_advantages(jnp.ones(4), 1)


def test_completion_rewards_letter_and_option_text():
    opts = ["aspirin", "heparin", "warfarin", "insulin"]
    texts = ["So heparin. The answer is B.", "So heparin. The answer is heparin.", "The answer is warfarin.",
             "The answer is digoxin.", "heparin, I think", "At first sight (B) looks right. The answer is 120 mg.",
             "The answer is A. Wait. The answer is (B).", "The answer is B or D."]
    reward, correct, formatted = completion_rewards(texts, [opts] * 8, [1] * 8, format_reward=0.5)
    # only a closing "The answer is X." naming an option counts: not a letter mentioned earlier ("(B)" in the
    # sixth), not a closing statement that names no option ("digoxin") or two ("B or D")
    np.testing.assert_array_equal(correct, [1, 1, 0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(formatted, [1, 1, 1, 0, 0, 0, 1, 0])
    np.testing.assert_allclose(reward, [1.5, 1.5, 0.5, 0.0, 0.0, 0.0, 1.5, 0.0])
    # the evaluation's extractor, with its fallbacks, credits the stray "(B)" and the bare option text
    _, lenient, _ = completion_rewards(texts, [opts] * 8, [1] * 8, answer_source="extract")
    np.testing.assert_array_equal(lenient, [1, 1, 0, 0, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="answer_source"):
        completion_rewards(texts, [opts] * 8, [1] * 8, answer_source="bogus")


def test_rollout_diagnostics_by_hand():
    # 3 groups of 4: all rewards equal (no signal), mixed, all equal again
    rewards = np.array([1, 1, 1, 1, 0, 1, 0, 0.25, 0, 0, 0, 0], np.float32)
    tokens = np.array([[5, 6, 7], [5, 6, 9], [5, 6, 7], [5, 6, 7],     # 2 distinct (length 3)
                       [1, 2, 0], [1, 2, 0], [1, 3, 0], [4, 0, 0],     # lengths 2,2,2,1 -> (1,2),(1,3),(4,) : 3
                       [8, 8, 8], [8, 8, 9], [8, 8, 7], [8, 0, 0]], np.int32)  # lengths 2,2,2,1 -> (8,8),(8,): 2
    lengths = np.array([3, 3, 3, 3, 2, 2, 2, 1, 2, 2, 2, 1])
    d = grpo.rollout_diagnostics(rewards, tokens, lengths, 4)
    assert d["zero_std_groups"] == pytest.approx(2 / 3)
    assert d["signal_rows"] == pytest.approx(1 / 3)
    assert d["distinct_completions"] == pytest.approx((2 + 3 + 2) / 3)


def test_logprob_agreement_by_hand():
    trainer = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.25, -9.0]])
    sampler = jnp.array([[-1.0, -2.5, 0.0], [-0.75, -0.25, 0.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 0]], jnp.float32)  # the third column is padding: ignored
    d = grpo.logprob_agreement(trainer, sampler, mask)
    assert float(d["logp_diff_max"]) == pytest.approx(0.5)
    assert float(d["logp_diff_mean"]) == pytest.approx((0 + 0.5 + 0.25 + 0) / 4)


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5))
    mask = rng.random((2, 5)) < 0.6
    mask[0, 0] = True
    loss, n = losses.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    lg = logits.astype(np.float64)
    logz = np.log(np.exp(lg).sum(-1))
    nll = logz - np.take_along_axis(lg, targets[..., None], -1)[..., 0]
    assert float(n) == mask.sum()
    assert float(loss) == pytest.approx((nll * mask).sum() / mask.sum(), rel=1e-5)
    ent = losses.token_entropy(jnp.asarray(logits))
    p = np.exp(lg - logz[..., None])
    np.testing.assert_allclose(np.asarray(ent), -(p * np.log(p)).sum(-1), rtol=1e-5)
    lp2, ent2 = losses.token_logprobs_and_entropy(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(np.asarray(lp2), -nll, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ent2), -(p * np.log(p)).sum(-1), rtol=1e-5, atol=1e-6)
    # the entropy carries no gradient; the log-probs carry d logp / d logits = onehot - p
    g = jax.grad(lambda l: losses.token_logprobs_and_entropy(l, jnp.asarray(targets))[1].sum())(jnp.asarray(logits))
    assert not np.asarray(g).any()
    g = jax.grad(lambda l: losses.token_logprobs_and_entropy(l, jnp.asarray(targets))[0][0, 0])(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(g)[0, 0], np.eye(11)[targets[0, 0]] - p[0, 0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- the RL registries by name


def test_rl_registries_find_each_name_and_refuse_unknown_ones():
    assert losses.rl_loss("grpo").fn is losses.grpo_loss
    assert losses.advantage_fn("grpo") is losses.group_advantages
    r = np.random.default_rng(3).random(8).astype(np.float32)
    np.testing.assert_allclose(losses.advantage_fn("dr_grpo")(r, 4), np_advantages(r, 4, scale=False), atol=1e-6)
    with pytest.raises(ValueError, match=r"config\.grpo\.loss: unknown 'ppo'; valid: bnpo, dapo, dr_grpo, grpo, "
                                         r"gspo, gspo_token$"):
        losses.rl_loss("ppo")
    with pytest.raises(ValueError, match=r"config\.grpo\.advantage: unknown 'rloo'; valid: dr_grpo, grpo$"):
        losses.advantage_fn("rloo")
    with pytest.raises(ValueError, match=r"config\.grpo\.loss: unknown"):
        grpo.GRPOSettings(loss="ppo")  # the settings refuse it before any model is loaded


def test_the_job_reads_loss_and_advantage_names_and_maps_scale_rewards():
    c = base_config()
    assert (c.grpo.loss, c.grpo.advantage, c.grpo.scale_rewards) == ("bnpo", "", True)
    s = grpo_job.grpo_settings(c.grpo)  # the default: token-level loss, clip 0.2 / 0.2, (r - mean) / std
    assert (s.loss_aggregation, s.epsilon_low, s.epsilon_high, s.advantage) == ("token", 0.2, 0.2, "grpo")
    c.grpo.scale_rewards = False  # the older spelling of Dr. GRPO's unscaled advantages
    assert grpo_job.grpo_settings(c.grpo).advantage == "dr_grpo"
    c.grpo.scale_rewards, c.grpo.advantage = True, "dr_grpo"
    assert grpo_job.grpo_settings(c.grpo).advantage == "dr_grpo"
    # a loss name brings its aggregation, clip bounds and advantage; keys set explicitly win over them
    c.grpo.loss, c.grpo.advantage = "dr_grpo", ""
    s = grpo_job.grpo_settings(c.grpo)
    assert (s.loss_aggregation, s.epsilon_low, s.epsilon_high, s.advantage) == ("constant", 0.2, 0.2, "dr_grpo")
    c.grpo.loss, c.grpo.epsilon_high, c.grpo.loss_aggregation = "gspo", 0.01, "token"
    s = grpo_job.grpo_settings(c.grpo)
    assert (s.loss_aggregation, s.epsilon_low, s.epsilon_high, s.advantage) == ("token", 3e-4, 0.01, "grpo")
    c.grpo.advantage = "bogus"
    with pytest.raises(ValueError, match=r"config\.grpo\.advantage: unknown 'bogus'; valid: dr_grpo, grpo"):
        grpo_job.grpo_settings(c.grpo)


# ---------------------------------------------------------------- the learner: rollout, reward, advantages, update


class IdTokenizer:
    """decode = the ids as text: all the learner needs of a tokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def tiny_policy(mesh, seed=0):
    with parallel.sharding_context(mesh):
        return Decoder(TINY, rngs=nnx.Rngs(seed))


def toy_prompt_set(n=3):
    """n questions (answer i % 4) as plain examples, with made-up prompt ids and sampler keys."""
    recs = [MCQRecord(id=f"p{i}", benchmark="toy", question=f"q{i}", options=list(WAYS), answer=i % 4,
                      label="reasoning") for i in range(n)]
    examples = [traces.make_example(r, "plain", np.random.default_rng(0)) for r in recs]
    return grpo.PromptSet(examples, [[1, 5 + i, 6 + i, 7] for i in range(n)], [100 + i for i in range(n)], 64)


def test_rollout_samples_a_group_of_each_prompt():
    mesh = one_device_mesh()
    model = tiny_policy(mesh)
    sampler = Sampler(TINY, mesh=mesh, pad_id=0, stop_ids=(2,))
    settings = grpo.GRPOSettings(num_generations=3, max_new_tokens=5)
    ps = toy_prompt_set()
    ro = grpo.rollout(sampler, model, IdTokenizer(), ps, np.array([2, 0]), settings=settings, seed=7)
    assert ro.prompts == [ps.ids[2], ps.ids[0]] and [e.record_id for e in ro.examples] == ["p2", "p0"]
    out = ro.samples
    np.testing.assert_array_equal(out.prompt_index, [0, 0, 0, 1, 1, 1])  # a prompt's rows are contiguous
    assert len(out.lengths) == 6 and ((out.lengths >= 1) & (out.lengths <= 5)).all()
    assert ro.texts == [" ".join(map(str, out.row_tokens(r))) for r in range(6)]
    for r, n in enumerate(out.lengths):  # the sampler's log-probs of the drawn tokens, 0 after the row's end
        assert (out.logprobs[r, :n] < 0).all() and not out.logprobs[r, n:].any()
    again = grpo.rollout(sampler, model, IdTokenizer(), ps, np.array([2, 0]), settings=settings, seed=7)
    np.testing.assert_array_equal(again.samples.tokens, out.tokens)  # the seed and the prompt keys fix the draw
    other = grpo.rollout(sampler, model, IdTokenizer(), ps, np.array([2, 0]), settings=settings, seed=8)
    assert not np.array_equal(other.samples.tokens, out.tokens)


def toy_rollout(texts=("",) * 4):
    """Two prompts (records p1: answer B = south, p2: answer C = east), two hand-made completions each."""
    ps = toy_prompt_set()
    tokens = np.array([[9, 2, 0], [9, 9, 2], [3, 0, 0], [4, 4, 0]], np.int32)
    lengths = np.array([2, 3, 1, 2], np.int32)
    logprobs = -np.arange(1, 13, dtype=np.float32).reshape(4, 3) * (np.arange(3)[None] < lengths[:, None])
    samples = SampleOutput(tokens, logprobs, lengths, np.array([0, 0, 1, 1]))
    return grpo.Rollout(samples, list(texts), [[1, 5, 6, 7], [1, 8]], [ps.examples[1], ps.examples[2]])


def test_rollout_rewards_score_each_row_against_its_prompts_record():
    ro = toy_rollout(["The answer is B.", "The answer is C.", "So east. The answer is east.", "The answer is west."])
    s = grpo.rollout_rewards(ro, grpo.GRPOSettings(num_generations=2, format_reward=0.5))
    np.testing.assert_array_equal(s["correct"], [1, 0, 1, 0])
    np.testing.assert_array_equal(s["formatted"], [1, 1, 1, 1])
    np.testing.assert_allclose(s["reward"], [1.5, 0.5, 1.5, 0.5])
    assert not s["overlong"].any()
    # DAPO's overlong penalty (max_new_tokens 3, buffer 2: lengths 2, 3, 1, 2 lose 0.5, 1, 0, 0.5 x 0.4)
    s = grpo.rollout_rewards(ro, grpo.GRPOSettings(num_generations=2, format_reward=0.5, max_new_tokens=3,
                                                   overlong_buffer=2, overlong_penalty=0.4))
    np.testing.assert_allclose(s["overlong"], [-0.2, -0.4, 0.0, -0.2], atol=1e-7)
    np.testing.assert_allclose(s["reward"], [1.3, 0.1, 1.5, 0.3], atol=1e-6)


@pytest.mark.parametrize("name, scale", [("grpo", True), ("dr_grpo", False)])
def test_advantages_by_name(name, scale):
    r = np.random.default_rng(2).random(12).astype(np.float32)
    got = grpo.advantages(r, grpo.GRPOSettings(num_generations=4, advantage=name))
    assert isinstance(got, np.ndarray)  # host in, host out
    np.testing.assert_allclose(got, np_advantages(r, 4, scale), rtol=1e-5, atol=1e-6)


def test_update_batch_rows_width_and_old_logprobs():
    ro = toy_rollout()
    adv = np.array([1.0, -1.0, 0.5, -0.5])
    s = grpo.GRPOSettings(num_generations=2, mu=2, max_new_tokens=4)  # mu > 1, old_logprobs="sampler"
    batch, width = grpo.update_batch(ro, adv, s, max_width=64, pad_id=0, local=slice(0, 4))
    assert width == 16 and batch["tokens"].shape == (4, 16)  # longest row 4 + 3 - 1 = 6 tokens, rounded up to 16
    assert grpo_rows.forward_positions(batch, 2) == 4 * 16
    np.testing.assert_array_equal(batch["tokens"][1, :7], [1, 5, 6, 7, 9, 9, 0])
    np.testing.assert_array_equal(batch["attention_mask"][1, :7], [1, 1, 1, 1, 1, 1, 0])
    # scored in completion coordinates, max_new_tokens = 4 wide: the row positions whose logits predict each
    # generated token (the prompt's last position first), the tokens, the mask, the sampler's log-probs
    assert batch["targets"].shape == batch["completion_mask"].shape == batch["completion_at"].shape == (4, 4)
    np.testing.assert_array_equal(batch["completion_at"][1], [3, 4, 5, 6])
    np.testing.assert_array_equal(batch["completion_at"][2], [1, 2, 3, 4])  # prompt [1, 8]
    np.testing.assert_array_equal(batch["targets"][1], [9, 9, 2, 0])
    np.testing.assert_array_equal(batch["completion_mask"][1], [1, 1, 1, 0])
    np.testing.assert_array_equal(batch["completion_mask"][2], [1, 0, 0, 0])
    np.testing.assert_array_equal(batch["sampler_logps"][1, :3], ro.samples.logprobs[1])
    np.testing.assert_array_equal(batch["old_logps"], batch["sampler_logps"])
    assert batch["advantages"].dtype == np.float32 and batch["advantages"].tolist() == adv.tolist()
    # the width is capped at max_width; "recompute" leaves old log-probs to `update`; this process's rows only
    half, width = grpo.update_batch(ro, adv, dataclasses.replace(s, old_logprobs="recompute"), max_width=8,
                                    pad_id=0, local=slice(2, 4))
    assert width == 8 and "old_logps" not in half and half["tokens"].shape == (2, 8)
    np.testing.assert_array_equal(half["advantages"], [0.5, -0.5])
    # a completion window narrower than the row: positions past the row's end clip to its last and stay masked
    narrow = grpo_rows.rollout_batch([[1, 5, 6, 7]], np.array([[9, 9, 2]]), np.array([3]), np.array([0]), width=6,
                                pad_id=0, completion_width=4)
    np.testing.assert_array_equal(narrow["completion_at"][0], [3, 4, 5, 5])
    np.testing.assert_array_equal(narrow["completion_mask"][0], [1, 1, 1, 0])
    with pytest.raises(ValueError, match="completion width 2"):
        grpo_rows.rollout_batch([[1, 5]], np.array([[9, 9, 2]]), np.array([3]), np.array([0]), width=8, pad_id=0,
                           completion_width=2)


def test_update_batch_shared_prompts_layout():
    ro = toy_rollout()
    s = grpo.GRPOSettings(num_generations=2, max_new_tokens=4)
    batch, width = grpo.update_batch(ro, np.zeros(4), s, max_width=64, pad_id=0, local=slice(0, 4), shared=True)
    # the rows' width as the row layout's (the training tokens); prompts left-padded to 16; completions 4 wide (the
    # longest, 3, rounded up to 16, at most max_new_tokens = 4): each group's prompt once, 3 fed-back tokens a row
    assert width == 16 and grpo_rows.forward_positions(batch, 2) == 2 * 16 + 4 * 3 and "tokens" not in batch
    assert batch["prompt_tokens"].shape == (4, 16) and batch["completion_inputs"].shape == (4, 3)
    np.testing.assert_array_equal(batch["prompt_tokens"][1, -5:], [0, 1, 5, 6, 7])
    np.testing.assert_array_equal(batch["prompt_positions"][2, -3:], [0, 0, 1])
    np.testing.assert_array_equal(batch["prompt_mask"][2, -3:], [False, True, True])
    np.testing.assert_array_equal(batch["completion_inputs"][1], [9, 9, 2])
    np.testing.assert_array_equal(batch["completion_positions"][1], [4, 5, 6])
    np.testing.assert_array_equal(batch["completion_attention"][2], [True, False, False])
    np.testing.assert_array_equal(batch["targets"][1], [9, 9, 2, 0])
    np.testing.assert_array_equal(batch["completion_mask"][3], [1, 1, 0, 0])


def test_shared_prompts_only_where_micro_batches_hold_whole_groups():
    class T:
        grad_accum = 1
    s = grpo.GRPOSettings(num_generations=4)
    assert grpo.shared_prompts(T, s, slice(0, 16))
    assert grpo.shared_prompts(T, s, slice(8, 16)) and not grpo.shared_prompts(T, s, slice(2, 8))  # process rows
    T.grad_accum = 2
    assert grpo.shared_prompts(T, s, slice(0, 16)) and not grpo.shared_prompts(T, s, slice(0, 12))  # 6-row halves
    assert not grpo.shared_prompts(T, dataclasses.replace(s, shared_prompts=False), slice(0, 16))


@pytest.mark.parametrize("scan", [False, True])
def test_completion_logps_equal_the_full_rows_logps_at_the_completion(scan):
    """The update scores completions through `completion_logits`, on rows with `logits_at` (the LM head on the
    completion positions only) or with each group's prompt run once into a KV cache that its completions share:
    both give the log-probs of the whole rows' logits picked at the completion positions, and so the same loss and
    gradient."""
    mesh = one_device_mesh()
    ro = toy_rollout()
    settings = grpo.GRPOSettings(num_generations=2, max_new_tokens=4, beta=0.1)
    adv = np.array([1.0, -1.0, 0.5, -0.5])
    rows, _ = grpo.update_batch(ro, adv, settings, max_width=64, pad_id=0, local=slice(0, 4))
    shared, _ = grpo.update_batch(ro, adv, settings, max_width=64, pad_id=0, local=slice(0, 4), shared=True)
    with parallel.sharding_context(mesh):
        model = Decoder(TINY, scan_layers=scan, rngs=nnx.Rngs(0))
    full, _ = model(rows["tokens"], rows["positions"], attention_mask=rows["attention_mask"])
    at = rows["completion_at"]
    want = jax.nn.log_softmax(np.take_along_axis(np.asarray(full), at[..., None], axis=1), axis=-1)
    want = np.take_along_axis(np.asarray(want), rows["targets"][..., None], axis=-1)[..., 0]
    mask = rows["completion_mask"] > 0
    k = shared["targets"].shape[1]
    np.testing.assert_array_equal(shared["completion_mask"], rows["completion_mask"][:, :k])
    for batch in (rows, shared):
        keys = grpo_rows.ROW_INPUTS + grpo_rows.SHARED_INPUTS + ("targets",)
        inputs = {key: batch[key] for key in keys if key in batch}
        got = np.asarray(grpo_rows.completion_logps(*nnx.split(model), inputs, 2))
        np.testing.assert_allclose(got[mask[:, :got.shape[1]]], want[mask], rtol=1e-5, atol=1e-5)
    # the loss of the full rows (logits everywhere, picked at the completion positions)
    ref_logps = want - 0.1 * mask
    loss_fn = grpo.make_loss_fn(settings)
    index = np.arange(4)[:, None]

    def full_rows_loss(m):
        logits, _ = m(rows["tokens"], rows["positions"], attention_mask=rows["attention_mask"])
        lp = jax.nn.log_softmax(logits[index, at], axis=-1)
        lp = jnp.take_along_axis(lp, jnp.asarray(rows["targets"])[..., None], axis=-1)[..., 0]
        return losses.rl_loss(settings.loss)(lp, jax.lax.stop_gradient(lp), rows["advantages"],
                                             rows["completion_mask"], ref_logps=ref_logps, beta=0.1,
                                             epsilon_low=settings.epsilon_low, epsilon_high=settings.epsilon_high,
                                             aggregation=settings.loss_aggregation, max_len=4)[0]

    want_loss, want_grad = nnx.value_and_grad(full_rows_loss)(model)
    for batch in (rows, shared):
        batch = {**batch, "ref_logps": ref_logps[:, :batch["targets"].shape[1]]}
        (got_loss, _), got_grad = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, None)
        np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6),
                     got_grad, want_grad)


def toy_update_rows(rows=4, width=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY.vocab_size, size=(rows, width + 1)).astype(np.int32)
    half = width // 2  # the targets of the second half of each row are its completion
    at = np.tile(np.arange(half, width, dtype=np.int32), (rows, 1))
    return {"tokens": ids[:, :-1], "positions": np.tile(np.arange(width, dtype=np.int32), (rows, 1)),
            "attention_mask": np.ones((rows, width), bool), "completion_at": at, "targets": ids[:, half + 1:],
            "completion_mask": np.ones((rows, width - half), np.float32),
            "advantages": np.array([1.0, -1.0, 0.5, -0.5], np.float32)}


def test_update_runs_mu_steps_with_reference_and_recomputed_old_logprobs():
    mesh = one_device_mesh()
    settings = grpo.GRPOSettings(num_generations=2, mu=2, beta=0.1, old_logprobs="recompute", max_new_tokens=8)
    trainer = Trainer(tiny_policy(mesh), loss_fn=grpo.make_loss_fn(settings), tx=optax.sgd(0.5), mesh=mesh)
    batch = toy_update_rows()
    m = grpo.update(trainer, batch, jax.random.key(0), settings, nnx.split(tiny_policy(mesh)))
    assert trainer.opt_steps == 2  # mu optimizer updates
    # the reference (the same initial weights) and the recomputed old policy log-probs join the rows
    np.testing.assert_allclose(np.asarray(batch["old_logps"]), np.asarray(batch["ref_logps"]), atol=1e-6)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # the first update's: the policy is still the reference
    assert 0 < m["update_ratio"] and {"loss", "grad_norm", "entropy", "clip_fraction", "pg_loss"} <= set(m)
    assert "weight" not in m and "tokens" not in m
    assert m["ratio_mean"] != 1.0  # the second update's ratio moved away from 1 (mean of both)


def test_update_on_shared_prompts_with_reference_and_recomputed_old_logprobs():
    mesh = one_device_mesh()
    settings = grpo.GRPOSettings(num_generations=2, mu=2, beta=0.1, old_logprobs="recompute", max_new_tokens=4)
    trainer = Trainer(tiny_policy(mesh), loss_fn=grpo.make_loss_fn(settings), tx=optax.sgd(0.5), mesh=mesh)
    batch, _ = grpo.update_batch(toy_rollout(), np.array([1.0, -1.0, 0.5, -0.5]), settings, max_width=64, pad_id=0,
                                 local=slice(0, 4), shared=grpo.shared_prompts(trainer, settings, slice(0, 4)))
    assert "prompt_tokens" in batch
    m = grpo.update(trainer, batch, jax.random.key(0), settings, nnx.split(tiny_policy(mesh)))
    assert trainer.opt_steps == 2
    mask = batch["completion_mask"] > 0
    np.testing.assert_allclose(np.asarray(batch["old_logps"])[mask], np.asarray(batch["ref_logps"])[mask], atol=1e-6)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6) and m["ratio_mean"] != 1.0


def test_update_without_reference_has_ratio_one_and_no_kl():
    mesh = one_device_mesh()
    settings = grpo.GRPOSettings(num_generations=2, mu=1, max_new_tokens=8)
    trainer = Trainer(tiny_policy(mesh), loss_fn=grpo.make_loss_fn(settings), tx=optax.sgd(0.5), mesh=mesh)
    batch = toy_update_rows()
    m = grpo.update(trainer, batch, jax.random.key(0), settings)
    assert trainer.opt_steps == 1 and "ref_logps" not in batch and "old_logps" not in batch
    assert "kl" not in m and m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------- the GRPO job


def signal_records(answer_of, variants=2):
    """Toy verifiable task: "Signal <colour> <v>" -> the rule's letter. The trace names the signal, then a letter."""
    return [MCQRecord(id=f"{c}{v}-{a}", benchmark="toy", question=f"Signal {c} {v}", options=list(WAYS), answer=a,
                      label="reasoning", trace=f"Signal {c} {LETTERS[a]}.")
            for v in range(variants) for i, c in enumerate(COLORS) for a in answer_of(i)]


def grpo_config(tmp_path, data_path, model_dir, *, steps, mu=2, beta=0.02, lr=2e-3, generations=8):
    c = sft_config(tmp_path, data_path, model_dir, steps=steps, lr=lr, ckpt_every=5)
    c.job = "grpo"
    c.eval.system_prompt = ""
    c.grpo.train_path = str(data_path)
    c.grpo.num_generations = generations
    c.grpo.prompts_per_step = 8
    c.grpo.max_new_tokens = 16
    c.grpo.mu = mu
    c.grpo.beta = beta
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"
    return c


def sampled_accuracy(model_dir, records, n=32):
    """Accuracy of temperature-1 samples of the policy in model_dir on records (n samples each)."""
    from transformers import AutoTokenizer

    from medkr_jax.eval.prompts import build_prompt, encode
    from medkr_jax.models.hf import load_decoder

    model, cfg = load_decoder(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [encode(tok, build_prompt(tok, r, system_prompt="")) for r in records]
    out = Sampler(cfg, pad_id=tok.pad_token_id, stop_ids=(tok.eos_token_id,)).generate(
        model, prompts, max_new_tokens=16, temperature=1.0, n=n, seed=123)
    texts = [tok.decode(out.row_tokens(r), skip_special_tokens=True) for r in range(len(out.lengths))]
    _, correct, _ = completion_rewards(texts, [records[j].options for j in out.prompt_index],
                                            [records[j].answer for j in out.prompt_index])
    return float(correct.mean())


@pytest.fixture(scope="module")
def signal_world(tmp_path_factory):
    """A tiny policy that, after a short SFT, writes "Signal <colour> <letter>.\\nThe answer is <letter>." with the
    letter uniformly random (SFT data pairs each signal with all four letters); the RL data's rule is fixed."""
    d = tmp_path_factory.mktemp("signal_world")
    warm = signal_records(lambda i: range(4))
    write_records(str(d / "warm.jsonl"), warm)
    rule = signal_records(lambda i: [i])
    write_records(str(d / "rule.jsonl"), rule)
    from tests.test_sft import corpus_for
    make_policy_folder(d / "init", corpus_for(warm), vocab_size=400)
    c = sft_config(d, d / "warm.jsonl", d / "init", steps=250, lr=3e-3, batch=8, seq_len=96, ckpt_every=10000)
    c.eval.system_prompt = ""
    c.output_dir = str(d / "warm")
    with compilation_cache(tmp_path_factory):
        sft_job.run(c, mesh=one_device_mesh())
    return d, rule


def test_grpo_learns_a_verifiable_rule(signal_world, tmp_path, tmp_path_factory):
    d, rule = signal_world
    # 16 samples per prompt: a colour whose policy leans to a wrong letter still samples the right one (with 8,
    # one seed in three locked a colour on a wrong letter and plateaued near 0.75). lr 1e-3: seeds 0-3 in three
    # float orders (8 host devices, one device on two threads, on one) ended at mean rewards of 0.925-0.961 over
    # the last 5 steps, sampled accuracy 0.945-0.977, the format rate never below 0.86; at 2e-3 0.916-0.963 and
    # 0.926-0.992, with steps whose format rate fell to 0.43-0.75 (reward dips to 0.63-0.70)
    cfg = grpo_config(tmp_path, d / "rule.jsonl", d / "warm" / "hf", steps=20, generations=16, lr=1e-3)
    with compilation_cache(tmp_path_factory):
        before = sampled_accuracy(d / "warm" / "hf", rule)
        summary = grpo_job.run(cfg, mesh=one_device_mesh())
        after = sampled_accuracy(summary["export_dir"], rule)
    assert before <= 0.3, before
    recs = read_metrics(cfg.output_dir)
    rewards = [r["reward_mean"] for r in recs if "reward_mean" in r]
    assert rewards[0] <= 0.35 and np.mean(rewards[-5:]) >= 0.9, rewards
    assert {"kl", "clip_fraction", "entropy", "response_length", "reward_std", "accuracy", "zero_std_groups",
            "distinct_completions", "update_ratio"} <= set(recs[-1])
    # the sampler draws from the distribution the trainer differentiates: same log-probs of the same tokens
    assert max(r["logp_diff_max"] for r in recs if "logp_diff_max" in r) < 1e-4
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert max(r["clip_fraction"] for r in recs) > 0  # mu = 2: the second inner update is clipped somewhere
    assert summary["sampler_compiles"] == 3  # every rollout: one empty state, one prefill, one decode chunk
    assert after >= 0.9, after
    assert os.path.exists(os.path.join(cfg.output_dir, "reward.png"))


def test_grpo_learns_under_a_noisy_reward(signal_world, tmp_path, tmp_path_factory):
    """A reward with variance of its own: each signal's prompt is scored against its rule letter in 3 of 4 records
    and against the next letter in the 4th (the same prompt, another answer), so even the best policy earns 0.75
    on average and every group's rewards are noisy. GRPO must still find the majority letter."""
    d, _ = signal_world
    noisy = signal_records(lambda i: [i, i, i, (i + 1) % 4])
    for k, r in enumerate(noisy):
        r.id = f"{r.id}-{k}"
    write_records(str(tmp_path / "noisy.jsonl"), noisy)
    early, late, after = [], [], []
    for seed in (0, 1):  # two runs (prompt order and sampling): the thresholds hold for their mean
        cfg = grpo_config(tmp_path / f"seed{seed}", tmp_path / "noisy.jsonl", d / "warm" / "hf", steps=24,
                          generations=16)
        cfg.grpo.num_prompts = 16  # a pool of the file's first 16 questions: variant 0 of every signal
        cfg.seed = seed
        with compilation_cache(tmp_path_factory):
            summary = grpo_job.run(cfg, mesh=one_device_mesh())
            after.append(sampled_accuracy(summary["export_dir"], signal_records(lambda i: [i])))
        assert summary["prompts"] == 16
        rewards = [r["reward_mean"] for r in read_metrics(cfg.output_dir) if "reward_mean" in r]
        early.append(np.mean(rewards[:3]))
        late.append(np.mean(rewards[-5:]))
        assert late[-1] >= early[-1] + 0.15, (seed, rewards)  # every run learns something
    # seeds 0-2 measured: early 0.25-0.26, late 0.65-0.69, after 0.93-0.95
    assert np.mean(early) <= 0.35 and np.mean(late) >= 0.55, (early, late)
    assert np.mean(after) >= 0.8, after  # the majority letter, though a quarter of its rewards said otherwise


@pytest.mark.devices(8)
def test_grpo_same_losses_on_one_and_eight_devices(signal_world, tmp_path, tmp_path_factory):
    d, _ = signal_world
    curves = []
    for name, mesh in (("one", one_device_mesh()),
                       ("eight", parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}))):
        cfg = grpo_config(tmp_path / name, d / "rule.jsonl", d / "warm" / "hf", steps=2)
        with compilation_cache(tmp_path_factory):
            grpo_job.run(cfg, mesh=mesh)
        curves.append([[r[k] for k in ("reward_mean", "loss", "kl", "entropy", "grad_norm")]
                       for r in read_metrics(cfg.output_dir) if "loss" in r])
    one, eight = np.array(curves[0]), np.array(curves[1])
    np.testing.assert_array_equal(one[:, 0], eight[:, 0])  # the same rollouts
    # the GRPO loss is a near-cancelling sum of O(1) terms (advantages have zero mean per group): compare
    # it absolutely at float32 resolution of those terms; the non-cancelling metrics relatively
    np.testing.assert_allclose(one[:, 1], eight[:, 1], rtol=0, atol=2e-5)
    # step 2 already follows one Adam update, which amplifies float32 summation-order differences of tiny
    # gradient entries: 1e-3 relative
    np.testing.assert_allclose(one[:, 2:], eight[:, 2:], rtol=1e-3, atol=1e-6)


def test_visited_records_are_the_prompts_the_learner_was_given(signal_world, tmp_path, tmp_path_factory, monkeypatch):
    """grpo.visited_records (the study's "GRPO's own prompts") against the prompt batches the run's step function
    actually received."""
    from medkr_jax.train import grpo as grpo_lib

    d, _ = signal_world
    noisy = signal_records(lambda i: [i, i, (i + 1) % 4])
    for k, r in enumerate(noisy):
        r.id = f"{r.id}-{k}"
    write_records(str(tmp_path / "rl.jsonl"), noisy)
    cfg = grpo_config(tmp_path, tmp_path / "rl.jsonl", d / "warm" / "hf", steps=3, mu=1, beta=0.0, generations=2)
    seen = []
    make = grpo_lib.make_step_fn

    def recording(*args, **kwargs):
        step = make(*args, **kwargs)

        def step_fn(trainer, prompt_batch, rng):
            seen.extend(int(i) for i in np.asarray(prompt_batch["index"]))
            return step(trainer, prompt_batch, rng)
        return step_fn

    monkeypatch.setattr(grpo_lib, "make_step_fn", recording)
    with compilation_cache(tmp_path_factory):
        grpo_job.run(cfg, mesh=one_device_mesh())
    assert len(seen) == 3 * 8
    want = {noisy[i].id: n for i, n in Counter(seen).items()}
    got = {r.id: r.meta["grpo_visits"] for r in grpo_job.visited_records(cfg)}
    assert got == want


@pytest.mark.devices(8)
def test_grpo_kill9_resume_matches_uninterrupted(signal_world, tmp_path, tmp_path_factory):
    """SIGKILL a running GRPO job, rerun the same command: it resumes (policy, optimizer, prompt iterator,
    sampling seeds) and the loss curve is the uninterrupted one."""
    d, _ = signal_world
    steps = 14
    cfg = grpo_config(tmp_path / "ref", d / "rule.jsonl", d / "warm" / "hf", steps=steps)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 2, 4  # the same programs as the 8-device run above
    with compilation_cache(tmp_path_factory):
        grpo_job.run(cfg)
    want = [r["loss"] for r in read_metrics(cfg.output_dir) if "loss" in r]

    cfg.output_dir = str(tmp_path / "killed" / "run")
    write_config_file(tmp_path / "killed.py", cfg)
    killed_at = run_killed_then_resumed(tmp_path / "killed.py", cfg.output_dir, kill_after_checkpoint=5,
                                        cache_dir=cache_dir_of(tmp_path_factory))
    assert 5 <= killed_at < steps
    got = {r["step"]: r["loss"] for r in read_metrics(cfg.output_dir) if "loss" in r}
    assert sorted(got) == list(range(1, steps + 1))
    np.testing.assert_allclose([got[s] for s in range(1, steps + 1)], want, rtol=1e-5, atol=1e-6)


def test_group_advantages_numpy_and_jax_agree():
    r = np.random.default_rng(1).random(12).astype(np.float32)
    for scale in (True, False):
        a_np = losses.group_advantages(r, 4, scale=scale)
        assert isinstance(a_np, np.ndarray)
        np.testing.assert_allclose(a_np, np.asarray(losses.group_advantages(jnp.asarray(r), 4, scale=scale)),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a_np, np_advantages(r, 4, scale), rtol=1e-5, atol=1e-6)


def test_grpo_on_a_split_without_reasoning_questions_names_the_grpo_key(tmp_path):
    knowledge = [MCQRecord(id="k1", benchmark="toy", question="Signal red 0", options=list(WAYS), answer=0,
                           label="knowledge", trace="Signal red A.")]
    write_records(str(tmp_path / "k.jsonl"), knowledge)
    c = base_config()
    c.job, c.output_dir, c.grpo.train_path = "grpo", str(tmp_path / "run"), str(tmp_path / "k.jsonl")
    with pytest.raises(sft.SFTDataError, match=r"config\.grpo\.reasoning_only=True .* set config\.grpo\.reasoning"):
        grpo_job.run(c)  # the questions are checked before any model is loaded


# -------------------------------------------------------------- the GRPO family learns the rule (by name)


def learner_rewards(model_dir, records, settings, *, steps, prompts_per_step=8, lr=1e-3, seed=0, lora_rank=0,
                    reference=None):
    """Per-step metrics of the GRPO learner alone (the job's pieces without checkpoints, export or report) from
    the policy in model_dir on `records`, with the job's optimizer (AdamW, clipping) at a constant `lr`; with
    `lora_rank` > 0 on adapters of that rank (the base frozen)."""
    from medkr_jax.eval.prompts import stop_token_ids
    from medkr_jax.jobs.training import optimizer_settings
    from medkr_jax.train.optim import make_optimizer

    mesh = one_device_mesh()
    model, cfg, tok, _ = sft.load_policy(str(model_dir), mesh=mesh, rules=None)
    model = lora.apply_lora(model, lora.LoRASettings(rank=lora_rank, alpha=2.0 * lora_rank), mesh=mesh)
    examples = [traces.make_example(r, "plain", np.random.default_rng(0)) for r in records]
    ps = grpo.build_prompts(examples, tok, system_prompt="", max_new_tokens=settings.max_new_tokens)
    stop = stop_token_ids(tok, cfg.eos_token_ids)
    sampler = Sampler(cfg, mesh=mesh, pad_id=tok.pad_token_id, stop_ids=stop)
    c = base_config()
    c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.schedule = lr, 0, "constant"
    trainer = Trainer(model, loss_fn=grpo.make_loss_fn(settings), mesh=mesh,
                      tx=make_optimizer(optimizer_settings(c), steps * settings.mu))
    rows = prompts_per_step * settings.num_generations
    step_fn = grpo.make_step_fn(sampler, tok, ps, settings, pad_id=tok.pad_token_id, local=slice(0, rows),
                                reference=reference)
    batches = iter(grpo.prompt_batches(len(examples), prompts_per_step, seed=seed))
    return [step_fn(trainer, next(batches), jax.random.fold_in(jax.random.key(seed), s)) for s in range(steps)]


# each variant by its name; DAPO with its rollout side (dynamic sampling, overlong penalty over the last 4 of the
# 16 new tokens: the rule's completions are ~10 tokens, so the band costs only rambling ones)
VARIANTS = {"grpo": {}, "dr_grpo": {}, "gspo": {},
            "dapo": {"dynamic_sampling_rounds": 2, "overlong_buffer": 4, "overlong_penalty": 0.5}}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_grpo_variant_raises_the_training_reward(signal_world, tmp_path_factory, name):
    """From the warm policy (reward ~0.25: a random letter) every loss by name, mu = 2, learns the rule: over two
    seeds (prompt order and sampling) the reward rises by 0.3 on average, and by 0.15 in each run.

    Measured at the learning rate used, 1e-3: seeds 0-3, every loss, in three float orders (8 host devices as in
    CI, one device on two threads, one device on one thread), 48 runs: rises of 0.40-0.67 (mean 0.56), the format
    rate never below 0.83. At 2e-3 (this test's rate until then) the same 48 runs rose by 0.13-0.69 (mean 0.53):
    four rose less than 0.3 and two collapsed within one or two steps from rewards of 0.83-0.88 to 0.02-0.11, the
    policy no longer closing its answer (format rate 0.06 / 0.14, completions at the 16-token cap) after an update of
    ordinary size (grad norm 0.33, sampler and trainer log-probs within 3e-6); one such run (DR-GRPO, seed 1, one
    device on two threads) failed this test, whose outcome then depended on the float order."""
    d, rule = signal_world
    settings = grpo.GRPOSettings(num_generations=8, max_new_tokens=16, mu=2, loss=name, **VARIANTS[name])
    rises, extra_prompts = [], 0
    for seed in (0, 1):
        with compilation_cache(tmp_path_factory):
            recs = learner_rewards(d / "warm" / "hf", rule, settings, steps=12, seed=seed)
        extra_prompts += sum(r.get("extra_prompts", 0) for r in recs)
        rewards = [r["reward_mean"] for r in recs]
        assert np.mean(rewards[:2]) <= 0.4, (seed, rewards)  # the warm policy guesses
        rises.append(np.mean(rewards[-3:]) - np.mean(rewards[:2]))
        assert rises[-1] >= 0.15, (seed, rewards)
        for r in recs:  # a rollout of 64 rows runs in 64 slots, at most 16 steps a draw
            assert r["rollout_decode_steps"] * 64 * r["rollout_occupancy"] == pytest.approx(r["tokens"])
            assert 0 < r["rollout_decode_steps"] <= 16 * r.get("sampling_rounds", 1)
    assert np.mean(rises) >= 0.3, rises
    if name == "dapo":
        assert {"groups_dropped", "extra_prompts", "sampling_rounds", "padding_groups", "overlong_penalty",
                "overlong_rate"} <= set(recs[-1])
        assert extra_prompts > 0  # some step's groups all agreed and were refilled


# ------------------------------------------------------------------------------------- LoRA (models/lora.py)


def test_lora_grpo_raises_the_reward_against_the_base_as_reference(signal_world, tmp_path_factory):
    """LoRA adapters on the frozen warm policy learn the rule with GRPO; the KL reference (beta > 0) is the job's
    reference for a LoRA policy, the base with the adapters off: 0 at the start (the adapters start as a no-op),
    growing as the adapters move, and the job loads no second copy of the weights for it.

    At the learning rate used, 5e-3: seeds 0-3 in the three float orders of the test above, 12 runs, rose by
    0.56-0.66, the format rate never below 0.80. At 1e-2 (this test's rate until then) they rose by 0.45-0.60
    while two collapsed for a step (format rate 0.16 and 0.28, reward 0.08 and 0.16) and recovered."""
    d, rule = signal_world
    settings = grpo.GRPOSettings(num_generations=8, max_new_tokens=16, mu=2, loss="dapo", beta=0.04)
    c = base_config()
    c.lora.rank = 8
    assert grpo_job._reference(c, settings, None, None) is grpo_job._base_policy  # no load_decoder call
    with compilation_cache(tmp_path_factory):
        recs = learner_rewards(d / "warm" / "hf", rule, settings, steps=12, lr=5e-3, lora_rank=8,
                               reference=grpo_job._base_policy)
    rewards, kl = [r["reward_mean"] for r in recs], [r["kl"] for r in recs]
    print(f"LoRA-GRPO rewards {np.round(rewards, 2).tolist()}, kl {np.round(kl, 4).tolist()}")
    assert np.mean(rewards[:2]) <= 0.4 and np.mean(rewards[-3:]) >= np.mean(rewards[:2]) + 0.3, rewards
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and max(kl[-3:]) > 1e-4, kl


def test_lora_sft_learns_checkpoints_adapters_exports_and_resumes(signal_world, tmp_path, tmp_path_factory,
                                                                  monkeypatch):
    """LoRA-SFT of the warm policy on the rule: the loss falls; the checkpoint holds the adapters and their
    optimizer state, no base weight; the export job rebuilds the job's merged and PEFT folders from the base and
    that checkpoint; a run that dies during step 6 and is rerun resumes from its step-4 checkpoint (the base
    reloaded from the model folder, adapters, optimizer state and data position from the checkpoint) with the
    uninterrupted loss curve, dropout on. (The kill -9 path of the same loop and checkpointer: test_sft.py.)"""
    d, _ = signal_world
    steps = 12
    cfg = sft_config(tmp_path / "ref", d / "rule.jsonl", d / "warm" / "hf", steps=steps, lr=1e-2, batch=8,
                     seq_len=96, ckpt_every=4)
    cfg.eval.system_prompt = ""
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 8, 16.0, 0.05
    with compilation_cache(tmp_path_factory):
        summary = sft_job.run(cfg, mesh=one_device_mesh())
        recs = [r for r in read_metrics(cfg.output_dir) if "loss" in r]
        want = [r["loss"] for r in recs]
        print(f"LoRA-SFT losses {np.round(want, 3).tolist()}")
        assert np.mean(want[-3:]) < 0.6 * np.mean(want[:3]), want
        meta = (tmp_path / "ref" / "run" / "checkpoints" / str(steps) / "state" / "_METADATA").read_text()
        assert "lora_a" in meta and "kernel" not in meta and "embedding" not in meta
        check_export_job_matches(cfg, summary, tmp_path)

        class Crash(Exception):
            pass

        def crashing_step(trainer, batch, rng):
            if trainer.opt_steps == 5:
                raise Crash()
            return trainer.update(batch, rng)

        cfg.output_dir = str(tmp_path / "crashed" / "run")
        with monkeypatch.context() as m:
            m.setattr(loop, "default_step_fn", crashing_step)
            with pytest.raises(Crash):
                sft_job.run(cfg, mesh=one_device_mesh())
        resumed = sft_job.run(cfg, mesh=one_device_mesh())
    assert resumed["resumed"] and resumed["start_step"] == 4
    got = {r["step"]: r["loss"] for r in read_metrics(cfg.output_dir) if "loss" in r}
    assert sorted(got) == list(range(1, steps + 1))
    np.testing.assert_allclose([got[s] for s in range(1, steps + 1)], want, rtol=1e-5, atol=1e-6)


def check_export_job_matches(cfg, summary, tmp_path):
    """The export job on the run's checkpoint (base from config.model.path) writes the job's own exports."""
    from safetensors.numpy import load_file

    from medkr_jax.jobs import export as export_job

    c = cfg.copy_and_resolve_references()
    c.job, c.export.out_dir, c.lora.peft_dir = "export", str(tmp_path / "again"), str(tmp_path / "again_peft")
    again = export_job.run(c)
    assert again["step"] == cfg.train.steps and again["adapter_params"] == summary["adapter_params"] > 0
    for first, second in ((os.path.join(summary["export_dir"], "model.safetensors"), tmp_path / "again"
                           / "model.safetensors"),
                          (os.path.join(summary["peft_dir"], "adapter_model.safetensors"), tmp_path / "again_peft"
                           / "adapter_model.safetensors")):
        a, b = load_file(first), load_file(str(second))
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
