"""Caps that epsilon cannot enforce: noise-free releases per run and per day, trained releases per day.

Evaluation metrics, transferability scores and finetuned scores are computed on private examples and
leave the site without noise (shared/mechanisms.py: `accounted = False`), so any number of adaptive
queries could reconstruct what epsilon protects (e.g. exact class counts of the test split from a
constant head). A real site therefore records each such release in its ledger before computing it, and
refuses one beyond its policy's `max-noise-free-releases-per-run`, or beyond
`max-noise-free-releases-per-day` over all runs in the last 24 hours, counted from the ledger inside the
release's transaction, so new run ids gain nothing. The same rolling window caps releases of something
trained (`max-rounds-per-day`) besides `max-rounds-per-run`: a DP-SGD round's update, and each step of secure
DP-SGD, whose head gradient leaves the site every step (masked, in a secure sum), where a DP-SGD round's
local steps stay at the site until the round's one update. Counting releases keeps 50 secure steps from
passing as a few rounds; the default cap (200) still lets four 50-step secure runs through a day. The caps
bound how much leaks; they are no DP guarantee. Simulated sites (no policy) have no caps and write no
noise-free records, so a simulated run's ledger holds its DP releases only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fedtl.client.ledger import PrivacyCharge, noise_free_charge
from fedtl.client.policy import PolicyRefusal, SitePolicy
from fedtl.client.site import Site
from fedtl.shared.mechanisms import DP_SGD, NOISE_FREE_KINDS, SECURE_HEAD_GRADIENT, Mechanism

WINDOW_S = 24 * 3600.0  # the rolling window of the per-day caps
# Releases of something trained, each counted once per (run, kind, round) against max-rounds-per-day: a DP-SGD
# round's update; a secure DP-SGD step's head gradient (its ledger round is the step).
TRAINED_KINDS = frozenset({DP_SGD.kind, SECURE_HEAD_GRADIENT.kind})


def count_noise_free(charges: list[PrivacyCharge], *, run_id: str | None = None, since: float | None = None) -> int:
    """Return how many noise-free releases `charges` hold, of one run and/or from a time on."""
    return sum(
        1
        for c in charges
        if c.kind in NOISE_FREE_KINDS and (run_id is None or c.run_id == run_id) and (since is None or c.time >= since)
    )


def check_noise_free_quota(
    policy: SitePolicy, charges: list[PrivacyCharge], *, run_id: str, what: str, now: float | None = None
) -> None:
    """Refuse one more noise-free release when the run's or the last 24 hours' count is at the policy's cap.

    Raises:
        PolicyRefusal: the message names the count, the cap and the policy key.
    """
    now = time.time() if now is None else now
    in_run = count_noise_free(charges, run_id=run_id)
    if in_run >= policy.max_noise_free_releases_per_run:
        raise PolicyRefusal(
            f"site {policy.site_name} refuses {what}: run {run_id} already had {in_run} noise-free releases here "
            f"(evaluation metrics, ranking or finetune scores), the policy's max-noise-free-releases-per-run"
        )
    today = count_noise_free(charges, since=now - WINDOW_S)
    if today >= policy.max_noise_free_releases_per_day:
        raise PolicyRefusal(
            f"site {policy.site_name} refuses {what}: {today} noise-free releases in the last 24 hours, the "
            f"policy's max-noise-free-releases-per-day"
        )


def check_rounds_per_day(
    policy: SitePolicy,
    charges: list[PrivacyCharge],
    *,
    run_id: str,
    server_round: int,
    what: str,
    kind: str = DP_SGD.kind,
    now: float | None = None,
) -> None:
    """Refuse a new trained release (`kind` in TRAINED_KINDS) when the last 24 hours hold `max-rounds-per-day`.

    A release counts once however many charges it has (a redone round or step is not a new one).

    Raises:
        PolicyRefusal: the message names the count and the policy key.
    """
    now = time.time() if now is None else now
    recent = {
        (c.run_id, c.kind, c.server_round) for c in charges if c.kind in TRAINED_KINDS and c.time >= now - WINDOW_S
    }
    if (run_id, kind, server_round) not in recent and len(recent) >= policy.max_rounds_per_day:
        raise PolicyRefusal(
            f"site {policy.site_name} refuses {what}: {len(recent)} trained releases (DP-SGD rounds, secure DP-SGD "
            "steps) in the last 24 hours over all runs, the policy's max-rounds-per-day"
        )


def charge_noise_free(
    site: Site,
    mechanism: Mechanism,
    *,
    run_id: str,
    server_round: int,
    delta: float,
    what: str,
    precondition: Callable[[list[PrivacyCharge]], None] | None = None,
) -> None:
    """Record one noise-free release in the ledger, within the policy's quotas, before it is computed.

    A simulated site (no policy) has no quotas and records nothing.

    Raises:
        PolicyRefusal: a quota is reached or `precondition` refuses (nothing is written).
    """
    policy = site.policy
    if policy is None:
        return
    with site.ledger.transaction() as book:
        if precondition is not None:
            precondition(book.charges)
        check_noise_free_quota(policy, book.charges, run_id=run_id, what=what)
        book.append(noise_free_charge(run_id=run_id, server_round=server_round, kind=mechanism.kind, delta=delta))
