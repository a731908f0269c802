"""A site's own policy: a TOML file the site controls, which nothing the server sends can loosen.

The SuperNode's node config names the file (`--node-config "policy='/etc/fedtl/site.toml'"`); every
message the ClientApp handles is checked against it before any data is touched, and a request that
asks for more than the policy allows is refused with the reason sent back to the server.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtl.shared.errors import ConfigError, FedtlError
from fedtl.shared.named_data import named_source
from fedtl.shared.protocol import RoundSettings
from fedtl.shared.tables import TableSchema, load_schema

ACCOUNTANTS = ("rdp", "prv")
BAD_FILES = ("error", "skip")
FINGERPRINT_CHARS = set("0123456789abcdef")


class PolicyRefusal(FedtlError):
    """The server asked for something the site's policy does not allow; the reason goes back to the server."""

    code = "policy"

    def public(self) -> str:
        """Return the message itself: it names the request and the site's own setting, not its data."""
        return str(self)


@dataclass(frozen=True)
class SitePolicy:
    """What a site allows: its data, its lifetime privacy budget, the backbones it accepts, where state lives."""

    site_name: str
    data: str
    label_names: tuple[str, ...]  # empty: the data's own classes (folder names, manifest labels)
    max_epsilon: float  # over the site's lifetime, at `delta`
    delta: float
    min_noise_multiplier: float
    max_rounds_per_run: int
    allowed_backbones: tuple[str, ...] | None  # SHA-256 fingerprints; None only for simulated sites
    state_dir: Path  # the privacy ledger
    cache_dir: Path  # verified backbones and cached features
    secret_dir: Path  # the ledger's key and head (client/ledger.py), outside state_dir
    accountant: str = "rdp"
    bad_files: str = "error"  # "skip": leave unreadable files out, reported by name and count
    release_evaluation_metrics: bool = False
    allow_non_private: bool = False
    test_fraction: float = 0.2  # local test split, when the data has none
    # Noise-free releases (evaluation metrics, ranking and finetune scores; client/quotas.py) are outside
    # epsilon, so their number is capped: per run, and per rolling 24 hours so that new run ids gain nothing.
    max_noise_free_releases_per_run: int = 60
    max_noise_free_releases_per_day: int = 200
    max_rounds_per_day: int = 200  # DP-SGD rounds + secure DP-SGD steps over all runs in a rolling 24 hours
    schema: str = ""  # table rows: the federation's published schema file, pinned by the site; "" = none
    # Secure aggregation: the most honest sites (this one included) the site counts on among those summed; it
    # refuses a run whose distributed noise assumes more (secagg-honest-sites). 1: it trusts only itself, so it
    # adds the full noise its epsilon needs.
    min_honest_sites: int = 1
    source: str = "<built in code>"

    def __post_init__(self) -> None:
        where = f"site policy {self.source}"
        if not self.site_name or not all(ch.isalnum() or ch in "._-" for ch in self.site_name):
            raise ConfigError(
                f"{where}: `site.name` may hold letters, digits, '.', '_' and '-', got {self.site_name!r}"
            )
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ConfigError(f"{where}: `privacy.max-epsilon` must be a finite number > 0, got {self.max_epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"{where}: `privacy.delta` must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0):
            raise ConfigError(
                f"{where}: `privacy.min-noise-multiplier` must be a number >= 0, got {self.min_noise_multiplier}"
            )
        if self.min_honest_sites < 1:
            raise ConfigError(f"{where}: `privacy.min-honest-sites` must be >= 1, got {self.min_honest_sites}")
        if self.max_rounds_per_run < 1:
            raise ConfigError(f"{where}: `privacy.max-rounds-per-run` must be >= 1, got {self.max_rounds_per_run}")
        if self.max_rounds_per_day < 1:
            raise ConfigError(f"{where}: `privacy.max-rounds-per-day` must be >= 1, got {self.max_rounds_per_day}")
        for key, value in (
            ("max-noise-free-releases-per-run", self.max_noise_free_releases_per_run),
            ("max-noise-free-releases-per-day", self.max_noise_free_releases_per_day),
        ):
            if value < 0:
                raise ConfigError(f"{where}: `privacy.{key}` must be >= 0 (0: none), got {value}")
        state, secret = self.state_dir.absolute(), self.secret_dir.absolute()
        if secret == state or state in secret.parents:
            raise ConfigError(
                f"{where}: `storage.secret-dir` {secret} lies inside `storage.state-dir` {state}; the ledger's key "
                "and head must be kept apart from the ledger (e.g. ~/.config/fedtl/<site name>, another volume)"
            )
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"{where}: `privacy.accountant` must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}"
            )
        if self.bad_files not in BAD_FILES:
            raise ConfigError(
                f"{where}: `site.bad-files` must be one of {', '.join(BAD_FILES)}, got {self.bad_files!r}"
            )
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"{where}: `site.test-fraction` must be in (0, 1), got {self.test_fraction}")
        if self.allowed_backbones is not None:
            if not self.allowed_backbones:
                raise ConfigError(
                    f"{where}: `backbones.allowed` is empty, so this site would refuse every federation; list the "
                    "SHA-256 fingerprints it accepts (`fedtl site init --backbone NAME` writes them)"
                )
            for fp in self.allowed_backbones:
                if len(fp) != 64 or not set(fp) <= FINGERPRINT_CHARS:
                    raise ConfigError(
                        f"{where}: `backbones.allowed` entry {fp!r} is not a SHA-256 fingerprint (64 lower-case hex "
                        "digits); `fedtl site init --backbone NAME` prints the fingerprint of a registry backbone"
                    )
        if len(set(self.label_names)) != len(self.label_names):
            raise ConfigError(f"{where}: `site.label-names` has duplicates: {list(self.label_names)}")
        if self.schema:
            self.table_schema()  # a missing or invalid schema file is an error of the policy, found at once

    def table_schema(self) -> TableSchema | None:
        """Return the table schema the policy pins (None: it pins none).

        Raises:
            ConfigError: the schema file is missing or invalid.
        """
        return load_schema(self.schema) if self.schema else None

    def check_settings(self, settings: RoundSettings, *, action: str) -> None:
        """Refuse `action` when the server's settings ask for more than this policy allows.

        Raises:
            PolicyRefusal: the reason names the setting, the value asked and the policy's limit.
        """
        self.check_backbone(settings.backbone_fingerprint, settings.backbone_name)
        problems = []
        if settings.non_private and not self.allow_non_private:
            problems.append(
                "the run is NON-PRIVATE (no clipping, no noise) and the policy sets allow-non-private = false"
            )
        if not settings.non_private and settings.target_epsilon > self.max_epsilon:
            problems.append(
                f"the run asks target-epsilon {settings.target_epsilon:g} but the policy allows at most "
                f"max-epsilon {self.max_epsilon:g} over the site's lifetime"
            )
        if settings.target_delta > self.delta:
            problems.append(f"the run asks target-delta {settings.target_delta:g} > the policy's delta {self.delta:g}")
        if settings.num_rounds > self.max_rounds_per_run:
            problems.append(
                f"the run plans {settings.num_rounds} rounds > the policy's max-rounds-per-run "
                f"{self.max_rounds_per_run}"
            )
        if settings.noise_multiplier == 0 and not settings.non_private and not self.allow_non_private:
            problems.append("the run fixes noise-multiplier 0 (no noise) and the policy sets allow-non-private = false")
        elif (
            settings.noise_multiplier is not None
            and settings.noise_multiplier < self.min_noise_multiplier
            and not settings.non_private
        ):
            problems.append(
                f"the run fixes noise-multiplier {settings.noise_multiplier:g} < the policy's min-noise-multiplier "
                f"{self.min_noise_multiplier:g}"
            )
        pinned = self.table_schema()
        if pinned is not None and settings.schema != pinned.key():
            sent = f"schema {json.loads(settings.schema).get('name')!r}" if settings.schema else "no table schema"
            problems.append(
                f"the run sends {sent}, which differs from the schema {pinned.name!r} the policy pins ({self.schema}); "
                "tables are read and encoded only under the schema the site approved"
            )
        # secagg-honest-sites 0 means "all summed sites", at least 2: known before the sum starts to exceed 1.
        assumed = settings.secagg_honest_sites or 2
        if settings.secure_aggregation and not settings.non_private and assumed > self.min_honest_sites:
            problems.append(
                f"the run's secure aggregation assumes {settings.secagg_honest_sites or 'all summed'} honest sites but "
                f"the policy counts on at most min-honest-sites {self.min_honest_sites}"
            )
        if self.label_names and json.loads(settings.label_names) != list(self.label_names):
            problems.append(
                f"the run trains classes {json.loads(settings.label_names)} but the policy declares "
                f"{list(self.label_names)} (names and order must match)"
            )
        if problems:
            raise PolicyRefusal(f"site {self.site_name} refuses {action}: " + "; ".join(problems))

    def check_backbone(self, fingerprint: str, name: str = "") -> None:
        """Refuse a backbone whose fingerprint the policy does not list.

        Raises:
            PolicyRefusal: the fingerprint is not in `backbones.allowed`.
        """
        if self.allowed_backbones is not None and fingerprint not in self.allowed_backbones:
            raise PolicyRefusal(
                f"site {self.site_name} refuses backbone {name or '?'} with fingerprint {fingerprint}: it is not in "
                f"the policy's backbones.allowed ({', '.join(f[:12] for f in self.allowed_backbones)}); the site "
                "operator must add it after checking where the weights come from"
            )

    def check_honest_sites(self, honest_sites: int, *, what: str) -> None:
        """Refuse distributed noise that counts on more honest sites than the policy's `min-honest-sites`.

        Raises:
            PolicyRefusal: `honest_sites` > `min-honest-sites`: the site would be less protected than it allows.
        """
        if honest_sites > self.min_honest_sites:
            raise PolicyRefusal(
                f"site {self.site_name} refuses {what}: its noise share assumes {honest_sites} honest sites in the "
                "sum, "
                f"but the policy counts on at most min-honest-sites {self.min_honest_sites} (raise it only if you "
                "trust that many sites not to collude with the server)"
            )

    def check_noise(self, noise_multiplier: float, *, what: str) -> None:
        """Refuse a release whose noise is below the policy's minimum, or without noise unless allowed.

        Raises:
            PolicyRefusal: `noise_multiplier` < `min-noise-multiplier`, or 0 without `allow-non-private`.
        """
        if noise_multiplier == 0 and not self.allow_non_private:
            raise PolicyRefusal(
                f"site {self.site_name} refuses {what}: noise-multiplier 0 releases it without noise, and the "
                "policy sets allow-non-private = false"
            )
        if noise_multiplier < self.min_noise_multiplier:
            raise PolicyRefusal(
                f"site {self.site_name} refuses {what}: noise-multiplier {noise_multiplier:g} < the policy's "
                f"min-noise-multiplier {self.min_noise_multiplier:g}"
            )


