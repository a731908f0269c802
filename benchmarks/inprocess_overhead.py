"""Flower's per-run fixed cost against the in-process executor, and the in-process cost per message.

Prints figures, asserts nothing about timings. Two parts:

1. The same small federation (`--small-sites` sites, 1 round, tiny backbone, digits) run `--repeats` times
   on Flower's simulation engine (`simulate`, Ray) and in process (`run_inprocess`), each engine on its
   own fedtl home, so the first run of each pays the site caches (backbone install, feature extraction)
   and later runs hit them. The difference of the medians of the warm runs estimates Flower's fixed cost.
2. One in-process run of `--many-sites` sites x `--many-rounds` rounds: wall time, messages by kind,
   mean milliseconds per message of each kind, and the process's peak resident memory.

Run: `.venv/bin/python benchmarks/inprocess_overhead.py [--repeats 3] [--many-sites 100] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig
from fedtl.simulations.engine import simulate
from fedtl.simulations.inprocess import InProcessGrid, run_inprocess


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the command-line settings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine in part 1")
    parser.add_argument("--small-sites", type=int, default=2, help="sites of the part-1 federation")
    parser.add_argument("--many-sites", type=int, default=100, help="sites of the part-2 in-process run (0: skip)")
    parser.add_argument("--many-rounds", type=int, default=2, help="rounds of the part-2 in-process run")
    parser.add_argument("--skip-flower", action="store_true", help="part 1 in process only")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    return parser.parse_args(argv)


@contextlib.contextmanager
def fedtl_home(path: Path) -> Iterator[None]:
    """Point FEDTL_HOME at `path` for the duration, then restore it."""
    previous = os.environ.get("FEDTL_HOME")
    os.environ["FEDTL_HOME"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FEDTL_HOME", None)
        else:
            os.environ["FEDTL_HOME"] = previous


def time_runs(run: Callable[..., dict[str, Any]], cfg: RunConfig, *, num_sites: int, repeats: int) -> list[float]:
    """Return the wall seconds of `repeats` runs of `cfg`, all on one fresh fedtl home."""
    seconds = []
    with tempfile.TemporaryDirectory() as home, fedtl_home(Path(home)):
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(cfg, num_sites=num_sites)
            seconds.append(time.perf_counter() - t0)
    return seconds


@contextlib.contextmanager
def timed_messages(stats: dict[str, list[float]]) -> Iterator[None]:
    """Record the seconds each delivered message takes, by kind (message type, or the query's action)."""
    original = InProcessGrid._deliver

    def deliver(self: InProcessGrid, msg: Any) -> Any:
        kind = msg.metadata.message_type
        if kind == "query":
            kind = f"query:{msg.content.config_records[k.CONFIG].get(k.ACTION, '')}"
        t0 = time.perf_counter()
        try:
            return original(self, msg)
        finally:
            stats[kind].append(time.perf_counter() - t0)

    InProcessGrid._deliver = deliver  # type: ignore[method-assign]
    try:
        yield
    finally:
        InProcessGrid._deliver = original  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure and print both parts; return the figures."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    figures: dict[str, Any] = {"args": {key: str(v) for key, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as out:
        small = RunConfig(backbone="tiny", data="digits", num_rounds=1, out=out, seed=0)
        engines = [("inprocess", run_inprocess)] + ([] if args.skip_flower else [("flower", simulate)])
        for name, run in engines:
            seconds = time_runs(run, small, num_sites=args.small_sites, repeats=args.repeats)
            figures[f"{name}-small-run-seconds"] = seconds
            print(f"{name:9s} {args.small_sites} sites x 1 round: " + ", ".join(f"{s:.2f}" for s in seconds) + " s")
        if not args.skip_flower and args.repeats > 1:
            warm = {name: statistics.median(figures[f"{name}-small-run-seconds"][1:]) for name, _ in engines}
            figures["flower-fixed-cost-seconds"] = warm["flower"] - warm["inprocess"]
            print(
                f"warm medians: flower {warm['flower']:.2f} s, in-process {warm['inprocess']:.2f} s -> "
                f"Flower's fixed cost per run about {figures['flower-fixed-cost-seconds']:.2f} s"
            )
        if args.many_sites:
            many = small.replace(num_rounds=args.many_rounds)
            stats: dict[str, list[float]] = defaultdict(list)
            with tempfile.TemporaryDirectory() as home, fedtl_home(Path(home)), timed_messages(stats):
                t0 = time.perf_counter()
                summary = run_inprocess(many, num_sites=args.many_sites)
                total = time.perf_counter() - t0
            count = sum(len(v) for v in stats.values())
            handled = sum(sum(v) for v in stats.values())
            figures["many"] = {
                "sites": args.many_sites,
                "rounds": args.many_rounds,
                "seconds": total,
                "messages": count,
                "seconds-in-clientapps": handled,
                "ms-per-message": 1000 * total / count,
                "ms-per-message-by-kind": {kind: 1000 * statistics.mean(v) for kind, v in sorted(stats.items())},
                "count-by-kind": {kind: len(v) for kind, v in sorted(stats.items())},
                "rejected-replies": len(summary["rejected-replies"]),
                "peak-rss-mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
            m = figures["many"]
            print(
                f"in-process {m['sites']} sites x {m['rounds']} rounds: {total:.1f} s, {count} messages, "
                f"{m['ms-per-message']:.1f} ms/message overall ({1000 * handled / count:.1f} in the ClientApp), "
                f"peak RSS {m['peak-rss-mib']:.0f} MiB, {m['rejected-replies']} rejected replies"
            )
            for kind, ms in m["ms-per-message-by-kind"].items():
                print(f"  {kind:24s} {m['count-by-kind'][kind]:5d} x {ms:7.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
