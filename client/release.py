"""The one release path of a site: plan the noise -> check it against the policy -> charge the ledger -> noise.

Every privacy-costing release (DP-SGD rounds, the feature-centre sum, the closed form's sufficient
statistics; shared/mechanisms.py declares them) is a `ReleaseRequest` handed to `charge_release`.
Inside one ledger transaction it plans the noise (the one the run fixed, the one the server chose by a
public rule, or the smallest that keeps the site within the run's target epsilon), lets the policy
refuse it, and appends the charge within the budget, before anything is computed. The caller then adds
the noise with the generator the returned `Release` gives: seeded from the run in simulation, from the
operating system's entropy at a real site. Epsilon reported is always the site's cumulative spend.
"""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtl.client.ledger import PrivacyCharge
from fedtl.client.policy import PolicyRefusal
from fedtl.client.quotas import charge_noise_free
from fedtl.client.site import Site
from fedtl.shared.mechanisms import SERVER, SKELLAM, Mechanism
from fedtl.shared.privacy import find_noise_multiplier
from fedtl.shared.protocol import RoundSettings
from fedtl.shared.secure_noise import SecureRandom

log = logging.getLogger(__name__)

BUDGET_WARNING_SHARE = 0.9  # a real site warns when a release brings it this close to its lifetime budget


@dataclass(frozen=True)
class ReleaseRequest:
    """One release a site is about to make: which mechanism, how it samples, and who fixed its noise."""

    mechanism: Mechanism
    server_round: int  # the round it belongs to (the ledger record's `server_round`; seeds simulated noise)
    sample_rate: float
    steps: int  # charged now
    what: str  # names the release in logs and refusals
    # Fixed by the run config (settings.noise_multiplier) or, for a mechanism the server plans, by the server's
    # public rule; None: the site plans it from its budget.
    noise_multiplier: float | None
    num_examples: int = 0  # N, the examples the release is computed from (declared public); 0: not checked
    planned_steps: int = 0  # every step of this mechanism the run will take (planning "auto"); >= steps
    # Checks the run's earlier charges before anything is planned (e.g. the policy's rounds per run).
    precondition: Callable[[list[PrivacyCharge]], None] | None = None
    # The caller knows no release was made for this run and round (a crash or kill after the write-ahead charge,
    # before anything left the site): a charge of this mechanism for exactly this round then pays for it.
    unreleased_charge_pays: bool = False
    # A Skellam mechanism's integer L2 / L1 sensitivities, and the trust assumption it is charged under: at least
    # `honest_sites` of the `num_sites` sites of the secure sum add their noise share (shared/distributed_noise.py).
    l2_sensitivity: float = 0.0
    l1_sensitivity: float = 0.0
    honest_sites: int = 0
    num_sites: int = 0

    def __post_init__(self) -> None:
        if self.mechanism.accounting == SKELLAM and not (
            self.l2_sensitivity > 0 and 1 <= self.honest_sites <= self.num_sites
        ):
            raise ValueError(
                f"{self.what}: a Skellam release needs its l2-sensitivity (> 0, got {self.l2_sensitivity}) and "
                f"1 <= honest-sites ({self.honest_sites}) <= num-sites ({self.num_sites})"
            )

    @classmethod
    def once(
        cls, mechanism: Mechanism, server_round: int, what: str, noise_multiplier: float | None, **more: Any
    ) -> ReleaseRequest:
        """Return the request of a release computed once over all the site's examples (sample rate 1, one step)."""
        return cls(mechanism, server_round, 1.0, 1, what, noise_multiplier, **more)


@dataclass(frozen=True)
class Release:
    """A release that is paid for: its noise, the site's cumulative epsilon after it, and its noise's seed."""

    noise_multiplier: float  # 0.0: no noise (the non-private baseline, or a run that fixed noise 0)
    epsilon: float  # cumulative over the site's whole ledger, at `delta`; inf once anything went without noise
    delta: float
    seed: int | None  # None: a real site, whose noise comes from a cryptographic generator (shared/secure_noise.py)

    def rng(self) -> np.random.Generator | SecureRandom:
        """Return the generator of this release's noise: seeded in simulation, cryptographic at a real site."""
        return np.random.default_rng(self.seed) if self.seed is not None else SecureRandom()


