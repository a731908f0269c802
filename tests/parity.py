"""Behaviour parity: fingerprints of whole federations, recorded once and compared bit for bit afterwards.

A case is a run config (user-facing keys, so the fingerprint outlives changes of the wire format) run in
process over simulated sites. Its fingerprint is what a user can observe of the run: the SHA-256 of every
tensor of the model file, every line of `metrics.jsonl`, each site's reported epsilon and each site's
ledger records (noise, sample rate, steps, round). Recorded with `python tests/parity.py --record [CASE]`
into `tests/parity/<case>.json`; `tests/test_parity.py` re-runs the cases and compares.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

PARITY_DIR = Path(__file__).resolve().parent / "parity"

# The defaults when the fingerprints were recorded, pinned: a later change of defaults is not a change of behaviour.
RECORDED_DEFAULTS = {
    "num-rounds": 10,
    "head": "linear",
    "strategy": "fedavg",
    "local-epochs": 2,
    "batch-size": 64,
    "learning-rate": 8.0,
    "max-grad-norm": 1.0,
    "noise-multiplier": "auto",
    "target-epsilon": 8.0,
    "target-delta": 1e-5,
    "feature-centering": True,
    "centering-noise-multiplier": 4.0,
    "head-solver": "dp-sgd",
    "closed-form": "ridge",
    "closed-form-ridge": 1.0,
    "feature-block": -1,  # the backbone's own features (dp-sgd resolves "auto" to that too)
}
SMALL = {"image-size": 32, "num-rounds": 2}
CASES: dict[str, tuple[dict[str, Any], int]] = {
    # name: (run config overrides, sites)
    "default": ({}, 5),  # `fedtl simulate` with no options as it was (slow: 224 px, 10 rounds)
    "default-small": (SMALL, 3),
    "closed-form": ({"image-size": 32, "head-solver": "closed-form", "projection-dim": 64}, 3),
    "last-block": ({**SMALL, "trainable-blocks": 1}, 3),
    "lora": ({**SMALL, "trainable-blocks": 1, "lora-rank": 2}, 3),
    "finetune-fedprox-mlp": ({**SMALL, "head": "mlp", "strategy": "fedprox", "personalization": "finetune"}, 3),
    "non-private": ({**SMALL, "non-private": True}, 2),
}
# The whole default job (224 px, 5 sites, 10 rounds) and the personalised FedProx run: minutes each on CI's
# CPUs. The suite runs the default configuration at a small size (default-small: the same code path), the
# closed form, last-block and LoRA runs; FEDTL_PARITY_FULL=1 runs these two too.
SLOW_CASES = ("default", "finetune-fedprox-mlp")


def tensor_digest(value: np.ndarray) -> str:
    """Return dtype, shape and SHA-256 of an array's bytes."""
    value = np.ascontiguousarray(value)
    return f"{value.dtype}{list(value.shape)}:{hashlib.sha256(value.tobytes()).hexdigest()}"


def fingerprint_run(summary: dict[str, Any]) -> dict[str, Any]:
    """Return the observable fingerprint of a finished run from its folder."""
    run_dir = Path(summary["run-dir"])
    model = load_file(str(run_dir / "model.safetensors"))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ledgers = {}
    for path in sorted((run_dir / "sites").glob("*/privacy/ledger.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ledgers[path.parents[1].name] = [
            [r["noise_multiplier"], r["sample_rate"], r["steps"], r["server_round"]] for r in records
        ]
    return {
        "tensors": {name: tensor_digest(v) for name, v in sorted(model.items())},
        "metrics": metrics,
        "epsilon-per-site": summary["epsilon-per-site"],
        "ledgers": ledgers,
    }


def run_case(name: str, workdir: Path) -> dict[str, Any]:
    """Run parity case `name` in process under `workdir` and return its fingerprint."""
    from fedtl.shared.config import RunConfig
    from fedtl.simulations.inprocess import run_inprocess

    overrides, sites = CASES[name]
    cfg = RunConfig.from_mapping({**RECORDED_DEFAULTS, **overrides, "out": str(workdir / "runs")})
    summary = run_inprocess(cfg, num_sites=sites, run_dir=workdir / "runs" / name)
    return fingerprint_run(summary)


def golden(name: str) -> dict[str, Any]:
    """Return the recorded fingerprint of case `name`."""
    return json.loads((PARITY_DIR / f"{name}.json").read_text())


def main(argv: list[str]) -> int:
    """Record the fingerprints of the named cases (all without names) with the code as it is now."""
    import os

    names = [a for a in argv if not a.startswith("-")] or list(CASES)
    PARITY_DIR.mkdir(exist_ok=True)
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"fedtl-parity-{name}-") as tmp:
            os.environ["FEDTL_HOME"] = str(Path(tmp) / "home")
            fp = run_case(name, Path(tmp))
        (PARITY_DIR / f"{name}.json").write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n")
        print(f"recorded {name}: {len(fp['tensors'])} tensors, {len(fp['metrics'])} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
