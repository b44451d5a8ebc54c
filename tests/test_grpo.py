"""GRPO objective and SFT loss vs independent NumPy implementations written from the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medkr_jax.train import losses


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
    if agg == "token":
        w = m / m.sum()
    elif agg == "sequence":
        w = m / m.sum(1, keepdims=True) / b
    else:
        w = m / (b * max_len)
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
