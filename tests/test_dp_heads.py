"""The `auto` DP head plan and full-batch DP-GD: accountant-exact budgets, public-only decisions, oracles."""

import inspect
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from fedtl.client.training import train_model
from fedtl.shared.dp_heads import (
    MAX_CENTER_NOISE_NORM,
    MAX_MEAN_NOISE_NORM,
    PROJECTION_DIMS,
    clipped_gradient_sum,
    mean_noise,
    plan_dp_head,
    train_full_batch,
)
from fedtl.shared.errors import ConfigError, PrivacyBudgetError
from fedtl.shared.heads import build_head
from fedtl.shared.privacy import PrivacyStep, compute_epsilon, find_noise_multiplier
from fedtl.shared.secure_dp_sgd import head_inputs

DELTA = 1e-5


def _plan(eps, sizes=(230, 230, 229, 229, 229), **kw):
    return plan_dp_head(
        target_epsilon=eps, target_delta=DELTA, site_sizes=sizes, feature_dim=1280, num_classes=10, **kw
    )


@pytest.mark.parametrize("eps", [1.0, 3.0, 8.0])
def test_the_planned_releases_spend_the_target_epsilon_by_the_accountant(eps):
    plan = _plan(eps)
    spent = compute_epsilon(plan.releases(), delta=DELTA)
    assert spent == pytest.approx(plan.epsilon)
    assert eps - 0.02 < spent <= eps
    assert plan.num_rounds * plan.local_steps == plan.steps


def test_the_plan_spends_only_what_the_ledger_leaves():
    earlier = [PrivacyStep(5.0, 0.25, 10)]
    spent = compute_epsilon(earlier, delta=DELTA)
    assert 0 < spent < 3.0
    plan = _plan(3.0, history=earlier)
    assert compute_epsilon(earlier + plan.releases(), delta=DELTA) <= 3.0
    assert plan.noise_multiplier > _plan(3.0).noise_multiplier
    with pytest.raises(PrivacyBudgetError, match="already spent"):
        _plan(spent, history=earlier)


def test_the_plan_reads_only_public_inputs_and_is_deterministic():
    public = {"target_epsilon", "target_delta", "site_sizes", "feature_dim", "num_classes", "history", "accountant"}
    public |= {"rounds"}  # the run config's num-rounds
    assert set(inspect.signature(plan_dp_head).parameters) == public
    assert _plan(3.0) == _plan(3.0)


@pytest.mark.parametrize(("rounds", "local_steps"), [(1, 50), (2, 25), (3, 17), (10, 5), (60, 1)])
def test_the_configured_rounds_split_at_least_50_steps_with_the_same_lr_times_steps(rounds, local_steps):
    plan, default = _plan(3.0, rounds=rounds), _plan(3.0)
    assert (plan.num_rounds, plan.local_steps, plan.steps) == (rounds, local_steps, rounds * local_steps)
    assert plan.learning_rate * plan.steps == pytest.approx(default.learning_rate * default.steps)
    assert compute_epsilon(plan.releases(), delta=DELTA) == pytest.approx(plan.epsilon) and plan.epsilon <= 3.0


def test_the_projection_dim_follows_the_noise_in_a_mean_of_unit_vectors():
    for eps in (0.5, 1.0, 3.0, 8.0):
        plan = _plan(eps)
        sigma = find_noise_multiplier(target_epsilon=eps, target_delta=DELTA, sample_rate=1.0, steps=1)
        eta = sigma * math.sqrt(5) / 1147
        assert plan.mean_noise == pytest.approx(eta)
        fitting = [k for k in PROJECTION_DIMS if eta * math.sqrt(k) <= MAX_MEAN_NOISE_NORM]
        assert plan.projection_dim == (max(fitting) if fitting else min(PROJECTION_DIMS))
        assert plan.max_grad_norm == 0.25
        assert plan.learning_rate * plan.steps * plan.max_grad_norm == pytest.approx(min(1.5 / eta, 3000.0))
    assert _plan(1.0).projection_dim < _plan(8.0).projection_dim


def test_the_centre_is_released_only_when_its_noise_is_small_enough_decided_before_releasing():
    big = _plan(3.0)
    assert big.center_noise_multiplier is not None and len(big.releases()) == 2
    tiny = plan_dp_head(target_epsilon=0.3, target_delta=DELTA, site_sizes=[20, 20], feature_dim=64, num_classes=2)
    expected_norm = find_noise_multiplier(target_epsilon=0.3, target_delta=DELTA, sample_rate=1.0, steps=1) / math.sqrt(
        0.1
    )
    expected_norm *= math.sqrt(2 * tiny.projection_dim) / 40
    assert expected_norm > MAX_CENTER_NOISE_NORM
    assert tiny.center_noise_multiplier is None and len(tiny.releases()) == 1
    assert "public synthetic centre" in tiny.reason


def test_bad_site_sizes_are_refused():
    with pytest.raises(ConfigError, match="site_sizes"):
        _plan(1.0, sizes=[100, 0])


def test_mean_noise_is_the_std_of_the_pooled_mean_of_noised_site_sums():
    rng = np.random.default_rng(0)
    sizes, sigma = [30, 50, 20], 2.0
    means = [sum(rng.normal(0, sigma, 4000) for _ in sizes) / sum(sizes)]
    assert np.std(means) == pytest.approx(mean_noise(noise_multiplier=sigma, site_sizes=sizes), rel=0.05)


