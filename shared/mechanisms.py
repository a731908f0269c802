"""Every kind of privacy-costing release a site makes, declared once: its ledger kind, sensitivity and noise planner.

A site pays for each release in its ledger before making it (client/release.py: plan -> policy check ->
charge -> noise). The GAUSSIAN mechanisms add noise of std `noise_multiplier x sensitivity` to a quantity
whose L2 sensitivity (one example added or removed) is `sensitivity`; each is accounted as `steps` sampled
Gaussian steps at `sample_rate` (Mironov et al. 2019). The SKELLAM mechanisms are the distributed noise of
secure aggregation (shared/distributed_noise.py): the site adds its share of integer Skellam noise to a
quantised release whose integer sensitivities the release request carries, and is charged what the sum
guarantees when at least `secagg-honest-sites` honest sites' shares are in it (the record names that
assumption). A new mechanism is a new entry here and a module that builds its release request.
"""

from __future__ import annotations

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
    sensitivity: float  # L2 sensitivity in the released quantity's units; for DP-SGD in units of max-grad-norm
    noise_planned_by: str  # SITE or SERVER
    accounting: str = GAUSSIAN  # GAUSSIAN or SKELLAM


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

MECHANISMS = {m.kind: m for m in (DP_SGD, FEATURE_SUM, SUFFICIENT_STATS, SECURE_FEATURE_SUM, SECURE_SUFFICIENT_STATS)}
