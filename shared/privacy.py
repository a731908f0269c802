"""Privacy maths: cumulative epsilon of a DP-SGD history, the noise that meets a budget, client-level DP.

A history may also hold Skellam releases (the distributed noise of secure aggregation,
shared/distributed_noise.py): such a history is accounted by RDP at integer orders, where the Skellam bound
holds, summing Opacus' sampled-Gaussian RDP for the Gaussian stretches; a history of Gaussian stretches only
takes the path below, unchanged.

Pure functions over (noise_multiplier, sample_rate, steps) histories, computed with Opacus'
accountants (RDP: Mironov 2017, "Renyi Differential Privacy"; Mironov et al. 2019 for the sampled
Gaussian mechanism; PRV: Gopi et al. 2021, "Numerical Composition of Differential Privacy").

RDP is additive over composed mechanisms and linear in steps (Mironov 2017, Prop. 1), so the RDP
accountant here computes each (sample_rate, noise_multiplier) curve once per process, order by order
and only at the orders that can decide the answer, and composes cached curves with the same float
operations, in the same order, as Opacus' `RDPAccountant.get_epsilon`: its epsilons are bit-identical.
The PRV accountant still goes through Opacus' `PRVAccountant` on every call (slow at small noise).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtl.shared.distributed_noise import SKELLAM_ORDERS, skellam_rdp, subsampled_rdp
from fedtl.shared.errors import ConfigError, PrivacyBudgetError

MAX_NOISE_MULTIPLIER = 1e4  # a noise search gives up above this (its errors say "1e4"): the budget cannot hold the work


@dataclass(frozen=True)
class PrivacyStep:
    """One homogeneous stretch of DP-SGD: `steps` steps at one noise and sample rate.

    With `l2_sensitivity` > 0 it is instead `steps` Skellam releases (shared/distributed_noise.py) of variance
    (noise_multiplier x l2_sensitivity)^2 on an integer vector of those L2 / L1 sensitivities, each on a Poisson
    sample at `sample_rate` (1: unsampled; below 1 accounted by Zhu & Wang's general bound, `subsampled_rdp`).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    l2_sensitivity: float = 0.0  # > 0: a Skellam release, in its integer units
    l1_sensitivity: float = 0.0

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"`noise-multiplier` must be a finite number >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"`sample-rate` must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ConfigError(f"`steps` must be >= 0, got {self.steps}")
        if self.l2_sensitivity or self.l1_sensitivity:
            if not (math.isfinite(self.l2_sensitivity) and self.l2_sensitivity > 0):
                raise ConfigError(
                    f"a Skellam step's `l2-sensitivity` must be a finite number > 0, got {self.l2_sensitivity}"
                )
            if not (math.isfinite(self.l1_sensitivity) and self.l1_sensitivity >= self.l2_sensitivity):
                raise ConfigError(
                    f"a Skellam step's `l1-sensitivity` must be >= its l2-sensitivity {self.l2_sensitivity}, got "
                    f"{self.l1_sensitivity} (the L1 norm bounds the L2 norm)"
                )

    @property
    def is_skellam(self) -> bool:
        """True for a Skellam release (distributed noise), False for a sampled Gaussian stretch."""
        return self.l2_sensitivity > 0


def compute_epsilon(history: Iterable[PrivacyStep], *, delta: float, accountant: str = "rdp") -> float:
    """Return the epsilon of the whole history at `delta` (inf if any stretch had no noise).

    Args:
        history: every DP-SGD stretch the site ever ran, in any order (composition commutes).
        delta: the target delta of the guarantee.
        accountant: "rdp" (default) or "prv".

    Returns:
        The cumulative epsilon; 0.0 for an empty history.
    """
    steps = [s for s in history if s.steps > 0]
    if not steps:
        return 0.0
    if any(s.noise_multiplier == 0 for s in steps):
        return math.inf
    if any(s.is_skellam for s in steps):
        return _integer_order_epsilon(steps, delta=delta)
    if accountant == "rdp":
        return _scan_rdp(steps, delta=delta, threshold=None)
    acc = _make_accountant(accountant)
    # Opacus' accountants keep history as [(noise_multiplier, sample_rate, num_steps)].
    acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in steps]
    return float(acc.get_epsilon(delta=delta))


