"""Throughput of DP head training on cached features against its alternatives, and bytes per site per round.

Prints figures, asserts nothing about timings. One run measures, on the same digits images:

1. DP head on cached features: `train_model` (DP-SGD, Poisson sampling) on precomputed backbone features.
2. Forward every step: the naive alternative, the frozen backbone run on each DP-SGD step's images,
   then the Opacus-wrapped head step.
3. Feature extraction: `extract_features` over the images (what (1) pays once per site and dataset).
4. Full-network DP fine-tuning at a small input size (BatchNorm -> GroupNorm so Opacus accepts it).

and the bytes a site receives/sends: the backbone once, then the head every round, against full fine-tuning
sending every backbone tensor both ways every round.

Run: `.venv/bin/python benchmarks/throughput.py [--samples 256] [--device auto] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtl.client.training import steps_per_epoch, train_model
from fedtl.shared.backbones import (
    Preprocessing,
    backbone_state_dict,
    build_backbone,
    count_state_bytes,
    get_backbone_spec,
    list_backbones,
)
from fedtl.shared.config import DEVICES, RunConfig
from fedtl.shared.data import load_dataset
from fedtl.shared.errors import BackboneError
from fedtl.shared.features import extract_features, resolve_device
from fedtl.shared.heads import build_head, head_arrays

DATA = "digits"
HEAD = "linear"  # the project's default head (RunConfig.head)
FALLBACK_BACKBONES = ("resnet18", "tiny")  # tried in order when the chosen one cannot be DP fine-tuned
TARGET_RATIO = 30.0  # the project's target for cached-feature rounds vs forward-every-step
_DEFAULTS = RunConfig()


@dataclass(frozen=True)
class Throughput:
    """One timed section: examples processed, optimizer (or batch) steps and wall-clock seconds."""

    samples: int
    steps: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        """Examples per second (NaN when nothing was timed)."""
        return self.samples / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict[str, float]:
        """Return the figures under kebab-case keys."""
        return {
            "samples": self.samples,
            "steps": self.steps,
            "seconds": self.seconds,
            "samples-per-s": self.samples_per_s,
        }


@dataclass(frozen=True)
class FinetuneResult:
    """Full-network DP fine-tuning: its throughput, the network actually used and why others were not."""

    throughput: Throughput
    backbone: str  # registry name of the network fine-tuned
    weights: str  # where its starting weights came from
    image_size: int
    setup_seconds: float  # ModuleValidator.fix + make_private, not in `throughput`
    model_bytes: int  # state of the DP-trainable network (GroupNorm backbone + classifier)
    skipped: tuple[str, ...]  # "<backbone>: <reason>" for every candidate that failed


# --- helpers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DpSettings:
    """The DP-SGD settings every section trains with."""

    learning_rate: float
    max_grad_norm: float
    noise_multiplier: float
    seed: int


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so perf_counter brackets the real compute."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def quiet_opacus() -> Iterator[None]:
    """Silence the two Opacus warnings every section here triggers by design."""
    with warnings.catch_warnings():
        # Benchmarks want reproducible noise, so secure_mode stays off (as in simulations).
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        # The head's inputs are features computed without grad (leaves), so the first layer's full
        # backward hook fires on outputs only; per-sample gradients need nothing more.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def cycle_batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the loader's batches epoch after epoch (a Poisson loader draws fresh batches each epoch)."""
    while True:
        yield from loader


def make_private_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    *,
    empty_input_shape: tuple[int, ...],
    device: torch.device,
) -> Callable[[torch.Tensor, torch.Tensor], int]:
    """Return a function doing one DP-SGD step on a batch of (indices, labels) and returning its size."""
    criterion = nn.CrossEntropyLoss()

    def step(indices: torch.Tensor, labels: torch.Tensor) -> int:
        optimizer.zero_grad(set_to_none=True)
        if len(labels) == 0:
            # An empty Poisson batch is still a step: Opacus adds pure noise (as train_model does).
            loss = model(torch.zeros((0, *empty_input_shape), device=device)).sum()
        else:
            loss = criterion(logits_of(indices), labels.to(device))
        loss.backward()
        optimizer.step()
        return len(labels)

    return step


