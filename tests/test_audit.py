"""The privacy audit: attack scores and metrics against independent oracles, bounds below accounted epsilon."""

import dataclasses
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from builders import round_settings
from scipy import stats
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from fedtl.cli.main import main
from fedtl.client.canaries import CANARY_SITE, add_canaries, draw_canaries
from fedtl.client.policy import PolicyRefusal, load_policy
from fedtl.client.site import site_from_policy
from fedtl.client.solvers.dp_sgd import train_round
from fedtl.client.training import steps_per_epoch, train_model
from fedtl.shared.backbones import backbone_state_dict, build_backbone, fingerprint_state_dict
from fedtl.shared.data import load_dataset, site_split
from fedtl.shared.errors import ConfigError
from fedtl.shared.heads import build_head, head_arrays
from fedtl.shared.privacy import PrivacyStep, compute_epsilon, find_noise_multiplier
from fedtl.simulations.attacks import (
    BONFERRONI,
    SPLIT,
    clopper_pearson,
    epsilon_lower_bound,
    lira_scores,
    logit_confidence,
    loss_scores,
    one_run_audit,
    one_run_epsilon,
    one_run_p_value,
    roc_auc,
    roc_curve,
    shadow_assignments,
    tpr_at_fpr,
)
from fedtl.simulations.audit import head_logits

DELTA = 1e-5


# --- metrics against sklearn ----------------------------------------------------------------------------


def _tied_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0.6, 1, 300).round(1), rng.normal(0, 1, 200).round(1)  # rounding makes ties


def test_roc_curve_auc_and_low_fpr_tpr_agree_with_sklearn():
    members, non_members = _tied_scores(0)
    truth = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    scores = np.r_[members, non_members]
    fpr, tpr, thresholds = sk_roc_curve(truth, scores, drop_intermediate=False)
    ours = roc_curve(members, non_members)
    np.testing.assert_allclose(ours.fpr, fpr)
    np.testing.assert_allclose(ours.tpr, tpr)
    np.testing.assert_allclose(ours.thresholds[1:], thresholds[1:])
    assert roc_auc(members, non_members) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    for target in (0.01, 0.05, 0.3):
        assert tpr_at_fpr(members, non_members, target) == pytest.approx(tpr[fpr <= target].max())


def test_clopper_pearson_bounds_are_where_the_binomial_tails_equal_alpha():
    lower, upper = clopper_pearson(np.array([0, 7, 30]), 30, 0.025)
    assert lower[0] == 0.0 and upper[2] == 1.0
    assert stats.binom.sf(7 - 1, 30, lower[1]) == pytest.approx(0.025)  # P[X >= 7 | p_lo] = alpha
    assert stats.binom.cdf(7, 30, upper[1]) == pytest.approx(0.025)  # P[X <= 7 | p_hi] = alpha


# --- one-run audit maths --------------------------------------------------------------------------------


def _brute_force_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al.'s bound from exact binomial sums in rationals: f(v) + 2 m delta max_i (f(v-i) - f(v)) / i."""
    q = Fraction(math.exp(eps) / (1 + math.exp(eps)))

    def tail(j: int) -> Fraction:  # P[Binomial(r, q) >= j]
        return sum((math.comb(r, i) * q**i * (1 - q) ** (r - i) for i in range(max(j, 0), r + 1)), Fraction(0))

    worst = max(((tail(v - i) - tail(v)) / i for i in range(1, v + 1)), default=Fraction(0))
    return min(float(tail(v) + 2 * m * Fraction(delta) * worst), 1.0)


@pytest.mark.parametrize(
    "m, r, v, eps, delta", [(40, 20, 15, 0.5, 1e-3), (60, 30, 30, 2.0, 1e-4), (10, 6, 1, 1.0, 0.0)]
)
def test_one_run_p_value_equals_exact_binomial_sums(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, epsilon=eps, delta=delta) == pytest.approx(
        _brute_force_p_value(m, r, v, eps, delta), rel=1e-9
    )


