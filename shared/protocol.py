"""What the server tells a site each round, as plain dataclasses <-> kebab-case config mappings."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, TypeVar

from fedtl.shared.errors import ReplyError

T = TypeVar("T")


@dataclass(frozen=True)
class RoundSettings:
    """The training/evaluation settings a site receives with every train or evaluate message."""

    run_id: str
    num_rounds: int
    backbone_name: str
    backbone_fingerprint: str
    image_size: int
    head: str
    head_hidden: int
    num_classes: int
    label_names: str  # JSON list: every site's data must carry exactly these classes, in this order
    local_epochs: int
    batch_size: int
    learning_rate: float
    max_grad_norm: float
    noise_multiplier: float  # < 0: derive from target_epsilon over num_rounds
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
    trainable_blocks: int = 0
    lora_rank: int = 0
    lora_alpha: float = 16.0


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


def encode(settings: Any) -> dict[str, Any]:
    """Return a dataclass as a kebab-case mapping fit for a Flower ConfigRecord."""
    return {f.name.replace("_", "-"): getattr(settings, f.name) for f in fields(settings)}


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
        expected = {"int": int, "float": (int, float), "str": str, "bool": bool}[str(f.type)]
        if not isinstance(value, expected) or (str(f.type) in ("int", "float") and isinstance(value, bool)):
            raise ReplyError(f"malformed {what}: `{key}` should be {f.type}, got {value!r}")
        if str(f.type) == "float" and not math.isfinite(value):
            raise ReplyError(f"malformed {what}: `{key}` must be a finite number, got {value!r}")
        kwargs[f.name] = float(value) if str(f.type) == "float" else value
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
