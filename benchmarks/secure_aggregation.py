"""Secure aggregation with distributed noise: what it costs in time, what it gives back in accuracy.

Every cell is a whole federation run in this process (`run_inprocess`: the same ServerApp logic and ClientApp
handlers as Flower's engine), closed-form heads (ridge, projection-dim 64 by default) on EfficientNet-Lite0
features at 64 px:

- overhead: a 10-site closed-form run with and without `secure-aggregation` (both make two releases per site,
  the feature centre and the statistics; with it, each is a four-stage secure sum), median of the repeats,
  after a warm-up run that fills the feature caches; also with the full 1280-dim Gram (projection-dim 0);
- accuracy on the server's held-out split, mean ± standard error over seeds: `central` (one site holding all
  the sites' training data: one trusted curator), `plain` (5 sites, each adding the full noise its epsilon
  needs, the server seeing each release), `secagg` (5 sites, each adding 1/5 of the noise, the server
  seeing only the sum). The target: secagg within two standard errors of central;
- the price of distrust: secagg assuming t = 1 .. 5 honest sites (each site adds 1/t of the noise).

    python benchmarks/secure_aggregation.py --home ~/.cache/fedtl-secagg            # all of it, 3 seeds
    python benchmarks/secure_aggregation.py --skip-accuracy                         # the overhead only
    python benchmarks/secure_aggregation.py --skip-overhead --data ../shared/data/pneumoniamnist_reassembled.npz \\
        --epsilons 1 --distrust-epsilon 1

Figures are printed, never asserted.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from federation_bench import federation_parser, open_home, write_json

from fedtl.shared.secure_sum import expand_mask, stats_length


def run_cell(base: dict, keys: dict, *, sites: int, out: Path) -> dict:
    """Run one federation; return its held-out accuracy, largest site epsilon and wall time."""
    from fedtl.shared.config import RunConfig
    from fedtl.simulations.inprocess import run_inprocess

    _quiet()
    cfg = RunConfig.from_mapping({**base, **keys, "out": str(out)})
    t0 = time.perf_counter()
    summary = run_inprocess(cfg, num_sites=sites)
    return {
        "accuracy": summary["final"].get("central-accuracy", math.nan),
        "epsilon_max": summary["epsilon-max"],
        "epsilon_if_alone": summary.get("secure-aggregation", {}).get("epsilon-if-alone", math.nan),
        "seconds": time.perf_counter() - t0,
    }


def _quiet() -> None:
    for name in ("flwr", "fedtl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def overhead(base: dict, *, sites: int, repeats: int, out: Path, projection_dims: list[int]) -> list[dict]:
    """Print and return the wall time of a closed-form run with and without secure aggregation."""
    rows = []
    for dim in projection_dims:
        keys = {"projection-dim": dim, "target-epsilon": 3.0, "seed": 0}
        run_cell(base, {**keys, "secure-aggregation": True}, sites=sites, out=out)  # warm-up: feature caches
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for secure in (False, True):
                cell = run_cell(base, {**keys, "secure-aggregation": secure}, sites=sites, out=out)
                times[secure].append(cell["seconds"])
        plain, secure = statistics.median(times[False]), statistics.median(times[True])
        length = stats_length(dim or 1280, 10)
        print(
            f"overhead, {sites} sites, projection-dim {dim}: plain {plain:.2f} s, secure aggregation {secure:.2f} s "
            f"-> +{secure - plain:.2f} s per run (a secure sum of the 1280-entry feature sum, one of the "
            f"{length}-entry statistics); runs {[round(t, 2) for t in times[False]]} / "
            f"{[round(t, 2) for t in times[True]]}",
            flush=True,
        )
        rows.append({"projection-dim": dim, "plain": times[False], "secure": times[True]})
    # What dominates a large sum: n mask expansions per site and n at the server, of `length` words each.
    length = stats_length(1280, 10)
    t0 = time.perf_counter()
    for _ in range(5):
        expand_mask(os.urandom(32), length)
    per_mask = (time.perf_counter() - t0) / 5
    print(
        f"mask expansion here: {8 * length / per_mask / 1e6:.0f} MB/s (ChaCha20); a {sites}-site sum of {length} "
        f"entries expands {sites * sites + sites} masks: {per_mask * (sites * sites + sites):.2f} s of it"
    )
    for dim in projection_dims:
        m = stats_length(dim or 1280, 10)
        seconds = statistics.median(protocol_seconds(sites, m, out) for _ in range(repeats))
        print(
            f"the protocol alone ({sites} sites and the server in one process, no release), {m} entries: "
            f"{seconds:.2f} s"
        )
    return rows


def protocol_seconds(sites: int, length: int, out: Path) -> float:
    """Return the wall time of one secure sum's four stages over `sites` in-process sites (zero vectors, no Flower)."""
    import numpy as np

    from fedtl.client import secagg
    from fedtl.client.site import Site
    from fedtl.server.secagg import SecureSum
    from fedtl.shared import constants as k

    root = Path(tempfile.mkdtemp(prefix="protocol-", dir=out))
    members = [Site(name=f"s{i}", state_dir=root / f"s{i}", cache_dir=root, data="") for i in range(1, sites + 1)]
    zeros = np.zeros(length, dtype=np.int64)
    t0 = time.perf_counter()
    server = SecureSum(sites, sites, "benchmark", length)

    def plan(i: int) -> secagg.SessionPlan:
        return secagg.SessionPlan(server.session, "benchmark", i, sites, server.threshold, sites, "benchmark")

    server.receive_public_keys({i: secagg.setup_session(s, plan(i)) for i, s in enumerate(members, 1)})
    request = server.share_keys_request()
    keys = dict(zip(request[k.SECAGG_INDICES], zip(request[k.SECAGG_PUBLIC_KEYS_1], request[k.SECAGG_PUBLIC_KEYS_2])))
    server.receive_shares_to_route({i: secagg.share_keys(s, server.session, keys) for i, s in enumerate(members, 1)})
    masked = {}
    for i, site in enumerate(members, 1):
        request = server.masked_input_request(i)
        incoming = dict(zip(request[k.SECAGG_SOURCES], request[k.SECAGG_CIPHERTEXTS]))
        masked[i] = secagg.mask_input(site, server.session, incoming, lambda _plan: zeros)
    server.receive_masked(masked)
    request = server.unmask_request()
    active, dropped = request[k.SECAGG_ACTIVE], request[k.SECAGG_DROPPED]
    server.finish(
        {i: secagg.unmask(s, server.session, active=active, dropped=dropped) for i, s in enumerate(members, 1)}
    )
    return time.perf_counter() - t0


