"""Per-round checkpoints of a run: global head, strategy state and run records in ONE atomic file.

A stopped run (a crashed server, a lost connection, too few sites in a round) continues from its
last checkpoint with `resume = "<run folder>"`: the same run id, so every site's ledger keeps
fixing the run's noise, the next round number, and the strategy's optimiser state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save

from fedtl.shared.errors import ConfigError
from fedtl.shared.files import atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedtl-checkpoint/1"
_STRATEGY_STATE = ("m_t", "v_t")  # FedAdam's moment estimates (flwr.serverapp.strategy.FedOpt)


@dataclass
class Checkpoint:
    """The state of a run after `server_round`."""

    server_round: int
    arrays: dict[str, np.ndarray]  # the global head after that round
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)  # RunRecorder state (JSON)


def checkpoint_path(run_dir: Path) -> Path:
    """Return where a run keeps its checkpoint."""
    return Path(run_dir) / CHECKPOINT_FILE


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write the checkpoint atomically (a crash leaves the previous round's checkpoint intact)."""
    tensors = {f"arrays/{name}": np.ascontiguousarray(v) for name, v in checkpoint.arrays.items()}
    for part, values in checkpoint.strategy_state.items():
        tensors.update({f"{part}/{name}": np.ascontiguousarray(v) for name, v in values.items()})
    metadata = {
        "format": FORMAT,
        "server-round": str(checkpoint.server_round),
        "records": json.dumps(checkpoint.records),
    }
    return atomic_write_bytes(checkpoint_path(run_dir), save(tensors, metadata=metadata))


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read a run's checkpoint.

    Raises:
        ConfigError: the folder holds no checkpoint, or it is not a fedtl checkpoint.
    """
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise ConfigError(
            f"cannot resume from {run_dir}: it has no {CHECKPOINT_FILE} (the run stopped before its first round "
            "finished, or this is not a run folder); start a new run instead"
        )
    with safe_open(str(path), framework="numpy") as fh:
        metadata = fh.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a {FORMAT} file (format {metadata.get('format')!r})")
    tensors = load_file(str(path))
    arrays = {name.split("/", 1)[1]: v for name, v in tensors.items() if name.startswith("arrays/")}
    state = {
        part: {name.split("/", 1)[1]: v for name, v in tensors.items() if name.startswith(f"{part}/")}
        for part in _STRATEGY_STATE
    }
    return Checkpoint(
        server_round=int(metadata["server-round"]),
        arrays=arrays,
        strategy_state={part: values for part, values in state.items() if values},
        records=json.loads(metadata["records"]),
    )


def strategy_state(strategy: Any) -> dict[str, dict[str, np.ndarray]]:
    """Return the optimiser state a strategy carries between rounds (empty for FedAvg/FedProx)."""
    out = {}
    for part in _STRATEGY_STATE:
        values = getattr(strategy, part, None)
        if values:
            out[part] = {name: np.asarray(v) for name, v in values.items()}
    return out


def restore_strategy_state(strategy: Any, state: dict[str, dict[str, np.ndarray]]) -> None:
    """Put saved optimiser state back into a strategy."""
    for part, values in state.items():
        setattr(strategy, part, dict(values))
