"""A site's local state: where it keeps backbones, features and privacy history, and its data."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save

from fedtl.client.canaries import CANARY_SITE, add_canaries, refuse_canaries, requested_canaries
from fedtl.client.ledger import PrivacyLedger
from fedtl.client.policy import SitePolicy, load_policy
from fedtl.shared import constants as k
from fedtl.shared.backbones import build_backbone, fingerprint_state_dict
from fedtl.shared.data import ImageDataset, load_dataset, site_split
from fedtl.shared.errors import BackboneError, ConfigError, DataError, FingerprintMismatchError
from fedtl.shared.features import FeatureCache
from fedtl.shared.files import atomic_write_bytes
from fedtl.shared.loaders import SiteData, load_site_dataset
from fedtl.shared.protocol import SimulationSettings
from fedtl.shared.tables import TableSchema, load_schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """One site: its name, its state folder (privacy ledger), its cache folder, its data and policy."""

    name: str
    state_dir: Path
    cache_dir: Path
    data: str
    policy: SitePolicy | None = None  # None only for a simulated site (the lab's run config is its policy)
    simulation: SimulationSettings | None = None
    partition_id: int = 0
    num_partitions: int = 1
    audit_canaries: int = 0  # canaries the server asked for: simulated site 0 adds them, a real site refuses

    @property
    def ledger(self) -> PrivacyLedger:
        """Return the site's privacy ledger: keyed from the policy's secret folder, a simulated site's from its own."""
        secret_dir = self.policy.secret_dir if self.policy is not None else None  # None: beside the ledger
        return PrivacyLedger(self.state_dir / "privacy" / "ledger.jsonl", secret_dir)

    @property
    def backbones(self) -> BackboneStore:
        """Return the site's store of verified backbone weights."""
        return BackboneStore(self.cache_dir / "backbones")

    @property
    def feature_cache(self) -> FeatureCache:
        """Return the site's on-disk feature cache."""
        return FeatureCache(self.cache_dir / "features")


SIMULATION_ENV = "FEDTL_SIMULATED_SITES"  # set to 1 only where the lab simulates sites on one machine


def simulation_enabled() -> bool:
    """Return True when this process runs simulated sites (opted in locally, never by the server)."""
    return os.environ.get(SIMULATION_ENV) == "1"


PRIVATE_UMASK = 0o077


def keep_private(*folders: Path) -> int:
    """Make this process create files 0600 and folders 0700, close `folders` (that exist); return the old umask.

    A real site's ledger, caches, features and approvals are its own: nobody else on the machine reads them.
    """
    previous = os.umask(PRIVATE_UMASK)
    for folder in folders:
        if Path(folder).is_dir():
            os.chmod(folder, 0o700)
    return previous


def site_from_policy(policy: SitePolicy) -> Site:
    """Return the real site a policy describes."""
    return Site(
        name=policy.site_name, state_dir=policy.state_dir, cache_dir=policy.cache_dir, data=policy.data, policy=policy
    )