def site_accountant(site: Site, settings: RoundSettings) -> str:
    """Return the accountant the site counts with: its policy's, or the run's for a simulated site."""
    return site.policy.accountant if site.policy is not None else settings.accountant


def round_seed(site: Site, settings: RoundSettings, server_round: int) -> int | None:
    """Return the seed of a round's sampling and noise: reproducible in simulation, None (OS entropy) at real sites."""
    if site.simulation is None:
        return None
    # Simulation only: the noise is reproducible from the run seed, which a real server would know.
    return zlib.crc32(f"{settings.seed}/{site.name}/{server_round}".encode())


def charge_release(site: Site, settings: RoundSettings, request: ReleaseRequest) -> Release:
    """Plan, check and charge one release in one ledger transaction, before it is computed (write-ahead).

    A release without noise is charged with noise 0, so the site's epsilon honestly becomes infinite, and
    only where the policy allows non-private work. A noise-free mechanism (`accounted = False`: evaluation
    metrics, ranking and finetune scores) is no DP release: it is recorded without epsilon and counted
    against the policy's quotas (client/quotas.py); its `Release` has noise 0 and epsilon nan (unchanged,
    not computed).

    Raises:
        PrivacyBudgetError: the release would take the site past the run's target epsilon (the message has
            the numbers), or the budget is already spent.
        PolicyRefusal: the noise is below the policy's minimum, zero where the policy forbids it, a quota of
            noise-free releases is reached, or the request's precondition refuses it.
    """
    if not request.mechanism.accounted:
        charge_noise_free(
            site,
            request.mechanism,
            run_id=settings.run_id,
            server_round=request.server_round,
            delta=settings.target_delta,
            what=request.what,
            precondition=request.precondition,
        )
        return Release(0.0, math.nan, settings.target_delta, None)
    policy = site.policy
    accountant = site_accountant(site, settings)
    check_delta(site, settings, request)
    with site.ledger.transaction() as book:
        if request.precondition is not None:
            request.precondition(book.charges)
        paid = _unreleased_charge(settings, request, book.charges)
        if paid is not None:
            log.info(
                "site %s: %s was charged by an attempt that released nothing (interrupted); that charge pays for it",
                site.name,
                request.what,
            )
            epsilon = book.epsilon(delta=settings.target_delta, accountant=accountant)
            return Release(
                paid.noise_multiplier, epsilon, settings.target_delta, round_seed(site, settings, request.server_round)
            )
        noise = plan_noise(site, settings, request, book.charges, accountant=accountant)
        if policy is not None and not settings.non_private:
            policy.check_noise(noise, what=request.what)
        if policy is not None and request.mechanism.accounting == SKELLAM:
            policy.check_honest_sites(request.honest_sites, what=request.what)
        if noise == 0:
            if policy is not None and not policy.allow_non_private:  # check_settings refuses such runs first
                raise PolicyRefusal(f"site {site.name} refuses {request.what}: no noise, and allow-non-private = false")
            budget, budget_name = math.inf, ""
        else:
            budget, budget_name = settings.target_epsilon, "the run's target-epsilon"
            if policy is not None and policy.max_epsilon < budget:  # check_settings refuses such runs first
                budget, budget_name = policy.max_epsilon, "the policy's max-epsilon"
        charge = PrivacyCharge(
            run_id=settings.run_id,
            server_round=request.server_round,
            noise_multiplier=noise,
            sample_rate=request.sample_rate,
            steps=request.steps,
            delta=settings.target_delta,
            kind=request.mechanism.kind,
            l2_sensitivity=request.l2_sensitivity if noise > 0 else 0.0,
            l1_sensitivity=request.l1_sensitivity if noise > 0 else 0.0,
            honest_sites=request.honest_sites,
            num_sites=request.num_sites,
        )
        # The run's target epsilon is at most the policy's max-epsilon and its delta at most the policy's
        # (SitePolicy.check_settings), so staying within the run's target keeps the site within its lifetime
        # budget too (epsilon only falls as delta grows).
        projected = book.append(
            charge,
            max_epsilon=budget,
            delta=settings.target_delta,
            accountant=accountant,
            what=f"{request.what} at site {site.name}",
            budget_name=budget_name,
        )
    if policy is not None and math.isfinite(projected) and projected >= BUDGET_WARNING_SHARE * policy.max_epsilon:
        log.warning(
            "site %s: %s brings its lifetime epsilon to %.3f of the policy's max-epsilon %.3g (budget nearly spent)",
            site.name,
            request.what,
            projected,
            policy.max_epsilon,
        )
    # With no budget to check the ledger computes nothing; a release without noise makes epsilon infinite.
    epsilon = projected if math.isfinite(budget) else math.inf
    return Release(noise, epsilon, settings.target_delta, round_seed(site, settings, request.server_round))


