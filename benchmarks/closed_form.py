"""One-shot DP closed-form heads against federated DP-SGD heads at the same epsilon: held-out accuracy.

Every cell is a whole federation run in this process (`run_inprocess`: the same ServerApp logic and ClientApp
handlers as Flower's engine) on digits through EfficientNet-Lite0 at 64 px, 5 iid sites by default:

- `dp-sgd`: the run config's defaults (10 rounds x 2 local epochs of DP-SGD, feature centring, noise derived
  from target-epsilon), with federated evaluation off (it does not change the model);
- `ridge` / `lda` `/p<d>`: head-solver = "closed-form", one noised release of sufficient statistics per
  site, projection-dim d (0: none), after the run's feature-centre release (as DP-SGD runs have it);
- `... nc`: the same without the feature centre (feature-centering = false): the intercept alone.

Accuracy is on the server's held-out split, which nothing here is tuned on. The closed form's design choices
(noise-calibrated ridge shift, projection to 64 dims as a candidate) were explored on the sites' local test
splits, never on the held-out split.

    python benchmarks/closed_form.py                           # epsilon 1, 3, 8; seed 0 (5-10 min on 2 CPU cores)
    python benchmarks/closed_form.py --seeds 0 1 2 --json runs/closed_form.json
    python benchmarks/closed_form.py --backbone tiny --image-size 0 --skip-dp-sgd   # a quick look

Figures are printed, never asserted.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from federation_bench import federation_parser, open_home, write_json


@dataclass(frozen=True)
class Variant:
    """One way of fitting the head: its label and the run-config keys that make it."""

    label: str
    keys: dict


def variants(projection_dims: list[int], methods: list[str], no_centre_dim: int | None) -> list[Variant]:
    """Return the closed-form variants to run: every method x projection, plus the no-centre ones."""
    out = [
        Variant(f"{m}/p{d}", {"head-solver": "closed-form", "closed-form": m, "projection-dim": d})
        for d in projection_dims
        for m in methods
    ]
    if no_centre_dim is not None:
        out += [
            Variant(
                f"{m}/p{no_centre_dim} nc",
                {
                    "head-solver": "closed-form",
                    "closed-form": m,
                    "projection-dim": no_centre_dim,
                    "feature-centering": False,
                },
            )
            for m in methods
        ]
    return out


def run_cell(base: dict, keys: dict, *, epsilon: float, seed: int, sites: int, out: Path) -> dict:
    """Run one federation and return its held-out accuracy, largest site epsilon and wall time."""
    from fedtl.shared.config import RunConfig
    from fedtl.simulations.inprocess import run_inprocess

    _quiet()  # Flower configures its logger when first imported
    cfg = RunConfig.from_mapping({**base, **keys, "target-epsilon": epsilon, "seed": seed, "out": str(out)})
    t0 = time.perf_counter()
    summary = run_inprocess(cfg, num_sites=sites)
    return {
        "accuracy": summary["final"].get("central-accuracy", math.nan),
        "epsilon_max": summary["epsilon-max"],
        "seconds": time.perf_counter() - t0,
        "majority": summary["majority-rate"],
    }


def _quiet() -> None:
    """Keep Flower's and fedtl's per-round log lines out of the table's way (errors still show)."""
    for name in ("flwr", "fedtl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.1f}±{100 * std:.1f}"


def print_table(results: dict, epsilons: list[float], labels: list[str], seeds: list[int]) -> None:
    """Print held-out accuracy (%) per epsilon and method (mean±std over seeds), and closed form minus DP-SGD."""
    print(f"\nheld-out accuracy % (mean±std over seeds {seeds}); largest site epsilon spent in brackets")
    width = max(20, *(len(label) + 2 for label in labels))  # a cell reads "84.0±4.1 [7.99]"
    print("epsilon".ljust(9) + "".join(label.rjust(width) for label in labels))
    for eps in epsilons:
        row = f"{eps:<9g}"
        for label in labels:
            cells = results.get((label, eps), [])
            acc = _mean_std([c["accuracy"] for c in cells])
            spent = max((c["epsilon_max"] for c in cells), default=math.nan)
            row += f"{acc} [{spent:.2f}]".rjust(width)
        print(row)
    if "dp-sgd" not in labels:
        return
    print("\nclosed form minus dp-sgd, points (mean over seeds)")
    others = [label for label in labels if label != "dp-sgd"]
    print("epsilon".ljust(9) + "".join(label.rjust(width) for label in others))
    for eps in epsilons:
        base = [c["accuracy"] for c in results.get(("dp-sgd", eps), [])]
        row = f"{eps:<9g}"
        for label in others:
            cells = [c["accuracy"] for c in results.get((label, eps), [])]
            gap = 100 * (sum(cells) / len(cells) - sum(base) / len(base)) if cells and base else math.nan
            row += f"{gap:+.1f}".rjust(width)
        print(row)


def main() -> None:
    """Parse the arguments, run every cell, print the tables."""
    parser = federation_parser(__doc__, epsilons=[1.0, 3.0, 8.0], seeds=[0])
    parser.add_argument("--projection-dims", type=int, nargs="+", default=[0, 64])
    parser.add_argument("--methods", nargs="+", default=["ridge", "lda"])
    parser.add_argument("--no-centre-dim", type=int, default=64, help="projection of the no-centre variants; -1: none")
    parser.add_argument("--skip-dp-sgd", action="store_true")
    args = parser.parse_args()
    home, out, base = open_home(args, prefix="fedtl-closed-form-")
    chosen = variants(args.projection_dims, args.methods, None if args.no_centre_dim < 0 else args.no_centre_dim)
    if not args.skip_dp_sgd:
        chosen = [Variant("dp-sgd", {})] + chosen
    print(
        f"{args.data} at {args.image_size or 'native'} px, {args.backbone}, {args.sites} iid sites; FEDTL_HOME={home}"
    )
    results: dict = {}
    rows = []
    for seed in args.seeds:
        for eps in args.epsilons:
            for variant in chosen:
                cell = run_cell(base, variant.keys, epsilon=eps, seed=seed, sites=args.sites, out=out)
                results.setdefault((variant.label, eps), []).append(cell)
                rows.append({"method": variant.label, "epsilon": eps, "seed": seed, **cell})
                print(
                    f"seed {seed} eps {eps:g} {variant.label:>14}: accuracy {100 * cell['accuracy']:.1f}% "
                    f"(majority {100 * cell['majority']:.1f}%), epsilon spent {cell['epsilon_max']:.3f}, "
                    f"{cell['seconds']:.0f} s",
                    flush=True,
                )
    print_table(results, args.epsilons, [v.label for v in chosen], args.seeds)
    write_json(args.json, {"args": vars(args), "cells": rows})


if __name__ == "__main__":
    main()