def poisson_private(
    module: nn.Module, labels: np.ndarray, dp: DpSettings, *, batch_size: int, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    """Wrap `module` with Opacus over a Poisson-sampled loader of (image index, label) pairs."""
    num_examples, seed = len(labels), dp.seed
    dataset = TensorDataset(torch.arange(num_examples), torch.as_tensor(labels, dtype=torch.long))
    # Batch sampling stays on a CPU generator; noise is drawn where the parameters live, and Opacus
    # needs its noise generator on that device.
    loader = DataLoader(
        dataset, batch_size=min(batch_size, num_examples), generator=torch.Generator().manual_seed(seed)
    )
    noise_generator = torch.Generator(device=device).manual_seed(seed + 1)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=dp.learning_rate)
    with quiet_opacus():
        engine = PrivacyEngine(accountant="rdp")
        return engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_generator,
        )


def timed_steps(
    step: Callable[[torch.Tensor, torch.Tensor], int],
    batches: Iterator,
    *,
    warmup: int,
    steps: int,
    device: torch.device,
) -> Throughput:
    """Run `warmup` untimed steps, then time `steps` steps and count the examples they processed."""
    with quiet_opacus():
        for _ in range(warmup):
            step(*next(batches))
        synchronize(device)
        start = time.perf_counter()
        samples = sum(step(*next(batches)) for _ in range(steps))
        synchronize(device)
        seconds = time.perf_counter() - start
    return Throughput(samples=samples, steps=steps, seconds=seconds)


# --- the sections ----------------------------------------------------------------------------------


def measure_extraction(
    backbone: nn.Module, images: np.ndarray, preprocessing: Preprocessing, *, batch_size: int, device: torch.device
) -> tuple[Throughput, np.ndarray]:
    """(3) Time extract_features over all images; return the throughput and the features (N, D)."""
    extract_features(
        backbone, images[:batch_size], preprocessing, batch_size=batch_size, device=device, progress=False
    )  # warm-up: weights to the device, kernel selection
    synchronize(device)
    start = time.perf_counter()
    features = extract_features(backbone, images, preprocessing, batch_size=batch_size, device=device, progress=False)
    synchronize(device)
    seconds = time.perf_counter() - start
    return Throughput(samples=len(images), steps=math.ceil(len(images) / batch_size), seconds=seconds), features


def measure_cached_head(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    epochs: int,
    batch_size: int,
    dp: DpSettings,
    repeats: int,
) -> tuple[Throughput, float]:
    """(1) Time train_model (DP-SGD on cached features, PrivacyEngine set-up included) as a site's round does.

    One call is short and easily disturbed by other processes, so the median of `repeats` calls is
    reported, with the fastest call's seconds beside it. train_model runs on the CPU.
    """

    def run(run_epochs: int) -> tuple[float, int]:
        head = build_head(HEAD, features.shape[1], num_classes, seed=dp.seed)
        start = time.perf_counter()
        with (
            quiet_opacus()
        ):  # train_model filters them itself (since 124cceb; train_head then); kept for older versions
            result = train_model(
                head,
                features,
                labels,
                epochs=run_epochs,
                batch_size=batch_size,
                **dataclasses.asdict(dp),
            )
        return time.perf_counter() - start, result.steps

    run(1)  # warm-up
    timings = [run(epochs) for _ in range(repeats)]
    seconds = [t for t, _ in timings]
    median = Throughput(samples=epochs * len(labels), steps=timings[0][1], seconds=statistics.median(seconds))
    return median, min(seconds)


