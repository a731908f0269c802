"""What the server tells a site each round, derived from the run config, and its one wire codec.

`RoundSettings` and `SimulationSettings` list what a site needs; every field that the run config
(`RunConfig`) also has takes the run config's value (`for_run`), so a new run-config key a site must
see is one line here and nothing else. On the wire each field is a kebab-case ConfigRecord entry; a
`float | None` field is None ("auto": the site plans it) and travels as the string "auto".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

from fedtl.shared.config import AUTO, RunConfig, fedtl_home
from fedtl.shared.errors import ReplyError

T = TypeVar("T")


@dataclass(frozen=True)
class RoundSettings:
    """The training/evaluation settings a site receives with every message of a run."""

    run_id: str
    num_rounds: int
    backbone_name: str
    backbone_fingerprint: str
    image_size: int  # resolved: the backbone's own size when the run config says 0
    head: str
    head_hidden: int
    num_classes: int
    label_names: str  # JSON list: every site's data must carry exactly these classes, in this order
    local_epochs: int
    batch_size: int
    learning_rate: float
    max_grad_norm: float
    noise_multiplier: float | None  # None: the site derives it from target-epsilon over the run ("auto")
    target_epsilon: float
    target_delta: float
    accountant: str
    non_private: bool
    seed: int
    feature_batch_size: int
    device: str
    personalization: str  # none | fedper (the head's last layer stays at the site) | finetune (after the run)
    finetune_epochs: int  # local DP-SGD epochs of the finetune phase (planned into the run's noise)
    # Deeper fine-tuning (shared/deep.py): the last `trainable_blocks` backbone blocks train with the head,
    # fully or through LoRA adapters of rank `lora_rank`; 0 and 0: the head alone on cached features.
    trainable_blocks: int
    lora_rank: int
    lora_alpha: float
    feature_block: int  # resolved by the server (never "auto"): -1 the backbone's own features, n block n's
    projection_dim: int  # closed-form head: the public projection of the features (0: none)
    # Secure aggregation: releases go through the secure sum with distributed Skellam noise, assuming at least
    # `secagg_honest_sites` honest sites among those summed (0: all of them; resolved when the sum starts).
    secure_aggregation: bool
    secagg_honest_sites: int
    # Table rows: the federation's schema as canonical JSON ("" for images and texts); the `tabular` backbone's
    # fingerprint is a hash of it, so a site that allows the fingerprint allows exactly this schema.
    schema: str = ""

    @classmethod
    def for_run(
        cls,
        cfg: RunConfig,
        *,
        run_id: str,
        backbone_fingerprint: str,
        image_size: int,
        label_names: tuple[str, ...],
        schema: str = "",
    ) -> RoundSettings:
        """Return the settings of run `run_id`: the run config's fields by name, plus what the server resolved.

        `cfg.feature_block` is resolved first (server/solvers/auto.resolve_feature_block): a site reads an int.
        """
        assert cfg.feature_block is not None, (
            "resolve feature-block 'auto' before telling sites (resolve_feature_block)"
        )
        given = {
            "run_id": run_id,
            "backbone_name": cfg.backbone,
            "backbone_fingerprint": backbone_fingerprint,
            "image_size": image_size,
            "num_classes": len(label_names),
            "label_names": json.dumps(list(label_names)),
            "schema": schema,
        }
        return cls(**_from_run_config(cls, cfg, given))

    @property
    def label_name_list(self) -> list[str]:
        """Return the federation's classes in order."""
        return list(json.loads(self.label_names))


@dataclass(frozen=True)
class SimulationSettings:
    """Stand-in for a simulated site's own node config: which slice of the shared data it holds."""

    data: str
    partition: str
    seed: int
    test_fraction: float
    local_test_fraction: float
    permuted_label_sites: str  # comma-separated site numbers whose labels are permuted (negative-transfer studies)
    site_root: str  # per-run state of simulated sites (privacy history)
    cache_root: str  # backbones and features, kept across runs
    audit_canaries: int = 0  # site 0 adds this many audit canaries to its training split (client/canaries.py)

    @classmethod
    def for_run(cls, cfg: RunConfig, *, run_dir: Path) -> SimulationSettings:
        """Return the simulation settings of a run whose folder is `run_dir`."""
        given = {"site_root": str((run_dir / "sites").resolve()), "cache_root": str(fedtl_home() / "sim-sites")}
        return cls(**_from_run_config(cls, cfg, given))


def _from_run_config(cls: type, cfg: RunConfig, given: dict[str, Any]) -> dict[str, Any]:
    """Return the keyword arguments of `cls`: `given`, and every other field from the run config's same-named field."""
    values = dict(given)
    for f in fields(cls):
        if f.name not in values:
            values[f.name] = getattr(cfg, f.name)  # AttributeError here: a field the run config lacks
    return values


def encode(settings: Any) -> dict[str, Any]:
    """Return a dataclass as a kebab-case mapping fit for a Flower ConfigRecord (None travels as "auto")."""
    return {
        f.name.replace("_", "-"): AUTO if getattr(settings, f.name) is None else getattr(settings, f.name)
        for f in fields(settings)
    }


_WIRE_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def decode(cls: type[T], values: Mapping[str, Any], *, what: str = "message config") -> T:
    """Return `cls` built from a kebab-case mapping; extra keys (e.g. Flower's) are ignored.

    Raises:
        ReplyError: a key is missing, its value has the wrong type, or a float is NaN or infinite.
    """
    kwargs = {}
    for f in fields(cls):  # type: ignore[arg-type]
        key = f.name.replace("_", "-")
        if key not in values:
            raise ReplyError(
                f"malformed {what}: key `{key}` is missing; sender and receiver run different fedtl versions?"
            )
        value = values[key]
        kind = str(f.type)
        optional = kind.endswith(" | None")
        if optional and value == AUTO:
            kwargs[f.name] = None
            continue
        base = kind.removesuffix(" | None")
        if not isinstance(value, _WIRE_TYPES[base]) or (base in ("int", "float") and isinstance(value, bool)):
            allowed = f'{base} or "{AUTO}"' if optional else base
            raise ReplyError(f"malformed {what}: `{key}` should be {allowed}, got {value!r}")
        if base == "float" and not math.isfinite(value):
            raise ReplyError(f"malformed {what}: `{key}` must be a finite number, got {value!r}")
        kwargs[f.name] = float(value) if base == "float" else value
    return cls(**kwargs)


def jsonable(value: Any) -> Any:
    """Return `value` with non-finite floats as the strings "inf"/"-inf"/"nan", so it is strict JSON."""
    if isinstance(value, dict):
        return {str(key): jsonable(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
