"""The site's privacy ledger on its own disk: append-only, write-ahead, fsynced, one writer at a time.

Every privacy-costing release a site makes is charged here *before* it is computed (write-ahead), so
a crash mid-round can only over-count, never under-count. Cumulative epsilon is recomputed from the
whole history with Opacus' accountant, across rounds and runs.

Crash safety:
- Each record is one JSON line carrying a CRC-32 of its own content; a record that fails its CRC or
  does not parse in the middle of the file means the file was edited or damaged: reading stops with
  an error (nothing is guessed, nothing is rewritten).
- A *torn* last record (a crash or power loss during the append: no final newline, or an unparseable
  last line) is counted pessimistically: the accounting fields are written first, so they are
  recovered when complete; otherwise the torn record counts as an unbounded release (epsilon = inf)
  until the operator restores the ledger from a backup. The next charge moves the torn bytes into an
  explicit `torn` record, so the repair is itself on the record.
- Check-and-append happens under one exclusive `flock` on a side lock file, so two processes of the
  same site cannot both spend the last of a budget.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from fedtl.shared.errors import DataError, PrivacyBudgetError
from fedtl.shared.mechanisms import DP_SGD, MECHANISMS
from fedtl.shared.privacy import PrivacyStep, compute_epsilon

log = logging.getLogger(__name__)

TORN = "torn"  # a pessimistic stand-in for a record cut short by a crash
KINDS = (*MECHANISMS, TORN)  # every mechanism's kind (shared/mechanisms.py), and torn records
LEGACY_NAME = "history.jsonl"  # fedtl 0.1's name for the same records (without checksums)

# Accounting fields first: a record cut short still carries them when they were written whole.
_FIELD_ORDER = ("noise_multiplier", "sample_rate", "steps", "kind", "run_id", "server_round", "delta", "time", "note")
# A Skellam release (secure aggregation) writes its integer sensitivities before everything else, so a torn record
# that still has its noise fields has them too (without them it would pass for a Gaussian step, counting less),
# and its trust assumption (t honest of n summed sites) after the accounting fields. Gaussian records stay as
# they were, byte for byte.
_SKELLAM_FIELDS = ("l2_sensitivity", "l1_sensitivity")
_TRUST_FIELDS = ("honest_sites", "num_sites")
_TORN_FIELD = re.compile(r'"(l2_sensitivity|l1_sensitivity|noise_multiplier|sample_rate|steps)": ([0-9.eE+-]+),')


@dataclass(frozen=True)
class PrivacyCharge:
    """One charged release: what the accountant needs, and where it came from."""

    run_id: str
    server_round: int
    noise_multiplier: float  # 0.0 for a non-private release (infinite epsilon)
    sample_rate: float
    steps: int
    delta: float
    time: float
    kind: str = "dp-sgd"  # a mechanism's kind (shared/mechanisms.py), or TORN
    note: str = ""  # for TORN records: the bytes that were cut short
    # Skellam releases only (0 otherwise): integer L2 / L1 sensitivities, and the trust assumption the charge holds
    # under: at least `honest_sites` honest sites' noise shares among the `num_sites` sites of the secure sum.
    l2_sensitivity: float = 0.0
    l1_sensitivity: float = 0.0
    honest_sites: int = 0
    num_sites: int = 0

    @property
    def step(self) -> PrivacyStep:
        """Return the accountant's view of this charge."""
        return PrivacyStep(
            self.noise_multiplier,
            self.sample_rate,
            self.steps,
            l2_sensitivity=self.l2_sensitivity,
            l1_sensitivity=self.l1_sensitivity,
        )

    def to_line(self) -> str:
        """Return the record as one JSON line, accounting fields first, with its CRC-32 last."""
        if self.l2_sensitivity:
            names = _SKELLAM_FIELDS + _FIELD_ORDER + _TRUST_FIELDS
        else:
            names = _FIELD_ORDER + tuple(n for n in _SKELLAM_FIELDS + _TRUST_FIELDS if getattr(self, n))
        record = {name: getattr(self, name) for name in names}
        return json.dumps({**record, "crc32": _crc(record)}) + "\n"


@dataclass(frozen=True)
class RunSpend:
    """What one run cost a site: its charges, and epsilon before and after it."""

    run_id: str
    rounds: int
    steps: int
    epsilon_alone: float  # the run's charges on their own
    epsilon_after: float  # cumulative, after this run (runs in ledger order)
    last_time: float


def _crc(record: dict) -> int:
    return zlib.crc32(json.dumps(record, sort_keys=True).encode())