def resolve_site(node_config: Mapping[str, Any], simulation: SimulationSettings | None) -> Site:
    """Return the site described by the SuperNode's node config.

    A real site names its policy file in its node config (`policy='/abs/site.toml'`); the policy
    holds its data path, budget and folders. A simulated site (Flower's simulation engine sets only
    `partition-id`/`num-partitions`) takes its slice of the shared data, its folders and a
    reproducible noise seed from the server's simulation settings, which is only acceptable in the
    lab: it is allowed only where `FEDTL_SIMULATED_SITES=1` is set on the machine running the sites
    (`fedtl simulate` sets it), so a real SuperNode can never be talked into it.

    Raises:
        ConfigError: the node config names no policy, or the policy file is missing or invalid.
    """
    if k.POLICY in node_config:
        site = site_from_policy(load_policy(str(node_config[k.POLICY])))
        # Kept so the site can refuse a canary request by name when it next touches its data (client/canaries).
        return dataclasses.replace(site, audit_canaries=requested_canaries(simulation))
    if k.PARTITION_ID in node_config and simulation is not None and simulation_enabled():
        if k.NUM_PARTITIONS not in node_config:
            raise ConfigError(f"node config has `partition-id` but no `num-partitions` (got {sorted(node_config)})")
        pid = int(node_config[k.PARTITION_ID])
        num = int(node_config[k.NUM_PARTITIONS])
        name = f"site-{pid}"
        return Site(
            name=name,
            state_dir=Path(simulation.site_root) / name,
            cache_dir=Path(simulation.cache_root) / name,
            data=simulation.data,
            simulation=simulation,
            partition_id=pid,
            num_partitions=num,
            audit_canaries=requested_canaries(simulation),
        )
    hint = (
        f" (`partition-id` alone makes a simulated site only where {SIMULATION_ENV}=1 is set)"
        if k.PARTITION_ID in node_config
        else ""
    )
    raise ConfigError(
        "this SuperNode's node config names no site policy: start it with "
        "--node-config \"policy='/absolute/path/site.toml'\" (write one with `fedtl site init`) "
        f"(got keys {sorted(node_config)}){hint}"
    )


_VERIFIED: set[tuple] = set()  # (path, inode, size, mtime, ctime) of stored backbones verified in this process