def measure_forward_every_step(
    backbone: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    preprocessing: Preprocessing,
    *,
    feature_dim: int,
    num_classes: int,
    epochs: int,
    batch_size: int,
    dp: DpSettings,
    max_steps: int,
    device: torch.device,
) -> tuple[Throughput, int]:
    """(2) Time DP-SGD on the head where every step first runs the frozen backbone on its raw images.

    Returns the throughput over min(max_steps, epochs * steps per epoch) steps (all of them when
    max_steps is 0) after one warm-up step, and the number of steps the full run would take.
    """
    num_examples = len(labels)
    head = build_head(HEAD, feature_dim, num_classes, seed=dp.seed).to(device).train()
    backbone.eval().to(device)
    model, optimizer, loader = poisson_private(head, labels, dp, batch_size=batch_size, device=device)

    def logits_of(indices: torch.Tensor) -> torch.Tensor:
        x = preprocessing.apply(images[indices.numpy()]).to(device)  # (B, 3, S, S)
        # no_grad, not inference_mode: inference tensors cannot be saved for the head's backward.
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = backbone(x)  # (B, D), as extract_features computes them
        return model(feats.float())  # (B, C)

    step = make_private_step(model, optimizer, logits_of, empty_input_shape=(feature_dim,), device=device)
    full_steps = epochs * steps_per_epoch(num_examples, batch_size)[1]
    steps = min(full_steps, max_steps) if max_steps else full_steps
    return timed_steps(step, cycle_batches(loader), warmup=1, steps=steps, device=device), full_steps


