"""Run configuration: one frozen dataclass, kebab-case keys on the wire, strict validation."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from fedtl.shared.errors import ConfigError
from fedtl.shared.partitioners import parse_partition

HEADS = ("linear", "mlp", "projected")  # projected: set by head-solver "auto" (shared/dp_heads.py)
STRATEGIES = ("fedavg", "fedprox", "fedadam")
ACCOUNTANTS = ("rdp", "prv")
CLIENT_DP_MODES = ("off", "server", "client")  # Flower's DifferentialPrivacy{Server,Client}SideFixedClipping
PERSONALIZATIONS = ("none", "fedper", "finetune")
HEAD_SOLVERS = ("auto", "dp-sgd", "closed-form", "secure-dp-sgd")
# The solvers whose releases go through the secure sum (auto: by secure DP-FedSGD, server/solvers.solver_for).
SECURE_SOLVERS = ("auto", "closed-form", "secure-dp-sgd")
PLANNED_SOLVERS = ("auto", "secure-dp-sgd")  # the solvers that plan a projected head (shared/dp_heads.py)
CLOSED_FORMS = ("ridge", "lda")
DEVICES = ("auto", "cpu", "cuda")
AUTO = "auto"


def fedtl_home() -> Path:
    """Return the root of fedtl's local state (caches of simulated sites, weights), `$FEDTL_HOME` first."""
    return Path(os.environ.get("FEDTL_HOME", Path.home() / ".cache" / "fedtl")).expanduser()


# What users write for the number of sites, which `fedtl simulate --sites` (or the SuperNodes that connect) sets.
SITE_COUNT_KEYS = frozenset({"sites", "num-sites", "num-clients", "clients", "num-supernodes", "num-nodes"})


