"""Cost of deeper fine-tuning under DP: head only vs the last 1 / 2 blocks vs LoRA, on digits.

Prints a table, asserts nothing. For each adaptation (head only; last 1 block; last 2 blocks; LoRA rank
`--lora-rank` in the last 2 blocks) of `--backbone` at `--image-size` px:

1. DP training throughput: one `train_head` / `train_deep` epoch (Poisson sampling, noise 1.0, CPU as at a
   site) on the cached features / activations of the first `--samples` digits training images, timed in a
   fresh process after a warm-up call, median of `--repeats` (samples/s = expected examples of the epoch /
   seconds; PrivacyEngine set-up included).
2. Peak memory of one more (untimed) epoch: the process's resident set size (RSS, /proc/self/statm sampled
   every 5 ms) above its level just before training, and its absolute peak (backbone, activations, Python).
3. Bytes per round per site: the tensors that travel, down and up (the run summary's
   `head-bytes-per-site-per-round`: head + trainable backbone tensors).
4. Held-out accuracy after a short federated run: `run_inprocess` with `--sites` simulated sites (iid),
   `--rounds` rounds of `--local-epochs` local epoch(s), noise derived for target epsilon `--target-epsilon`
   over the run (feature centering on, as by default); the server's held-out digits test split. Each run
   starts from an empty cache (its own FEDTL_HOME), so "run s" includes its feature/activation extraction.

Run: `.venv/bin/python benchmarks/deep_finetune.py [--image-size 64] [--rounds 3] [--json out.json]`.
Caches and runs go to a temporary FEDTL_HOME unless `--home` is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

ADAPTATIONS = {  # label -> (trainable-blocks, lora-rank); LoRA's rank comes from --lora-rank
    "head only": (0, 0),
    "last 1 block": (1, 0),
    "last 2 blocks": (2, 0),
    "LoRA, last 2 blocks": (2, -1),
}


def _rss_bytes() -> int:
    """Return this process's resident set size (Linux /proc; elsewhere the peak so far from getrusage)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    """Sample the RSS in a thread while the block runs; `peak` and `start` in bytes."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def measure_training(args: dict[str, Any]) -> dict[str, float]:
    """Time one DP epoch of `args['blocks']`/`args['rank']` on the first samples; return samples/s and memory."""
    import numpy as np
    import torch

    from fedtl.client.deep_training import train_deep
    from fedtl.client.training import train_head
    from fedtl.shared.backbones import build_backbone, get_backbone_spec, resolve_preprocessing
    from fedtl.shared.data import load_dataset
    from fedtl.shared.deep import Adaptation, AdaptedHead, adapt_backbone, split_backbone
    from fedtl.shared.features import extract_features
    from fedtl.shared.heads import build_head, normalize_features

    torch.set_num_threads(args["threads"])
    warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
    name, n = args["backbone"], args["samples"]
    train = load_dataset("digits", seed=0, test_fraction=0.2).train
    images, labels = train.images[:n], train.labels[:n]
    pre = resolve_preprocessing(name, args["image_size"])
    features = extract_features(build_backbone(name), images, pre, device="cpu", progress=False)
    head = build_head("linear", get_backbone_spec(name).feature_dim, 10)
    head.center.copy_(torch.as_tensor(normalize_features(features).mean(axis=0)))  # as feature centering would
    adaptation = Adaptation(args["blocks"], args["rank"], 16.0)
    common = dict(
        epochs=1, batch_size=args["batch_size"], learning_rate=8.0, max_grad_norm=1.0, noise_multiplier=1.0, seed=0
    )
    if adaptation.enabled:
        frozen, _ = split_backbone(name, build_backbone(name), adaptation.trainable_blocks)
        inputs = extract_features(frozen, images, pre, device="cpu", progress=False)  # (N, C, H, W)
        _, trainable = adapt_backbone(name, build_backbone(name), adaptation)
        model = AdaptedHead(trainable, head)
        train = train_deep
    else:
        inputs, model, train = features, head, train_head
    # Warm-up on a copy (lazy imports, Opacus/functorch first-call costs), so neither figure includes them.
    warm = min(n, 2 * args["batch_size"])
    train(copy.deepcopy(model), inputs[:warm], np.asarray(labels[:warm]), **common)
    times = []
    for _ in range(args["repeats"]):
        start = time.perf_counter()
        result = train(copy.deepcopy(model), inputs, np.asarray(labels), **common)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    # Memory in a separate epoch: the sampling thread takes the GIL and would slow the timed ones.
    with PeakRss() as rss:
        train(copy.deepcopy(model), inputs, np.asarray(labels), **common)
    return {
        "samples-per-s": n / seconds,  # one epoch: n examples expected under Poisson sampling
        "train-seconds": seconds,
        "steps": result.steps,
        "input-floats-per-example": int(np.prod(inputs.shape[1:])),
        "train-rss-growth-mb": (rss.peak - rss.start) / 2**20,
        "peak-rss-mb": rss.peak / 2**20,
    }