def test_one_run_bound_is_zero_at_chance_and_grows_with_correct_guesses():
    bounds = [one_run_epsilon(200, 100, v, delta=DELTA) for v in range(40, 101)]
    assert bounds[:11] == [0.0] * 11  # 40..50 right of 100: chance or worse refutes nothing
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
    assert bounds[-1] > bounds[30] > 0  # 100 right > 70 right > nothing


def test_one_run_bound_holds_on_randomized_response_and_has_power():
    # eps-DP randomized response on each canary's bit: every guess is right w.p. e^eps / (1 + e^eps), the
    # worst case the theorem allows, so the 95% lower bound may exceed eps in at most ~5% of audits.
    eps, m, rng = 1.0, 400, np.random.default_rng(0)
    bounds = [
        one_run_epsilon(m, m, int(rng.binomial(m, math.exp(eps) / (1 + math.exp(eps)))), delta=0.0) for _ in range(200)
    ]
    assert np.mean(np.array(bounds) > eps) <= 0.1
    assert np.median(bounds) > 0.5 * eps  # and it is no trivial bound


def test_threshold_bounds_hold_on_randomized_response():
    # A membership test that is exactly eps-DP: TPR / FPR = e^eps; both threshold-selection methods stay below eps.
    eps, rng = 1.0, np.random.default_rng(1)
    q = math.exp(eps) / (1 + math.exp(eps))
    for method in (SPLIT, BONFERRONI):
        above = []
        for trial in range(60):
            members = (rng.random(2000) < q).astype(float)
            non_members = (rng.random(2000) < 1 - q).astype(float)
            bound = epsilon_lower_bound(members, non_members, delta=DELTA, method=method, seed=trial)
            above.append(bound.epsilon > eps)
        assert np.mean(above) <= 0.1, method


def test_one_run_audit_counts_top_and_bottom_guesses():
    scores = np.array([9.0, 8.0, 7.0, 1.0, 0.5, 0.0])
    included = np.array([True, True, False, False, True, False])
    audit = one_run_audit(scores, included, delta=DELTA, guesses=(2, 2))
    assert (audit.correct, audit.tests, audit.included) == (3, 1, 3)  # 9, 8 in (right); 0.5 wrong, 0 right
    assert audit.auc == pytest.approx(roc_auc_score(included, scores))
    with pytest.raises(ConfigError, match=r"k\+ \+ k- <= 6 canaries, got \(4, 3\)"):
        one_run_audit(scores, included, delta=DELTA, guesses=(4, 3))


# --- LiRA -----------------------------------------------------------------------------------------------


def test_shadow_assignments_put_every_example_in_exactly_half_the_shadows():
    keep = shadow_assignments(8, 500, seed=3)
    assert keep.shape == (8, 500) and np.all(keep.sum(axis=0) == 4)
    with pytest.raises(ConfigError, match=r"`shadows` must be >= 2 .* got 1"):
        shadow_assignments(1, 10, seed=0)


def test_lira_scores_equal_per_example_gaussian_likelihood_ratios():
    rng = np.random.default_rng(2)
    keep = shadow_assignments(16, 30, seed=0)
    shadow = rng.normal(0, 1, (16, 30)) + 2.0 * keep  # IN confidences sit higher
    target = rng.normal(1, 1, 30)
    online = lira_scores(target, shadow, keep, online=True, global_variance=False)
    offline = lira_scores(target, shadow, keep, online=False, global_variance=False)
    for i in range(30):
        ins, outs = shadow[keep[:, i], i], shadow[~keep[:, i], i]
        expected = stats.norm.logpdf(target[i], ins.mean(), ins.std(ddof=1)) - stats.norm.logpdf(
            target[i], outs.mean(), outs.std(ddof=1)
        )
        assert online[i] == pytest.approx(expected)
        assert offline[i] == pytest.approx((target[i] - outs.mean()) / outs.std(ddof=1))
    pooled = lira_scores(target, shadow, keep, online=False, global_variance=True)
    residuals = np.concatenate([shadow[~keep[:, i], i] - shadow[~keep[:, i], i].mean() for i in range(30)])
    sd = math.sqrt((residuals**2).sum() / (len(residuals) - 30))
    np.testing.assert_allclose(pooled, (target - np.array([shadow[~keep[:, i], i].mean() for i in range(30)])) / sd)


