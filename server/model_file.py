"""The adapted model as ONE safetensors file: head tensors plus everything needed to use and judge it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save
from torch import nn

from fedtl.shared.backbones import AnyPreprocessing, preprocessing_from_dict
from fedtl.shared.deep import FINAL_FEATURES, Adaptation, build_adapted_backbone, read_after_block, split_wire_arrays
from fedtl.shared.errors import ModelFileError
from fedtl.shared.files import atomic_write_bytes
from fedtl.shared.heads import PROJECTED, Head, build_head, load_head_arrays
from fedtl.shared.protocol import jsonable

FORMAT = "fedtl-adapted-model/1"
_PREDICT_ITEMS = {"images": "IMAGE", "texts": "TEXT-OR-FILE", "rows": "TABLE-FILE"}


@dataclass(frozen=True)
class AdaptedModel:
    """A federated head on a named, fingerprinted backbone, with its provenance and privacy spend."""

    backbone_name: str
    backbone_fingerprint: str
    preprocessing: AnyPreprocessing  # images, texts (tokenizer) or rows (the table schema)
    feature_dim: int
    head: str
    head_hidden: int
    label_names: tuple[str, ...]
    arrays: dict[str, np.ndarray]
    privacy: dict[str, dict[str, float]]  # site -> {"epsilon": cumulative, "delta": ...}
    non_private: bool
    num_rounds: int
    sites: tuple[str, ...]
    run_id: str
    strategy: str = "fedavg"
    metrics: dict[str, Any] = field(default_factory=dict)
    # Client-level DP of the aggregation (server/client_dp.py): a different guarantee from `privacy`.
    client_dp: dict[str, Any] = field(default_factory=dict)
    # Secure aggregation (server/secure_releases.py): the trust assumption the sites' epsilons hold under.
    trust: dict[str, Any] = field(default_factory=dict)
    # Deeper fine-tuning (shared/deep.py): how the backbone was adapted, and the names of the backbone tensors
    # that changed (stored as `backbone.<name>` beside the head's); empty for a head on the frozen backbone.
    trainable_blocks: int = 0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    changed_tensors: tuple[str, ...] = ()
    # A head-only model may read the frozen backbone after an earlier block (shared/deep.py, `feature-block`).
    feature_block: int = FINAL_FEATURES

    def __post_init__(self) -> None:
        stored = sorted(split_wire_arrays(self.arrays)[1])
        if stored != sorted(self.changed_tensors):
            raise ModelFileError(
                f"the model's changed-tensors list {sorted(self.changed_tensors)[:5]} differs from its stored "
                f"backbone tensors {stored[:5]}; the file was written incompletely or edited"
            )

    @property
    def adaptation(self) -> Adaptation:
        """Return how the backbone was adapted (head only when nothing changed in it)."""
        return Adaptation.of(self)

    @property
    def projection_dim(self) -> int:
        """Return k of a projected head (its stored public projection is (k, D)); 0 for other heads."""
        projection = self.arrays.get("projection")
        return int(projection.shape[0]) if self.head == PROJECTED and projection is not None else 0

    def build_head(self) -> Head:
        """Return the head module with this model's weights (and frozen buffers: centre, projection) loaded."""
        head = build_head(
            self.head,
            self.feature_dim,
            len(self.label_names),
            hidden=self.head_hidden,
            projection_dim=self.projection_dim,
        )
        load_head_arrays(head, split_wire_arrays(self.arrays)[0], source="the model file")
        return head

    def adapt_backbone(self, backbone: nn.Module) -> nn.Module:
        """Return the pretrained `backbone` (fingerprint already checked) as the head reads it: its changed tensors
        applied, or cut after the feature block the head was trained on."""
        if self.feature_block != FINAL_FEATURES:
            return read_after_block(self.backbone_name, backbone, self.feature_block)
        if not self.adaptation.enabled:
            return backbone
        return build_adapted_backbone(self.backbone_name, backbone, self.adaptation, split_wire_arrays(self.arrays)[1])

    def metadata(self) -> dict[str, Any]:
        """Return every field except the tensors, JSON-able."""
        meta = {k_: v for k_, v in asdict(self).items() if k_ != "arrays"}
        meta["preprocessing"] = self.preprocessing.to_dict()
        meta["label_names"] = list(self.label_names)
        meta["sites"] = list(self.sites)
        meta["changed_tensors"] = list(self.changed_tensors)
        return meta


def save_model(path: str | Path, model: AdaptedModel) -> Path:
    """Write the model file (tensors + JSON metadata + model card) and a readable card beside it."""
    path = Path(path)
    card = model_card(model)
    metadata = {"format": FORMAT, "fedtl": json.dumps(jsonable(model.metadata()), sort_keys=True), "model-card": card}
    atomic_write_bytes(path, save({k_: np.ascontiguousarray(v) for k_, v in model.arrays.items()}, metadata=metadata))
    atomic_write_bytes(path.with_suffix(".md"), card.encode())
    return path


