"""What a site puts into a secure sum: its feature sum or closed-form statistics, quantised, with its noise share.

Called by `client/secagg.mask_input` once the secure sum's keys check out. Each release is charged first
through the one release path (client/release.py) as a Skellam mechanism (shared/mechanisms.py): the central
noise multiplier the server chose by its public rule, the integer sensitivities of the quantised release, and
the trust assumption (t honest of n sites) the charge holds under. Then the site adds its share, Skellam of
variance (noise_multiplier x l2_sensitivity)^2 / t (shared/distributed_noise.py). No Flower here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedtl.client.centering import CENTER_ROUND
from fedtl.client.inputs import load_site_inputs
from fedtl.client.ledger import PrivacyCharge
from fedtl.client.quotas import check_rounds_per_day
from fedtl.client.release import Release, ReleaseRequest, charge_release, round_seed
from fedtl.client.secagg import SessionPlan
from fedtl.client.site import Site
from fedtl.client.solvers.closed_form import STATS_ROUND
from fedtl.shared import constants as k
from fedtl.shared.closed_form import prepare_features, random_projection
from fedtl.shared.cut import Cut
from fedtl.shared.distributed_noise import sample_skellam, share_variance
from fedtl.shared.errors import ReplyError
from fedtl.shared.mechanisms import SECURE_FEATURE_SUM, SECURE_HEAD_GRADIENT, SECURE_SUFFICIENT_STATS, Mechanism
from fedtl.shared.protocol import RoundSettings
from fedtl.shared.public_basis import project_features
from fedtl.shared.secure_dp_sgd import check_head_tensors, clipped_gradient_rows, head_inputs, poisson_sample
from fedtl.shared.secure_noise import SecureRandom
from fedtl.shared.secure_sum import (
    IntegerRelease,
    feature_sum_release,
    feature_sum_scale,
    stats_release,
    stats_scale,
)

log = logging.getLogger(__name__)

FEATURE_SUM = "feature-sum"
SUFFICIENT_STATS = "sufficient-stats"
HEAD_GRADIENT = "head-gradient"  # one step of secure DP-SGD (server/solvers/secure_dp_sgd.py)


@dataclass(frozen=True)
class SecureRelease:
    """A site's input to a secure sum: its integer vector (noise share in it), example count and paid release."""

    values: np.ndarray  # (m,) int64
    num_examples: int  # declared public, as in every reply (README, privacy model)
    release: Release


def secure_release(
    site: Site,
    settings: RoundSettings,
    plan: SessionPlan,
    *,
    noise_multiplier: float,
    center: np.ndarray | None,
    arrays: dict[str, np.ndarray] | None = None,
    values: dict[str, int | float] | None = None,
) -> SecureRelease:
    """Charge, compute, quantise and noise the release `plan.release` names.

    `arrays` and `values`: the tensors and scalars the server sent with the release (a secure DP-SGD step's head,
    its step number and sample rate); the other releases need only `center`.

    Raises:
        ReplyError: an unknown release, or a `center` that does not fit the site's features.
        PrivacyBudgetError, PolicyRefusal: from the release path, before anything is computed.
    """
    if plan.release not in RELEASES:
        raise ReplyError(f"unknown secure release {plan.release!r}; expected one of {', '.join(RELEASES)}")
    return RELEASES[plan.release](site, settings, plan, noise_multiplier, Sent(center, arrays or {}, values or {}))


@dataclass(frozen=True)
class Sent:
    """What the server sent with a secure release: the feature centre, and a secure DP-SGD step's head and scalars."""

    center: np.ndarray | None
    arrays: dict[str, np.ndarray]
    values: dict[str, int | float]