def test_logit_confidence_is_the_log_odds_of_the_true_class_even_near_certainty():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 30.0]])
    phi = logit_confidence(logits, np.array([0, 2]))
    p = np.exp(loss_scores(logits[:1], np.array([0])))[0]  # softmax probability of the label
    assert phi[0] == pytest.approx(math.log(p / (1 - p)))
    assert phi[1] == pytest.approx(30.0 - math.log(2.0), abs=1e-12)  # p / (1 - p) = e^30 / 2, where 1 - p underflows


# --- attacks on real heads trained with the sites' loop -------------------------------------------------


def _blobs(n: int, rng: np.random.Generator, *, dim: int, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    means = np.random.default_rng(99).normal(0, 1, (classes, dim))  # one fixed task
    labels = rng.integers(0, classes, n)
    return (means[labels] + rng.normal(0, 3.0, (n, dim))).astype(np.float32), labels


def test_loss_attack_on_an_overfit_non_private_head_beats_chance_clearly():
    rng = np.random.default_rng(0)
    x, y = _blobs(40, rng, dim=64)  # 40 examples in 64 dimensions: a linear head can fit every one
    x_out, y_out = _blobs(200, rng, dim=64)
    head = build_head("linear", 64, 4)
    train_model(  # non-private: no clipping, no noise
        head, x, y, epochs=100, batch_size=40, learning_rate=4.0, max_grad_norm=None, noise_multiplier=0.0, seed=0
    )
    members, non_members = loss_scores(head_logits(head, x), y), loss_scores(head_logits(head, x_out), y_out)
    assert roc_auc(members, non_members) > 0.8
    assert epsilon_lower_bound(members, non_members, delta=DELTA).epsilon > 0


CANARY_DIM, CANARY_EPOCHS, CANARY_BATCH = 256, 20, 64


def _train_with_canaries(noise_multiplier: float | None, *, seed: int = 0):
    """Train a head on 100 examples plus the included half of 100 mislabelled canaries; return what the audit needs."""
    rng = np.random.default_rng(seed)
    x, y = _blobs(100, rng, dim=CANARY_DIM)
    cx, cy = _blobs(100, rng, dim=CANARY_DIM)
    wrong = (cy + rng.integers(1, 4, len(cy))) % 4
    included = rng.random(len(cy)) < 0.5
    train_x, train_y = np.concatenate([x, cx[included]]), np.concatenate([y, wrong[included]])
    x_out, y_out = _blobs(200, rng, dim=CANARY_DIM)
    head = build_head("linear", CANARY_DIM, 4)
    kwargs = dict(epochs=CANARY_EPOCHS, batch_size=CANARY_BATCH, learning_rate=4.0, seed=seed)
    private = noise_multiplier is not None
    result = train_model(
        head,
        train_x,
        train_y,
        max_grad_norm=1.0 if private else None,
        noise_multiplier=noise_multiplier if private else 0.0,
        **kwargs,
    )
    spent = (
        math.inf
        if noise_multiplier is None
        else compute_epsilon([PrivacyStep(noise_multiplier, result.sample_rate, result.steps)], delta=DELTA)
    )
    loss = (loss_scores(head_logits(head, x), y), loss_scores(head_logits(head, x_out), y_out))
    canary_scores = logit_confidence(head_logits(head, cx), wrong)
    return spent, loss, one_run_audit(canary_scores, included, delta=DELTA)


def test_bounds_stay_below_the_accounted_epsilon_of_a_small_epsilon_head_and_not_without_dp():
    sample_rate, per_epoch = steps_per_epoch(100 + 50, CANARY_BATCH)  # about half the 100 canaries are in
    noise = find_noise_multiplier(
        target_epsilon=1.0, target_delta=DELTA, sample_rate=sample_rate, steps=CANARY_EPOCHS * per_epoch
    )
    spent, (members, non_members), canary = _train_with_canaries(noise)
    assert 0.8 < spent <= 1.05
    for method in (SPLIT, BONFERRONI):
        assert 0 <= epsilon_lower_bound(members, non_members, delta=DELTA, method=method).epsilon < spent
    assert 0 <= canary.epsilon < spent
    # The same canaries without DP are memorised, and the one-run bound sees it: the test can fail.
    _, _, open_canary = _train_with_canaries(None)
    assert open_canary.epsilon > 1.0 > canary.epsilon


# --- canaries at the sites ------------------------------------------------------------------------------


def test_canaries_are_reproducible_mislabelled_and_appended_in_order():
    splits = load_dataset("digits", seed=0, test_fraction=0.2)
    a = draw_canaries(splits.test.labels, 10, count=50, seed=7)
    b = draw_canaries(splits.test.labels, 10, count=50, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b)))
    assert len(set(a.indices.tolist())) == 50 and np.all(a.labels != splits.test.labels[a.indices])
    assert 10 < a.included.sum() < 40
    assert not np.array_equal(a.included, draw_canaries(splits.test.labels, 10, count=50, seed=8).included)
    train = splits.train.subset(np.arange(100))
    canaried = add_canaries(train, splits.test, count=50, seed=7)
    chosen = a.indices[a.included]
    assert len(canaried) == 100 + len(chosen) and canaried.fingerprint() != train.fingerprint()
    np.testing.assert_array_equal(canaried.images[100:], splits.test.images[chosen])
    np.testing.assert_array_equal(canaried.labels[100:], a.labels[a.included])
    with pytest.raises(ConfigError, match=r"`audit-canaries` must be between 1 and the 360 images .* got 400"):
        draw_canaries(splits.test.labels, 10, count=400, seed=0)