def find_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    history: Iterable[PrivacyStep] = (),
    accountant: str = "rdp",
    precision: float = 0.005,
) -> float:
    """Return the smallest noise multiplier (to `precision`) keeping history + planned steps within budget.

    With the rdp accountant every probe reuses the cached curves and computes only the orders that decide
    whether it is over budget, so it returns exactly what bisecting on full `compute_epsilon` calls would.

    Raises:
        PrivacyBudgetError: the history alone already spends `target_epsilon`.
    """
    past = [s for s in history if s.steps > 0]
    spent = _spent_within_budget(past, target_epsilon, target_delta, accountant)

    skellam = any(s.is_skellam for s in past)

    def above_with(method: str) -> Callable[[float], bool]:
        """Return sigma -> whether history + the planned steps at sigma spend more than `target_epsilon`."""

        def above(sigma: float) -> bool:
            planned = past + [PrivacyStep(sigma, sample_rate, steps)]
            if method == "rdp" and not skellam:
                return _exceeds_rdp(planned, delta=target_delta, target=target_epsilon)
            return compute_epsilon(planned, delta=target_delta, accountant=method) > target_epsilon

        return above

    eps_above_target = above_with(accountant)
    what = f"{target_epsilon} over {steps} steps at sample-rate {sample_rate:.4f} after {spent:.3f} already spent"
    try:
        if accountant == "prv" and not skellam:
            # PRV is at least as tight as RDP, so RDP's answer bounds PRV's from above; PRV evaluations at
            # small noise take minutes, so the search stays within [sigma_rdp / 2, sigma_rdp].
            rdp_above = above_with("rdp")
            high = bisect_noise(rdp_above, *bracket_noise(rdp_above, what), precision)
            low = high / 2
            if not eps_above_target(low):
                return low
        else:
            low, high = bracket_noise(eps_above_target, what)
    except PrivacyBudgetError as exc:
        raise PrivacyBudgetError(f"{exc}{_unreachable(past, sample_rate, steps, target_delta)}") from None
    return bisect_noise(eps_above_target, low, high, precision)


def _unreachable(past: list[PrivacyStep], sample_rate: float, steps: int, delta: float) -> str:
    """Return the tail of the error when no noise meets a budget: what the largest noise spends, and the fix.

    Even infinite noise leaves RDP's conversion to (epsilon, delta) (Balle et al. 2020, as Opacus converts) a
    floor of about log(1 / delta) / (largest order - 1): 0.103 at delta 1e-5 over Opacus' orders (up to 63).
    """
    with warnings.catch_warnings():  # Opacus warns that the largest order is optimal: the floor this explains
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        floor = compute_epsilon(past + [PrivacyStep(MAX_NOISE_MULTIPLIER, sample_rate, steps)], delta=delta)
    # Fewer rounds or steps would not help: at noise 1e4 the floor is the conversion's (and the history's).
    return (
        f": even noise 1e4 spends epsilon {floor:.3f} at delta {delta:g} (the RDP accountant cannot certify less "
        "at that delta, whatever the noise or the number of steps); raise target-epsilon above it or raise "
        "target-delta"
    )


def find_skellam_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    l2_sensitivity: float,
    l1_sensitivity: float,
    history: Iterable[PrivacyStep] = (),
    precision: float = 0.005,
    sample_rate: float = 1.0,
    steps: int = 1,
) -> float:
    """Return the smallest noise multiplier (to `precision`) of `steps` Skellam releases (each on a Poisson sample
    at `sample_rate`) keeping history + them in budget.

    Raises:
        PrivacyBudgetError: the history alone already spends `target_epsilon`, or no noise up to 1e4 fits.
    """
    past = [s for s in history if s.steps > 0]
    spent = _spent_within_budget(past, target_epsilon, target_delta, "rdp")

    def eps_above_target(sigma: float) -> bool:
        release = PrivacyStep(sigma, sample_rate, steps, l2_sensitivity=l2_sensitivity, l1_sensitivity=l1_sensitivity)
        return compute_epsilon(past + [release], delta=target_delta) > target_epsilon

    what = "one Skellam release" if (sample_rate, steps) == (1.0, 1) else f"{steps} Skellam releases at q {sample_rate}"
    low, high = bracket_noise(eps_above_target, f"{target_epsilon} for {what} after {spent:.3f} already spent")
    return bisect_noise(eps_above_target, low, high, precision)


