"""DP heads that work at small epsilon: the plan (`head-solver = "auto"`) and full-batch DP gradient descent.

Every choice below is a function of public quantities only: target epsilon and delta, the sites' example counts
(declared public in fedtl), the feature dimension, the number of classes, and the public backbone (through the
synthetic-image basis of `fedtl.shared.public_basis`). Nothing looks at any site's data, so nothing here costs
privacy beyond the releases the plan lists, each charged to the accountant.

The one quantity that drives every rule is `mean_noise`, eta = sigma * sqrt(K) / N: the per-coordinate noise std
in a mean of N unit vectors when each of K sites adds its own Gaussian noise of multiplier sigma (the whole
budget spent on one release, no secure aggregation) to its own sum. It is also the noise that full-batch DP-GD
leaves per unit of lr x steps x max_grad_norm in every logit of a unit-norm input (see `train_full_batch`), which
is why that product is set from it (Panda et al. 2022, "A New Linear Scaling Rule for Private Adaptive
Hyperparameter Optimization": with full batches, noise and progress both scale with lr x steps, so that product is
what to set; the clipping norm scales the noise, and the progress of every example whose gradient it clips).

How the constants were chosen: on digits only (EfficientNet-Lite0, 64 px, 5 iid sites, seeds 0-2), scored on the
sites' pooled local test splits, never on a held-out split; PneumoniaMNIST and BreastMNIST use them unchanged
(benchmarks/dp_heads.py). Compared: projection dims 16-1280 (MAX_MEAN_NOISE_NORM picks 64 at epsilon 1 and 256
at 3 and 8, the best there); whitening 0, 0.5, 1 (0.5 and 1 a point or two above 0); centre shares 0.1 and 0.2
(tied); Poisson sample rates 0.1 and 0.25 (no gain over full batches); 20 to 200 steps (no difference, as the rule
predicts); FedAvg every step or every 5 (tied); averaging the last 5 rounds' models (no consistent gain). Then, in
this order: the head's bias trained or held at zero (held: +3.8 / +2.6 / +0.9 points at epsilon 1 / 3 / 8,
shared/heads.py; at clip 1, LOGIT_NOISE 0.75, cap 1000, the rule first chosen from LOGIT_NOISE in {0.5, 1, 2});
then, with it held, (LOGIT_NOISE, MAX_LR_STEPS, MAX_GRAD_NORM) in (0.75, 1000, 1), (0.75 / 1.1 / 1.5 / 2, 3000,
0.5), (0.75 / 1.1 / 1.5, 3000, 0.25), each scored both with every site noising its own steps and with the secure
sum's one-curator noise (head-solver "secure-dp-sgd", whose lr x steps the old cap bound at epsilon 8):
(1.5, 3000, 0.25) was the best or within 0.5 point of it in all six cells, +3.0 / +1.8 / +2.1 points at epsilon
1 / 3 / 8 with per-site noise and +3.3 / +1.8 / +1.6 with the secure sum's. A DP Gram release for whitening and the
closed form on the same basis lost to DP-GD at every epsilon.
Last, with every constant above fixed, where the head reads the backbone (shared/deep.py, `feature-block`): every
MBConv block 6..15 against the final features, at 64 and 224 px; the rule there (the last block whose output is at
least 4 px a side) gained 14, 9 and 6 points at epsilon 1, 3 and 8 on those splits at 64 px (at 224 px -2, +3 and
+4). The constants were not chosen again on the new features.
Pure numpy: no Flower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedtl.shared.errors import ConfigError
from fedtl.shared.privacy import PrivacyStep, compute_epsilon, find_noise_multiplier
from fedtl.shared.public_basis import SYNTHETIC_COUNT

DP_GD = "dp-gd"
PROJECTION_DIMS = (16, 32, 64, 128, 256)
MAX_MEAN_NOISE_NORM = 0.07  # k: the largest with eta * sqrt(k) <= this (noise norm in a k-dim mean of unit vectors)
LOGIT_NOISE = 1.5  # lr x steps x max_grad_norm = LOGIT_NOISE / eta: the std the DP-GD noise leaves in each logit
MAX_LR_STEPS = 3000.0  # the cap on that product: beyond it more progress is not worth its noise at large epsilon
CENTER_SHARE = 0.1  # the k-dim centre release, when made, has this share of the one-release budget
MAX_CENTER_NOISE_NORM = 0.25  # above this expected noise norm the public synthetic centre is used instead
STEPS = 50  # full-batch DP-GD steps per site over the run, at least (q = 1: the same noise for any count)
LOCAL_STEPS = 5  # steps between averagings at the default 10 rounds; num-rounds stays the run config's (below)
MAX_GRAD_NORM = 0.25  # per-example gradients are ||p - y|| <= sqrt(2) on unit inputs: most are clipped


@dataclass(frozen=True)
class HeadPlan:
    """What a site releases for a DP head and how it trains, chosen from public inputs; `reason` says why."""

    method: str
    projection_dim: int  # k: the head sees P normalise(x), P the public synthetic basis
    center_noise_multiplier: float | None  # the k-dim feature-sum release (sensitivity 1); None: public centre
    noise_multiplier: float  # of every full-batch DP-GD step (sample rate 1, sensitivity max_grad_norm)
    steps: int  # DP-GD steps at each site over the run
    local_steps: int  # steps per round (FedAvg between rounds)
    learning_rate: float
    max_grad_norm: float
    mean_noise: float  # eta of the whole budget (module docstring)
    epsilon: float  # of the planned history (earlier history included), by the accountant
    reason: str
    sample_rate: float = 1.0  # of every step (secure DP-FedSGD may sample; DP-GD uses full batches)
    honest_sites: int = 0  # secure DP-FedSGD: the t its noise is planned for (0: each site noises alone)

    @property
    def num_rounds(self) -> int:
        """Return the federation rounds: steps / local_steps."""
        return self.steps // self.local_steps

    def releases(self) -> list[PrivacyStep]:
        """Return the run's releases as the ledger charges them: the centre (if any), then every DP-GD step."""
        centre = [] if self.center_noise_multiplier is None else [PrivacyStep(self.center_noise_multiplier, 1.0, 1)]
        return centre + [PrivacyStep(self.noise_multiplier, 1.0, self.steps)]