class OutOfPlaceBasicBlock(nn.Module):
    """Wrap a torchvision ResNet BasicBlock and run its maths with the shortcut added out of place."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C', H', W')
        b = self.block
        identity = x if b.downsample is None else b.downsample(x)
        out = b.relu(b.bn1(b.conv1(x)))
        return b.relu(b.bn2(b.conv2(out)) + identity)  # torchvision: out += identity


def finetune_candidates(name: str) -> Iterator[tuple[str, Callable[[], tuple[nn.Module, str]]]]:
    """Yield (backbone name, builder returning (network, weights label)) in the order to try them."""

    def registry(n: str) -> Callable[[], tuple[nn.Module, str]]:
        return lambda: (build_backbone(n), get_backbone_spec(n).weights_source)

    def resnet18() -> tuple[nn.Module, str]:
        import torchvision  # lazy, as in fedtl.shared.backbones

        try:
            net, weights = registry("resnet18")()
        except BackboneError:
            net = torchvision.models.resnet18(weights=None)  # seeded by seed_everything
            net.fc = nn.Identity()  # (B, 512), as build_backbone strips it
            for sub in net.modules():
                # Opacus' backward hooks need non-in-place activations (build_backbone does the same).
                if isinstance(getattr(sub, "inplace", None), bool):
                    sub.inplace = False
            weights = "RANDOM init (resnet18 weights file absent; valid for timing only)"
        # torchvision's BasicBlock adds the shortcut in place (`out += identity`) onto bn2's output; once
        # bn2 is a trainable GroupNorm that output comes from a full backward hook, and autograd forbids
        # modifying it in place (pytorch/pytorch#61519). Same maths, out of place, on this copy only.
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for i, block in enumerate(layer):
                if type(block) is torchvision.models.resnet.BasicBlock:
                    layer[i] = OutOfPlaceBasicBlock(block)  # a class, not a patched method: fix() pickles
        return net, weights + "; residual add made out-of-place for Opacus hooks"

    builders = {"resnet18": resnet18}
    yield name, builders.get(name, registry(name))
    for fallback in FALLBACK_BACKBONES:
        if fallback != name:
            yield fallback, builders.get(fallback, registry(fallback))


def build_private_finetune_model(backbone: nn.Module, feature_dim: int, num_classes: int) -> nn.Module:
    """Return a trainable, Opacus-valid copy of `backbone` with a linear classifier on top (CPU).

    Raises:
        opacus.validators.errors.UnsupportedModuleError: modules Opacus cannot train privately remain.
    """
    net = copy.deepcopy(backbone).cpu().train()
    # build_backbone freezes every parameter, and ModuleValidator only checks and fixes trainable modules.
    for p in net.parameters():
        p.requires_grad_(True)
    # BatchNorm mixes examples of a batch, which breaks per-example clipping; GroupNorm(gcd(32, C), C)
    # normalises each example alone. Its affine weights start at 1/0 and the ImageNet BatchNorm statistics
    # are gone, so accuracy would suffer: these figures are for timing.
    net = ModuleValidator.fix(net)
    model = nn.Sequential(net, nn.Linear(feature_dim, num_classes)).train()  # (B, 3, s, s) -> (B, C)
    ModuleValidator.validate(model, strict=True)
    return model


def measure_full_finetune(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    image_size: int,
    num_classes: int,
    batch_size: int,
    dp: DpSettings,
    min_steps: int,
    device: torch.device,
) -> FinetuneResult:
    """(4) Time full-network DP-SGD at `image_size` px over 1 epoch (at least `min_steps` steps) of the images.

    Tries backbone `name`, then FALLBACK_BACKBONES; a candidate that fails to build, fix, wrap or
    take its warm-up step is skipped with its reason.
    """
    skipped: list[str] = []
    num_examples = len(labels)
    for candidate, build in finetune_candidates(name):
        try:
            seed_everything(dp.seed)
            backbone, weights = build()
            spec = get_backbone_spec(candidate)
            preprocessing = Preprocessing(
                image_size=image_size, mean=spec.preprocessing.mean, std=spec.preprocessing.std
            )
            start = time.perf_counter()
            with quiet_opacus():
                model = build_private_finetune_model(backbone, spec.feature_dim, num_classes)
                model_bytes = count_state_bytes(backbone_state_dict(model))
                # fp32 throughout: per-sample gradients and clipping in full precision.
                model, optimizer, loader = poisson_private(
                    model.to(device), labels, dp, batch_size=batch_size, device=device
                )
            setup_seconds = time.perf_counter() - start

            def logits_of(indices: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
                return model(preprocessing.apply(images[indices.numpy()]).to(device))  # (B, C)

            step = make_private_step(
                model, optimizer, logits_of, empty_input_shape=(3, image_size, image_size), device=device
            )
            batches = cycle_batches(loader)
            # Warm-up apart: the first private step is many times slower. EfficientNet-Lite's convs are a
            # Conv2d subclass, absent from Opacus' exact-type grad-sampler registry, so functorch computes
            # their per-sample gradients.
            timed_steps(step, batches, warmup=1, steps=0, device=device)
        except Exception as exc:  # noqa: BLE001 - any failure means "use the next candidate", and say why
            text = " ".join(str(exc).split())
            skipped.append(f"{candidate}: {type(exc).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}")
            continue
        steps = max(min_steps, steps_per_epoch(num_examples, batch_size)[1])
        throughput = timed_steps(step, batches, warmup=0, steps=steps, device=device)
        return FinetuneResult(
            throughput=throughput,
            backbone=candidate,
            weights=weights,
            image_size=image_size,
            setup_seconds=setup_seconds,
            model_bytes=model_bytes,
            skipped=tuple(skipped),
        )
    raise RuntimeError(f"no backbone could be DP fine-tuned: {'; '.join(skipped)}")


def measure_bytes(
    backbone: nn.Module, *, feature_dim: int, num_classes: int, rounds: int, finetune_model_bytes: int | None
) -> dict[str, Any]:
    """(6) Bytes per site: backbone once + head both ways each round, vs full fine-tuning both ways each round."""
    backbone_bytes = count_state_bytes(backbone_state_dict(backbone))
    # What travels each round, one way: weight, bias and the `center` buffer (HEAD over D features).
    head_bytes = sum(a.nbytes for a in head_arrays(build_head(HEAD, feature_dim, num_classes)).values())
    classifier_bytes = (feature_dim + 1) * num_classes * 4  # float32 Linear(D, C)
    if finetune_model_bytes is None:
        finetune_bytes, finetune_basis = backbone_bytes + classifier_bytes, "frozen backbone state + classifier"
    else:
        finetune_bytes, finetune_basis = finetune_model_bytes, "GroupNorm backbone + classifier"
    cached_total = backbone_bytes + rounds * 2 * head_bytes
    full_total = rounds * 2 * finetune_bytes
    return {
        "rounds": rounds,
        "backbone-bytes-once": backbone_bytes,
        "head-bytes-one-way": head_bytes,
        "head-bytes-per-round": 2 * head_bytes,
        "backbone-over-head": backbone_bytes / head_bytes,
        "cached-design-total": cached_total,
        "full-finetune-bytes-one-way": finetune_bytes,
        "full-finetune-basis": finetune_basis,
        "full-finetune-total": full_total,
        "full-over-cached": full_total / cached_total,
    }


# --- output ----------------------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    """Return n bytes in B/KiB/MiB/GiB with three significant figures."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} GiB"


