"""The site's privacy ledger on its own disk: append-only, write-ahead, keyed and chained, one writer at a time.

Every release a site makes is charged here *before* it is computed (write-ahead), so a crash mid-round
can only over-count, never under-count. Cumulative epsilon is recomputed from the whole history with
Opacus' accountant, across rounds and runs. Noise-free releases (shared/mechanisms.py, `accounted =
False`) are recorded too, with noise 0, sample rate 0 and 0 steps: they add nothing to epsilon and are
counted against the policy's quotas (client/quotas.py).

Tamper evidence (a site never silently goes back to a fresh budget):
- The ledger is keyed by a 32-byte site secret, `ledger.key` (64 hex digits, mode 0600) in the site's
  secret folder, which is *outside* the state folder (policy `[storage] secret-dir`; a lab ledger keeps
  it beside itself, `<ledger folder>/secret`). The key is created at the first charge of a fresh site.
- Each record is one JSON line, accounting fields first, then `"mac"`: HMAC-SHA256 under that key of
  `b"fedtl-ledger-v2\\n" + <the previous record's mac, or 64 zeros for the first> + b"\\n" +
  json.dumps(<the record without "mac">, sort_keys=True)` (Python's json, default separators), in hex.
  The chain makes an edited, reordered or removed record fail the MAC of its own line or of the next.
- A head, `ledger.head` beside the key (`{"records": n, "mac": <mac of record n>, ...}`), is rewritten
  atomically after every append, so a truncated or deleted ledger, or a whole one swapped for an older
  copy, no longer matches it.
- Crash rule: the record is fsynced before the head is updated, so a crash between the two leaves the
  ledger exactly one record ahead of its head; when that record chains onto the head's MAC it is
  accepted and the head is brought up to date at the next charge. Anything else is refused.
- Refused, each with a message naming the file, what is wrong and the fix (restore from a backup; never
  delete the ledger to reset a budget): a signed ledger without its key, a ledger shorter than its head
  or missing while its head exists, a broken chain, a record without a MAC, a head missing beside a
  non-empty ledger or more than one record behind it, a key readable by others.
- Ledgers of earlier versions (a CRC-32 per record, or no checksum) are refused until the operator runs
  `fedtl site ledger adopt`, which shows every record, keeps a copy of the file, signs the records into
  a chain and appends an `adopted` record saying what was adopted, from which file (SHA-256) and by
  whom. The same command re-seals a signed ledger whose head was lost (the chain still verifies), and,
  only with `--new-key`, re-signs records whose key is lost (the adoption record says nothing vouches
  for them). Someone who deletes the ledger *and* the secret folder starts a fresh site: keep the secret
  folder on another volume than the state, and back both up.

Crash safety (unchanged from the CRC ledger):
- A record that does not parse in the middle of the file means the file was edited or damaged: reading
  stops with an error (nothing is guessed, nothing is rewritten).
- A *torn* last record (a crash or power loss during the append: no final newline, or an unparseable
  last line) is counted pessimistically: the accounting fields are written first, so they are recovered
  when complete; otherwise the torn record counts as an unbounded release (epsilon = inf) until the
  operator restores the ledger from a backup. The next charge overwrites the torn bytes with an explicit,
  signed `torn` record, so the repair is itself on the record.
- Check-and-append happens under one exclusive `flock` on a side lock file, so two processes of the
  same site cannot both spend the last of a budget.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from fedtl.shared.errors import DataError, PrivacyBudgetError
from fedtl.shared.files import atomic_write_bytes
from fedtl.shared.mechanisms import DP_SGD, MECHANISMS
from fedtl.shared.privacy import PrivacyStep, compute_epsilon

log = logging.getLogger(__name__)

TORN = "torn"  # a pessimistic stand-in for a record cut short by a crash
ADOPTED = "adopted"  # `fedtl site ledger adopt` signed the records before it into a chain (costs nothing)
KINDS = (*MECHANISMS, TORN, ADOPTED)  # every mechanism's kind (shared/mechanisms.py), torn and adopted records
LEGACY_NAME = "history.jsonl"  # fedtl 0.1's name for the same records (without checksums)
KEY_NAME = "ledger.key"
HEAD_NAME = "ledger.head"
LAB_SECRET_DIR = "secret"  # a ledger's secret folder when none is given: beside it (the lab's, no protection)
GENESIS = "0" * 64  # the "previous MAC" of a ledger's first record
MAC_DOMAIN = b"fedtl-ledger-v2"
RESTORE = "Restore it from a backup; never delete or edit the ledger to reset a budget"

# Accounting fields first: a record cut short still carries them when they were written whole.
_FIELD_ORDER = ("noise_multiplier", "sample_rate", "steps", "kind", "run_id", "server_round", "delta", "time", "note")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NO_STEP = (0.0, 0.0, 0)  # the accounting fields of a record that is no DP step (noise-free, adopted)
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
    noise_multiplier: float  # 0.0 for a non-private release (infinite epsilon), or one that is no DP step
    sample_rate: float  # 0.0 only for a record that is no DP step (with 0 steps)
    steps: int
    delta: float
    time: float = field(default_factory=time.time)  # when it was charged (set on creation)
    kind: str = "dp-sgd"  # a mechanism's kind (shared/mechanisms.py), TORN or ADOPTED
    note: str = ""  # for TORN records: the bytes that were cut short; for ADOPTED ones: what was adopted
    # Skellam releases only (0 otherwise): integer L2 / L1 sensitivities, and the trust assumption the charge holds
    # under: at least `honest_sites` honest sites' noise shares among the `num_sites` sites of the secure sum.
    l2_sensitivity: float = 0.0
    l1_sensitivity: float = 0.0
    honest_sites: int = 0
    num_sites: int = 0

    @property
    def accounted(self) -> bool:
        """Return whether this record is a DP release that epsilon composes (noise-free and adopted ones are not)."""
        mechanism = MECHANISMS.get(self.kind)
        return mechanism.accounted if mechanism is not None else self.kind == TORN

    @property
    def step(self) -> PrivacyStep:
        """Return the accountant's view of this charge (zero steps for a record that is no DP step)."""
        if (self.noise_multiplier, self.sample_rate, self.steps) == _NO_STEP:
            return PrivacyStep(0.0, 1.0, 0)  # Opacus' RDP of q = 0 is 0 too: the same epsilon either way
        return PrivacyStep(
            self.noise_multiplier,
            self.sample_rate,
            self.steps,
            l2_sensitivity=self.l2_sensitivity,
            l1_sensitivity=self.l1_sensitivity,
        )

    def record(self) -> dict[str, Any]:
        """Return the record's fields in ledger order (accounting fields first), without its MAC.

        A Gaussian record has exactly the fields of earlier versions; a Skellam one leads with its sensitivities
        and ends with its trust assumption.
        """
        if self.l2_sensitivity:
            names = _SKELLAM_FIELDS + _FIELD_ORDER + _TRUST_FIELDS
        else:
            names = _FIELD_ORDER + tuple(n for n in _SKELLAM_FIELDS + _TRUST_FIELDS if getattr(self, n))
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class RunSpend:
    """What one run cost a site: its charges, and epsilon before and after it."""

    run_id: str
    rounds: int
    steps: int
    epsilon_alone: float  # the run's charges on their own
    epsilon_after: float  # cumulative, after this run (runs in ledger order)
    last_time: float
    noise_free: int = 0  # noise-free releases (evaluation, ranking, finetune scores): no epsilon, counted