def test_a_real_site_refuses_canaries_before_touching_its_data(tmp_path):
    from fedtl.client.admin import init_policy

    tiny = fingerprint_state_dict(backbone_state_dict(build_backbone("tiny")))
    policy = init_policy(
        tmp_path / "site.toml", site_name="hospital-a", data="digits", backbones=["tiny"], label_names=[]
    )
    site = dataclasses.replace(site_from_policy(load_policy(policy)), audit_canaries=20)
    site.backbones.install("tiny", tiny, backbone_state_dict(build_backbone("tiny")))
    head = head_arrays(build_head("linear", 32, 10, hidden=16))
    with pytest.raises(
        PolicyRefusal, match=r"site hospital-a refuses `audit-canaries = 20`: canaries are a simulation"
    ):
        train_round(site, round_settings(tiny), head, server_round=1)
    assert site.ledger.charges() == []  # refused before any charge


# --- end to end: tiny in-process runs, then `fedtl audit` -----------------------------------------------


@pytest.fixture(scope="module")
def audited_runs(tmp_path_factory) -> dict[str, dict]:
    """A DP (epsilon 1) and a non-private tiny 2-site run, both with 40 canaries, in their own fedtl home."""
    from fedtl.shared.config import RunConfig
    from fedtl.simulations.inprocess import run_inprocess

    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDTL_HOME", str(tmp_path_factory.mktemp("home-audit")))
        out = tmp_path_factory.mktemp("runs")
        for name, changes in (("dp", {"target_epsilon": 1.0}), ("open", {"non_private": True})):
            cfg = RunConfig(
                backbone="tiny", data="digits", num_rounds=1, local_epochs=2, learning_rate=2.0, batch_size=64,
                audit_canaries=40, seed=5, out=str(out), run_name=name, federated_evaluation=False, **changes,
            )  # fmt: skip
            runs[name] = run_inprocess(cfg, num_sites=2)
    return runs