def _feature_sum(
    site: Site, settings: RoundSettings, plan: SessionPlan, noise_multiplier: float, sent: Sent
) -> SecureRelease:
    """The sum of the site's L2-normalised training features at the cut that trains (the feature centre).

    With a public `projection` (k, D) sent (secure DP-SGD's k-dim centre), the sum of the projected features
    instead, each row clipped to norm 1 (shared/public_basis.project_features): the same sensitivity whatever the
    projection, so a hostile one changes what is summed, never what one example can move it by.

    Raises:
        ReplyError: a projection that is not (k, D) with 1 <= k < D, or holds non-finite values.
    """
    features = load_site_inputs(site, settings, cut=Cut.of(settings).at_end_cut()).train_x  # (N, D)
    projection = sent.arrays.get("projection")
    if projection is None:
        rows = _unit_rows(features)
    else:
        dim = features.shape[1]
        if projection.ndim != 2 or not 1 <= projection.shape[0] < dim or projection.shape[1] != dim:
            raise ReplyError(
                f"the projection sent has shape {projection.shape}; expected (k, {dim}) with 1 <= k < {dim}"
            )
        if not np.all(np.isfinite(projection)):
            raise ReplyError("the projection sent holds NaN or Inf values; the server must send a finite basis")
        rows = project_features(features, projection)  # (N, k), norms <= 1
    scale = feature_sum_scale(noise_multiplier)
    return _noised(
        site,
        settings,
        plan,
        SECURE_FEATURE_SUM,
        CENTER_ROUND,
        noise_multiplier,
        lambda: feature_sum_release(rows, scale),
        len(rows),
    )


def _sufficient_stats(
    site: Site, settings: RoundSettings, plan: SessionPlan, noise_multiplier: float, sent: Sent
) -> SecureRelease:
    """The closed form's statistics of the head's inputs (normalised, centred, projected, clipped to norm 1)."""
    inputs, center = load_site_inputs(site, settings), sent.center
    dim = inputs.train_x.shape[1]
    if center is not None and (center.shape != (dim,) or not np.all(np.isfinite(center))):
        raise ReplyError(f"the feature centre sent has shape {center.shape} or non-finite values; expected ({dim},)")
    projection = random_projection(dim, settings.projection_dim, seed=settings.seed)
    rows = prepare_features(inputs.train_x, center=center, projection=projection)  # (N, d), norms <= 1
    scale = stats_scale(noise_multiplier)
    return _noised(
        site,
        settings,
        plan,
        SECURE_SUFFICIENT_STATS,
        STATS_ROUND,
        noise_multiplier,
        lambda: stats_release(rows, inputs.train_y, settings.num_classes, scale),
        len(rows),
    )


def _head_gradient(
    site: Site, settings: RoundSettings, plan: SessionPlan, noise_multiplier: float, sent: Sent
) -> SecureRelease:
    """One step of distributed DP-FedSGD: the sum of clipped per-example head gradients on a Poisson sample.

    The site draws its sample at the sample rate the server sent (public, the same rule for every site), computes
    each sampled example's gradient of the head sent, clipped to max-grad-norm (shared/secure_dp_sgd.py), and
    releases their sum quantised at the public scale of `noise_multiplier` with its Skellam share. It is charged
    as one Skellam release on a Poisson sample at that rate (ledger kind `secagg-head-gradient`, round = the step).
    The reply's example count is the site's training-example count (declared public), never the sample's size.

    Raises:
        ReplyError: a missing or malformed step number, sample rate or head tensor.
    """
    step, rate = sent.values.get(k.SECAGG_STEP), sent.values.get(k.SECAGG_SAMPLE_RATE)
    if not (isinstance(step, int) and step >= 1 and isinstance(rate, float) and 0 < rate <= 1):
        raise ReplyError(
            f"a secure DP-SGD step needs `{k.SECAGG_STEP}` (an int >= 1) and `{k.SECAGG_SAMPLE_RATE}` (a float in "
            f"(0, 1]); got {step!r} and {rate!r}"
        )
    inputs = load_site_inputs(site, settings)
    weight, bias, center, projection = check_head_tensors(
        sent.arrays, feature_dim=inputs.train_x.shape[1], num_classes=settings.num_classes
    )
    u = head_inputs(inputs.train_x, center=center, projection=projection)
    seed = round_seed(site, settings, step)
    # Simulation: reproducible from the run seed (a stream apart from the noise's); a real site: ChaCha20.
    sampler = SecureRandom() if seed is None else np.random.default_rng([seed, 1])
    keep = poisson_sample(sampler, len(u), rate)
    rows = clipped_gradient_rows(  # a projected head's bias is held (shared/heads.py): its gradient is not sent
        u[keep], inputs.train_y[keep], weight, bias, max_grad_norm=settings.max_grad_norm, fit_bias=projection is None
    )
    scale = feature_sum_scale(noise_multiplier)
    return _noised(
        site,
        settings,
        plan,
        SECURE_HEAD_GRADIENT,
        step,
        noise_multiplier,
        lambda: feature_sum_release(rows, scale),
        len(u),
        sample_rate=rate,
        precondition=_steps_per_day_check(site, settings, step),
    )