def accuracy(
    base: dict, *, epsilons: list[float], seeds: list[int], sites: int, distrust_epsilon: float | None, out: Path
) -> list[dict]:
    """Print central / plain / secagg accuracy per epsilon (mean ± SE over seeds) and the price of distrust."""
    arms = {"central": (1, {}), "plain": (sites, {}), "secagg": (sites, {"secure-aggregation": True})}
    if distrust_epsilon is not None:
        for t in range(1, sites):
            arms[f"secagg t={t}"] = (sites, {"secure-aggregation": True, "secagg-honest-sites": t})
    cells = []
    for eps in epsilons:
        for seed in seeds:
            for arm, (n, keys) in arms.items():
                if arm.startswith("secagg t=") and eps != distrust_epsilon:
                    continue
                cell = run_cell(base, {**keys, "target-epsilon": eps, "seed": seed}, sites=n, out=out)
                cells.append({"arm": arm, "epsilon": eps, "seed": seed, **cell})
                print(
                    f"eps {eps:g} seed {seed} {arm:>12}: accuracy {100 * cell['accuracy']:.1f}%, epsilon spent "
                    f"{cell['epsilon_max']:.3f}"
                    + (f" (if every other site colluded: {cell['epsilon_if_alone']:.3f})" if "secagg" in arm else "")
                    + f", {cell['seconds']:.1f} s",
                    flush=True,
                )
    print(f"\nheld-out accuracy %, mean ± standard error over seeds {seeds}")
    for eps in epsilons:
        by_arm = {a: [c["accuracy"] for c in cells if c["arm"] == a and c["epsilon"] == eps] for a in arms}
        line = f"epsilon {eps:g}: " + ", ".join(
            f"{a} {100 * _mean_se(v)[0]:.1f}±{100 * _mean_se(v)[1]:.1f}" for a, v in by_arm.items() if v
        )
        print(line)
        if by_arm["central"] and by_arm["secagg"]:
            (mc, sc), (ms, ss) = _mean_se(by_arm["central"]), _mean_se(by_arm["secagg"])
            gap, se = ms - mc, math.sqrt(sc**2 + ss**2)
            verdict = "within" if abs(gap) <= 2 * se else "NOT within"
            print(f"  secagg - central = {100 * gap:+.1f} points, 2 SE = {200 * se:.1f}: {verdict} two standard errors")
    if distrust_epsilon is not None:
        print(f"\nthe price of distrust at epsilon {distrust_epsilon:g} ({sites} sites; t = honest sites assumed)")
        for t in range(1, sites + 1):
            arm = "secagg" if t == sites else f"secagg t={t}"
            values = [c["accuracy"] for c in cells if c["arm"] == arm and c["epsilon"] == distrust_epsilon]
            if values:
                mean, se = _mean_se(values)
                print(f"  t = {t}: {100 * mean:.1f}±{100 * se:.1f}%")
    return cells


def main() -> None:
    """Parse the arguments, run the overhead and accuracy cells, print the figures."""
    parser = federation_parser(__doc__, epsilons=[1.0, 3.0], seeds=[0, 1, 2])
    parser.add_argument("--projection-dim", type=int, default=64)
    parser.add_argument("--closed-form", default="ridge")
    parser.add_argument("--distrust-epsilon", type=float, default=1.0, help="epsilon of the t sweep; -1: none")
    parser.add_argument("--overhead-sites", type=int, default=10)
    parser.add_argument("--overhead-repeats", type=int, default=3)
    parser.add_argument("--overhead-projection-dims", type=int, nargs="+", default=[64, 0])
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    home, out, base = open_home(args, prefix="fedtl-secagg-")
    base = {**base, "head-solver": "closed-form", "closed-form": args.closed_form}
    print(f"{args.data} at {args.image_size} px, {args.backbone}, closed form {args.closed_form}; FEDTL_HOME={home}")
    print(f"torch threads {__import__('torch').get_num_threads()}, cpus {os.cpu_count()}")
    report: dict = {"args": vars(args)}
    if not args.skip_overhead:
        report["overhead"] = overhead(
            {**base, "data": "digits"},
            sites=args.overhead_sites,
            repeats=args.overhead_repeats,
            out=out,
            projection_dims=args.overhead_projection_dims,
        )
    if not args.skip_accuracy:
        report["accuracy"] = accuracy(
            {**base, "projection-dim": args.projection_dim},
            epsilons=args.epsilons,
            seeds=args.seeds,
            sites=args.sites,
            distrust_epsilon=None if args.distrust_epsilon < 0 else args.distrust_epsilon,
            out=out,
        )
    write_json(args.json, report)


if __name__ == "__main__":
    main()
