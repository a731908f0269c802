"""Behaviour parity: fingerprints of whole federations, recorded once and compared afterwards.

A case is a run config (user-facing keys, so the fingerprint outlives changes of the wire format) run in
process over simulated sites. Its fingerprint is what a user can observe of the run: the SHA-256 of every
tensor of the model file with a sample of its values, every line of `metrics.jsonl`, each site's reported
epsilon and each site's ledger records (noise, sample rate, steps, round). Recorded with
`python tests/parity.py [CASE ...]` into `tests/parity/<case>.json`; `tests/test_parity.py` re-runs the
cases and compares with `compare`.

The same code gives bit-identical runs on one machine, but not across CPUs: torch and OpenBLAS pick their
float kernels by instruction set (AVX2, AVX-512), and their sums round differently. Measured on the pinned
cases, two kernels of one machine gave tensors within 2.5e-7 of each tensor's largest entry and metrics
within 1e-7 (relative). So a tensor passes when its digest is equal, or else when every sampled value lies
within `TENSOR_TOLERANCE` of its largest entry; metrics within `METRIC_TOLERANCE`; epsilons and ledger
noise within 1e-9; counts, names and rounds exactly. A change of behaviour (another seed, step, noise or
order of operations that is not a rounding) moves the values by far more.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
import zlib
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


TENSOR_TOLERANCE = 1e-5  # of the tensor's largest entry: 40 x the rounding measured across kernels
METRIC_TOLERANCE = 1e-6  # relative, for the floats of metrics.jsonl
PRIVACY_TOLERANCE = 1e-9  # relative, for epsilons and noise multipliers
SAMPLES = 256  # values sampled from each tensor, at places fixed by its name and size


def tensor_digest(value: np.ndarray) -> str:
    """Return dtype, shape and SHA-256 of an array's bytes."""
    value = np.ascontiguousarray(value)
    return f"{value.dtype}{list(value.shape)}:{hashlib.sha256(value.tobytes()).hexdigest()}"


def sample_places(name: str, size: int) -> np.ndarray:
    """Return the flat indices sampled from tensor `name` of `size` entries (the same in every process)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return np.sort(rng.choice(size, size=min(SAMPLES, size), replace=False))


def tensor_sample(name: str, value: np.ndarray) -> dict[str, Any]:
    """Return the largest absolute entry of a tensor and its values at `sample_places` (as float64)."""
    flat = np.asarray(value, dtype=np.float64).ravel()
    return {
        "max-abs": float(np.abs(flat).max(initial=0.0)),
        "values": [float(v) for v in flat[sample_places(name, flat.size)]],
    }


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
        "tensor-samples": {name: tensor_sample(name, v) for name, v in sorted(model.items())},
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


def compare(got: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Return what differs between two fingerprints beyond float rounding (empty: the same behaviour)."""
    problems = []
    if {n: d.split(":")[0] for n, d in got["tensors"].items()} != {
        n: d.split(":")[0] for n, d in expected["tensors"].items()
    }:
        problems.append(f"model tensors differ in names, dtypes or shapes: {got['tensors']} != {expected['tensors']}")
        return problems
    for name, digest in expected["tensors"].items():
        if got["tensors"][name] == digest:
            continue  # bit-identical
        want, have = expected["tensor-samples"][name], got["tensor-samples"][name]
        worst = max((abs(a - b) for a, b in zip(have["values"], want["values"], strict=True)), default=0.0)
        if worst > TENSOR_TOLERANCE * want["max-abs"] or not math.isclose(
            have["max-abs"], want["max-abs"], rel_tol=TENSOR_TOLERANCE
        ):
            problems.append(f"model tensor {name} differs: {worst:.3g} at a sampled entry, of {want['max-abs']:.3g}")
    problems += _differences("metrics.jsonl", got["metrics"], expected["metrics"], METRIC_TOLERANCE)
    problems += _differences("epsilon", got["epsilon-per-site"], expected["epsilon-per-site"], PRIVACY_TOLERANCE)
    problems += _differences("ledger records", got["ledgers"], expected["ledgers"], PRIVACY_TOLERANCE)
    return problems


def _differences(where: str, got: Any, expected: Any, rel_tol: float) -> list[str]:
    """Return the places where two JSON values differ: floats beyond `rel_tol`, anything else at all."""
    if isinstance(expected, dict) and isinstance(got, dict) and got.keys() == expected.keys():
        return [p for key in expected for p in _differences(f"{where}/{key}", got[key], expected[key], rel_tol)]
    if isinstance(expected, list) and isinstance(got, list) and len(got) == len(expected):
        return [p for i, (a, b) in enumerate(zip(got, expected)) for p in _differences(f"{where}[{i}]", a, b, rel_tol)]
    if type(got) is float and type(expected) is float and math.isclose(got, expected, rel_tol=rel_tol, abs_tol=1e-300):
        return []
    if type(got) is float and type(expected) is float and math.isnan(got) and math.isnan(expected):
        return []
    return [] if got == expected and type(got) is type(expected) else [f"{where}: {got!r} != {expected!r}"]


def main(argv: list[str]) -> int:
    """Record the fingerprints of the named cases (all without names) with the code as it is now.

    `--add-samples` keeps a case's recorded digests and adds the tensor samples of a run here, after
    checking that this run matches the record (within float rounding where the digests differ, by the
    metrics alone): for records made before the samples were kept.
    """
    import os

    names = [a for a in argv if not a.startswith("-")] or list(CASES)
    PARITY_DIR.mkdir(exist_ok=True)
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"fedtl-parity-{name}-") as tmp:
            os.environ["FEDTL_HOME"] = str(Path(tmp) / "home")
            fp = run_case(name, Path(tmp))
        if "--add-samples" in argv:
            recorded = golden(name)
            problems = compare(fp, {**recorded, "tensor-samples": fp["tensor-samples"]})
            if problems:
                raise SystemExit(f"{name}: this run does not match its record, so no samples were added: {problems}")
            fp = {**recorded, "tensor-samples": fp["tensor-samples"]}
        (PARITY_DIR / f"{name}.json").write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n")
        print(f"recorded {name}: {len(fp['tensors'])} tensors, {len(fp['metrics'])} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