def _spent_within_budget(past: list[PrivacyStep], target_epsilon: float, target_delta: float, accountant: str) -> float:
    """Return the epsilon `past` spends; raise PrivacyBudgetError when it already reaches `target_epsilon`."""
    spent = compute_epsilon(past, delta=target_delta, accountant=accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetError(
            f"privacy budget exhausted: epsilon already spent is {spent:.3f} >= target-epsilon "
            f"{target_epsilon} (delta {target_delta}); raise the budget or start a new site ledger"
        )
    return spent


def bracket_noise(above: Callable[[float], bool], what: str) -> tuple[float, float]:
    """Return (low, high) with `above(high)` false, doubling from 1; `what` names the target in the error."""
    low, high = 0.0, 1.0
    while above(high):
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetError(f"no noise multiplier up to 1e4 meets target-epsilon {what}")
    return low, high


def bisect_noise(above: Callable[[float], bool], low: float, high: float, precision: float) -> float:
    """Return the smallest noise (to `precision`) in (low, high] that `above` does not reject."""
    while high - low > precision:
        mid = (low + high) / 2
        if above(mid):
            low = mid
        else:
            high = mid
    return high


def _integer_order_epsilon(history: Sequence[PrivacyStep], *, delta: float) -> float:
    """Return the epsilon of a history with Skellam releases: RDP summed at integer orders, converted once.

    The Skellam bound holds at integer orders only (Agarwal et al. 2021, Theorem 3.5), so the whole history is
    accounted there: Opacus' `compute_rdp` for the sampled Gaussian stretches, `skellam_rdp` for the releases,
    and Opacus' `get_privacy_spent` for the conversion. RDP bounds at a subset of orders remain valid bounds.
    Whatever the requested accountant, such a history is accounted by RDP (no PRV of the Skellam mechanism).
    """
    orders = list(SKELLAM_ORDERS)
    rdp = np.zeros(len(orders))
    for s in history:
        if s.is_skellam:
            curve = _skellam_curve(s.noise_multiplier, s.l2_sensitivity, s.l1_sensitivity, s.sample_rate)
            rdp = rdp + curve * s.steps
        else:
            rdp = rdp + compute_rdp(q=s.sample_rate, noise_multiplier=s.noise_multiplier, steps=s.steps, orders=orders)
    with warnings.catch_warnings():
        # At large epsilon the smallest order, 2, is optimal and Opacus suggests smaller ones; the Skellam bound has
        # none below 2 (integer orders only), so there is nothing to expand and nothing for the user to do.
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha", category=UserWarning)
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=256)
def _skellam_curve(noise_multiplier: float, l2: float, l1: float, sample_rate: float) -> np.ndarray:
    """Return one Skellam release's RDP at SKELLAM_ORDERS, on a Poisson sample at `sample_rate` (cached, read-only)."""
    if sample_rate == 1:
        orders: list[int] = list(SKELLAM_ORDERS)
        values = [
            skellam_rdp(a, noise_multiplier=noise_multiplier, l2_sensitivity=l2, l1_sensitivity=l1) for a in orders
        ]
        curve = np.array(values)
    else:  # the subsampling bound needs the unsampled RDP at every order 2 .. max
        full = np.zeros(max(SKELLAM_ORDERS) + 1)
        for a in range(2, len(full)):
            full[a] = skellam_rdp(a, noise_multiplier=noise_multiplier, l2_sensitivity=l2, l1_sensitivity=l1)
        curve = subsampled_rdp(list(SKELLAM_ORDERS), sample_rate=sample_rate, rdp=full)
    curve.setflags(write=False)
    return curve