def measure_federation(args: dict[str, Any]) -> dict[str, float]:
    """Run a short federated run with the adaptation; return accuracy, bytes per round and wall time."""
    import torch

    from fedtl.shared.config import RunConfig
    from fedtl.simulations.inprocess import run_inprocess

    torch.set_num_threads(args["threads"])
    # A fresh home per run: each run pays its own feature / activation extraction, as a first run would.
    os.environ["FEDTL_HOME"] = str(Path(args["home"]) / f"home-{args['blocks']}-{args['rank']}")
    cfg = RunConfig(
        backbone=args["backbone"],
        image_size=args["image_size"],
        num_rounds=args["rounds"],
        local_epochs=args["local_epochs"],
        target_epsilon=args["target_epsilon"],
        batch_size=args["batch_size"],
        out=str(Path(args["home"]) / "runs"),
        seed=0,
        device="cpu",
        trainable_blocks=args["blocks"],
        lora_rank=args["rank"],
    )
    start = time.perf_counter()
    summary = run_inprocess(cfg, num_sites=args["sites"])
    return {
        "central-accuracy": summary["final"]["central-accuracy"],
        "bytes-per-site-per-round": summary["head-bytes-per-site-per-round"],
        "epsilon-max": summary["epsilon-max"],
        "run-seconds": time.perf_counter() - start,
    }


def _in_fresh_process(fn, args: dict[str, Any]) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Run fn(args) in a spawned process, so each measurement starts from the same memory state."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, (args,))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "tiny"])
    p.add_argument("--image-size", type=int, default=64, help="input px (default 64: 2x2 maps in the last stage)")
    p.add_argument("--samples", type=int, default=256, help="training images of the throughput epoch")
    p.add_argument("--batch-size", type=int, default=64, help="expected DP batch size (RunConfig default)")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs; the median is reported")
    p.add_argument("--home", default="", help="FEDTL_HOME for caches and runs (default: a temporary folder)")
    p.add_argument("--skip-federation", action="store_true", help="throughput and memory only")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure every adaptation and print the table."""
    args = parse_args(argv)
    home = args.home or tempfile.mkdtemp(prefix="fedtl-deep-bench-")
    os.environ["FEDTL_HOME"] = home  # inherited by the spawned processes
    rows: dict[str, dict[str, float]] = {}
    for label, (blocks, rank) in ADAPTATIONS.items():
        job = {**vars(args), "home": home, "blocks": blocks, "rank": args.lora_rank if rank < 0 else rank}
        job.pop("json")
        rows[label] = _in_fresh_process(measure_training, job)
        if not args.skip_federation:
            rows[label].update(_in_fresh_process(measure_federation, job))
        print(f"{label}: {rows[label]}", file=sys.stderr, flush=True)
    print(
        f"\n{args.backbone} at {args.image_size} px on digits; DP epoch of {args.samples} images, batch "
        f"{args.batch_size}, noise 1.0, CPU, {args.threads} threads; federated: {args.sites} sites, "
        f"{args.rounds} rounds x {args.local_epochs} local epoch(s), target epsilon {args.target_epsilon:g}"
    )
    header = "| adaptation | samples/s | train RSS growth MB | peak RSS MB | input floats/ex | bytes/round/site |"
    header += " held-out acc | epsilon | run s |"
    print(header)
    print("|" + "---|" * 9)
    for label, r in rows.items():
        fed = (
            f"{r['bytes-per-site-per-round']:,} | {r['central-accuracy']:.3f} | {r['epsilon-max']:.2f} | "
            f"{r['run-seconds']:.0f} |"
            if "central-accuracy" in r
            else "- | - | - | - |"
        )
        print(
            f"| {label} | {r['samples-per-s']:.0f} | {r['train-rss-growth-mb']:.0f} | {r['peak-rss-mb']:.0f} | "
            f"{r['input-floats-per-example']:,} | {fed}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