@dataclass(frozen=True)
class LedgerHead:
    """The ledger's length and last MAC, kept beside the key so that truncation or deletion shows."""

    records: int
    mac: str


@dataclass(frozen=True)
class LedgerState:
    """A ledger as read and verified: its charges, their MACs, a torn last record, how it stands to its head."""

    charges: tuple[PrivacyCharge, ...]  # verified, in order (a torn last record is not among them)
    macs: tuple[str, ...]
    torn: tuple[PrivacyCharge, int] | None  # the pessimistic stand-in and the byte offset of the torn bytes
    key: bytes | None  # None: a fresh site (no signed record yet)
    head: LedgerHead | None  # None: a fresh site

    @property
    def head_behind(self) -> bool:
        """Return True when a crash left the head one record behind (accepted; repaired at the next charge)."""
        return self.head is not None and len(self.charges) == self.head.records + 1


@dataclass(frozen=True)
class Adoption:
    """What `PrivacyLedger.adopt` would sign: the records as read, why they need it, and the file's SHA-256."""

    reason: str
    charges: tuple[PrivacyCharge, ...]
    unchecked: int  # records nothing vouches for (no checksum, or MACs under a lost key)
    sha256: str  # of the ledger file as read (of b"" when it is missing)
    new_key: bool = False


