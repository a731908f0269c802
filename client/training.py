"""The site's training loop: DP-SGD (Opacus) on cached backbone features. No Flower here."""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule, PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtl.shared.heads import head_arrays, predict_proba
from fedtl.shared.metrics import classification_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What one local training call produced; `arrays` are the only tensors that leave the site."""

    arrays: "OrderedDict[str, np.ndarray]"
    num_examples: int
    train_loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float | None  # None: the non-private baseline


def steps_per_epoch(num_examples: int, batch_size: int) -> tuple[float, int]:
    """Return (sample_rate, optimizer steps per epoch) of Poisson sampling, exactly as Opacus' DPDataLoader sets them.

    Opacus sets the sample rate to 1 / ceil(N / B) (one over the plain loader's length) and runs
    int(1 / sample_rate) Poisson steps per epoch, which float rounding can make one less than
    ceil(N / B). The accountant must be charged with exactly these, not with B / N.
    """
    sample_rate = 1.0 / math.ceil(num_examples / min(batch_size, num_examples))
    return sample_rate, int(1 / sample_rate)


def train_head(
    head: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    noise_multiplier: float | None,
    seed: int | None,
    global_arrays: dict[str, np.ndarray] | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train `head` in place on (features, labels) and return its new tensors.

    With a noise multiplier this is DP-SGD (Abadi et al. 2016, "Deep Learning with Differential
    Privacy"): Poisson-sampled batches (expected size ~batch_size), per-sample clipping to `max_grad_norm`,
    Gaussian noise of std noise_multiplier * max_grad_norm. With `noise_multiplier=None` it is plain
    SGD (the labelled non-private baseline).

    Args:
        head: the module to train; its current weights are the starting point.
        features: float32 (N, D) cached backbone features of the site's training split.
        labels: int (N,) classes.
        epochs: passes over the data; each is int(1/sample_rate) Poisson-sampled steps.
        batch_size: expected batch size (Poisson sampling gives variable batches).
        learning_rate: SGD step size.
        max_grad_norm: per-sample clipping norm C.
        noise_multiplier: sigma, or None for non-private training.
        seed: seeds batch sampling and noise; None draws both from OS entropy. A server-known seed
            would let the server regenerate and subtract the noise, so only simulations pass one.
        global_arrays: the round's global head; with `proximal_mu` > 0 it anchors FedProx
            (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").
        proximal_mu: FedProx weight mu.

    Returns:
        TrainResult with the new head tensors and what the privacy accountant needs.
    """
    num_examples = len(labels)
    if num_examples == 0:
        raise ValueError("cannot train on an empty training split; the site needs at least one example")
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # OS entropy
    else:
        generator.manual_seed(seed)
    dataset = TensorDataset(torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long))
    sample_rate, per_epoch = steps_per_epoch(num_examples, batch_size)
    head.train()
    optimizer = torch.optim.SGD(head.parameters(), lr=learning_rate)
    anchor = None
    if proximal_mu > 0 and global_arrays is not None:
        anchor = {name: torch.as_tensor(global_arrays[name]) for name, _ in head.named_parameters()}
    with warnings.catch_warnings():
        if seed is not None:
            # Simulations want reproducible noise, so Opacus' secure-RNG warning says nothing new there.
            # Real sites (seed=None) keep the warning: OS entropy seeds the generator, but torch's
            # generator is not a cryptographic one (Opacus' secure_mode needs torchcsprng).
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        # Features are leaves (the backbone is frozen), so the first layer's full backward hook
        # fires on outputs only; Opacus' per-sample gradients need nothing more.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if noise_multiplier is not None:
            loader = DataLoader(dataset, batch_size=min(batch_size, num_examples), generator=generator)
            model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
                module=head,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                poisson_sampling=True,
                noise_generator=generator,
            )
            # The accountant was charged with (sample_rate, epochs * per_epoch) before training.
            assert math.isclose(loader.sample_rate, sample_rate) and len(loader) == per_epoch, (
                loader.sample_rate,
                len(loader),
                sample_rate,
                per_epoch,
            )
        else:
            loader = DataLoader(dataset, batch_size=min(batch_size, num_examples), shuffle=True, generator=generator)
            model = head
        try:
            losses, steps = _run_epochs(
                model,
                optimizer,
                loader,
                epochs=epochs,
                feature_dim=features.shape[1],
                anchor=anchor,
                learning_rate=learning_rate,
                proximal_mu=proximal_mu,
            )
        finally:
            if isinstance(model, GradSampleModule):
                model._close()  # remove Opacus' hooks and per-sample gradients from the caller's head
    if noise_multiplier is not None:
        assert steps == epochs * per_epoch, (steps, epochs, per_epoch)
    head.eval()
    return TrainResult(
        arrays=head_arrays(head),
        num_examples=num_examples,
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
    )


def _run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    epochs: int,
    feature_dim: int,
    anchor: dict[str, torch.Tensor] | None,
    learning_rate: float,
    proximal_mu: float,
) -> tuple[list[float], int]:
    """Run the SGD steps of `epochs` passes; return the non-empty batches' losses and the step count."""
    criterion = nn.CrossEntropyLoss()
    head = model._module if isinstance(model, GradSampleModule) else model
    losses: list[float] = []
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(y) == 0:
                # An empty Poisson batch still counts as a step: Opacus adds pure noise to it.
                loss = model(torch.zeros((0, feature_dim))).sum()
            else:
                loss = criterion(model(x), y)
                losses.append(float(loss.detach()))
            loss.backward()
            optimizer.step()
            steps += 1
            if anchor is not None:
                # FedProx's proximal term mu/2 ||w - w_global||^2 depends on no data, so its gradient
                # is applied after the private step (post-processing); inside the loss Opacus would
                # drop it, because it keeps only per-sample gradients.
                with torch.no_grad():
                    for name, param in head.named_parameters():
                        param.sub_(learning_rate * proximal_mu * (param - anchor[name]))
    return losses, steps


def evaluate_head(head: nn.Module, features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Return the classification metrics of the head on a labelled feature split."""
    return classification_metrics(labels, predict_proba(head, features))