@dataclass(frozen=True)
class RunConfig:
    """Everything a federation run needs; the ServerApp resolves it and sends sites their part.

    The defaults below are mirrored in pyproject's `[tool.flwr.app.config]` (what `flwr run .` reads);
    `tests/test_config.py` fails when the two drift apart.
    """

    num_rounds: int = 10
    backbone: str = "efficientnet_lite0"
    image_size: int = 0  # 0: the backbone's own input size
    head: str = "linear"
    head_hidden: int = 128
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.1  # FedAdam's eta
    local_epochs: int = 2
    batch_size: int = 64  # expected batch size under Poisson sampling
    learning_rate: float = 8.0
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None ("auto" in files and on the command line): derived from target-epsilon
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    accountant: str = "rdp"
    feature_centering: bool = True  # estimate the mean feature from noised site sums (charged to each site)
    centering_noise_multiplier: float = 4.0  # noise of that one release, in units of its sensitivity (1)
    non_private: bool = False
    data: str = "digits"  # the server's held-out data for central evaluation; "" = none (set label-names)
    label_names: str = ""  # comma-separated class names the federation trains; "" = the server data's
    schema: str = ""  # table rows: the federation's declared schema (a JSON file); "" = none, or a named table's own
    partition: str = "iid"
    test_fraction: float = 0.2  # held-out server test set, when the data has no test split
    local_test_fraction: float = 0.2
    central_evaluation: bool = True
    federated_evaluation: bool = True  # sites report test-split metrics: outside the DP guarantee
    min_available_nodes: int = 2
    min_train_sites: int = 1  # a round with fewer accepted updates stops the run (resume it later)
    max_update_norm: float = 0.0  # reject updates moving the head further; 0 = 10x the round's median (>= 3 sites)
    fraction_train: float = 1.0
    seed: int = 0
    out: str = "runs"
    run_name: str = ""
    # images a backbone forward pass: on a CPU 32 runs a 224 px pass faster, and at a lower peak, than 64
    # (shared/heap.py); a GPU wants more
    feature_batch_size: int = 32
    device: str = AUTO
    round_timeout: float = 3600.0
    resume: str = ""  # a stopped run's folder: continue it from its last checkpoint
    # Client-level DP (McMahan et al. 2018) on top of the sites' sample-level DP: clip each site's update,
    # add Gaussian noise to their average; its epsilon is per site (user), reported apart from theirs.
    client_dp: str = "off"
    client_noise_multiplier: float = 1.0  # noise std in units of client-clipping-norm / sampled sites
    client_clipping_norm: float = 1.0
    client_dp_delta: float = 1e-5
    # Personalised heads: fedper keeps the head's last layer at each site (mlp head); finetune adapts the
    # final shared head locally (DP-SGD, charged) after the last round; both are scored per site.
    personalization: str = "none"
    finetune_epochs: int = 2
    permuted_label_sites: str = ""  # simulation only: comma-separated site numbers whose labels are permuted
    ray_address: str = ""  # simulation only: an existing Ray cluster (HOST:PORT or "auto"); "" starts one
    # How each site's head is fitted: "auto" plans DP-GD on a public projection from public quantities only
    # (server/solvers/auto.py, shared/dp_heads.py); DP-SGD rounds as configured; or one noised release of
    # sufficient statistics solved in closed form by the server (ridge regression or LDA on the summed statistics).
    head_solver: str = "auto"
    closed_form: str = "ridge"
    closed_form_ridge: float = 1.0  # ridge penalty lambda (also regularises LDA's covariance)
    # closed form: public seeded random projection of features to this many dims (0 = none); set by the auto plan
    projection_dim: int = 0
    # Deeper fine-tuning under DP: the last `trainable-blocks` backbone blocks train with the head, and/or
    # LoRA adapters of rank `lora-rank` (peft) on the backbone; 0 and 0 = head only (cached features).
    trainable_blocks: int = 0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    # Where a head-only run reads the frozen backbone: -1 = its own (final) features; n = the pooled output of
    # EfficientNet-Lite's MBConv block n; None ("auto") = the auto plan's choice where the plan applies (the last
    # block whose output is at least 4 x 4 px, shared/deep.choose_feature_block), else -1.
    feature_block: int | None = None
    audit_canaries: int = 0  # simulation only: canaries inserted into site-0's data for a one-run privacy audit
    # Secure aggregation (SecAgg+ with distributed Skellam noise): the server learns only the sum of the sites'
    # feature sums, closed-form statistics and secure-dp-sgd's head gradients; each site adds 1 / secagg-honest-sites
    # of the noise, so the sum carries one curator's noise if at least that many summed sites are honest (0: every
    # site of the run).
    secure_aggregation: bool = False
    secagg_honest_sites: int = 0

    def __post_init__(self) -> None:
        _check_positive_int(
            self,
            "num_rounds",
            "local_epochs",
            "batch_size",
            "head_hidden",
            "feature_batch_size",
            "min_available_nodes",
            "min_train_sites",
            "finetune_epochs",
        )
        for name, choices in _CHOICES.items():
            _check_choice(self, name, choices)
        for name in _POSITIVE:
            _check_range(self, name, low=0.0, low_open=True)
        for name in _NON_NEGATIVE:
            _check_range(self, name, low=0.0)
        for name in _OPEN_FRACTIONS:
            _check_range(self, name, low=0.0, high=1.0, low_open=True, high_open=True)
        _check_range(self, "fraction_train", low=0.0, high=1.0, low_open=True)
        for name in ("projection_dim", "trainable_blocks", "lora_rank", "audit_canaries", "secagg_honest_sites"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`{_kebab(name)}` must be >= 0, got {getattr(self, name)}")
        if self.head_solver == "closed-form":
            _check_closed_form(self)
        if self.head == "projected" and (self.head_solver not in PLANNED_SOLVERS or self.projection_dim < 1):
            raise ConfigError(
                f'`head = "projected"` is the head the auto plan chooses (with its public projection-dim), got '
                f"head-solver = {self.head_solver!r} and projection-dim = {self.projection_dim}; set "
                'head-solver = "auto" and leave `head` to the plan, or choose head = "linear" or "mlp"'
            )
        if self.secure_aggregation and self.head_solver not in SECURE_SOLVERS:
            raise ConfigError(
                "`secure-aggregation = true` covers the feature centre, the closed form's statistics and the "
                'head gradients of head-solver "secure-dp-sgd" (which "auto" then plans); DP-SGD\'s rounds are not '
                'securely aggregated, so it needs head-solver = "auto", "closed-form" or "secure-dp-sgd", got '
                f"{self.head_solver!r}"
            )
        if self.personalization == "fedper" and self.head != "mlp":
            raise ConfigError(
                '`personalization = "fedper"` keeps the head\'s last layer at each site and shares the others, '
                f'so it needs head = "mlp", got head = {self.head!r}'
            )
        if self.client_dp != "off" and self.strategy == "fedadam":
            raise ConfigError(
                f'`client-dp = "{self.client_dp}"` needs a strategy whose server step is a mean (fedavg, fedprox): '
                "FedAdam's adaptive step does not match the noise calibrated to clipping-norm / sampled sites"
            )
        self.permuted_label_site_ids  # raises ConfigError naming the value
        if self.min_train_sites > self.min_available_nodes:
            raise ConfigError(
                f"`min-train-sites` ({self.min_train_sites}) must be <= `min-available-nodes` "
                f"({self.min_available_nodes}): a round cannot get more updates than sites"
            )
        if not self.data and not self.label_names.strip():
            raise ConfigError(
                '`data` is "" (the server holds no data), so `label-names` must list the classes, e.g. '
                'label-names = "benign,malignant"'
            )
        parse_partition(self.partition)  # raises ConfigError naming the value
        if not re.fullmatch(r"[A-Za-z0-9._-]*", self.run_name) or self.run_name.startswith("."):
            raise ConfigError(
                f"`run-name` may hold letters, digits, '.', '_' and '-' only (it names a folder), got {self.run_name!r}"
            )
        if self.image_size < 0:
            raise ConfigError(f"`image-size` must be >= 0 (0 = the backbone's own size), got {self.image_size}")
        if self.feature_block == AUTO:  # the word users write, kept as None (resolved by the server)
            object.__setattr__(self, "feature_block", None)
        if self.feature_block is not None and (
            isinstance(self.feature_block, bool) or not isinstance(self.feature_block, int) or self.feature_block < -1
        ):
            raise ConfigError(
                f'`feature-block` must be -1 (the backbone\'s own features), a block number >= 0 or "auto", got '
                f"{self.feature_block!r}"
            )
        if self.noise_multiplier == AUTO:  # the word users write, kept as None (planned by the site)
            object.__setattr__(self, "noise_multiplier", None)
        if self.noise_multiplier is not None and (
            isinstance(self.noise_multiplier, bool)
            or not isinstance(self.noise_multiplier, (int, float))
            or not math.isfinite(self.noise_multiplier)
            or self.noise_multiplier < 0
        ):
            raise ConfigError(f'`noise-multiplier` must be a number >= 0 or "auto", got {self.noise_multiplier!r}')

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys (Flower run config, CLI overrides); unknown keys are errors.

        Raises:
            ConfigError: a key is unknown (the nearest known key is suggested) or a value has the wrong type.
        """
        known = {_kebab(f.name): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean `{close[0]}`?" if close else ""
                if key in SITE_COUNT_KEYS:  # the federation's size is the launcher's, not the run's
                    hint = "; the number of sites is not a run-config key: `fedtl simulate --sites N` sets it."
                raise ConfigError(f"unknown config key `{key}`{hint or '.'} Known keys: {', '.join(sorted(known))}")
            kwargs[known[key].name] = _coerce(key, value, getattr(cls, known[key].name))
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Return the kebab-case mapping that `from_mapping` reads back unchanged ("auto" for an unset noise)."""
        return {_kebab(f.name): AUTO if getattr(self, f.name) is None else getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        """Return a copy with snake_case fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def label_name_list(self) -> tuple[str, ...]:
        """Return `label-names` as a tuple (empty: take the server data's)."""
        return tuple(n.strip() for n in self.label_names.split(",") if n.strip())

    @property
    def permuted_label_site_ids(self) -> tuple[int, ...]:
        """Return `permuted-label-sites` as site numbers (simulation only)."""
        ids = []
        for part in self.permuted_label_sites.split(","):
            if not part.strip():
                continue
            if not part.strip().isdigit():
                raise ConfigError(
                    f'`permuted-label-sites` must list site numbers like "0,3", got {self.permuted_label_sites!r}'
                )
            ids.append(int(part))
        return tuple(sorted(set(ids)))

    @property
    def is_private(self) -> bool:
        """True unless the run is the labelled non-private baseline."""
        return not self.non_private


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check a value against its default's type; ints are accepted where floats are expected."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{key}` must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{key}` must be a number, got {value!r}")
        return float(value)
    if default is None:  # noise-multiplier: a number, or "auto" (None: planned from the budget)
        if value == AUTO:
            return None
        if key == "feature-block":  # a block number, or "auto" (None: resolved by the server)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(
                    f'`{key}` must be an integer (-1: the backbone\'s own features) or "auto", got {value!r}'
                )
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'`{key}` must be a number >= 0 or "auto", got {value!r}')
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"`{key}` must be a string, got {value!r}")
    return value


