"""How noisy the feature-centre release may be, and when its estimate is too noisy to use.

The head subtracts the federation's mean L2-normalised feature (see shared/heads.Head). Each site
releases that sum once with Gaussian noise (sensitivity 1), charged like one DP-SGD step at sample
rate 1. At a small target epsilon a fixed noise multiplier would spend most or all of the budget
(sigma 4 alone costs epsilon ~1.0 at delta 1e-5), so the noise is raised until the release costs at
most CENTERING_BUDGET_SHARE of the target. The more noise, the worse the estimate: when the noise
expected in the mean is larger than MAX_CENTER_NOISE_NORM (the mean of unit vectors has norm <= 1,
~0.9 for backbone features), the estimate would hurt more than help, and the head uses no centre.
Dropping it is post-processing of a release already charged: it costs nothing more.
"""

from __future__ import annotations

import math

from fedtl.shared.errors import PrivacyBudgetError
from fedtl.shared.privacy import PrivacyStep, compute_epsilon, find_noise_multiplier

CENTERING_BUDGET_SHARE = 0.25  # the centre release spends at most this share of target-epsilon
MAX_CENTER_NOISE_NORM = 0.5  # expected L2 norm of the noise in the mean above which the centre is dropped


def centering_noise_multiplier(
    *, requested: float, target_epsilon: float, target_delta: float, accountant: str = "rdp"
) -> float | None:
    """Return the centre release's noise: `requested`, or more so that it costs <= the budget share.

    Returns None when no noise makes one release that cheap (the accountant's bound has a floor at
    tiny epsilons): then nothing is released and the head uses no centre.
    """
    cost = compute_epsilon([PrivacyStep(requested, 1.0, 1)], delta=target_delta, accountant=accountant)
    if cost <= CENTERING_BUDGET_SHARE * target_epsilon:
        return requested
    try:
        return find_noise_multiplier(
            target_epsilon=CENTERING_BUDGET_SHARE * target_epsilon,
            target_delta=target_delta,
            sample_rate=1.0,
            steps=1,
            accountant=accountant,
        )
    except PrivacyBudgetError:
        return None


def center_noise_norm(*, noise_multiplier: float, dim: int, num_sites: int, count: int) -> float:
    """Return the expected L2 norm of the noise in the mean of `num_sites` noised sums over `count` examples."""
    return noise_multiplier * math.sqrt(dim * num_sites) / max(count, 1)
