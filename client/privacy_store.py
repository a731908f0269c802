"""The site's privacy history on its own disk: append-only, written before training, fsynced.

Every DP-SGD stretch a site runs is charged here *before* its training starts (write-ahead), so a
crash mid-round can only over-count, never under-count. Cumulative epsilon is recomputed from the
whole history with Opacus' accountant, across rounds and runs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedtl.shared.errors import DataError
from fedtl.shared.privacy import PrivacyStep, compute_epsilon

log = logging.getLogger(__name__)

DP_SGD = "dp-sgd"
FEATURE_SUM = "feature-sum"


@dataclass(frozen=True)
class PrivacyCharge:
    """One charged round: what the accountant needs, and where it came from."""

    run_id: str
    server_round: int
    noise_multiplier: float  # 0.0 for a non-private round (infinite epsilon)
    sample_rate: float
    steps: int
    delta: float
    time: float
    kind: str = DP_SGD  # DP_SGD rounds, or FEATURE_SUM (one Gaussian release of a feature sum)

    @property
    def step(self) -> PrivacyStep:
        """Return the accountant's view of this charge."""
        return PrivacyStep(self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyStore:
    """Append-only JSON-lines file of `PrivacyCharge`s; one file per site."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def charges(self) -> list[PrivacyCharge]:
        """Return every charge in the order written.

        Raises:
            DataError: a record is unreadable (the file was edited or damaged); nothing is guessed.
        """
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH)  # never read half of a concurrent append
            try:
                text = fh.read()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(PrivacyCharge(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as exc:
                raise DataError(
                    f"privacy history {self.path} line {lineno} is unreadable ({exc}); the file must not be "
                    "edited by hand. Restore it from a backup; never delete it to reset a budget"
                ) from exc
        return out

    def history(self) -> list[PrivacyStep]:
        """Return the accountant history of every charge."""
        return [c.step for c in self.charges()]

    def charge(self, charge: PrivacyCharge) -> None:
        """Append `charge` durably (locked, flushed and fsynced) before the training it pays for."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(asdict(charge), sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def epsilon(self, *, delta: float, accountant: str = "rdp") -> float:
        """Return the site's cumulative epsilon over its whole history at `delta`."""
        return compute_epsilon(self.history(), delta=delta, accountant=accountant)

    def run_noise_multiplier(self, run_id: str) -> float | None:
        """Return the DP-SGD noise multiplier already fixed for `run_id`, if any round of it was charged."""
        for c in self.charges():
            if c.run_id == run_id and c.kind == DP_SGD:
                return c.noise_multiplier
        return None

    def history_outside_training(self, run_id: str) -> list[PrivacyStep]:
        """Return every charge except this run's DP-SGD rounds: what the run's training noise must leave room for."""
        return [c.step for c in self.charges() if not (c.run_id == run_id and c.kind == DP_SGD)]


def new_charge(
    *,
    run_id: str,
    server_round: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    kind: str = DP_SGD,
) -> PrivacyCharge:
    """Return a charge stamped with the current time."""
    return PrivacyCharge(
        run_id=run_id,
        server_round=server_round,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        time=time.time(),
        kind=kind,
    )