_NAMES = frozenset(f.name for f in fields(PrivacyCharge))


class _Line(NamedTuple):
    lineno: int
    charge: PrivacyCharge
    record: dict[str, Any]  # exactly what was signed
    mac: str | None  # None: a record of an earlier version
    crc_checked: bool


def _crc(record: dict) -> int:
    return zlib.crc32(json.dumps(record, sort_keys=True).encode())


def _mac(key: bytes, previous: str, record: dict[str, Any]) -> str:
    """Return the record's MAC, chained onto the previous record's (see the module docstring)."""
    message = MAC_DOMAIN + b"\n" + previous.encode() + b"\n" + json.dumps(record, sort_keys=True).encode()
    return hmac.digest(key, message, "sha256").hex()


def _signed_line(key: bytes, previous: str, charge: PrivacyCharge) -> tuple[str, str]:
    record = charge.record()
    mac = _mac(key, previous, record)
    return json.dumps({**record, "mac": mac}) + "\n", mac


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_only_folder(folder: Path) -> bool:
    """Return whether `folder` is on a read-only mount (so no process can be appending to a ledger there)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class PrivacyLedger:
    """Append-only JSON-lines file of signed `PrivacyCharge`s; one file per site, its key and head elsewhere."""

    def __init__(self, path: str | Path, secret_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        # A real site's policy names a secret folder outside its state folder (SitePolicy.secret_dir); the
        # lab's ledgers keep it beside them, which guards against accidents only.
        self.secret_dir = Path(secret_dir) if secret_dir is not None else self.path.parent / LAB_SECRET_DIR
        self._site_secret = secret_dir is not None  # a lab ledger's key lives and dies with it (temporary baselines)
        self.key_path = self.secret_dir / KEY_NAME
        self.head_path = self.secret_dir / HEAD_NAME

    # --- reading ---------------------------------------------------------------------------------

    def charges(self) -> list[PrivacyCharge]:
        """Return every charge in the order written, with a pessimistic stand-in for a torn last record.

        Raises:
            DataError: the ledger does not verify (module docstring: key, chain, head); nothing is guessed.
        """
        state = self.read_state()
        return list(state.charges) + ([state.torn[0]] if state.torn else [])

    def read_state(self) -> LedgerState:
        """Return the ledger read and verified against its key and head (module docstring).

        Raises:
            DataError: the message names the file, what is wrong and the fix.
        """
        with self._locked(fcntl.LOCK_SH):
            return self._read()

    def history(self) -> list[PrivacyStep]:
        """Return the accountant history of every charge that epsilon composes."""
        return [c.step for c in self.charges() if c.accounted]

    def epsilon(self, *, delta: float, accountant: str = "rdp") -> float:
        """Return the site's cumulative epsilon over its whole history at `delta`."""
        return compute_epsilon(self.history(), delta=delta, accountant=accountant)

    def spend_by_run(self, *, delta: float, accountant: str = "rdp") -> list[RunSpend]:
        """Return each run's spend, in the order runs first appear in the ledger (adoption records left out)."""
        charges = [c for c in self.charges() if c.kind != ADOPTED]
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
                    steps=sum(c.steps for c in mine if c.accounted),
                    epsilon_alone=compute_epsilon(
                        [c.step for c in mine if c.accounted], delta=delta, accountant=accountant
                    ),
                    epsilon_after=compute_epsilon(
                        [c.step for c in charges if c.run_id in upto and c.accounted],
                        delta=delta,
                        accountant=accountant,
                    ),
                    last_time=max(c.time for c in mine),
                    noise_free=sum(1 for c in mine if not c.accounted),
                )
            )
        return out

    # --- writing ---------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[LedgerBook]:
        """Hold the ledger exclusively: read and verify it once, plan against it, append to it.

        Everything a release decides from the ledger (its noise, the rounds a run already did, the quotas,
        the budget check) happens inside one transaction, so two processes of a site cannot both spend the
        same remaining budget and the file is read once per release.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(fcntl.LOCK_EX):
            yield LedgerBook(self, self._read())

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
            _fsync_dir(self.path.parent)

    def _overwrite_tail(self, offset: int, line: str) -> None:
        """Replace the bytes from `offset` on with `line`, in place (a crash midway leaves a torn record again)."""
        data = line.encode()
        with open(self.path, "r+b") as fh:
            fh.seek(offset)
            fh.write(data)
            fh.truncate(offset + len(data))
            fh.flush()
            os.fsync(fh.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def _seal(self, records: int, mac: str) -> None:
        """Rewrite the head atomically: the ledger now holds `records` records, the last with `mac`."""
        head = {"records": records, "mac": mac, "ledger": str(self.path.absolute()), "time": time.time()}
        atomic_write_bytes(self.head_path, (json.dumps(head) + "\n").encode())
        _fsync_dir(self.secret_dir)

    def _create_key(self) -> bytes:
        """Create the site's ledger key (0600, in a 0700 folder); refuse to replace one."""
        self.secret_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(self.secret_dir)
        if self._site_secret:
            log.warning(
                "privacy ledger %s: created its key %s; back up %s with the ledger and never delete it",
                self.path,
                self.key_path,
                self.secret_dir,
            )
        else:
            log.info(
                "privacy ledger %s: created its key %s (a lab ledger: the key is kept beside it)",
                self.path,
                self.key_path,
            )
        return key

    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        if not self.lock_path.parent.is_dir():
            yield  # no ledger folder yet: nothing to read (its head is still checked), nobody writing
            return
        read_only = mode == fcntl.LOCK_SH and _read_only_folder(self.lock_path.parent)
        if read_only and not self.lock_path.exists():
            yield  # a read-only copy never written through a lock (a backup): nobody is writing it
            return
        # On a read-only mount (a reviewer's view of a live site's volume) a read-only handle still takes the
        # shared lock, which the site's writer, through the same file, honours.
        with open(self.lock_path, "r" if read_only else "a") as lock:
            fcntl.flock(lock, mode)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # --- verifying -------------------------------------------------------------------------------

    def _load_key(self) -> bytes | None:
        if not self.key_path.exists():
            return None
        mode = self.key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise DataError(
                f"ledger key {self.key_path} is readable or writable by others (mode {mode:o}); it must be the "
                f"site's secret: chmod 600 {self.key_path}"
            )
        try:
            key = bytes.fromhex(self.key_path.read_text(encoding="ascii").strip())
        except (ValueError, UnicodeDecodeError):
            key = b""
        if len(key) != 32:
            raise DataError(f"ledger key {self.key_path} is not 64 hex digits: it was damaged. {RESTORE}")
        return key

    def _load_head(self) -> LedgerHead | None:
        if not self.head_path.exists():
            return None
        try:
            raw = json.loads(self.head_path.read_text(encoding="utf-8"))
            head = LedgerHead(int(raw["records"]), str(raw["mac"]))
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            raise DataError(f"ledger head {self.head_path} is unreadable ({exc}). {RESTORE}") from exc
        if head.records < 0 or not _HEX64.fullmatch(head.mac):
            raise DataError(f"ledger head {self.head_path} is malformed ({head}). {RESTORE}")
        return head

    def _lines(self, data: bytes) -> tuple[list[_Line], tuple[PrivacyCharge, int] | None]:
        """Return the parsed records of `data` and, when its last record is torn, its stand-in and byte offset."""
        out = []
        offset = 0
        lines = data.split(b"\n")
        for lineno, raw in enumerate(lines, start=1):
            last = lineno == len(lines)
            if last and not raw:
                break  # the file ends with a newline
            try:
                charge, record, mac, crc_checked = _parse(raw)
            except (ValueError, TypeError, KeyError) as exc:
                if last:  # cut short by a crash during the append
                    return out, (self._stand_in(raw), offset)
                if not raw.strip():
                    offset += len(raw) + 1
                    continue
                raise DataError(
                    f"privacy ledger {self.path} line {lineno} is unreadable ({exc}); the file must not be "
                    f"edited by hand. {RESTORE}"
                ) from exc
            out.append(_Line(lineno, charge, record, mac, crc_checked))
            offset += len(raw) + 1
        return out, None

    def _check_chain(self, key: bytes, lines: list[_Line]) -> list[str]:
        macs, previous = [], GENESIS
        for line in lines:
            assert line.mac is not None
            if not hmac.compare_digest(line.mac, _mac(key, previous, line.record)):
                raise DataError(
                    f"privacy ledger {self.path} line {line.lineno} fails its MAC: the record was changed, moved "
                    f"or a record before it removed after it was written (or {self.key_path} is not this ledger's "
                    f"key). {RESTORE}"
                )
            macs.append(line.mac)
            previous = line.mac
        return macs

    def _check_head(self, head: LedgerHead, macs: list[str]) -> None:
        n = len(macs)
        if n < head.records:
            missing = "is missing" if not self.path.exists() else f"holds {n} records"
            raise DataError(
                f"privacy ledger {self.path} {missing}, but its head {self.head_path} says {head.records}: it was "
                f"truncated or deleted. {RESTORE}"
            )
        at_head = macs[head.records - 1] if head.records else GENESIS
        if not hmac.compare_digest(at_head, head.mac):
            raise DataError(
                f"privacy ledger {self.path}: its record {head.records} does not match the MAC in its head "
                f"{self.head_path}: the ledger was replaced by another or an older copy. {RESTORE}"
            )
        if n > head.records + 1:
            raise DataError(
                f"privacy ledger {self.path} holds {n} records but its head {self.head_path} says {head.records}: "
                f"the head was restored from an older backup than the ledger. Restore both from the same backup, "
                "or check the records and re-seal them with `fedtl site ledger adopt --policy <policy>`"
            )

    def _read(self) -> LedgerState:
        """Return the verified ledger (the caller holds the lock); raise DataError naming what is wrong."""
        legacy = self.path.with_name(LEGACY_NAME)
        if legacy.is_file() and legacy != self.path:
            raise DataError(
                f"{legacy} is the privacy history of an earlier fedtl version; its spend must count. Append its "
                f"lines to {self.path} (or rename it, if {self.path.name} does not exist yet), delete it, then "
                "sign them with `fedtl site ledger adopt --policy <policy>`"
            )
        key, head = self._load_key(), self._load_head()
        if head is not None and key is None:
            raise DataError(
                f"ledger key {self.key_path} is missing but its head {self.head_path} is there: restore "
                f"{self.secret_dir} from a backup (without the key the ledger {self.path} cannot be checked)"
            )
        lines, torn = self._lines(self.path.read_bytes() if self.path.is_file() else b"")
        unkeyed = [line.lineno for line in lines if line.mac is None]
        if unkeyed and len(unkeyed) == len(lines) and head is None:
            raise DataError(
                f"privacy ledger {self.path} was written by an earlier fedtl: its {len(lines)} record(s) carry a "
                "CRC-32 or no checksum, which anyone can recompute, so edits to it would go unnoticed. Review and "
                "sign it once with `fedtl site ledger adopt --policy <policy>` (it shows every record and keeps a "
                "copy of the file)"
            )
        if unkeyed:
            raise DataError(
                f"privacy ledger {self.path} line {unkeyed[0]} carries no MAC: a record was added or rewritten "
                f"outside fedtl. {RESTORE}"
            )
        if lines and key is None:
            raise DataError(
                f"privacy ledger {self.path} is signed, but its key {self.key_path} is missing: restore "
                f"{self.secret_dir} (the key and the head beside it) from a backup; until then the ledger cannot "
                "be checked and the site refuses to work"
            )
        macs = self._check_chain(key, lines) if key is not None else []
        if head is None and lines:
            raise DataError(
                f"privacy ledger {self.path} has {len(lines)} signed records but its head {self.head_path} is "
                f"missing, so a truncated copy could not be told from the whole ledger. Restore {self.secret_dir} "
                "from a backup, or check the records and re-seal them with `fedtl site ledger adopt --policy "
                "<policy>`"
            )
        if head is not None:
            self._check_head(head, macs)
        return LedgerState(tuple(line.charge for line in lines), tuple(macs), torn, key, head)

    def _stand_in(self, raw: bytes) -> PrivacyCharge:
        """Return the pessimistic charge standing for a torn record."""
        text = raw.decode("utf-8", errors="replace")
        found = dict(_TORN_FIELD.findall(text))
        try:
            fields_ = (float(found["noise_multiplier"]), float(found["sample_rate"]), int(found["steps"]))
            sensitivities = (float(found.get("l2_sensitivity", 0.0)), float(found.get("l1_sensitivity", 0.0)))
            if fields_ != _NO_STEP:  # a torn noise-free record costs nothing: its 0 steps are whole
                PrivacyStep(*fields_, l2_sensitivity=sensitivities[0], l1_sensitivity=sensitivities[1])
            how = "its accounting fields were recovered"
        except (KeyError, ValueError):  # ConfigError is a ValueError
            fields_, sensitivities = (0.0, 1.0, 1), (0.0, 0.0)  # unknown cost: count it as unbounded
            how = (
                "its cost cannot be recovered, so it counts as unbounded (epsilon = inf); restore the ledger "
                "from a backup to go on"
            )
        log.warning("privacy ledger %s: the last record is torn (a crash during a write); %s", self.path, how)
        return PrivacyCharge(
            run_id="torn",
            server_round=-1,
            noise_multiplier=fields_[0],
            sample_rate=fields_[1],
            steps=fields_[2],
            delta=0.0,
            time=time.time(),
            kind=TORN,
            note=text[:2000],
            l2_sensitivity=sensitivities[0],
            l1_sensitivity=sensitivities[1],
        )

    # --- adopting --------------------------------------------------------------------------------

    def plan_adoption(self, *, new_key: bool = False) -> Adoption:
        """Return what `adopt` would sign, after checking that adopting is what this ledger needs.

        Adoptable: records of an earlier version (CRC-32 or no checksum) with no head beside the key; a
        signed ledger whose chain verifies but whose head is missing or more than one record behind; and,
        with `new_key`, a signed ledger whose key is lost (its MACs cannot be checked).

        Raises:
            DataError: the ledger verifies (nothing to adopt), or its problem is one adoption must not
                paper over (a broken chain, a truncated or replaced ledger): the message says so.
        """
        with self._locked(fcntl.LOCK_SH):
            try:
                self._read()
            except DataError as exc:
                problem = str(exc)
            else:
                raise DataError(f"privacy ledger {self.path} verifies (key, chain and head): nothing to adopt")
            data = self.path.read_bytes() if self.path.is_file() else b""
            key, head = self._load_key(), self._load_head()
            lines, torn = self._lines(data)
            refuse = f"cannot adopt privacy ledger {self.path}: {problem}"
            macs = [line.mac for line in lines]
            if not lines:
                raise DataError(refuse)
            if all(mac is None for mac in macs):
                if head is not None and head.records > 0:
                    raise DataError(
                        f"{refuse} (its head says the site had a signed ledger of {head.records} records; this "
                        "file of an earlier version is not it)"
                    )
                unchecked = sum(1 for line in lines if not line.crc_checked)
                reason = f"records of an earlier fedtl ({len(lines) - unchecked} with a CRC-32, {unchecked} without)"
            elif any(mac is None for mac in macs):
                raise DataError(refuse)
            elif key is None:
                if not new_key:
                    raise DataError(
                        f"{refuse}. If the key is lost for good, `fedtl site ledger adopt --new-key` re-signs the "
                        "records under a new key; nothing then vouches that they were not edited, and the "
                        "adoption record says so"
                    )
                if head is not None and len(lines) < head.records:
                    raise DataError(refuse)
                unchecked, reason = len(lines), "signed records whose key was lost, re-signed under a new key"
            else:
                chained = self._check_chain(key, lines)  # raises on a broken chain: never adopted
                if head is not None:
                    at_head = chained[head.records - 1] if 0 < head.records <= len(chained) else GENESIS
                    if len(chained) < head.records or at_head != head.mac:
                        raise DataError(refuse)
                unchecked, reason = 0, "a signed ledger whose chain verifies but whose head was missing or behind"
            charges = tuple(line.charge for line in lines) + ((torn[0],) if torn else ())
            return Adoption(reason, charges, unchecked, hashlib.sha256(data).hexdigest(), new_key)

    def adopt(self, adoption: Adoption) -> Path:
        """Sign `adoption`'s records into a fresh chain, append an `adopted` record, seal the head.

        The file as it was is kept beside the ledger (`<name>.pre-adopt-<UTC time>`), and the `adopted`
        record names the reason, the file's SHA-256, the copy and who adopted it.

        Returns:
            The path of the copy of the file as it was.

        Raises:
            DataError: the file changed since `plan_adoption` read it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(fcntl.LOCK_EX):
            data = self.path.read_bytes() if self.path.is_file() else b""
            if hashlib.sha256(data).hexdigest() != adoption.sha256:
                raise DataError(f"privacy ledger {self.path} changed since it was shown; run the adoption again")
            key = self._load_key()
            if key is None:
                key = self._create_key()
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            backup = atomic_write_bytes(self.path.with_name(f"{self.path.name}.pre-adopt-{stamp}"), data)
            note = (
                f"adopted {len(adoption.charges)} record(s): {adoption.reason}; {adoption.unchecked} unchecked; "
                f"file sha256 {adoption.sha256}; copy kept at {backup}; by {_operator()}"
            )
            adopted = PrivacyCharge("ledger-adopt", 0, *_NO_STEP, delta=0.0, kind=ADOPTED, note=note)
            previous, out = GENESIS, []
            for charge in (*adoption.charges, adopted):
                line, previous = _signed_line(key, previous, charge)
                out.append(line)
            atomic_write_bytes(self.path, "".join(out).encode())
            self._seal(len(out), previous)
        log.warning("privacy ledger %s: %s", self.path, note)
        return backup


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


class LedgerBook:
    """The ledger's records as read inside a transaction, and the one way to append to it (budget checked)."""

    def __init__(self, ledger: PrivacyLedger, state: LedgerState):
        self._ledger = ledger
        self._state = state
        self._macs = list(state.macs)
        self._torn = state.torn
        self.charges = list(state.charges) + ([state.torn[0]] if state.torn else [])  # a torn record counts

    def epsilon(self, *, delta: float, accountant: str = "rdp") -> float:
        """Return the cumulative epsilon of the charges read in this transaction."""
        return compute_epsilon([c.step for c in self.charges], delta=delta, accountant=accountant)

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
        delta = charge.delta if delta is None else delta
        self._prepare()
        if math.isnan(max_epsilon):
            raise PrivacyBudgetError(f"refusing {what}: the budget to check it against is NaN")
        if not math.isfinite(max_epsilon):  # nothing to check: keep the append cheap
            self._write(charge)
            self.charges.append(charge)
            return math.nan
        history = [c.step for c in self.charges if c.accounted]
        projected = compute_epsilon(history + [charge.step], delta=delta, accountant=accountant)
        # Noise planned to meet a budget exactly lands on it up to float rounding of the RDP sums.
        if projected > max_epsilon * (1 + 1e-6):
            spent = compute_epsilon(history, delta=delta, accountant=accountant)
            raise PrivacyBudgetError(
                f"refusing {what}: the site's cumulative epsilon would reach {projected:.3f} > {budget_name} "
                f"{max_epsilon:g} (delta {delta:g}); spent so far {spent:.3f}, "
                f"left {max(max_epsilon - spent, 0):.3f} "
                f"(ledger {self._ledger.path}). Ask for fewer rounds or more noise"
            )
        self._write(charge)
        self.charges.append(charge)
        return projected

    def _prepare(self) -> None:
        """Create the key of a fresh site, bring a head a crash left behind up to date, repair a torn record."""
        ledger, state = self._ledger, self._state
        if state.key is None:  # _read refused any record without its key: this is a fresh site
            self._state = state = LedgerState(state.charges, state.macs, state.torn, ledger._create_key(), None)
        if state.head is None or state.head.records != len(self._macs):
            ledger._seal(len(self._macs), self._macs[-1] if self._macs else GENESIS)
            self._state = LedgerState(
                state.charges, state.macs, state.torn, state.key, LedgerHead(len(self._macs), self._last_mac())
            )
        if self._torn is not None:
            stand_in, offset = self._torn
            log.warning("privacy ledger %s: torn last record replaced by a pessimistic `torn` record", ledger.path)
            line, mac = _signed_line(self._key(), self._last_mac(), stand_in)
            ledger._overwrite_tail(offset, line)
            self._macs.append(mac)
            ledger._seal(len(self._macs), mac)
            self._torn = None  # the stand-in is already among self.charges
        elif self._macs and not ledger._ends_with_newline():
            ledger._append("\n")  # a crash lost only the last newline: the record itself is whole

    def _write(self, charge: PrivacyCharge) -> None:
        line, mac = _signed_line(self._key(), self._last_mac(), charge)
        self._ledger._append(line)  # fsynced before the head moves: the crash rule's order
        self._macs.append(mac)
        self._ledger._seal(len(self._macs), mac)

    def _key(self) -> bytes:
        assert self._state.key is not None
        return self._state.key

    def _last_mac(self) -> str:
        return self._macs[-1] if self._macs else GENESIS


