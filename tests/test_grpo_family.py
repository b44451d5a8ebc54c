"""The GRPO family by name (train/losses.py): each loss name's defaults as TRL names them, GSPO and GSPO-token
against a NumPy reference written from the GSPO paper's formula, rows without completion tokens counted in no
denominator, DAPO's overlong penalty and dynamic sampling (train/rewards.py, train/grpo.py) by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medkr_jax.sampling import SampleOutput
from medkr_jax.train import grpo, losses
from medkr_jax.train.rewards import overlong_penalty
from tests.test_grpo import np_advantages, np_grpo, toy_prompt_set

# TRL's GRPOConfig semantics of each name: loss_type "grpo" = per-sequence token mean, then the mean over
# sequences; "bnpo" / "dapo" = token-level; "dr_grpo" = sum / (rows * max_completion_length); GSPO =
# importance_sampling_level "sequence" with loss_type "grpo" and the GSPO paper's clip 3e-4 / 4e-4; DAPO's
# clip-higher 0.28; Dr. GRPO's advantages without std scaling.
PRESETS = {"grpo": ("sequence", 0.2, 0.2, "grpo"), "bnpo": ("token", 0.2, 0.2, "grpo"),
           "dapo": ("token", 0.2, 0.28, "grpo"), "dr_grpo": ("constant", 0.2, 0.2, "dr_grpo"),
           "gspo": ("sequence", 3e-4, 4e-4, "grpo"), "gspo_token": ("sequence", 3e-4, 4e-4, "grpo")}


def np_gspo(logp, old, ref, adv, mask, beta, el, eh):
    """GSPO (paper eq. 5-7), float64: s_i = exp(mean_t (logp - old)), -min(s_i A_i, clip(s_i) A_i) per sequence
    plus beta * the sequence's mean k3 KL, averaged over sequences with a completion token; and d loss / d logp."""
    b, t = logp.shape
    m = mask.astype(np.float64)
    n = m.sum(1)
    rows = (n > 0).sum()
    loss, grad = 0.0, np.zeros((b, t))
    for i in range(b):
        if n[i] == 0:
            continue
        s = np.exp(((logp[i] - old[i]) * m[i]).sum() / n[i])
        unclipped, clipped = s * adv[i], min(max(s, 1 - el), 1 + eh) * adv[i]
        d = ref[i] - logp[i]
        loss += (-min(unclipped, clipped) + beta * ((np.exp(d) - d - 1) * m[i]).sum() / n[i]) / rows
        active = unclipped <= clipped or 1 - el <= s <= 1 + eh  # the gradient flows through the unclipped term
        grad[i] = ((-adv[i] * s if active else 0.0) + beta * (1 - np.exp(d))) * m[i] / n[i] / rows
    return loss, grad


def batch(seed, b=8, t=6, spread=0.3):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 0.5, size=(b, t))
    logp = old + rng.normal(0, spread, size=(b, t))
    ref = old + rng.normal(0, 0.3, size=(b, t))
    lengths = rng.integers(1, t + 1, size=b)
    lengths[3] = 0  # a row without completion tokens
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    adv = np_advantages(rng.random(b).astype(np.float32), 4, True)
    return logp, old, ref, adv, mask


def value_and_grad(name, logp, old, ref, adv, mask, **options):
    def f(lp):
        return losses.rl_loss(name)(lp, jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
                                    jnp.asarray(mask), ref_logps=jnp.asarray(ref, jnp.float32), **options)[0]
    loss, grad = jax.value_and_grad(f)(jnp.asarray(logp, jnp.float32))
    return float(loss), np.asarray(grad)


def test_each_name_stands_for_trls_semantics():
    assert {k: (v.aggregation, v.epsilon_low, v.epsilon_high, v.advantage)
            for k, v in losses.RL_LOSSES.items()} == PRESETS
    assert set(losses.ADVANTAGES) == {"grpo", "dr_grpo"}


