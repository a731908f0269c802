"""Privacy accounting cost: Opacus' RDP accountant called directly (fedtl before issue 13) against shared/privacy.py.

Times, in one run on this machine:

(a) `compute_epsilon` over a site ledger after one typical run: 10 DP-SGD rounds (q = 64/287, 20 steps each,
    the noise found in (b)) and 5 one-shot releases (q = 1, one step: feature centre, closed-form statistics);
(b) `find_noise_multiplier` for that run: q = 64/287, 20 steps/round x 10 rounds, target epsilon 8, delta 1e-5.

"old" is the previous implementation (a fresh `RDPAccountant` per call, every curve recomputed; it has no cache,
so cold and warm are the same), "new" is `fedtl.shared.privacy` with its curve cache emptied first (cold) and
then as it is left (warm). Each figure is the median of `--repeats` calls (cold: each call after emptying the
cache). The script also checks that both give the same numbers.

    python benchmarks/accounting.py            # ~1 minute on 2 CPU cores
    python benchmarks/accounting.py --repeats 1

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

from opacus.accountants import RDPAccountant

from fedtl.shared import privacy
from fedtl.shared.privacy import PrivacyStep, bisect_noise, bracket_noise, compute_epsilon, find_noise_multiplier

Q, STEPS_PER_ROUND, ROUNDS, TARGET_EPSILON, DELTA = 64 / 287, 20, 10, 8.0, 1e-5


def old_compute_epsilon(history: list[PrivacyStep], *, delta: float) -> float:
    """Return epsilon as fedtl did before issue 13: Opacus' RDPAccountant over the whole history."""
    steps = [s for s in history if s.steps > 0]
    if not steps:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in steps]
    return float(acc.get_epsilon(delta=delta))


def old_find_noise_multiplier(
    *, target_epsilon: float, target_delta: float, sample_rate: float, steps: int, precision: float = 0.005
) -> float:
    """Return the noise as fedtl's find_noise_multiplier did before issue 13 (rdp, no history)."""

    def above(sigma: float) -> bool:
        return old_compute_epsilon([PrivacyStep(sigma, sample_rate, steps)], delta=target_delta) > target_epsilon

    low, high = bracket_noise(above, f"{target_epsilon}")  # the search is today's; only epsilon is the old one
    return bisect_noise(above, low, high, precision)


def time_call(fn: Callable[[], object], *, repeats: int, cold: bool) -> tuple[float, object]:
    """Return the median seconds of `repeats` calls of `fn` (emptying the curve cache before each if cold)."""
    times, result = [], None
    for _ in range(repeats):
        if cold:
            privacy._unit_curve.cache_clear()  # the per-process curve cache (private: benchmark only)
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="calls per figure (median reported)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Optimal order is the")

    find_kwargs = dict(target_epsilon=TARGET_EPSILON, target_delta=DELTA, sample_rate=Q, steps=STEPS_PER_ROUND * ROUNDS)
    rows = []
    t_old, sigma_old = time_call(lambda: old_find_noise_multiplier(**find_kwargs), repeats=args.repeats, cold=False)
    t_cold, sigma_new = time_call(lambda: find_noise_multiplier(**find_kwargs), repeats=args.repeats, cold=True)
    t_warm, _ = time_call(lambda: find_noise_multiplier(**find_kwargs), repeats=args.repeats, cold=False)
    rows.append(("(b) find_noise_multiplier", t_old, t_cold, t_warm, f"sigma old {sigma_old!r} new {sigma_new!r}"))

    history = [PrivacyStep(sigma_new, Q, STEPS_PER_ROUND)] * ROUNDS + [PrivacyStep(4.0 + i, 1.0, 1) for i in range(5)]
    t_old, eps_old = time_call(lambda: old_compute_epsilon(history, delta=DELTA), repeats=args.repeats, cold=False)
    t_cold, eps_new = time_call(lambda: compute_epsilon(history, delta=DELTA), repeats=args.repeats, cold=True)
    t_warm, _ = time_call(lambda: compute_epsilon(history, delta=DELTA), repeats=args.repeats, cold=False)
    rows.insert(0, ("(a) compute_epsilon, 15 records", t_old, t_cold, t_warm, f"eps old {eps_old!r} new {eps_new!r}"))

    # A long-lived site: 100 runs' worth of records (1500), warm, as the ledger's charge() recomposes it.
    long_history = history * 100
    t_long, _ = time_call(lambda: compute_epsilon(long_history + [history[0]], delta=DELTA), repeats=5, cold=False)

    print(f"{'':34} {'old (Opacus)':>14} {'new cold':>11} {'new warm':>11}  speed-up cold / warm")
    for name, old, cold, warm, check in rows:
        print(
            f"{name:34} {old * 1e3:11.1f} ms {cold * 1e3:8.1f} ms {warm * 1e3:8.3f} ms  "
            f"{old / cold:6.1f}x / {old / warm:8.0f}x   {check}"
        )
    same = sigma_old == sigma_new and eps_old == eps_new
    print(f"identical results: {same}")
    print(f"compute_epsilon over 1501 records (warm): {t_long * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
