"""What the whole-federation benchmarks share: their common arguments, a FEDTL_HOME, and the base run config.

Imported by the scripts beside it (`python benchmarks/<script>.py` puts this folder on the path).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any


def federation_parser(doc: str | None, *, epsilons: list[float], seeds: list[int]) -> argparse.ArgumentParser:
    """Return a parser with the arguments every federation benchmark takes (data, backbone, sites, home, json)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--epsilons", type=float, nargs="+", default=epsilons)
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--home", default="", help="FEDTL_HOME to reuse (warm feature caches); default: a temp dir")
    parser.add_argument("--json", default="", help="also write every cell to this file")
    return parser


def open_home(args: argparse.Namespace, *, prefix: str) -> tuple[str, Path, dict[str, Any]]:
    """Set FEDTL_HOME (the given one, or a new temp dir); return it, a new runs folder in it, and the base config."""
    logging.basicConfig(level=logging.ERROR)
    home = args.home or tempfile.mkdtemp(prefix=prefix)
    os.environ["FEDTL_HOME"] = home
    out = Path(tempfile.mkdtemp(prefix="runs-", dir=home))
    base = {
        "backbone": args.backbone,
        "image-size": args.image_size,
        "data": args.data,
        "device": "cpu",
        "federated-evaluation": False,  # it does not change the model
    }
    return home, out, base


def write_json(path: str, report: dict[str, Any]) -> None:
    """Write `report` to `path` (when one was asked for), creating its folder."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