@pytest.mark.parametrize("name", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_token_ratio_losses_by_name_match_numpy(name):
    agg, el, eh, _ = PRESETS[name]
    logp, old, ref, adv, mask = batch(1)
    loss, grad = value_and_grad(name, logp, old, ref, adv, mask, beta=0.04, max_len=9)
    want_loss, want_grad = np_grpo(logp, old, ref, adv, mask, 0.04, el, eh, agg, 9)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
@pytest.mark.parametrize("beta, el, eh", [(0.0, None, None), (0.04, 0.05, 0.08)])
def test_gspo_and_gspo_token_match_the_papers_formula(name, beta, el, eh):
    logp, old, ref, adv, mask = batch(2, spread=0.15)
    clip = {} if el is None else {"epsilon_low": el, "epsilon_high": eh}
    el, eh = (el, eh) if el is not None else PRESETS[name][1:3]
    s = np.exp(((logp - old) * mask).sum(1) / np.maximum(mask.sum(1), 1))
    live = mask.sum(1) > 0
    if el > 1e-3:  # both clip branches are exercised (at the paper's 3e-4 / 4e-4 every row here is clipped)
        outside = (s < 1 - el) | (s > 1 + eh)
        assert outside[live].any() and (~outside[live]).any(), s
    loss, grad = value_and_grad(name, logp, old, ref, adv, mask, beta=beta, **clip)
    want_loss, want_grad = np_gspo(logp, old, ref, adv, mask, beta, el, eh)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-3, atol=1e-6)
    # the sequence ratio is not the token ratio: GSPO's gradient differs from token-level GRPO's
    _, token_grad = value_and_grad("grpo", logp, old, ref, adv, mask, beta=beta, epsilon_low=el, epsilon_high=eh)
    assert np.abs(token_grad - grad).max() > 1e-3