# TOML layout: section -> {key: (field name, type)}
_LAYOUT: dict[str, dict[str, tuple[str, type]]] = {
    "site": {
        "name": ("site_name", str),
        "data": ("data", str),
        "label-names": ("label_names", list),
        "bad-files": ("bad_files", str),
        "test-fraction": ("test_fraction", float),
        "schema": ("schema", str),
    },
    "privacy": {
        "max-epsilon": ("max_epsilon", float),
        "delta": ("delta", float),
        "min-noise-multiplier": ("min_noise_multiplier", float),
        "max-rounds-per-run": ("max_rounds_per_run", int),
        "max-rounds-per-day": ("max_rounds_per_day", int),
        "max-noise-free-releases-per-run": ("max_noise_free_releases_per_run", int),
        "max-noise-free-releases-per-day": ("max_noise_free_releases_per_day", int),
        "accountant": ("accountant", str),
        "allow-non-private": ("allow_non_private", bool),
        "release-evaluation-metrics": ("release_evaluation_metrics", bool),
        "min-honest-sites": ("min_honest_sites", int),
    },
    "backbones": {"allowed": ("allowed_backbones", list)},
    "storage": {"state-dir": ("state_dir", str), "cache-dir": ("cache_dir", str), "secret-dir": ("secret_dir", str)},
}
_REQUIRED = ("site.name", "site.data", "privacy.max-epsilon", "privacy.delta", "backbones.allowed", "storage.state-dir")