def _unreleased_charge(
    settings: RoundSettings, request: ReleaseRequest, charges: list[PrivacyCharge]
) -> PrivacyCharge | None:
    """Return this run's charge for exactly this release when the caller says none of it was released, else None."""
    if not request.unreleased_charge_pays:
        return None
    for c in charges:
        if (c.run_id, c.kind, c.server_round, c.sample_rate, c.steps) == (
            settings.run_id,
            request.mechanism.kind,
            request.server_round,
            request.sample_rate,
            request.steps,
        ):
            return c
    return None


DELTA_WARNING_FACTOR = 0.1  # delta above this share of 1/N is legal but weak: the site logs a warning


def check_delta(site: Site, settings: RoundSettings, request: ReleaseRequest) -> None:
    """Refuse a release whose delta is not below 1/N for its N examples; warn when it is not well below.

    (epsilon, delta)-DP with delta >= 1/N is met by a mechanism that publishes one example outright, so it
    protects nobody; the usual advice is delta much smaller than 1/N (Dwork & Roth 2014, section 2.3).

    Raises:
        PolicyRefusal: target-delta >= 1 / num_examples.
    """
    n = request.num_examples
    if not n:
        return
    if settings.target_delta >= 1.0 / n:
        raise PolicyRefusal(
            f"site {site.name} refuses {request.what}: target-delta {settings.target_delta:g} is not below 1/N = "
            f"{1.0 / n:.3g} for its N = {n} examples, so it would protect no one; ask for a delta well below 1/N "
            "(e.g. 1e-5)"
        )
    if settings.target_delta > DELTA_WARNING_FACTOR / n:
        log.warning(
            "site %s: target-delta %g is close to 1/N = %.3g for %s (keep delta well below 1/N)",
            site.name,
            settings.target_delta,
            1.0 / n,
            request.what,
        )


def plan_noise(
    site: Site, settings: RoundSettings, request: ReleaseRequest, charges: list[PrivacyCharge], *, accountant: str
) -> float:
    """Return the release's noise multiplier (0.0: none), from the site's charges read in the transaction.

    In the non-private baseline it is 0. A noise fixed by the run config or chosen by the server is taken
    as it is (the policy checks it next). Otherwise the site plans it: the noise of this run's earlier
    releases of the same mechanism (all releases of a run agree), or at its first one the smallest noise
    (to 0.005) that keeps every earlier charge plus all `planned_steps` of the run within the run's
    target epsilon, and never below the policy's `min-noise-multiplier`.

    Raises:
        PrivacyBudgetError: earlier charges already spend the target epsilon, or no noise up to 1e4 fits.
    """
    mechanism = request.mechanism
    if settings.non_private:
        log.warning("site %s: NON-PRIVATE %s (baseline mode): no clipping, no noise", site.name, request.what)
        return 0.0
    if request.noise_multiplier is not None:
        if request.noise_multiplier == 0:
            warnings.warn(f"noise-multiplier is 0: {request.what} is released without noise (epsilon = inf)")
        return float(request.noise_multiplier)
    if mechanism.noise_planned_by == SERVER:
        raise ValueError(f"{request.what}: the server picks this mechanism's noise, but the request carries none")
    mine = [c for c in charges if c.run_id == settings.run_id and c.kind == mechanism.kind]
    if mine:
        return mine[0].noise_multiplier
    noise = find_noise_multiplier(
        target_epsilon=settings.target_epsilon,
        target_delta=settings.target_delta,
        sample_rate=request.sample_rate,
        steps=max(request.planned_steps, request.steps),
        history=[c.step for c in charges],
        accountant=accountant,
    )
    if site.policy is not None and noise < site.policy.min_noise_multiplier:
        log.info(
            "site %s: the run's budget allows noise %.3f for %s; the policy's minimum %.3f is used (spends less)",
            site.name,
            noise,
            request.what,
            site.policy.min_noise_multiplier,
        )
        noise = site.policy.min_noise_multiplier
    return noise