def test_fedtl_audit_end_to_end_writes_reports_with_the_canary_bound(audited_runs, tmp_path, capsys):
    dp, open_ = audited_runs["dp"], audited_runs["open"]
    out = tmp_path / "compare"
    assert main(["audit", dp["model"], open_["model"], "--shadows", "2", "--out", str(out)]) == 0
    splits = load_dataset("digits", seed=5, test_fraction=0.2)
    drawn = draw_canaries(splits.test.labels, 10, count=40, seed=5)
    # Members: the sites' clean training splits (site 0's canaries taken out); non-members: their test splits and
    # the server's held-out images that are not canaries.
    parts = [site_split(splits.train, pid, 2, seed=5, local_test_fraction=0.2) for pid in range(2)]
    sizes = (sum(len(train) for train, _ in parts), sum(len(test) for _, test in parts) + len(splits.test) - 40)
    for summary in (dp, open_):
        run_dir = Path(summary["run-dir"])
        report = json.loads((run_dir / "audit.json").read_text())
        assert report["run-id"] == summary["run-id"] and report["shadows"] == 2
        assert [a["attack"] for a in report["attacks"]] == ["loss-threshold", "lira-online"]
        assert all((a["num-members"], a["num-non-members"]) == sizes for a in report["attacks"])
        canary = report["canary"]
        assert (canary["canaries"], canary["included"]) == (40, int(drawn.included.sum()))
        site0 = summary["epsilon-per-site"][f"site-{CANARY_SITE}"]
        assert report["canary-site-epsilon"] == (site0 if math.isfinite(site0) else "inf")
        markdown = (run_dir / "audit.md").read_text()
        assert "## One-run canary audit" in markdown and "| loss-threshold |" in markdown
    dp_report = json.loads((Path(dp["run-dir"]) / "audit.json").read_text())
    assert dp_report["canary"]["epsilon"] < dp_report["canary-site-epsilon"] <= 1.0 + 1e-6
    assert all(a["bound"]["epsilon"] < dp_report["accounted-epsilon"] for a in dp_report["attacks"])
    compare = (out / "audit-compare.md").read_text()
    assert dp["run-id"] in compare and open_["run-id"] in compare and "no (non-private)" in compare
    assert "eps lower bound" in capsys.readouterr().out


def test_fedtl_audit_of_operator_supplied_sets_and_its_errors(audited_runs, tmp_path, capsys):
    dp = audited_runs["dp"]
    digits = load_dataset("digits", seed=0, test_fraction=0.2).train
    sources = {}
    for role, rows in (("members", np.arange(0, 30)), ("non-members", np.arange(30, 60))):
        part = digits.subset(rows)
        sources[role] = tmp_path / f"{role}.npz"
        np.savez(
            sources[role],
            train_images=part.images[:20],
            train_labels=part.labels[:20],
            test_images=part.images[20:],
            test_labels=part.labels[20:],
        )
    args = ["audit", dp["model"], "--members", str(sources["members"]), "--non-members", str(sources["non-members"])]
    assert main([*args, "--shadows", "2"]) == 0
    report = json.loads((Path(dp["run-dir"]) / "audit.json").read_text())
    assert [(a["num-members"], a["num-non-members"]) for a in report["attacks"]] == [(30, 30), (30, 30)]
    assert report["canary"] is None and "members.npz" in report["members"]
    capsys.readouterr()
    assert main(args[:4]) == 2
    assert "give both --members and --non-members" in capsys.readouterr().err
    assert main([*args, "--canaries"]) == 2
    assert "--canaries audits a simulated run's own canaries" in capsys.readouterr().err
    assert main([*args, "--shadows", "1"]) == 2
    assert "`shadows` must be 0 (no LiRA) or >= 2, got 1" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "none.safetensors")]) == 2
    assert "model file" in capsys.readouterr().err
