"""Secure DP-SGD (head-solver "secure-dp-sgd", issue 15) against the default and the lab's central DP-SGD baseline.

Every cell is a real federation of the product (`fedtl.simulations.inprocess.run_inprocess`: the ServerApp and
ClientApp handlers, each site with its own ledger), EfficientNet-Lite0 at 64 px (`--image-size`), 5 iid digits
sites, per-site epsilon 1 and 3 at delta 1e-5, seeds 0-2: `secure-dp-sgd` (t = all sites unless --honest-sites),
the default `auto` (each site noises its own DP-GD updates), and the lab's central DP-SGD baseline on the pooled
training data at the same epsilon (simulations/baselines.train_baseline_head of a `head-solver = "dp-sgd"` lab: a linear
head, the run config's schedule; the lab's auto baseline is the plan of one site, which secure DP-SGD with t = all sites
computes too).
Held-out accuracy (the server's split, never used for any choice); mean and standard error over the seeds.

    nice -n 10 python benchmarks/secure_dp_sgd.py
    python benchmarks/secure_dp_sgd.py --epsilons 1 --seeds 0 --honest-sites 1
    python benchmarks/secure_dp_sgd.py --data ../shared/data/pneumoniamnist_reassembled.npz --image-size 0 --epsilons 1

FEDTL_HOME holds the feature caches. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np


def held_out(summary: dict) -> float:
    """Return a run's final held-out accuracy."""
    return float(summary["final"]["central-accuracy"])


def main() -> None:
    """Run every (epsilon, seed) cell and print the table."""
    from flwr.app import Array, ArrayRecord

    from fedtl.shared import constants as k
    from fedtl.shared.config import RunConfig
    from fedtl.shared.heads import head_arrays
    from fedtl.simulations import baselines as bl
    from fedtl.simulations.inprocess import run_inprocess

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--honest-sites", type=int, default=0, help="t of secure-dp-sgd (0: all sites)")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--image-size", type=int, default=64, help="0: the backbone's own input size (224 px)")
    args = parser.parse_args()
    methods = ("secure-dp-sgd", "auto", "central-dp")
    scores: dict[tuple[str, float], list[float]] = {(m, e): [] for m in methods for e in args.epsilons}
    with tempfile.TemporaryDirectory(prefix="fedtl-secure-dp-sgd-") as tmp:
        for seed in args.seeds:
            base = RunConfig(
                backbone="efficientnet_lite0",
                image_size=args.image_size,
                data=args.data,
                partition="iid",
                seed=seed,
                federated_evaluation=False,
                device="cpu",
                out=tmp,
            )
            lab = None
            for eps in args.epsilons:
                for solver in ("secure-dp-sgd", "auto"):
                    t0 = time.time()
                    cfg = base.replace(target_epsilon=eps, head_solver=solver, run_name=f"{solver}-{eps:g}-{seed}")
                    if solver == "secure-dp-sgd":
                        cfg = cfg.replace(secagg_honest_sites=args.honest_sites)
                    summary = run_inprocess(cfg, num_sites=args.sites)
                    scores[(solver, eps)].append(held_out(summary))
                    print(
                        f"eps {eps:g} seed {seed} {solver}: held-out accuracy {held_out(summary):.3f}, epsilon spent "
                        f"{summary['epsilon-max']:.3f} ({time.time() - t0:.0f} s)",
                        flush=True,
                    )
                lab = lab or bl.load_lab_federation(base.replace(target_epsilon=eps, head_solver="dp-sgd"), args.sites)
                pooled_x = np.concatenate([s.train_features for s in lab.sites])
                pooled_y = np.concatenate([s.train_labels for s in lab.sites])
                t0 = time.time()
                dp = bl.train_baseline_head(lab, pooled_x, pooled_y, target_epsilon=eps, seed=seed)
                record = ArrayRecord({n: Array(v) for n, v in head_arrays(dp.head).items()})
                acc = float(lab.central(record)[k.ACCURACY])
                scores[("central-dp", eps)].append(acc)
                print(
                    f"eps {eps:g} seed {seed} central-dp: held-out accuracy {acc:.3f}, epsilon {dp.epsilon:.3f} "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )
    print(f"\n{args.sites} iid {Path(args.data).name} sites, seeds {args.seeds}: held-out accuracy, mean +- s.e.")
    print("| epsilon | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for eps in args.epsilons:
        cells = []
        for m in methods:
            v = np.array(scores[(m, eps)])
            se = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan
            cells.append(f"{v.mean():.3f} +- {se:.3f}")
        print(f"| {eps:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