def print_report(figures: dict[str, Any]) -> None:
    """Print the run's figures as a table."""
    env, cfg, sec, ft = figures["environment"], figures["config"], figures["sections"], figures["full-finetune"]
    print("fedtl throughput benchmark (figures, not assertions; timings vary with machine load)")
    print(f"  device      {env['device']}  torch {env['torch']}  opacus {env['opacus']}  threads {env['threads']}")
    print(f"  backbone    {cfg['backbone']}  feature_dim {env['feature-dim']}  image {env['image-size']} px")
    print(f"  data        {DATA}: N = {cfg['samples']} training images ({env['raw-image-shape']} uint8, resized)")
    print(
        f"  DP-SGD      noise_multiplier {cfg['noise-multiplier']}, max_grad_norm {cfg['max-grad-norm']}, "
        f"expected batch {cfg['batch-size']} (Poisson), lr {cfg['learning-rate']}, {cfg['epochs']} epochs, "
        f"{HEAD} head"
    )
    print()
    rows = [
        (
            "(1) DP head on cached features (train_model, CPU)",
            sec["cached-head"],
            f"median of {cfg['head-repeats']} calls (fastest {figures['cached-head-fastest-seconds']:.3f} s), "
            "set-up incl.",
        ),
        (
            "(2) frozen backbone forward every step + DP head",
            sec["forward-every-step"],
            f"{sec['forward-every-step']['steps']} of {figures['forward-every-step-full-steps']} steps timed",
        ),
        ("(3) feature extraction (extract_features)", sec["extraction"], f"batch {cfg['batch-size']}"),
        (
            f"(4) full-network DP fine-tuning @ {ft['image-size']} px",
            sec["full-finetune"],
            f"{ft['backbone']}, N = {ft['samples']}, batch {ft['batch-size']}",
        ),
    ]
    print(f"  {'section':<52}{'samples':>8}{'steps':>7}{'seconds':>10}{'samples/s':>12}  note")
    for label, t, note in rows:
        print(f"  {label:<52}{t['samples']:>8}{t['steps']:>7}{t['seconds']:>10.3f}{t['samples-per-s']:>12.1f}  {note}")
    print()
    print(
        f"  (4) used {ft['backbone']} with weights: {ft['weights']}; "
        f"fix + make_private {ft['setup-seconds']:.2f} s (not timed)"
    )
    for reason in ft["skipped"]:
        print(f"      skipped {reason}")
    print()
    r = figures["ratios"]
    verdict = "met" if r["cached-vs-forward-every-step"] >= TARGET_RATIO else "NOT met"
    print("  ratios")
    print(
        f"    cached-feature rounds vs forward-every-step  (1)/(2) {r['cached-vs-forward-every-step']:>10.1f}x"
        f"  (target >= {TARGET_RATIO:.0f}x: {verdict})"
    )
    print(f"    cached-feature rounds vs full DP fine-tuning (1)/(4) {r['cached-vs-full-finetune']:>10.1f}x")
    print(f"    feature extraction vs forward-every-step     (3)/(2) {r['extraction-vs-forward-every-step']:>10.2f}x")
    print()
    b = figures["bytes"]
    print(f"  bytes per site ({b['rounds']} rounds)")
    print(
        f"    backbone, sent once per site            {format_bytes(b['backbone-bytes-once']):>12}"
        f"  ({b['backbone-bytes-once']} B)"
    )
    print(
        f"    {HEAD} head, one way                     {format_bytes(b['head-bytes-one-way']):>12}"
        f"  ({b['head-bytes-one-way']} B; weight, bias, center)"
    )
    print(f"    head per round (down + up)              {format_bytes(b['head-bytes-per-round']):>12}")
    print(f"    backbone / head (one way)               {b['backbone-over-head']:>12.1f}x")
    print(
        f"    cached-backbone design, {b['rounds']} rounds         {format_bytes(b['cached-design-total']):>12}"
        f"  (backbone once + {b['rounds']} x 2 x head)"
    )
    print(
        f"    full fine-tuning, {b['rounds']} rounds               {format_bytes(b['full-finetune-total']):>12}"
        f"  ({b['rounds']} x 2 x {format_bytes(b['full-finetune-bytes-one-way'])}, {b['full-finetune-basis']})"
    )
    print(f"    full fine-tuning / cached design        {b['full-over-cached']:>12.1f}x")