def load_model(path: str | Path) -> AdaptedModel:
    """Read a model file written by `save_model`.

    Raises:
        ModelFileError: the file is missing, not safetensors, or lacks fedtl's metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist; runs write it as runs/<run-id>/model.safetensors")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            metadata = fh.metadata() or {}
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a readable safetensors file ({exc})") from exc
    if metadata.get("format") != FORMAT or "fedtl" not in metadata:
        raise ModelFileError(
            f"{path} is not a fedtl model file: metadata format is {metadata.get('format')!r}, expected {FORMAT!r}"
        )
    try:
        meta = json.loads(metadata["fedtl"])
        # Non-finite epsilons (non-private sites) are stored as strings in strict JSON.
        meta["privacy"] = {
            site: {key: float(v) for key, v in spend.items()} for site, spend in meta.get("privacy", {}).items()
        }
        return AdaptedModel(
            arrays=dict(arrays),
            preprocessing=preprocessing_from_dict(meta.pop("preprocessing")),
            label_names=tuple(meta.pop("label_names")),
            sites=tuple(meta.pop("sites")),
            changed_tensors=tuple(meta.pop("changed_tensors", ())),
            **meta,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{path} has damaged or incomplete fedtl metadata ({exc!r})") from exc


def model_card(model: AdaptedModel) -> str:
    """Return a human-readable Markdown card: what the model is, how it was trained, what it cost."""
    lines = [f"# fedtl adapted model `{model.run_id}`", ""]
    if model.non_private:
        lines += ["**NON-PRIVATE BASELINE: trained without differential privacy. Do not release.**", ""]
    lines += [
        f"- Backbone: `{model.backbone_name}` "
        + ("(frozen)" if not model.adaptation.enabled else f"(pretrained; fine-tuned: {model.adaptation.describe()})")
        + f", fingerprint `{model.backbone_fingerprint}`"
        + (" (of the pretrained weights)" if model.adaptation.enabled else ""),
        f"- Preprocessing: {model.preprocessing.describe()}",
        *(
            [f"- Features: the pooled output of MBConv block {model.feature_block} (the blocks above it are not run)"]
            if model.feature_block != FINAL_FEATURES
            else []
        ),
        f"- Head: {model.head}"
        + (f" (hidden {model.head_hidden})" if model.head == "mlp" else "")
        + (
            f" on {model.projection_dim} public directions (stored `projection`: the backbone's features of seeded "
            "synthetic images, no private data)"
            if model.head == PROJECTED
            else ""
        )
        + f", {model.feature_dim} -> {len(model.label_names)} classes",
        f"- Labels: {', '.join(model.label_names)}",
        f"- Federation: {len(model.sites)} sites, {model.num_rounds} rounds, strategy {model.strategy}",
        "",
        "## Privacy spent per site (cumulative, sample-level DP-SGD)",
        "",
        "| site | epsilon | delta |",
        "|---|---|---|",
    ]
    for site, spend in sorted(model.privacy.items()):
        eps = spend.get("epsilon", math.inf)
        lines.append(
            f"| {site} | {'inf (non-private)' if not math.isfinite(eps) else f'{eps:.3f}'} | {spend.get('delta')} |"
        )
    if model.trust:
        trust = model.trust
        lines += [
            "",
            "## Trust assumption (secure aggregation)",
            "",
            f"- {trust.get('assumption')}.",
            f"- Mechanism: {trust.get('mechanism')}; noise multiplier {trust.get('noise-multiplier')} of the sum, each "
            f"site adding 1/{trust.get('honest-sites')} of its variance; {trust.get('sites-in-sum')} of "
            f"{trust.get('sites')} sites in the sum, {trust.get('threshold')} shares rebuild a site's masks.",
        ]
    if model.adaptation.enabled:
        lines += [
            "",
            f"## Changed backbone tensors ({len(model.changed_tensors)}, stored as `backbone.<name>`)",
            "",
            "Trained under the same DP-SGD as the head. "
            + (
                "LoRA adapters (peft): base weights and BatchNorms unchanged."
                if model.lora_rank > 0
                else "The trainable blocks' BatchNorms became GroupNorms (per-example statistics) "
                "initialised from the pretrained affine weights."
            ),
            "",
            *[f"- `{name}`" for name in model.changed_tensors],
        ]
    if model.client_dp:
        eps, dp = float(model.client_dp.get("client-epsilon", math.inf)), model.client_dp
        lines += [
            "",
            f"## Client-level DP ({dp.get('client-dp')}-side clipping, per site as a whole)",
            "",
            f"- epsilon {eps:.3f} at delta {dp.get('client-delta')}, noise multiplier "
            f"{dp.get('client-noise-multiplier')}, clipping norm {dp.get('client-clipping-norm')}, "
            f"{dp.get('client-sampled-sites')} sites sampled per round over {dp.get('client-dp-rounds')} rounds",
        ]
    if model.metrics:
        lines += ["", "## Final metrics", ""]
        lines += [
            f"- {key}: {value:.4f}" if isinstance(value, float) else f"- {key}: {value}"
            for key, value in sorted(model.metrics.items())
        ]
    lines += [
        "",
        "## Use",
        "",
        f"`fedtl predict {model.run_id}/model.safetensors {_PREDICT_ITEMS[model.preprocessing.kind]}...` "
        "(needs the backbone with the fingerprint above).",
        "",
        ("Only the head was trained. " if not model.adaptation.enabled else "")
        + "The backbone's ImageNet weights are public; the guarantee above covers each",
        "site's training examples, not who took part, and not data the backbone itself was trained on.",
    ]
    return "\n".join(lines) + "\n"