def test_clipped_gradients_equal_per_example_autograd_then_clipping():
    rng = np.random.default_rng(1)
    u, y = rng.normal(size=(7, 5)), rng.integers(0, 3, 7)
    w, b = rng.normal(size=(3, 5)), rng.normal(size=3)
    gw, gb = clipped_gradient_sum(u, y, w, b, max_grad_norm=0.3)
    want_w, want_b = np.zeros_like(w), np.zeros_like(b)
    for i in range(7):
        tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
        loss = torch.nn.functional.cross_entropy((torch.tensor(u[i]) @ tw.T + tb)[None], torch.tensor([y[i]]))
        loss.backward()
        norm = math.sqrt(float(tw.grad.square().sum() + tb.grad.square().sum()))
        want_w += tw.grad.numpy() * min(1.0, 0.3 / norm)
        want_b += tb.grad.numpy() * min(1.0, 0.3 / norm)
    assert np.allclose(gw, want_w) and np.allclose(gb, want_b)


def test_noiseless_full_batch_dp_gd_equals_opacus_dp_sgd_at_sample_rate_one():
    rng = np.random.default_rng(2)
    u = rng.normal(size=(40, 6))
    u /= np.linalg.norm(u, axis=1, keepdims=True)  # the Head's normalisation then leaves them unchanged
    y = rng.integers(0, 3, 40)
    head = build_head("linear", 6, 3, seed=0)
    w0 = head.layers[0].weight.detach().double().numpy().copy()
    b0 = head.layers[0].bias.detach().double().numpy().copy()
    result = train_model(
        head,
        u.astype(np.float32),
        y,
        epochs=4,
        batch_size=40,
        learning_rate=0.5,
        max_grad_norm=0.2,
        noise_multiplier=0.0,
        seed=0,
    )
    assert result.sample_rate == 1.0 and result.steps == 4
    w, b = train_full_batch(u, y, w0, b0, steps=4, learning_rate=0.5, max_grad_norm=0.2, noise_multiplier=0.0, rng=rng)
    assert np.allclose(result.arrays["layers.0.weight"], w, atol=1e-5)
    assert np.allclose(result.arrays["layers.0.bias"], b, atol=1e-5)


def test_the_projected_head_trains_its_weights_only_as_dp_gd_without_a_bias_does():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 9)), rng.integers(0, 3, 40)
    projection, centre = np.linalg.qr(rng.normal(size=(9, 4)))[0].T, rng.normal(scale=0.1, size=4)

    def trained(epochs: int, noise_multiplier: float) -> dict:
        head = build_head("projected", 9, 3, projection_dim=4, seed=0)
        head.projection.copy_(torch.tensor(projection, dtype=torch.float32))
        head.center.copy_(torch.tensor(centre, dtype=torch.float32))
        # clip 0.3 binds: per-example norms are ||p - y|| <= sqrt(2)
        kw = {"batch_size": 40, "learning_rate": 2.0, "max_grad_norm": 0.3, "seed": 0}
        return train_model(head, x.astype(np.float32), y, epochs=epochs, noise_multiplier=noise_multiplier, **kw).arrays

    u = head_inputs(x, center=centre, projection=projection)
    zero = (np.zeros((3, 4)), np.zeros(3))
    w, b = train_full_batch(
        u, y, *zero, steps=6, learning_rate=2.0, max_grad_norm=0.3, noise_multiplier=0.0, rng=rng, fit_bias=False
    )
    assert np.abs(w).max() > 0.05 and np.all(b == 0.0)
    exact = trained(6, 0.0)
    assert np.allclose(exact["layers.0.weight"], w, atol=1e-5)
    assert np.all(exact["layers.0.bias"] == 0.0)  # held: no gradient, no noise
    noisy = trained(2, 1.0)
    assert np.all(noisy["layers.0.bias"] == 0.0) and np.abs(noisy["layers.0.weight"]).max() > 0


def test_noiseless_unclipped_dp_gd_converges_to_scikit_learns_logistic_regression():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 150)
    u = rng.normal(size=(150, 2)) + np.array([[0.0, 0.0], [1.0, 0.5], [0.0, 1.0]])[y]  # overlapping classes
    w, b = train_full_batch(
        u,
        y,
        np.zeros((3, 2)),
        np.zeros(3),
        steps=4000,
        learning_rate=2.0,
        max_grad_norm=1e9,
        noise_multiplier=0.0,
        rng=rng,
    )
    oracle = LogisticRegression(C=1e10, max_iter=10000, tol=1e-12).fit(u, y)
    logits = u @ w.T + b
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert np.allclose(probs, oracle.predict_proba(u), atol=2e-3)


def test_dp_gd_noise_has_the_documented_std_in_the_weights():
    rng = np.random.default_rng(4)
    u, y = np.zeros((50, 3)), np.zeros(50, dtype=int)  # zero inputs: the weight gradient is 0, only noise moves W
    w, _ = train_full_batch(
        u,
        y,
        np.zeros((200, 3)),
        np.zeros(200),
        steps=9,
        learning_rate=0.1,
        max_grad_norm=2.0,
        noise_multiplier=5.0,
        rng=rng,
    )
    assert np.std(w) == pytest.approx(0.1 * math.sqrt(9) * 5.0 * 2.0 / 50, rel=0.1)