def _parse(raw: bytes) -> tuple[PrivacyCharge, dict[str, Any], str | None, bool]:
    """Return (charge, record as signed, MAC or None, CRC checked) of one line; raise ValueError when malformed."""
    record = json.loads(raw)
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    mac = record.pop("mac", None)
    crc = record.pop("crc32", None)  # an earlier version's checksum; records of fedtl 0.1 carry none
    if mac is not None and (crc is not None or not isinstance(mac, str) or not _HEX64.fullmatch(mac)):
        raise ValueError("malformed `mac`")
    if crc is not None and crc != _crc(record):
        raise ValueError("checksum mismatch: the record was changed after it was written")
    if not _NAMES.issuperset(record):
        raise ValueError(f"unknown fields {sorted(set(record) - _NAMES)}")
    charge = PrivacyCharge(**record)
    if charge.kind not in KINDS:
        raise ValueError(f"unknown kind {charge.kind!r}")
    accounting = (charge.noise_multiplier, charge.sample_rate, charge.steps)
    if not charge.accounted and accounting != _NO_STEP:
        raise ValueError(f"a {charge.kind} record must carry noise 0, sample rate 0 and 0 steps, got {accounting}")
    if accounting != _NO_STEP:  # validates noise, sample rate, steps (and a Skellam record's sensitivities)
        PrivacyStep(*accounting, l2_sensitivity=charge.l2_sensitivity, l1_sensitivity=charge.l1_sensitivity)
    return charge, record, mac, crc is not None


def noise_free_charge(*, run_id: str, server_round: int, kind: str, delta: float) -> PrivacyCharge:
    """Return the record of a noise-free release (no DP step: noise 0, sample rate 0, 0 steps)."""
    if MECHANISMS[kind].accounted:
        raise ValueError(f"{kind!r} is a DP mechanism, not a noise-free release")
    return PrivacyCharge(run_id, server_round, *_NO_STEP, delta=delta, kind=kind)