def _check_closed_form(cfg: RunConfig) -> None:
    """Refuse settings a closed-form head cannot honour: it is one linear solve on cached features, no rounds."""
    conflicts = {
        "head": (cfg.head, "linear"),
        "personalization": (cfg.personalization, "none"),
        "client-dp": (cfg.client_dp, "off"),
        "trainable-blocks": (cfg.trainable_blocks, 0),
        "lora-rank": (cfg.lora_rank, 0),
    }
    for key, (value, needed) in conflicts.items():
        if value != needed:
            raise ConfigError(
                f'`head-solver = "closed-form"` solves a linear head on cached features in one release, so it needs '
                f'{key} = {needed!r}, got {value!r}; set {key} = {needed!r} or head-solver = "dp-sgd"'
            )


def _check_positive_int(cfg: RunConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 1:
            raise ConfigError(f"`{_kebab(name)}` must be >= 1, got {value}")


# The run config's enumerated and bounded keys, checked in __post_init__ (errors name the key in kebab case).
_CHOICES = {
    "client_dp": CLIENT_DP_MODES,
    "personalization": PERSONALIZATIONS,
    "head_solver": HEAD_SOLVERS,
    "closed_form": CLOSED_FORMS,
    "head": HEADS,
    "strategy": STRATEGIES,
    "accountant": ACCOUNTANTS,
    "device": DEVICES,
}
_POSITIVE = (  # > 0
    "closed_form_ridge",
    "lora_alpha",
    "client_clipping_norm",
    "learning_rate",
    "max_grad_norm",
    "target_epsilon",
    "centering_noise_multiplier",
    "server_learning_rate",
    "round_timeout",
)
_NON_NEGATIVE = ("client_noise_multiplier", "proximal_mu", "max_update_norm")  # >= 0
_OPEN_FRACTIONS = ("client_dp_delta", "target_delta", "test_fraction", "local_test_fraction")  # in (0, 1)


def _check_choice(cfg: RunConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"`{_kebab(name)}` must be one of {', '.join(choices)}; got {value!r}")


def _check_range(
    cfg: RunConfig,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    value = getattr(cfg, name)
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        bound = " and ".join(b for b in (lo, hi) if b)
        raise ConfigError(f"`{_kebab(name)}` must be {bound}, got {value}")