def mean_noise(*, noise_multiplier: float, site_sizes: Sequence[int]) -> float:
    """Return eta = sigma sqrt(K) / N: the noise std per coordinate in the mean of N unit vectors over K sites.

    Each site adds N(0, sigma^2) to each coordinate of its own sum; the K sums add up, so the pooled sum carries
    N(0, K sigma^2) and its mean over N = sum of sizes examples N(0, K sigma^2 / N^2).
    """
    return noise_multiplier * math.sqrt(len(site_sizes)) / sum(site_sizes)


def choose_projection_dim(eta: float, *, feature_dim: int, public_count: int = SYNTHETIC_COUNT) -> int:
    """Return the largest k of PROJECTION_DIMS with eta sqrt(k) <= MAX_MEAN_NOISE_NORM (the smallest k if none).

    The expected norm of the noise in a k-dim mean grows as eta sqrt(k) while the signal a k-dim public basis
    keeps grows more slowly past its first directions; 0.07 was the best threshold for digits on the sites'
    local test splits (benchmarks/dp_heads.py, seeds 0-2). k stays below D and the number of public images.
    """
    fits = [k for k in PROJECTION_DIMS if k < feature_dim and k <= public_count]
    if not fits:
        raise ConfigError(
            f"no projection dim of {PROJECTION_DIMS} fits feature dim {feature_dim} and {public_count} public images"
        )
    good = [k for k in fits if eta * math.sqrt(k) <= MAX_MEAN_NOISE_NORM]
    return max(good) if good else min(fits)


def dp_gd_schedule(site_sizes: Sequence[int], rounds: int) -> tuple[list[int], int, int]:
    """Return the checked site sizes, steps per round and total steps: `rounds` x ceil(STEPS / rounds).

    Raises:
        ConfigError: no sites, a site with no examples, or rounds < 1.
    """
    sizes = [int(n) for n in site_sizes]
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"`site_sizes` must list at least one site with >= 1 example, got {sizes}")
    if rounds < 1:
        raise ConfigError(f"`num-rounds` must be >= 1 for a DP head plan, got {rounds}")
    local_steps = math.ceil(STEPS / rounds)
    return sizes, local_steps, rounds * local_steps