class PrivacyLedger:
    """Append-only JSON-lines file of `PrivacyCharge`s; one file per site."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    # --- reading ---------------------------------------------------------------------------------

    def charges(self) -> list[PrivacyCharge]:
        """Return every charge in the order written, with a pessimistic stand-in for a torn last record.

        Raises:
            DataError: a record before the last is unreadable or fails its checksum (the file was edited or
                damaged); nothing is guessed.
        """
        with self._locked(fcntl.LOCK_SH):
            charges, torn = self._read()
        return charges + ([torn[0]] if torn else [])

    def unchecked_records(self) -> int:
        """Return how many records carry no checksum (written by fedtl 0.1): their integrity is not checked."""
        if not self.path.is_file():
            return 0
        with self._locked(fcntl.LOCK_SH):
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        return sum(1 for line in lines if line.strip() and '"crc32"' not in line)

    def history(self) -> list[PrivacyStep]:
        """Return the accountant history of every charge."""
        return [c.step for c in self.charges()]

    def epsilon(self, *, delta: float, accountant: str = "rdp") -> float:
        """Return the site's cumulative epsilon over its whole history at `delta`."""
        return compute_epsilon(self.history(), delta=delta, accountant=accountant)

    def spend_by_run(self, *, delta: float, accountant: str = "rdp") -> list[RunSpend]:
        """Return each run's spend, in the order runs first appear in the ledger."""
        charges = self.charges()
        order: list[str] = []
        for c in charges:
            if c.run_id not in order:
                order.append(c.run_id)
        out = []
        for i, run_id in enumerate(order):
            mine = [c for c in charges if c.run_id == run_id]
            upto = set(order[: i + 1])
            out.append(
                RunSpend(
                    run_id=run_id,
                    rounds=len({c.server_round for c in mine if c.kind == DP_SGD.kind}),
                    steps=sum(c.steps for c in mine),
                    epsilon_alone=compute_epsilon([c.step for c in mine], delta=delta, accountant=accountant),
                    epsilon_after=compute_epsilon(
                        [c.step for c in charges if c.run_id in upto], delta=delta, accountant=accountant
                    ),
                    last_time=max(c.time for c in mine),
                )
            )
        return out

    # --- writing ---------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[LedgerBook]:
        """Hold the ledger exclusively: read and verify it once, plan against it, append to it.

        Everything a release decides from the ledger (its noise, the rounds a run already did, the budget
        check) happens inside one transaction, so two processes of a site cannot both spend the same
        remaining budget and the file is read once per release.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(fcntl.LOCK_EX):
            charges, torn = self._read()
            yield LedgerBook(self, charges, torn)

    def charge(self, charge: PrivacyCharge, **budget: Any) -> float:
        """Append `charge` in its own transaction (see `LedgerBook.append` for the budget arguments)."""
        with self.transaction() as book:
            return book.append(charge, **budget)

    def _append(self, line: str) -> None:
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        if new:  # make the new file's directory entry durable too
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def _repair(self, torn: tuple[PrivacyCharge, int]) -> None:
        """Cut the torn bytes off and append them as an explicit TORN record (caller holds the lock)."""
        stand_in, offset = torn
        log.warning("privacy ledger %s: torn last record replaced by a pessimistic `torn` record", self.path)
        with open(self.path, "r+b") as fh:
            fh.truncate(offset)
            fh.flush()
            os.fsync(fh.fileno())
        self._append(stand_in.to_line())

    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        if not self.lock_path.parent.is_dir():
            yield  # no ledger folder yet: nothing to read, nobody writing
            return
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, mode)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> tuple[list[PrivacyCharge], tuple[PrivacyCharge, int] | None]:
        """Return the complete charges and, when the last record is torn, its stand-in and byte offset."""
        legacy = self.path.with_name(LEGACY_NAME)
        if legacy.is_file() and legacy != self.path:
            raise DataError(
                f"{legacy} is the privacy history of an earlier fedtl version; its spend must count. Append its "
                f"lines to {self.path} (or rename it, if {self.path.name} does not exist yet), then delete it"
            )
        if not self.path.is_file():
            return [], None
        data = self.path.read_bytes()
        charges = []
        offset = 0
        lines = data.split(b"\n")
        for lineno, raw in enumerate(lines, start=1):
            last = lineno == len(lines)
            if last and not raw:
                break  # the file ends with a newline
            try:
                charges.append(_parse(raw))
            except (ValueError, TypeError, KeyError) as exc:
                if last:  # cut short by a crash during the append
                    return charges, (self._stand_in(raw), offset)
                if not raw.strip():
                    offset += len(raw) + 1
                    continue
                raise DataError(
                    f"privacy ledger {self.path} line {lineno} is unreadable ({exc}); the file must not be "
                    "edited by hand. Restore it from a backup; never delete it to reset a budget"
                ) from exc
            offset += len(raw) + 1
        return charges, None

    def _stand_in(self, raw: bytes) -> PrivacyCharge:
        """Return the pessimistic charge standing for a torn record."""
        text = raw.decode("utf-8", errors="replace")
        found = dict(_TORN_FIELD.findall(text))
        try:
            step = PrivacyStep(
                float(found["noise_multiplier"]),
                float(found["sample_rate"]),
                int(found["steps"]),
                l2_sensitivity=float(found.get("l2_sensitivity", 0.0)),
                l1_sensitivity=float(found.get("l1_sensitivity", 0.0)),
            )
            how = "its accounting fields were recovered"
        except (KeyError, ValueError):  # ConfigError is a ValueError
            step = PrivacyStep(0.0, 1.0, 1)  # unknown cost: count it as unbounded
            how = (
                "its cost cannot be recovered, so it counts as unbounded (epsilon = inf); restore the ledger "
                "from a backup to go on"
            )
        log.warning("privacy ledger %s: the last record is torn (a crash during a write); %s", self.path, how)
        return PrivacyCharge(
            run_id="torn",
            server_round=-1,
            noise_multiplier=step.noise_multiplier,
            sample_rate=step.sample_rate,
            steps=step.steps,
            delta=0.0,
            time=time.time(),
            kind=TORN,
            note=text[:2000],
            l2_sensitivity=step.l2_sensitivity,
            l1_sensitivity=step.l1_sensitivity,
        )


class LedgerBook:
    """The ledger's records as read inside a transaction, and the one way to append to it (budget checked)."""

    def __init__(self, ledger: PrivacyLedger, charges: list[PrivacyCharge], torn: tuple[PrivacyCharge, int] | None):
        self._ledger = ledger
        self._torn = torn
        self.charges = charges + ([torn[0]] if torn else [])  # a torn last record counts, pessimistically

    def append(
        self,
        charge: PrivacyCharge,
        *,
        max_epsilon: float = math.inf,
        delta: float | None = None,
        accountant: str = "rdp",
        what: str = "this release",
        budget_name: str = "its budget",
    ) -> float:
        """Append `charge` durably, before the release it pays for, unless it takes epsilon past `max_epsilon`.

        Args:
            charge: the release to pay for.
            max_epsilon: the most the site's cumulative epsilon may reach at `delta` (inf: no check).
            delta: the delta of that check (default: the charge's own).
            accountant: "rdp" or "prv".
            what: names the release in the refusal message.
            budget_name: names `max_epsilon` there (e.g. "the run's target-epsilon").

        Returns:
            The site's cumulative epsilon at `delta` including this charge (nan when `max_epsilon` is inf:
            no budget to check, so nothing is computed).

        Raises:
            PrivacyBudgetError: the charge would exceed `max_epsilon` (nothing is written).
        """
        ledger = self._ledger
        delta = charge.delta if delta is None else delta
        if self._torn is not None:
            ledger._repair(self._torn)
            self._torn = None
        elif len(self.charges) and not ledger._ends_with_newline():
            ledger._append("\n")  # a crash lost only the last newline: the record itself is whole
        if math.isnan(max_epsilon):
            raise PrivacyBudgetError(f"refusing {what}: the budget to check it against is NaN")
        if not math.isfinite(max_epsilon):  # nothing to check: keep the append cheap
            ledger._append(charge.to_line())
            self.charges.append(charge)
            return math.nan
        history = [c.step for c in self.charges]
        projected = compute_epsilon(history + [charge.step], delta=delta, accountant=accountant)
        # Noise planned to meet a budget exactly lands on it up to float rounding of the RDP sums.
        if projected > max_epsilon * (1 + 1e-6):
            spent = compute_epsilon(history, delta=delta, accountant=accountant)
            raise PrivacyBudgetError(
                f"refusing {what}: the site's cumulative epsilon would reach {projected:.3f} > {budget_name} "
                f"{max_epsilon:g} (delta {delta:g}); spent so far {spent:.3f}, "
                f"left {max(max_epsilon - spent, 0):.3f} "
                f"(ledger {ledger.path}). Ask for fewer rounds or more noise"
            )
        ledger._append(charge.to_line())
        self.charges.append(charge)
        return projected


def _parse(raw: bytes) -> PrivacyCharge:
    """Return the charge of one ledger line; raise ValueError on bad JSON, fields or checksum."""
    record = json.loads(raw)
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    crc = record.pop("crc32", None)  # records from fedtl 0.1 carry none; `fedtl site ledger` counts them
    if crc is not None and crc != _crc(record):
        raise ValueError("checksum mismatch: the record was changed after it was written")
    names = {f.name for f in fields(PrivacyCharge)}
    if set(record) - names:
        raise ValueError(f"unknown fields {sorted(set(record) - names)}")
    charge = PrivacyCharge(**record)
    if charge.kind not in KINDS:
        raise ValueError(f"unknown kind {charge.kind!r}")
    charge.step  # validates noise, sample rate and steps
    return charge


def new_charge(
    *,
    run_id: str,
    server_round: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    kind: str = "dp-sgd",
    l2_sensitivity: float = 0.0,
    l1_sensitivity: float = 0.0,
    honest_sites: int = 0,
    num_sites: int = 0,
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
        l2_sensitivity=l2_sensitivity,
        l1_sensitivity=l1_sensitivity,
        honest_sites=honest_sites,
        num_sites=num_sites,
    )