# --- entry point -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line; bad values exit with a message naming the flag."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default=_DEFAULTS.backbone, choices=list_backbones())
    p.add_argument("--samples", type=int, default=256, help="first N digits training images (default 256)")
    p.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="backbone input px; 0 = the backbone's own (224 for efficientnet_lite0)",
    )
    p.add_argument("--small-image-size", type=int, default=64, help="input px of full fine-tuning (4)")
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="expected DP batch size")
    p.add_argument("--epochs", type=int, default=2, help="epochs of (1); (2) is timed over a share of as many")
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--max-grad-norm", type=float, default=_DEFAULTS.max_grad_norm)
    p.add_argument("--learning-rate", type=float, default=_DEFAULTS.learning_rate)
    p.add_argument(
        "--forward-steps",
        type=int,
        default=4,
        help="steps of (2) timed (0 = all of --epochs); a share suffices for samples/s",
    )
    p.add_argument("--finetune-samples", type=int, default=64, help="images of (4), one epoch")
    p.add_argument("--finetune-batch-size", type=int, default=16, help="expected batch size of (4)")
    p.add_argument("--head-repeats", type=int, default=5, help="timed calls of (1); the median is reported")
    p.add_argument("--rounds", type=int, default=_DEFAULTS.num_rounds, help="rounds R of the bytes total")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    for flag in (
        "samples",
        "small_image_size",
        "batch_size",
        "epochs",
        "finetune_samples",
        "finetune_batch_size",
        "head_repeats",
        "rounds",
    ):
        if getattr(args, flag) < 1:
            p.error(f"`--{flag.replace('_', '-')}` must be >= 1, got {getattr(args, flag)}")
    for flag in ("image_size", "forward_steps", "noise_multiplier"):
        if getattr(args, flag) < 0:
            p.error(f"`--{flag.replace('_', '-')}` must be >= 0, got {getattr(args, flag)}")
    for flag in ("max_grad_norm", "learning_rate"):
        if not getattr(args, flag) > 0:
            p.error(f"`--{flag.replace('_', '-')}` must be > 0, got {getattr(args, flag)}")
    try:
        args.resolved_device = resolve_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every section, print the table, write --json when asked and return the figures."""
    args = parse_args(argv)
    device = args.resolved_device
    seed_everything(args.seed)
    train = load_dataset(DATA, seed=args.seed).train
    if args.samples > len(train):
        sys.exit(f"`--samples` must be <= {len(train)} (the {DATA} training images), got {args.samples}")
    images, labels = train.images[: args.samples], train.labels[: args.samples]
    num_classes = len(train.label_names)
    spec = get_backbone_spec(args.backbone)
    image_size = args.image_size or spec.preprocessing.image_size
    preprocessing = Preprocessing(image_size=image_size, mean=spec.preprocessing.mean, std=spec.preprocessing.std)
    backbone = build_backbone(args.backbone)
    dp = DpSettings(
        learning_rate=args.learning_rate,
        max_grad_norm=args.max_grad_norm,
        noise_multiplier=args.noise_multiplier,
        seed=args.seed,
    )

    print(f"[3] feature extraction on {device} ...", file=sys.stderr, flush=True)
    extraction, features = measure_extraction(
        backbone, images, preprocessing, batch_size=args.batch_size, device=device
    )
    print("[1] DP head on cached features ...", file=sys.stderr, flush=True)
    cached, cached_best = measure_cached_head(
        features,
        labels,
        num_classes=num_classes,
        epochs=args.epochs,
        batch_size=args.batch_size,
        repeats=args.head_repeats,
        dp=dp,
    )
    print("[2] forward every step ...", file=sys.stderr, flush=True)
    forward, full_steps = measure_forward_every_step(
        backbone,
        images,
        labels,
        preprocessing,
        feature_dim=spec.feature_dim,
        num_classes=num_classes,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_steps=args.forward_steps,
        device=device,
        dp=dp,
    )
    print("[4] full-network DP fine-tuning ...", file=sys.stderr, flush=True)
    n_ft = min(args.finetune_samples, args.samples)
    finetune = measure_full_finetune(
        args.backbone,
        images[:n_ft],
        labels[:n_ft],
        image_size=args.small_image_size,
        num_classes=num_classes,
        batch_size=args.finetune_batch_size,
        min_steps=3,
        device=device,
        dp=dp,
    )
    byte_figures = measure_bytes(
        backbone,
        feature_dim=spec.feature_dim,
        num_classes=num_classes,
        rounds=args.rounds,
        finetune_model_bytes=finetune.model_bytes if finetune.backbone == args.backbone else None,
    )

    figures: dict[str, Any] = {
        "config": {
            k.replace("_", "-"): (str(v) if isinstance(v, (Path, torch.device)) else v)
            for k, v in vars(args).items()
            if k != "resolved_device"
        },
        "environment": {
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "torch": torch.__version__,
            "opacus": __import__("opacus").__version__,
            "threads": torch.get_num_threads(),
            "feature-dim": spec.feature_dim,
            "image-size": image_size,
            "raw-image-shape": "x".join(map(str, images.shape[1:])),
        },
        "sections": {
            "cached-head": cached.to_dict(),
            "forward-every-step": forward.to_dict(),
            "extraction": extraction.to_dict(),
            "full-finetune": finetune.throughput.to_dict(),
        },
        "cached-head-fastest-seconds": cached_best,
        "forward-every-step-full-steps": full_steps,
        "full-finetune": {
            "backbone": finetune.backbone,
            "weights": finetune.weights,
            "image-size": finetune.image_size,
            "samples": n_ft,
            "batch-size": args.finetune_batch_size,
            "setup-seconds": finetune.setup_seconds,
            "model-bytes": finetune.model_bytes,
            "skipped": list(finetune.skipped),
        },
        "ratios": {
            "cached-vs-forward-every-step": cached.samples_per_s / forward.samples_per_s,
            "cached-vs-full-finetune": cached.samples_per_s / finetune.throughput.samples_per_s,
            "extraction-vs-forward-every-step": extraction.samples_per_s / forward.samples_per_s,
        },
        "bytes": byte_figures,
    }
    print_report(figures)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"\n  figures written to {args.json}")
    return figures


if __name__ == "__main__":
    main()