# --- RDP accounting on cached curves ----------------------------------------------------------------
#
# Opacus' RDPAccountant.get_epsilon computes, for each history entry (sigma, q, n), the array
# compute_rdp(q, sigma, 1 order at a time) * n, sums the arrays with Python's sum() (a left fold from 0)
# and converts once with get_privacy_spent (eps_i = rdp_i - A_i + B_i, then the first nanargmin).
# Every operation is elementwise, so each order's epsilon depends only on that order's per-step RDP
# values: we cache those per (q, sigma) (the unit curve; `rdp * 1` is exact, so `unit * n` is Opacus'
# `rdp * n`), fold them in history order, and call get_privacy_spent itself.
#
# Orders near 1 cost most (Opacus' fractional-order series converges slowly there: ~25 ms for order 1.1
# against ~0.2 ms for an integer order) and rarely matter: their conversion term A_i is large. An order
# is skipped (its epsilon set to +inf before the conversion) only when a lower bound on its epsilon
# already exceeds the best epsilon found (or the threshold a bisection asks about), so it cannot be the
# argmin and the result is unchanged. The bound uses the cached values where known and, for a value not
# yet computed, RDP >= 0 (a Renyi divergence is non-negative; Mironov 2017, Prop. 2) less a slack of
# _RDP_FLOOR per step that covers the float error of Opacus' series many times over.

_ORDERS: list[float] = list(RDPAccountant.DEFAULT_ALPHAS)  # the very list Opacus passes by default
_ORDERS_VEC = np.atleast_1d(_ORDERS)
_CHEAP_FIRST = sorted(range(len(_ORDERS)), key=lambda i: -_ORDERS[i])  # cost grows as the order nears 1
_CHUNK = 16  # orders computed between two checks
_RDP_FLOOR = 1e-6  # a computed per-step RDP is assumed >= -this (true value >= 0; float error ~1e-13)
_CURVE_CACHE_SIZE = 4096  # (q, sigma) curves kept per process, ~1.4 kB each
_hint = [_ORDERS.index(8.0)]  # the order that decided last time: tried first (only speed depends on it)


class _UnitCurve:
    """Per-step RDP of one sampled Gaussian mechanism at Opacus' default orders, filled in lazily."""

    __slots__ = ("q", "sigma", "values", "known")

    def __init__(self, q: float, sigma: float) -> None:
        self.q, self.sigma = q, sigma
        self.values = np.full(len(_ORDERS), np.nan)
        self.known = np.zeros(len(_ORDERS), dtype=bool)

    def fill(self, indices: Iterable[int]) -> None:
        """Compute the per-step RDP at the orders `indices` not yet known, with Opacus' compute_rdp."""
        for i in indices:
            if not self.known[i]:
                self.values[i] = compute_rdp(q=self.q, noise_multiplier=self.sigma, steps=1, orders=[_ORDERS[i]])[0]
                self.known[i] = True


@lru_cache(maxsize=_CURVE_CACHE_SIZE)
def _unit_curve(q: float, sigma: float) -> _UnitCurve:
    return _UnitCurve(q, sigma)


