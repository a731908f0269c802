"""Privacy maths: cumulative epsilon of a DP-SGD history, the noise that meets a budget, client-level DP.

Pure functions over (noise_multiplier, sample_rate, steps) histories, computed with Opacus'
accountants (RDP: Mironov 2017, "Renyi Differential Privacy"; Mironov et al. 2019 for the sampled
Gaussian mechanism; PRV: Gopi et al. 2021, "Numerical Composition of Differential Privacy").
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from opacus.accountants import PRVAccountant, RDPAccountant

from fedtl.shared.errors import ConfigError, PrivacyBudgetError


@dataclass(frozen=True)
class PrivacyStep:
    """One homogeneous stretch of DP-SGD: `steps` steps at one noise and sample rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"`noise-multiplier` must be a finite number >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"`sample-rate` must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ConfigError(f"`steps` must be >= 0, got {self.steps}")


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

    Raises:
        PrivacyBudgetError: the history alone already spends `target_epsilon`.
    """
    past = [s for s in history if s.steps > 0]
    spent = compute_epsilon(past, delta=target_delta, accountant=accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetError(
            f"privacy budget exhausted: epsilon already spent is {spent:.3f} >= target-epsilon "
            f"{target_epsilon} (delta {target_delta}); raise the budget or start a new site ledger"
        )

    def eps_at(sigma: float) -> float:
        return compute_epsilon(
            past + [PrivacyStep(sigma, sample_rate, steps)], delta=target_delta, accountant=accountant
        )

    if accountant == "prv":
        # PRV is at least as tight as RDP, so RDP's answer bounds PRV's from above; PRV evaluations at
        # small noise take minutes, so the search stays within [sigma_rdp / 2, sigma_rdp].
        high = find_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=steps,
            history=past,
            accountant="rdp",
            precision=precision,
        )
        low = high / 2
        if eps_at(low) <= target_epsilon:
            return low
    else:
        low, high = 0.0, 1.0
        while eps_at(high) > target_epsilon:
            low, high = high, high * 2
            if high > 1e4:
                raise PrivacyBudgetError(
                    f"no noise multiplier up to 1e4 meets target-epsilon {target_epsilon} over {steps} steps at "
                    f"sample-rate {sample_rate:.4f} after {spent:.3f} already spent; plan fewer rounds or steps"
                )
    while high - low > precision:
        mid = (low + high) / 2
        if eps_at(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


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