def _steps_per_day_check(site: Site, settings: RoundSettings, step: int):  # type: ignore[no-untyped-def]
    """Return the check, run on the ledger inside the step's transaction, of the policy's max-rounds-per-day.

    Each secure step's gradient leaves the site, so it counts as one trained release (client/quotas.py).
    """
    policy = site.policy
    if policy is None:
        return None

    def check(charges: list[PrivacyCharge]) -> None:
        check_rounds_per_day(
            policy,
            charges,
            run_id=settings.run_id,
            server_round=step,
            what=f"secure DP-SGD step {step}",
            kind=SECURE_HEAD_GRADIENT.kind,
        )

    return check


def _noised(
    site: Site,
    settings: RoundSettings,
    plan: SessionPlan,
    mechanism: Mechanism,
    server_round: int,
    noise_multiplier: float,
    compute: Callable[[], IntegerRelease],
    rows_count: int,
    *,
    sample_rate: float = 1.0,
    precondition: Callable[[list[PrivacyCharge]], None] | None = None,
) -> SecureRelease:
    """Compute the exact integers (they stay here), charge the release, then add this site's noise share.

    The integer sensitivities depend only on the public scale and dimension, never on the data, and the charge
    is on disk before anything leaves the site (write-ahead, as every release). `sample_rate` < 1: the release
    is computed from a Poisson sample at that rate and charged as such. `precondition`: checked on the ledger
    inside the charge's transaction (a policy quota).
    """
    exact = compute()
    release = charge_release(
        site,
        settings,
        ReleaseRequest(
            mechanism,
            server_round,
            sample_rate,
            1,  # one step: one summed release (a Poisson sample at `sample_rate` for a head gradient)
            f"the securely summed {plan.release} of run {settings.run_id}",
            noise_multiplier,
            l2_sensitivity=exact.l2_sensitivity,
            l1_sensitivity=exact.l1_sensitivity,
            honest_sites=plan.honest_sites,
            num_sites=plan.num_sites,
            precondition=precondition,
        ),
    )
    variance = share_variance(
        noise_multiplier=release.noise_multiplier, l2_sensitivity=exact.l2_sensitivity, honest_sites=plan.honest_sites
    )
    values = exact.values + sample_skellam(release.rng(), variance=variance, size=len(exact.values))
    count = int(rows_count)
    log.info(
        "site %s: %s in secure sum %s: %d entries of %d examples, noise multiplier %.3f (its share: 1/%d of the "
        "variance), cumulative epsilon %.3f if at least %d of the %d sites are honest",
        site.name,
        plan.release,
        plan.session,
        len(values),
        count,
        release.noise_multiplier,
        plan.honest_sites,
        release.epsilon,
        plan.honest_sites,
        plan.num_sites,
    )
    return SecureRelease(values, count, release)


def _unit_rows(features: np.ndarray) -> np.ndarray:
    """Return features (N, D) scaled to unit L2 norm in float64 (zero rows stay zero)."""
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


RELEASES: dict[str, Callable[..., SecureRelease]] = {
    FEATURE_SUM: _feature_sum,  # the feature centre's sum (server/centering.py under secure aggregation)
    SUFFICIENT_STATS: _sufficient_stats,  # the closed form's statistics (server/solvers/closed_form.py)
    HEAD_GRADIENT: _head_gradient,  # a secure DP-SGD step (server/solvers/secure_dp_sgd.py): the head sent
}