def lr_times_steps(eta: float) -> float:
    """Return lr x steps x max_grad_norm for mean noise eta: min(LOGIT_NOISE / eta, MAX_LR_STEPS) (Panda et al.)."""
    return min(LOGIT_NOISE / eta, MAX_LR_STEPS) if eta > 0 else MAX_LR_STEPS


def plan_learning_rate(eta: float, steps: int) -> float:
    """Return the learning rate of `steps` full-batch steps clipped at MAX_GRAD_NORM: `lr_times_steps` / (steps C)."""
    return lr_times_steps(eta) / (steps * MAX_GRAD_NORM)


def plan_dp_head(
    *,
    target_epsilon: float,
    target_delta: float,
    site_sizes: Sequence[int],
    feature_dim: int,
    num_classes: int,
    history: Sequence[PrivacyStep] = (),
    accountant: str = "rdp",
    rounds: int = STEPS // LOCAL_STEPS,
) -> HeadPlan:
    """Return the DP head plan (`head-solver = "auto"`) for these public inputs, within target epsilon.

    1. sigma: the noise multiplier of one Gaussian release (sample rate 1) spending what `history` leaves of the
       budget; eta = `mean_noise(sigma)`.
    2. k = `choose_projection_dim(eta)` public synthetic directions.
    3. The k-dim centre: released at noise sigma / sqrt(CENTER_SHARE) when its expected noise norm
       sigma_c sqrt(K k) / N is at most MAX_CENTER_NOISE_NORM, else not released (the synthetic images' centre,
       public, is used). Decided before anything is released, from public numbers only.
    4. `rounds` x ceil(STEPS / rounds) full-batch DP-GD steps (at least STEPS) at the noise that keeps history +
       centre + steps within target epsilon (the accountant searches it), clipped at MAX_GRAD_NORM, learning
       rate = min(LOGIT_NOISE / eta, MAX_LR_STEPS) / (steps MAX_GRAD_NORM). Rounds are the run config's (a site's
       policy caps them): with full batches progress and noise depend on lr x steps, not on how the steps are split
       (Panda et al.).

    Args:
        target_epsilon, target_delta: the run's per-site budget.
        site_sizes: each site's training-example count (public: sites declare it).
        feature_dim: D of the backbone.
        num_classes: C (recorded in the reason; the rules do not depend on it: one example moves one class).
        history: the site's earlier releases (ledger); the plan spends what they leave.
        accountant: "rdp" or "prv".
        rounds: federation rounds (FedAvg between them); the default 10 gives the tuned 5 steps per round.

    Raises:
        ConfigError: no sites, or a site with no examples.
        PrivacyBudgetError: the history already spends target epsilon.
    """
    sizes, local_steps, steps = dp_gd_schedule(site_sizes, rounds)
    past = list(history)
    sigma = find_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        sample_rate=1.0,
        steps=1,
        history=past,
        accountant=accountant,
    )
    eta = mean_noise(noise_multiplier=sigma, site_sizes=sizes)
    k = choose_projection_dim(eta, feature_dim=feature_dim)
    total, num_sites = sum(sizes), len(sizes)
    center_sigma = sigma / math.sqrt(CENTER_SHARE)
    center_noise = center_sigma * math.sqrt(num_sites * k) / total
    centre = [PrivacyStep(center_sigma, 1.0, 1)] if center_noise <= MAX_CENTER_NOISE_NORM else []
    noise = find_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        sample_rate=1.0,
        steps=steps,
        history=past + centre,
        accountant=accountant,
    )
    lr_steps = lr_times_steps(eta)
    epsilon = compute_epsilon(
        past + centre + [PrivacyStep(noise, 1.0, steps)], delta=target_delta, accountant=accountant
    )
    centre_text = (
        f"the {k}-dim feature centre is released at noise {center_sigma:.2f} ({CENTER_SHARE:.0%} of the budget; "
        f"expected noise norm {center_noise:.3f} <= {MAX_CENTER_NOISE_NORM})"
        if centre
        else f"no centre is released (its expected noise norm {center_noise:.3f} > {MAX_CENTER_NOISE_NORM}); "
        "the public synthetic centre is used"
    )
    reason = (
        f"{DP_GD}: {num_sites} sites, {total} examples, {num_classes} classes, epsilon {target_epsilon:g} at delta "
        f"{target_delta:g}: one release would need noise {sigma:.2f}, so a mean of unit vectors carries noise "
        f"eta = {eta:.4f} per coordinate; features are projected on the top {k} public synthetic-image directions "
        f"(largest k with eta sqrt(k) <= {MAX_MEAN_NOISE_NORM}); {centre_text}; {steps} full-batch DP-GD steps "
        f"({rounds} rounds of {local_steps}) at noise {noise:.2f}, clip {MAX_GRAD_NORM:g}, learning rate "
        f"{plan_learning_rate(eta, steps):.3g} (lr x steps x clip = {lr_steps:.0f} = min({LOGIT_NOISE} / eta, "
        f"{MAX_LR_STEPS:g})); planned epsilon {epsilon:.3f}"
    )
    return HeadPlan(
        method=DP_GD,
        projection_dim=k,
        center_noise_multiplier=centre[0].noise_multiplier if centre else None,
        noise_multiplier=noise,
        steps=steps,
        local_steps=local_steps,
        learning_rate=plan_learning_rate(eta, steps),
        max_grad_norm=MAX_GRAD_NORM,
        mean_noise=eta,
        epsilon=epsilon,
        reason=reason,
    )


