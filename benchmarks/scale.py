"""How far one machine goes: sites x rounds -> wall time and peak memory; sweep runs per minute.

Every measurement runs in a fresh child process (so its peak RSS is its own) through the in-process
executor, which runs the SAME ServerApp and ClientApp handlers as Flower's engine without Ray.

    python benchmarks/scale.py                         # 10x5, 100x5, 1000x50 on PneumoniaMNIST, tiny backbone
    python benchmarks/scale.py --grid 1000x50 --fraction-train 1.0
    python benchmarks/scale.py --sweep-rate            # runs per minute of the default job, warm caches

Figures are printed, never asserted: they depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pneumoniamnist_reassembled.npz"


def run_one(args: argparse.Namespace) -> dict:
    """Run one federation in this process and return its figures (the child's side)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from fedtl.shared.config import RunConfig
    from fedtl.simulations.inprocess import run_inprocess

    cfg = RunConfig.from_mapping(json.loads(args.config))
    t0 = time.perf_counter()
    summary = run_inprocess(cfg, num_sites=args.sites)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    final = summary.get("final", {})
    return {
        "sites": args.sites,
        "rounds": cfg.num_rounds,
        "seconds": seconds,
        "peak_rss_mib": peak_kib / 1024,
        "accuracy": final.get("central-accuracy"),
        "epsilon_max": summary.get("epsilon-max"),
        "client_epsilon": summary.get("client-epsilon"),
        "rejected": len(summary.get("rejected-replies", [])),
    }


def _num(value: object) -> str:
    return f"{float(value):.3f}" if isinstance(value, (int, float, str)) and value != "" else "-"


def child(sites: int, config: dict, env: dict) -> dict:
    """Run `run_one` in a child process and return its figures."""
    command = [sys.executable, __file__, "--one", "--sites", str(sites), "--config", json.dumps(config)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child run failed ({sites} sites):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="10x5,100x5,1000x50", help="comma-separated SITESxROUNDS")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="data source (default PneumoniaMNIST, 4,708 train)")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--fraction-train", type=float, default=0.1, help="sites sampled per round (default 0.1)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--client-dp", default="off", help="off | server | client (client-level DP)")
    parser.add_argument("--home", help="FEDTL_HOME to reuse (warm feature caches); default: a new one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="any run-config key")
    parser.add_argument("--sweep-rate", action="store_true", help="also measure sweep runs per minute")
    parser.add_argument("--sweep-runs", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sites", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    home = args.home or tempfile.mkdtemp(prefix="fedtl-scale-")
    env = {**os.environ, "FEDTL_HOME": home, "OMP_NUM_THREADS": "1"}
    out = Path(home) / "runs"
    print(f"machine: {os.cpu_count()} cores; FEDTL_HOME={home}; data {args.data}; backbone {args.backbone}")
    print(
        f"{'sites':>6} {'rounds':>6} {'train/round':>11} {'wall s':>8} {'s/round':>8} {'peak MiB':>9} {'accuracy':>9} "
        f"{'eps max':>8} {'client eps':>10} {'rejected':>8}"
    )
    for cell in args.grid.split(","):
        sites, rounds = (int(x) for x in cell.lower().split("x"))
        config = {
            "data": args.data,
            "backbone": args.backbone,
            "num-rounds": rounds,
            "local-epochs": args.local_epochs,
            "fraction-train": args.fraction_train,
            # Evaluating every one of 1,000 sites every round is a federated-evaluation study of its own;
            # the server's held-out set measures the model here.
            "federated-evaluation": False,
            "client-dp": args.client_dp,
            "min-train-sites": 1,
            "out": str(out),
            "target-epsilon": 8.0,
        }
        for item in args.set:
            key, _, value = item.partition("=")
            config[key] = json.loads(value)
        figures = child(sites, config, env)
        per_round = max(1, int(sites * args.fraction_train))
        acc = figures["accuracy"]
        print(
            f"{sites:>6} {rounds:>6} {per_round:>11} {figures['seconds']:>8.1f} {figures['seconds'] / rounds:>8.2f} "
            f"{figures['peak_rss_mib']:>9.0f} {acc if acc is None else round(acc, 4)!s:>9} "
            f"{_num(figures['epsilon_max']):>8} {_num(figures['client_epsilon']):>10} {figures['rejected']:>8}",
            flush=True,
        )
    if args.sweep_rate:
        sweep_rate(args, env, out)


def sweep_rate(args: argparse.Namespace, env: dict, out: Path) -> None:
    """Runs per minute of the default job (digits, EfficientNet-Lite0, 5 sites) with warm feature caches."""
    config = {"out": str(out)}
    child(5, config, env)  # warms every cache (features of the 5 sites and the server's test set)
    t0 = time.perf_counter()
    times = [child(5, {**config, "seed": 0}, env)["seconds"] for _ in range(args.sweep_runs)]
    wall = time.perf_counter() - t0
    print(
        "sweep rate, default job (10 rounds, 5 sites, warm caches, in-process): "
        f"run {min(times):.1f}-{max(times):.1f} s inside the child; "
        f"{60 * args.sweep_runs / wall:.2f} runs/min including process start"
    )


if __name__ == "__main__":
    main()