def _conversion_terms(delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (A, B) of Opacus' get_privacy_spent, eps = rdp - A + B, by the same numpy expressions."""
    a = (np.log(delta) + np.log(_ORDERS_VEC)) / (_ORDERS_VEC - 1)
    b = np.log((_ORDERS_VEC - 1) / _ORDERS_VEC)
    return a, b


def _scan_rdp(history: Sequence[PrivacyStep], *, delta: float, threshold: float | None) -> float | bool:
    """Return the RDP epsilon of `history` (threshold None), else whether that epsilon exceeds `threshold`.

    `history` is non-empty, every stretch noised and with steps > 0 (compute_epsilon's early exits).
    """
    curves = [_unit_curve(float(s.sample_rate), float(s.noise_multiplier)) for s in history]
    slot: dict[int, int] = {}
    which = np.array([slot.setdefault(id(c), len(slot)) for c in curves])  # entry -> its distinct curve
    distinct = list({id(c): c for c in curves}.values())
    weights = np.array([s.steps for s in history], dtype=np.float64)[:, None]
    a, b = _conversion_terms(delta)

    def fold() -> np.ndarray:
        # Opacus: sum([rdp * n for each entry]); accumulate is the same left fold, elementwise.
        units = np.stack([c.values for c in distinct])[which]
        return np.add.accumulate(units * weights, axis=0)[-1]

    known = np.stack([c.known for c in distinct])[which]
    units = np.where(known, np.stack([c.values for c in distinct])[which], 0.0)
    known_part = (units * weights).sum(axis=0)
    magnitude = (np.abs(units) * weights).sum(axis=0)
    lower = known_part - ((~known) * weights).sum(axis=0) * _RDP_FLOOR - a + b
    lower = lower - 1e-9 * (1 + magnitude + np.abs(a) + np.abs(b))  # float error of the sums above

    best = math.inf if threshold is None else threshold
    done = np.zeros(len(_ORDERS), dtype=bool)
    rest = [i for i in _CHEAP_FIRST if i != _hint[0]]
    for chunk in [[_hint[0]]] + [rest[k : k + _CHUNK] for k in range(0, len(rest), _CHUNK)]:
        todo = [i for i in chunk if not lower[i] > best]
        if not todo:
            continue
        for c in distinct:
            c.fill(todo)
        done[todo] = True
        eps = fold()[todo] - a[todo] + b[todo]
        if threshold is not None:
            hit = np.flatnonzero(eps <= threshold)
            if hit.size:
                _hint[0] = todo[hit[0]]
                return False
        elif not np.isnan(eps).all():
            best = min(best, float(np.nanmin(eps)))
    if threshold is not None:
        # No order has epsilon <= threshold: epsilon is above it, or inf (every order NaN, none skipped).
        return math.inf > threshold
    rdp = fold()
    rdp[~done] = np.inf
    eps, _ = get_privacy_spent(orders=_ORDERS, rdp=rdp, delta=delta)
    if done.any() and not np.isnan(rdp[done]).all():
        _hint[0] = int(np.nanargmin(np.where(done, rdp - a + b, np.nan)))
    return float(eps)


def _exceeds_rdp(history: Iterable[PrivacyStep], *, delta: float, target: float) -> bool:
    """Return compute_epsilon(history, delta=delta) > target (rdp), computing only the orders that decide it."""
    steps = [s for s in history if s.steps > 0]
    if not steps:
        return 0.0 > target
    if any(s.noise_multiplier == 0 for s in steps):
        return math.inf > target
    return bool(_scan_rdp(steps, delta=delta, threshold=target))


def _make_accountant(name: str) -> RDPAccountant | PRVAccountant:
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ConfigError(f"`accountant` must be one of rdp, prv; got {name!r}")


def client_noise_stdv(*, noise_multiplier: float, clipping_norm: float, num_sampled_clients: int) -> float:
    """Return the std of the Gaussian noise on the mean of `num_sampled_clients` clipped site updates.

    DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
    each site's update is clipped to L2 norm `clipping_norm`, so one site moves the mean over a fixed
    denominator of m sites by at most C / m; the noise is `noise_multiplier` times that sensitivity,
    z * C / m (Flower's `compute_stdv`).
    """
    if num_sampled_clients < 1:
        raise ConfigError(f"`num-sampled-clients` must be >= 1, got {num_sampled_clients}")
    if not clipping_norm > 0:
        raise ConfigError(f"`client-clipping-norm` must be > 0, got {clipping_norm}")
    if not noise_multiplier >= 0:
        raise ConfigError(f"`client-noise-multiplier` must be >= 0, got {noise_multiplier}")
    return noise_multiplier * clipping_norm / num_sampled_clients


def client_level_epsilon(*, noise_multiplier: float, sample_rates: Sequence[float], delta: float) -> float:
    """Return the client-level (per site) epsilon at `delta` of noised aggregates, one per entry of `sample_rates`.

    Each round is one sampled Gaussian mechanism on a site's clipped update: noise multiplier z
    relative to the sensitivity C / m, each site taking part with probability q = m / N, that round's
    entry of `sample_rates` (Mironov et al. 2019, the RDP bound of Opacus' accountant). Flower samples
    exactly m of the N sites without replacement, not Poisson: the Poisson bound is the usual
    approximation (as in McMahan et al. 2018), not a proof for that sampler. Returns 0.0 for no
    rounds and inf when z = 0.
    """
    rounds = Counter(sample_rates)
    history = [PrivacyStep(noise_multiplier, q, n) for q, n in sorted(rounds.items())]
    return compute_epsilon(history, delta=delta, accountant="rdp")