def clipped_gradient_sum(
    features: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    max_grad_norm: float,
    fit_bias: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the sum over examples of the per-example cross-entropy gradients of a linear head, each clipped.

    For logits W u + b the example's gradient is (p - y) [u; 1]^T, of L2 norm ||p - y|| sqrt(||u||^2 + 1), so
    clipping needs no per-sample backward pass (Abadi et al. 2016 clip the joint weight-and-bias gradient, as
    Opacus does). With `fit_bias` False the bias is held (the projected head's, shared/heads.py): the norm is
    ||p - y|| ||u|| and the bias gradient is zero. Returns (grad_weight (C, k), grad_bias (C,)).
    """
    u = np.asarray(features, dtype=np.float64)  # (N, k)
    logits = u @ weight.T + bias  # (N, C)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    g = p - np.eye(weight.shape[0])[labels]  # (N, C)
    norms = np.linalg.norm(g, axis=1) * np.sqrt(np.sum(u * u, axis=1) + float(fit_bias))  # (N,)
    g = g * np.minimum(1.0, max_grad_norm / np.maximum(norms, 1e-12))[:, None]
    return g.T @ u, g.sum(axis=0) if fit_bias else np.zeros(weight.shape[0])


def train_full_batch(
    features: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    steps: int,
    learning_rate: float,
    max_grad_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
    fit_bias: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (W, b) after `steps` full-batch DP-GD steps from (weight, bias) on one site's data.

    `fit_bias` False holds b (the projected head's, which the auto plan trains): no gradient, no noise on it.

    Each step is Opacus' DP-SGD at sample rate 1: the clipped per-example gradients are summed, N(0,
    (noise_multiplier * max_grad_norm)^2) is added to every coordinate, the sum is divided by the site's N.
    `steps` of them compose to one Gaussian mechanism of multiplier noise_multiplier / sqrt(steps) (RDP adds,
    Mironov 2017). For a fixed budget (noise_multiplier = sigma sqrt(steps)) W ends with noise of std
    (lr x steps) sigma max_grad_norm / N per entry, whatever the number of steps, and so does the logit of a
    unit-norm input: after FedAvg over K sites, (lr x steps x max_grad_norm) eta, the module's rule.
    """
    if steps < 0 or not learning_rate > 0:
        raise ConfigError(f"full-batch DP-GD needs steps >= 0 and a learning rate > 0, got {steps}, {learning_rate}")
    w, b = np.array(weight, dtype=np.float64), np.array(bias, dtype=np.float64)
    n = len(labels)
    for _ in range(steps):
        gw, gb = clipped_gradient_sum(features, labels, w, b, max_grad_norm=max_grad_norm, fit_bias=fit_bias)
        std = noise_multiplier * max_grad_norm
        w -= learning_rate * (gw + rng.normal(0.0, std, size=gw.shape)) / n
        if fit_bias:
            b -= learning_rate * (gb + rng.normal(0.0, std, size=gb.shape)) / n
    return w, b


def estimate_center(sums: Sequence[np.ndarray], site_sizes: Sequence[int]) -> np.ndarray:
    """Return the pooled mean from the sites' (noised) sums of projected features and their public counts."""
    return np.sum(np.asarray(sums, dtype=np.float64), axis=0) / sum(site_sizes)