def test_gspo_numpy_reference_agrees_with_central_differences():
    logp, old, ref, adv, mask = batch(3, spread=0.15)
    _, g = np_gspo(logp, old, ref, adv, mask, 0.04, 0.05, 0.08)
    h = 1e-6
    for i, j in [(0, 0), (1, 2), (5, 0), (7, 1)]:
        if not mask[i, j]:
            continue
        up, down = logp.copy(), logp.copy()
        up[i, j] += h
        down[i, j] -= h
        fd = (np_gspo(up, old, ref, adv, mask, 0.04, 0.05, 0.08)[0]
              - np_gspo(down, old, ref, adv, mask, 0.04, 0.05, 0.08)[0]) / (2 * h)
        assert fd == pytest.approx(g[i, j], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_row_without_completion_tokens_changes_nothing(name):
    """Sequence and constant modes count non-empty rows only: an empty row leaves the loss and the others'
    gradients as they are (it used to scale them by (B - 1) / B)."""
    logp, old, ref, adv, mask = batch(4)
    keep = mask.sum(1) > 0
    loss, grad = value_and_grad(name, logp, old, ref, adv, mask, beta=0.04, max_len=9)
    loss_without, grad_without = value_and_grad(name, logp[keep], old[keep], ref[keep], adv[keep], mask[keep],
                                                 beta=0.04, max_len=9)
    assert loss == pytest.approx(loss_without, rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(grad[keep], grad_without, rtol=1e-5, atol=1e-8)
    assert not grad[~keep].any()
    weight = losses.aggregation_weight(jnp.asarray(mask), PRESETS[name][0])
    assert float(weight) == (mask.sum() if PRESETS[name][0] == "token" else keep.sum())


def test_settings_take_the_loss_defaults_and_refuse_bad_values():
    s = grpo.GRPOSettings(loss="gspo")
    assert (s.loss_aggregation, s.epsilon_low, s.epsilon_high, s.advantage) == ("sequence", 3e-4, 4e-4, "grpo")
    s = grpo.GRPOSettings(loss="dapo", epsilon_high=0.3, advantage="dr_grpo")
    assert (s.loss_aggregation, s.epsilon_low, s.epsilon_high, s.advantage) == ("token", 0.2, 0.3, "dr_grpo")
    with pytest.raises(ValueError, match=r"config\.grpo\.loss_aggregation: .* got 'mean'"):
        grpo.GRPOSettings(loss_aggregation="mean")
    with pytest.raises(ValueError, match=r"config\.grpo\.epsilon_low"):
        grpo.GRPOSettings(epsilon_low=1.5)
    with pytest.raises(ValueError, match=r"config\.grpo\.overlong_buffer: .*max_new_tokens=16 tokens, got 17"):
        grpo.GRPOSettings(max_new_tokens=16, overlong_buffer=17)
    with pytest.raises(ValueError, match=r"config\.grpo\.dynamic_sampling_rounds"):
        grpo.GRPOSettings(dynamic_sampling_rounds=-1)


# ------------------------------------------------------------------------------------ DAPO's rollout side


def test_overlong_penalty_by_hand():
    # DAPO eq. 13 with L_max = 16, L_cache = 4: no penalty up to 12 tokens, then linear to -penalty at 16
    lengths = np.array([1, 12, 13, 14, 16])
    np.testing.assert_allclose(overlong_penalty(lengths, max_new_tokens=16, buffer=4),
                               [0, 0, -0.25, -0.5, -1.0])
    np.testing.assert_allclose(overlong_penalty(lengths, max_new_tokens=16, buffer=4, penalty=0.5),
                               [0, 0, -0.125, -0.25, -0.5])
    assert not overlong_penalty(lengths, max_new_tokens=16, buffer=0).any()


def scored(rewards, prompt_ids, group=2, tag=0):
    """A hand-made rollout of len(prompt_ids) prompts x `group` rows with the given rewards; row r's tokens
    are [tag * 100 + r] so merged rows can be traced back."""
    ps = toy_prompt_set(6)
    r = len(rewards)
    samples = SampleOutput(tokens=(tag * 100 + np.arange(r, dtype=np.int32))[:, None],
                           logprobs=-np.ones((r, 1), np.float32), lengths=np.ones(r, np.int32),
                           prompt_index=np.repeat(np.arange(len(prompt_ids), dtype=np.int32), group))
    ro = grpo.Rollout(samples, [f"t{tag}.{i}" for i in range(r)], [ps.ids[i] for i in prompt_ids],
                      [ps.examples[i] for i in prompt_ids])
    rw = np.asarray(rewards, np.float32)
    return ro, {"reward": rw, "correct": rw, "formatted": np.ones(r, np.float32), "overlong": np.zeros(r, np.float32)}


class Draws:
    """draw(indices, seed) for dynamic_sampling: hands out the given rollouts in turn and records the calls."""

    def __init__(self, *rollouts):
        self.rollouts, self.calls = list(rollouts), []

    def __call__(self, indices, seed):
        self.calls.append((sorted(int(i) for i in indices), seed))
        rewards = self.rollouts.pop(0)
        return scored(rewards, list(indices), tag=len(self.calls))


def test_dynamic_sampling_refills_from_prompts_not_yet_drawn():
    first = scored([1, 1, 0, 1], [0, 1])  # prompt 0's group: equal rewards (dropped); prompt 1's: signal
    draws = Draws([0, 0, 1, 0])           # the next batch: again one dropped, one kept
    s = grpo.GRPOSettings(num_generations=2, dynamic_sampling_rounds=3)
    ro, sc, train_rows, m = grpo.dynamic_sampling(draws, first, [0, 1], s, num_prompts=6, seed=5)
    assert len(draws.calls) == 1  # enough signal after one more batch: no further rounds
    (indices, seed), = draws.calls
    assert len(indices) == 2 and not set(indices) & {0, 1} and seed != 5
    np.testing.assert_array_equal(ro.samples.tokens[:, 0], [2, 3, 102, 103])  # prompt 1's rows, then the new ones
    np.testing.assert_array_equal(ro.samples.prompt_index, [0, 0, 1, 1])
    assert ro.prompts[0] == first[0].prompts[1] and ro.examples[0] is first[0].examples[1]
    assert ro.texts == ["t0.2", "t0.3", "t1.2", "t1.3"]
    np.testing.assert_array_equal(sc["reward"], [0, 1, 1, 0])
    np.testing.assert_array_equal(train_rows, [1, 1, 1, 1])
    assert m == {"sampling_rounds": 2, "extra_prompts": 2, "groups_dropped": 2, "padding_groups": 0}


def test_dynamic_sampling_fills_a_short_batch_with_groups_the_loss_leaves_out():
    first = scored([1, 1, 0, 1], [0, 1])
    draws = Draws([0, 0, 1, 1])  # nothing but equal rewards
    s = grpo.GRPOSettings(num_generations=2, dynamic_sampling_rounds=1)
    ro, sc, train_rows, m = grpo.dynamic_sampling(draws, first, [0, 1], s, num_prompts=3, seed=5)
    assert sorted(draws.calls[0][0]) == [0, 2] or sorted(draws.calls[0][0]) == [1, 2]  # the pool's last fresh
    np.testing.assert_array_equal(ro.samples.tokens[:, 0], [2, 3, 0, 1])
    np.testing.assert_array_equal(train_rows, [1, 1, 0, 0])
    assert m == {"sampling_rounds": 2, "extra_prompts": 2, "groups_dropped": 3, "padding_groups": 1}
    adv = grpo.advantages(sc["reward"], s)
    b, _ = grpo.update_batch(ro, adv, s, max_width=16, pad_id=0, local=slice(0, 4), train_rows=train_rows)
    assert b["completion_mask"][:2].sum() == 2 and not b["completion_mask"][2:].any()
    # with every group informative there is nothing to draw
    draws = Draws()
    ro, sc, train_rows, m = grpo.dynamic_sampling(draws, scored([0, 1, 1, 0], [0, 1]), [0, 1], s, num_prompts=6,
                                                  seed=5)
    assert not draws.calls and m["sampling_rounds"] == 1 and train_rows.all()