def load_policy(path: str | Path) -> SitePolicy:
    """Read and validate a site policy file; relative paths in it are relative to the file's folder.

    Raises:
        ConfigError: the file is missing or not TOML, a key is unknown or missing, or a value is invalid.
    """
    path = Path(path).expanduser()
    if not path.is_absolute():
        raise ConfigError(f"the site policy path must be absolute (it is read by a SuperNode), got {str(path)!r}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"site policy {path} does not exist; write one with `fedtl site init {path}`") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"site policy {path} cannot be read as TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for section, table in raw.items():
        if section not in _LAYOUT:
            raise ConfigError(_unknown(path, section, _LAYOUT, "section"))
        if not isinstance(table, dict):
            raise ConfigError(f"site policy {path}: `{section}` must be a table ([{section}]), got {table!r}")
        for key, value in table.items():
            if key not in _LAYOUT[section]:
                raise ConfigError(
                    _unknown(path, f"{section}.{key}", {f"{section}.{k}" for k in _LAYOUT[section]}, "key")
                )
            name, kind = _LAYOUT[section][key]
            values[name] = _typed(path, f"{section}.{key}", value, kind)
    missing = [key for key in _REQUIRED if _LAYOUT[key.split(".")[0]][key.split(".")[1]][0] not in values]
    if missing:
        raise ConfigError(f"site policy {path} lacks {', '.join(f'`{m}`' for m in missing)}; see `fedtl site init`")
    base = path.parent
    state_dir = _resolve(base, values.pop("state_dir"))
    cache_dir = _resolve(base, values.pop("cache_dir", str(state_dir / "cache")))
    secret_dir = _resolve(base, values.pop("secret_dir", str(default_secret_dir(values["site_name"]))))
    data = values.pop("data")
    if data != "digits" and not (named_source(data) is not None and not _resolve(base, data).exists()):
        data = str(_resolve(base, data))  # not sklearn's digits nor a named data set (for trying a site out)
    if values.get("schema"):
        values["schema"] = str(_resolve(base, values["schema"]))
    values["label_names"] = tuple(values.get("label_names", ()))
    values["allowed_backbones"] = tuple(values["allowed_backbones"])
    values.setdefault("min_noise_multiplier", 0.0)
    values.setdefault("max_rounds_per_run", 100)
    return SitePolicy(
        data=data, state_dir=state_dir, cache_dir=cache_dir, secret_dir=secret_dir, source=str(path), **values
    )


def default_secret_dir(site_name: str) -> Path:
    """Return where a site keeps its ledger key and head by default: `$XDG_CONFIG_HOME/fedtl/<site name>`."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home).expanduser() / "fedtl" / site_name


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _typed(path: Path, key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"site policy {path}: `{key}` must be a list of strings, got {value!r}")
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"site policy {path}: `{key}` must be {kind.__name__}, got {value!r}")
    return value


def _unknown(path: Path, key: str, known: Any, what: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"site policy {path}: unknown {what} `{key}`{hint} (known: {', '.join(sorted(known))})"


def policy_template(
    *,
    site_name: str,
    data: str,
    state_dir: str,
    fingerprints: dict[str, str],
    label_names: list[str],
    secret_dir: str | None = None,
    schema: str = "",
) -> str:
    """Return a commented policy file for `fedtl site init`."""
    allowed = "\n".join(f'  "{fp}",  # {name}' for name, fp in fingerprints.items())
    labels = json.dumps(label_names)
    secret = secret_dir if secret_dir is not None else str(default_secret_dir(site_name))
    schema_line = f"schema = {json.dumps(schema)}" if schema else '# schema = "federation-schema.json"'
    return f"""\
# fedtl site policy. This file belongs to the site: nothing the federation server sends can loosen it.
# Point your SuperNode at it:  fedtl site start --policy /absolute/path/to/this.toml ...
# (or flower-supernode ... --node-config "policy='/absolute/path/to/this.toml'").
# Relative paths below are relative to this file's folder. Check it with: fedtl site check --policy <this file>

[site]
# How this site appears in the server's logs and reports.
name = "{site_name}"
# Image folder (one sub-folder per class), CSV manifest (path,label[,split]; DICOM or image files),
# MedMNIST .npz; texts: CSV text,label[,split] or JSON lines; table rows: CSV or Parquet under `schema`.
data = "{data}"
# Table rows only: the federation's published schema (JSON). Runs that send another schema are refused.
{schema_line}
# Class names in the federation's order; [] = take the federation's (the run must match the data).
label-names = {labels}
# "skip": leave unreadable or corrupt files out (reported by name and count); "error": refuse to train.
bad-files = "error"
# Share of the data kept as the local test split, when the data has no split of its own.
test-fraction = 0.2

[privacy]
# Lifetime budget of this site, over every run, at `delta`; work beyond it is refused. 24 leaves room for
# three federations at fedtl's default target-epsilon of 8 (each run asks for its own target, never more).
max-epsilon = 24.0
# Keep it well below 1 / (number of records).
delta = 1e-5
# Never release a DP-SGD step or a statistic with less noise than this.
min-noise-multiplier = 0.5
max-rounds-per-run = 50
# DP-SGD rounds and secure DP-SGD steps (each step leaves the site) over all runs in any 24 hours
# (new run ids do not reset it).
max-rounds-per-day = 200
# Noise-free releases (evaluation metrics, ranking and finetune scores, when released at all) per run
# and in any 24 hours; each is recorded in the ledger before it is computed. 0: none.
max-noise-free-releases-per-run = 60
max-noise-free-releases-per-day = 200
# "rdp" (Opacus' RDP accountant) or "prv" (tighter, slower).
accountant = "rdp"
# Never take part in a non-private baseline run.
allow-non-private = false
# Evaluation metrics, ranking and finetune scores are NOT covered by epsilon: false keeps them at the site.
release-evaluation-metrics = false
# Secure aggregation: the most honest sites (this one included) you count on among those summed. A run whose
# distributed noise assumes more is refused. 1: trust only this site (it adds the full noise itself).
min-honest-sites = 1

[backbones]
# SHA-256 fingerprints of the backbone weights this site accepts; anything else is refused before use.
allowed = [
{allowed}
]

[storage]
# The privacy ledger lives here: back it up, never delete it.
state-dir = "{state_dir}"
# Verified backbones and cached features (default: <state-dir>/cache).
# cache-dir = "/var/cache/fedtl"
# The ledger's key (created 0600 at the first charge) and head: they make an edited, truncated or
# deleted ledger detectable, so they must live OUTSIDE state-dir (another volume); back them up with
# the ledger and never delete them. `fedtl site ledger verify` checks all three.
# (default when absent: $XDG_CONFIG_HOME/fedtl/<site name>, i.e. ~/.config/fedtl/<site name>)
secret-dir = "{secret}"
"""