def _stamp(path: Path) -> tuple:
    info = path.stat()
    return (str(path), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class BackboneStore:
    """Verified backbone weights, one safetensors file per fingerprint."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, fingerprint: str) -> Path:
        """Return where the weights with this fingerprint are kept."""
        return self.root / f"{fingerprint}.safetensors"

    def has(self, fingerprint: str) -> bool:
        """Return True when weights with this fingerprint are stored."""
        return self.path(fingerprint).is_file()

    def install(self, name: str, fingerprint: str, state_dict: dict[str, torch.Tensor]) -> Path:
        """Verify received weights against the announced fingerprint, then store them atomically.

        Raises:
            FingerprintMismatchError: the weights hash to another fingerprint (nothing is stored).
        """
        actual = fingerprint_state_dict(state_dict)
        if actual != fingerprint:
            raise FingerprintMismatchError(
                f"backbone `{name}` weights received hash to {actual}, but the server announced {fingerprint}; "
                "refusing them. The transfer was corrupted or the weights were tampered with"
            )
        data = save({k_: v.contiguous() for k_, v in state_dict.items()}, metadata={"backbone-name": name})
        return atomic_write_bytes(self.path(fingerprint), data)

    def load(self, name: str, fingerprint: str) -> torch.nn.Module:
        """Build backbone `name` from stored weights, re-checking their fingerprint.

        Raises:
            BackboneError: no weights with this fingerprint are stored.
            FingerprintMismatchError: the stored file was changed after it was verified.
        """
        return build_backbone(name, self._verified_state(name, fingerprint))

    def verify(self, name: str, fingerprint: str) -> None:
        """Check the stored weights still hash to `fingerprint`, as every use of their features requires.

        Features cached from verified weights are only as trustworthy as those weights: a stored file changed
        on disk (tampering, corruption) stops the site before any of its features are used. A file already
        verified in this process, unchanged since (same inode, size, modification and change times), is not
        hashed again; a fresh process (every message of a deployed site) hashes it once.

        Raises:
            BackboneError: no weights with this fingerprint are stored.
            FingerprintMismatchError: the stored file was changed after it was verified.
        """
        path = self.path(fingerprint)
        if path.is_file() and _stamp(path) in _VERIFIED:
            return
        self._verified_state(name, fingerprint)

    def _verified_state(self, name: str, fingerprint: str) -> dict[str, torch.Tensor]:
        """Return the stored weights after checking they hash to `fingerprint` (and remember the file as verified)."""
        path = self.path(fingerprint)
        if not path.is_file():
            raise BackboneError(
                f"backbone `{name}` with fingerprint {fingerprint} is not in the site cache {self.root}"
            )
        stamp = _stamp(path)
        state = load_file(str(path))
        actual = fingerprint_state_dict(state)
        if actual != fingerprint:
            raise FingerprintMismatchError(
                f"stored backbone file {path} hashes to {actual}, expected {fingerprint}: it was modified on disk. "
                "Delete the file; the server will send verified weights again"
            )
        _VERIFIED.add(stamp)
        return state

    def fingerprints(self) -> list[str]:
        """Return the fingerprints of every stored backbone."""
        return sorted(p.stem for p in self.root.glob("*.safetensors"))


def load_site_data(
    site: Site, label_names: tuple[str, ...], schema: TableSchema | None = None
) -> tuple[ImageDataset, ImageDataset]:
    """Return the site's (train, local test) data, validated against the federation's `label_names` (and `schema`).

    Simulated site 0 of a run with `audit-canaries` also holds that run's included canaries (client/canaries).

    Raises:
        DataError: the data is unreadable, empty, or holds labels outside `label_names`.
        PolicyRefusal: a real site was asked for audit canaries.
    """
    if site.simulation is not None:
        sim = site.simulation
        schema_key = schema.key() if schema is not None else ""
        stamp = _file_stamp(sim.data)
        splits = _shared_dataset(sim.data, sim.seed, sim.test_fraction, tuple(label_names), stamp, schema_key)
        permuted = {int(p) for p in sim.permuted_label_sites.split(",") if p.strip()}
        train, test = site_split(
            splits.train,
            site.partition_id,
            site.num_partitions,
            scheme=sim.partition,
            seed=sim.seed,
            local_test_fraction=sim.local_test_fraction,
            permute_labels=site.partition_id in permuted,
        )
        if site.audit_canaries and site.partition_id == CANARY_SITE:  # a one-run privacy audit (client/canaries)
            train = add_canaries(train, splits.test, count=site.audit_canaries, seed=sim.seed)
        return train, test
    policy = site.policy
    if policy is None:
        raise ConfigError(f"site {site.name} has neither a policy nor simulation settings; see `resolve_site`")
    refuse_canaries(site.name, site.audit_canaries)
    splits = load_policy_data(policy, label_names, schema).splits
    if splits.test is None or len(splits.test) == 0:
        raise DataError(f"site data {policy.data} has no local test split; give it test rows or a test/ folder")
    return splits.train, splits.test


@functools.lru_cache(maxsize=2)
def _shared_dataset(
    data: str,
    seed: int,
    test_fraction: float,
    label_names: tuple[str, ...],
    stamp: tuple[int, int] | None,
    schema_key: str = "",
):
    """Return the lab's shared dataset, decoded once per process (simulated sites all slice the same one).

    Simulation only: a thousand simulated sites would otherwise decode the same file a thousand times a
    round. `stamp` (the file's size and mtime) is part of the key, so an edited file is read again.
    """
    schema = load_schema(schema_key) if schema_key else None
    return load_dataset(data, seed=seed, test_fraction=test_fraction, label_names=label_names or None, schema=schema)


def _file_stamp(data: str) -> tuple[int, int] | None:
    path = Path(data).expanduser()
    if not path.exists():
        return None
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def load_policy_data(
    policy: SitePolicy, label_names: tuple[str, ...] | None = None, schema: TableSchema | None = None
) -> SiteData:
    """Load and validate the data a policy names, in the policy's class order (else `label_names`).

    Table rows are read under `schema` (the run's, already checked against the policy's) or the policy's own.
    """
    return load_site_dataset(
        policy.data,
        label_names=policy.label_names or label_names or None,
        bad_files=policy.bad_files,
        seed=0,
        test_fraction=policy.test_fraction,
        schema=schema or policy.table_schema(),
    )
