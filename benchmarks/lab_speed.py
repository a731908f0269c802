"""The lab's speed targets, measured in one run on this machine: warm, cold and sweep rate of the default job.

Prints figures, asserts nothing (they depend on the machine and its load). In one run, each in a fresh
process so that import and start-up costs count as a user pays them:

1. warm: the default federation (digits, EfficientNet-Lite0, 5 sites, 10 rounds) in process, caches warm,
   the median of --warm-runs fresh processes (target <= 5 s wall on 2 cores);
2. sweep rate: federations a minute of the default job in one process, as `fedtl sweep` runs them
   (target >= 10 a minute);
3. cold: `fedtl simulate` on Flower's engine with empty caches, against one backbone pass over all the data the
   run passes through the backbone plus Flower's fixed start-up (a 1-round `tiny` federation on Flower's engine,
   warm), both measured here (target cold <= 1.1 x their sum). The pass is the default run's own (its image size, up
   to the features its head reads) over the digits (the sites' and the held-out images) and over the public
   synthetic images the default `auto` plan computes its basis from (once per backbone; a cold run passes them
   too); the ratio against the digits' pass alone is printed as well. Medians of --cold-runs runs of each, taken
   in turn.

Run: `.venv/bin/python benchmarks/lab_speed.py [--skip-cold] [--sweep-runs 5] [--warm-runs 5] [--cold-runs 3]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Return the wall seconds of one command, which must succeed."""
    t = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - t


def fedtl(*args: str) -> list[str]:
    """Return the command line of `fedtl ARGS` in this Python."""
    return [PY, "-m", "fedtl.cli.main", *args]


SWEEP_CHILD = """
import sys, time
from fedtl.shared.config import RunConfig
from fedtl.simulations.inprocess import run_inprocess
n, out = int(sys.argv[1]), sys.argv[2]
run_inprocess(RunConfig(out=out), num_sites=5)  # warm
t = time.perf_counter()
for seed in range(n):
    run_inprocess(RunConfig(out=out, seed=seed), num_sites=5)
print((time.perf_counter() - t) / n)
"""

BACKBONE_PASS = """
import time
from fedtl.server.solvers.auto import resolve_feature_block
from fedtl.shared.backbones import build_backbone
from fedtl.shared.config import RunConfig
from fedtl.shared.cut import Cut
from fedtl.shared.data import load_dataset
from fedtl.shared.features import extract_features
from fedtl.shared.heap import reuse_freed_memory
from fedtl.shared.public_basis import generate_synthetic_images
# The default run's own pass: its backbone, image size and the features its head reads (feature-block "auto").
cut = Cut.of(resolve_feature_block(RunConfig()), backbone_fingerprint="unchecked")
splits = load_dataset("digits")
images = [s.images for s in (splits.train, splits.test)]
model = cut.frozen_part(build_backbone(cut.backbone_name))
with reuse_freed_memory():  # one heap for the whole pass, as the lab's preparation keeps
    t = time.perf_counter()
    for part in images:
        extract_features(model, part, cut.preprocessing, progress=False)
    data_s = time.perf_counter() - t
    t = time.perf_counter()  # the public synthetic images the auto plan's basis is computed from (once per backbone)
    extract_features(model, generate_synthetic_images(), cut.preprocessing, progress=False)
    public_s = time.perf_counter() - t
print(data_s, public_s)
"""


def main() -> None:
    """Measure and print the figures of the lab's speed targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-runs", type=int, default=5)
    parser.add_argument("--warm-runs", type=int, default=5, help="fresh warm processes; their median is the figure")
    parser.add_argument("--cold-runs", type=int, default=3, help="cold runs (each with its reference passes)")
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedtl-lab-speed-") as tmp:  # its homes and runs: ~200 MB, then gone
        figures = measure(
            Path(tmp),
            sweep_runs=args.sweep_runs,
            warm_runs=args.warm_runs,
            cold_runs=args.cold_runs,
            skip_cold=args.skip_cold,
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


def measure(work: Path, *, sweep_runs: int, warm_runs: int, cold_runs: int, skip_cold: bool) -> dict[str, float]:
    """Measure and print the figures, with every home and run folder under `work`; return them."""
    env = {**os.environ, "FEDTL_HOME": str(work / "home")}
    figures: dict[str, float] = {}
    warm = fedtl("simulate", "--executor", "inprocess", "--out", str(work / "runs"))
    timed(warm, env)  # warms every cache
    runs = sorted(timed(warm, env) for _ in range(warm_runs))
    figures["warm_inprocess_s"] = statistics.median(runs)
    print(
        f"1. warm default federation, in process: {figures['warm_inprocess_s']:.2f} s wall, the median of {warm_runs} "
        f"runs ({runs[0]:.2f}-{runs[-1]:.2f}) (target <= 5 s)"
    )
    done = subprocess.run(
        [PY, "-c", SWEEP_CHILD, str(sweep_runs), str(work / "sweep")], env=env, capture_output=True, text=True
    )
    per_run = float(done.stdout.strip().splitlines()[-1])
    figures["sweep_runs_per_minute"] = 60.0 / per_run
    print(f"2. sweep rate: {figures['sweep_runs_per_minute']:.1f} federations a minute (target >= 10)")
    if not skip_cold:
        tiny = ["simulate", "--backbone", "tiny", "--sites", "2", "--rounds", "1", "--out", str(work / "tiny")]
        timed(fedtl(*tiny), env)  # warm tiny caches
        colds, datas, publics, fixeds = [], [], [], []
        for i in range(cold_runs):  # in turn, so that a slower minute of the machine falls on every figure alike
            cold_env = {**os.environ, "FEDTL_HOME": str(work / f"cold-home-{i}")}
            colds.append(timed(fedtl("simulate", "--out", str(work / "cold-runs")), cold_env))
            done = subprocess.run([PY, "-c", BACKBONE_PASS], env=env, capture_output=True, text=True, cwd=ROOT)
            data_s, public_s = (float(v) for v in done.stdout.strip().splitlines()[-1].split())
            datas.append(data_s)
            publics.append(public_s)
            fixeds.append(timed(fedtl(*tiny), env))
        median = statistics.median
        cold, data_s, public_s = median(colds), median(datas), median(publics)
        figures["cold_simulate_s"], figures["backbone_pass_s"], figures["public_pass_s"] = cold, data_s, public_s
        figures["flower_fixed_s"] = fixed = median(fixeds)
        floor = data_s + public_s + fixed
        print(
            f"3. cold `fedtl simulate` on Flower's engine: {cold:.1f} s; one backbone pass over all its data (the "
            f"digits {data_s:.1f} s, the auto plan's public synthetic images {public_s:.1f} s) + Flower's fixed "
            f"start-up {fixed:.1f} s = {floor:.1f} s; ratio {cold / floor:.2f} (target <= 1.1)\n"
            f"   against the digits' pass alone + the start-up ({data_s + fixed:.1f} s): ratio "
            f"{cold / (data_s + fixed):.2f}\n"
            f"   medians of {cold_runs} runs of each; cold {min(colds):.1f}-{max(colds):.1f} s, pass "
            f"{min(datas):.1f}-{max(datas):.1f} s, public {min(publics):.1f}-{max(publics):.1f} s, start-up "
            f"{min(fixeds):.1f}-{max(fixeds):.1f} s"
        )
    return figures


if __name__ == "__main__":
    main()
