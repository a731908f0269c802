"""Does `fedtl rank-backbones` pick the backbone that federated training then favours? Scores beside accuracies.

For each dataset and candidate backbone (default EfficientNet-Lite0/1/2, all with weights on disk):

1. the ranking itself (`rank_simulated`, in process): each simulated site's LogME and H-score on its cached
   training features, site-size-weighted by the server;
2. LEEP (Nguyen et al. 2020) of the same sites' features through the backbone's ImageNet head, computed here in
   the lab (sites do not hold the ImageNet head, so `rank-backbones` does not report it);
3. a federated DP run with the default settings (`run_inprocess`; `--rounds` may shorten it), its accuracy and
   balanced accuracy on the server's held-out test set;
4. Spearman's rho and Kendall's tau (scipy.stats) between each estimator and the accuracy, over the candidates.

With 3 candidates a rank correlation can only be -1, -0.5, 0.5 or 1 (Spearman) and its p-value is meaningless;
the table is a sanity check of the plumbing and of the direction, not a study (Chaves et al. 2024, arXiv
2405.20420, evaluate such scorers properly). Feature extraction dominates the time on CPU: `--image-size` shrinks
every candidate's input alike (0 = each one's native 224/240/260 px).

Run: `.venv/bin/python benchmarks/rank_backbones.py [--data digits,../shared/data/breastmnist.npz]
[--image-size 64] [--rounds 10] [--sites 3] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")  # before flwr is first imported: keep the terminal for the tables

from fedtl.client.transferability import leep_score  # noqa: E402
from fedtl.shared import constants as k  # noqa: E402
from fedtl.shared.backbones import build_imagenet_classifier  # noqa: E402
from fedtl.shared.config import RunConfig  # noqa: E402
from fedtl.shared.errors import BackboneError  # noqa: E402
from fedtl.simulations.baselines import load_lab_federation  # noqa: E402
from fedtl.simulations.inprocess import run_inprocess  # noqa: E402
from fedtl.simulations.ranking import rank_simulated  # noqa: E402

# The MedMNIST files live in ../shared/data beside the checkout (never inside it).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DATA = f"digits,{SHARED_DATA / 'breastmnist.npz'}"
DEFAULT_BACKBONES = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
LEEP = "leep"


def lab_leep(cfg: RunConfig, num_sites: int) -> float:
    """Return the sites' size-weighted mean LEEP of `cfg.backbone` (nan for a backbone without an ImageNet head)."""
    try:
        fc = build_imagenet_classifier(cfg.backbone)._fc  # EfficientNet-Lite: pooled (B, 1280) -> (B, 1000)
    except (BackboneError, AttributeError):
        return math.nan
    lab = load_lab_federation(cfg, num_sites)
    scores, weights = [], []
    for site in lab.sites:
        with torch.no_grad():
            probs = torch.softmax(fc(torch.from_numpy(site.train_features).float()), dim=1).double().numpy()
        scores.append(leep_score(probs, site.train_labels))
        weights.append(len(site.train_labels))
    return float(np.average(scores, weights=weights))


def measure(data: str, backbones: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Rank the candidates on `data`, train each one federated, and return scores, accuracies and correlations."""
    cfg = RunConfig(data=data, image_size=args.image_size, num_rounds=args.rounds, seed=args.seed, out=str(out))
    t0 = time.time()
    ranking = rank_simulated(cfg, backbones, num_sites=args.sites)
    rank_seconds = time.time() - t0
    rows = {}
    for name in backbones:
        b = ranking["backbones"][name]
        t1 = time.time()
        leep = lab_leep(cfg.replace(backbone=name), args.sites)
        summary = run_inprocess(cfg.replace(backbone=name), num_sites=args.sites)
        rows[name] = {
            k.LOGME: b[k.LOGME],
            f"{k.LOGME}-se": b[f"{k.LOGME}-standard-error"],
            k.H_SCORE: b[k.H_SCORE],
            LEEP: leep,
            "accuracy": summary["final"].get("central-accuracy", math.nan),
            "balanced-accuracy": summary["final"].get("central-balanced-accuracy", math.nan),
            "majority-rate": summary["majority-rate"],
            "epsilon-max": summary["epsilon-max"],
            "image-size": b["image-size"],
            "train-seconds": time.time() - t1,
        }
    correlations = {}
    for target in ("accuracy", "balanced-accuracy"):
        for est in (k.LOGME, k.H_SCORE, LEEP):
            x = [rows[n][est] for n in backbones]
            y = [rows[n][target] for n in backbones]
            ok = [i for i in range(len(x)) if math.isfinite(x[i]) and math.isfinite(y[i])]
            if len(ok) < 3:
                correlations[f"{est}~{target}"] = {"spearman": math.nan, "kendall": math.nan}
                continue
            xs, ys = [x[i] for i in ok], [y[i] for i in ok]
            correlations[f"{est}~{target}"] = {
                "spearman": float(spearmanr(xs, ys).statistic),
                "kendall": float(kendalltau(xs, ys).statistic),
            }
    return {
        "data": data,
        "rows": rows,
        "correlations": correlations,
        "recommended": ranking["recommended"],
        "margin": ranking["margin"],
        "warnings": ranking["warnings"],
        "rank-seconds": rank_seconds,
    }


def print_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    """Print one dataset's scores beside its accuracies, then the rank correlations."""
    px = "native" if args.image_size == 0 else f"{args.image_size} px"
    print(
        f"\n{result['data']}: {args.sites} iid sites, seed {args.seed}, {args.rounds} DP rounds (epsilon 8), input {px}"
    )
    print(f"{'backbone':<20}{'LogME ± SE':>20}{'H-score':>10}{'LEEP':>9}{'accuracy':>10}{'bal.acc':>9}{'train s':>9}")
    for name, r in result["rows"].items():
        logme = f"{r[k.LOGME]:.4f} ± {r[f'{k.LOGME}-se']:.4f}"
        print(
            f"{name:<20}{logme:>20}{r[k.H_SCORE]:>10.3f}{r[LEEP]:>9.4f}{r['accuracy']:>10.4f}"
            f"{r['balanced-accuracy']:>9.4f}{r['train-seconds']:>9.0f}"
        )
    first = next(iter(result["rows"].values()))
    m = result["margin"]
    print(
        f"majority rate {first['majority-rate']:.4f}; recommended {result['recommended']} (LogME lead "
        f"{m['value']:.4g} ± {m['standard-error']:.3g}{', within noise' if m['within-noise'] else ''}); "
        f"ranking took {result['rank-seconds']:.0f} s"
    )
    for key, c in result["correlations"].items():
        print(f"  {key:<28} spearman {c['spearman']:+.2f}  kendall {c['kendall']:+.2f}")


def main(argv: list[str] | None = None) -> int:
    """Run every dataset, print the tables, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="comma-separated data sources")
    p.add_argument("--backbones", default=DEFAULT_BACKBONES, help="comma-separated candidates")
    p.add_argument("--image-size", type=int, default=64, help="input size for every candidate (0: native)")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds of each DP run (default: the config's 10)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    t0 = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedtl-rank-bench-") as tmp:
        for data in [d.strip() for d in args.data.split(",") if d.strip()]:
            results.append(measure(data, backbones, args, Path(tmp)))
            print_table(results[-1], args)
    print(f"\ntotal {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
