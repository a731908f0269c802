"""Every kind of privacy-costing release a site makes, declared once: its ledger kind, sensitivity and noise planner.

A site pays for each release in its ledger before making it (client/release.py: plan -> policy check ->
charge -> noise). The GAUSSIAN mechanisms add noise of std `noise_multiplier x sensitivity` to a quantity
whose L2 sensitivity (one example added or removed) is `sensitivity`; each is accounted as `steps` sampled
Gaussian steps at `sample_rate` (Mironov et al. 2019). The SKELLAM mechanisms are the distributed noise of
secure aggregation (shared/distributed_noise.py): the site adds its share of integer Skellam noise to a
quantised release whose integer sensitivities the release request carries, and is charged what the sum
guarantees when at least `secagg-honest-sites` honest sites' shares are in it (the record names that
assumption). A new mechanism is a new entry here and a module that builds its release request.

Noise-free releases (evaluation metrics, transferability scores, finetuned scores) are declared here too,
with `accounted = False`: they carry no DP guarantee, so they add nothing to epsilon (their ledger records
hold noise 0, sample rate 0 and 0 steps, which Opacus' RDP analysis also counts as nothing), but each is
recorded in the ledger before it is computed and counted against the policy's quotas (client/quotas.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtl.shared import closed_form

GAUSSIAN = "gaussian"  # accounted as sampled Gaussian steps (Opacus' RDP or PRV accountant)
SKELLAM = "skellam"  # distributed Skellam noise under secure aggregation (integer-order RDP, Agarwal et al. 2021)

SITE = "site"  # the site plans the noise from its budget (noise-multiplier "auto"), or the run fixes it
SERVER = "server"  # the server picks the noise by a public rule and the site checks it against its policy


@dataclass(frozen=True)
class Mechanism:
    """One kind of release: what the ledger calls it, what one example can change, who picks its noise."""

    kind: str  # the ledger record's `kind`
    description: str
    sensitivity: float  # L2 sensitivity in the released quantity's units (DP-SGD: of max-grad-norm; noise-free: inf)
    noise_planned_by: str  # SITE or SERVER
    accounting: str = GAUSSIAN  # GAUSSIAN or SKELLAM
    accounted: bool = True  # False: a noise-free release, outside epsilon, counted against the policy's quotas


DP_SGD = Mechanism("dp-sgd", "DP-SGD steps on the model above the cut", 1.0, SITE)
FEATURE_SUM = Mechanism("feature-sum", "the noised sum of the site's L2-normalised features (centring)", 1.0, SERVER)
SUFFICIENT_STATS = Mechanism(
    "sufficient-stats", "noised sufficient statistics of the closed-form head", closed_form.SENSITIVITY, SITE
)

# Under secure aggregation the server plans the noise by a public rule, so every site adds a share of one noise.
SECURE_FEATURE_SUM = Mechanism(
    "secagg-feature-sum",
    "the site's Skellam share on its quantised feature sum (secure aggregation)",
    1.0,
    SERVER,
    SKELLAM,
)
SECURE_SUFFICIENT_STATS = Mechanism(
    "secagg-sufficient-stats",
    "the site's Skellam share on its quantised sufficient statistics (secure aggregation)",
    closed_form.SENSITIVITY,
    SERVER,
    SKELLAM,
)

# One step of distributed DP-FedSGD (head-solver "secure-dp-sgd"): the sum of the clipped per-example gradients of
# the site's Poisson sample, in units of max-grad-norm (server/solvers/secure_dp_sgd.py).
SECURE_HEAD_GRADIENT = Mechanism(
    "secagg-head-gradient",
    "the site's Skellam share on its quantised sum of clipped per-example head gradients (secure aggregation)",
    1.0,
    SERVER,
    SKELLAM,
)

# PRIVACY SHORTCUT: the three below leave the site without noise; they are capped in number, not by epsilon.
EVALUATION = Mechanism(
    "evaluation",
    "noise-free metrics of the global model on the site's local test split",
    math.inf,
    SITE,
    accounted=False,
)
RANKING = Mechanism(
    "ranking", "noise-free transferability scores of a backbone on the site's features", math.inf, SITE, accounted=False
)
FINETUNE_SCORES = Mechanism(
    "finetune-scores", "noise-free test scores of the shared and the finetuned head", math.inf, SITE, accounted=False
)

MECHANISMS = {
    m.kind: m
    for m in (
        DP_SGD,
        FEATURE_SUM,
        SUFFICIENT_STATS,
        SECURE_FEATURE_SUM,
        SECURE_SUFFICIENT_STATS,
        SECURE_HEAD_GRADIENT,
        EVALUATION,
        RANKING,
        FINETUNE_SCORES,
    )
}
NOISE_FREE_KINDS = frozenset(kind for kind, m in MECHANISMS.items() if not m.accounted)
