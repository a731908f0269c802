"""Audit the default job without DP and at epsilon 1 and 8, side by side: empirical lower bounds vs accounted epsilon.

Runs the default federation (digits, EfficientNet-Lite0, 5 sites, 10 rounds) in process with `--canaries`
audit canaries at site 0, once non-private and once per `--epsilons`, then `fedtl audit`s each model (loss
threshold, online LiRA with `--shadows` shadow heads, the one-run canary bound) and prints the comparison
table that `fedtl audit A B C` writes as audit-compare.md.

    .venv/bin/python benchmarks/audit.py [--sites 5] [--rounds 10] [--canaries 100] [--shadows 8]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")  # read when flwr is first imported: keep the table readable

from fedtl.shared.config import RunConfig
from fedtl.simulations.audit import audit_model, compare_markdown, write_audit, write_comparison
from fedtl.simulations.inprocess import run_inprocess


def main() -> None:
    """Run the three federations, audit each, print the side-by-side table and the timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--canaries", type=int, default=100)
    parser.add_argument("--shadows", type=int, default=8)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="runs folder (default: a fresh temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedtl-audit-bench-"))
    settings = [("non-private", {"non_private": True})]
    settings += [(f"eps{eps:g}", {"target_epsilon": eps}) for eps in args.epsilons]
    audits, timings = [], []
    for name, changes in settings:
        cfg = RunConfig(
            backbone=args.backbone,
            data=args.data,
            num_rounds=args.rounds,
            audit_canaries=args.canaries,
            seed=args.seed,
            out=str(out),
            run_name=name,
            **changes,
        )
        t0 = time.perf_counter()
        summary = run_inprocess(cfg, num_sites=args.sites)
        t_run = time.perf_counter() - t0
        audit = audit_model(summary["model"], shadows=args.shadows, seed=args.seed)
        write_audit(audit)
        audits.append(audit)
        accuracy = summary["final"].get("central-accuracy", float("nan"))
        timings.append((name, t_run, audit.seconds, accuracy))
    write_comparison(audits, out)
    print(
        f"\n{args.backbone} on {args.data}, {args.sites} sites, {args.rounds} rounds, {args.canaries} canaries "
        f"at site 0, {args.shadows} shadow heads; runs in {out}\n"
    )
    print(compare_markdown(audits))
    print("| run | held-out accuracy | run s | audit s |\n|---|---|---|---|")
    for name, t_run, t_audit, accuracy in timings:
        print(f"| {name} | {accuracy:.3f} | {t_run:.0f} | {t_audit:.0f} |")


if __name__ == "__main__":
    main()
