"""The site's one training loop: DP-SGD (Opacus) on the inputs at the cut, for any model above it. No Flower here.

The model above the cut (a head, or [trainable blocks + head]) says how it trains: its parameter groups
and learning rates, and whether it is clipped flat or per tensor (`Head` and `AdaptedHead` in shared/).
Everything else, Poisson sampling, clipping, noise, FedProx and the step count the ledger was charged
for, is this one loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtl.shared.heads import PROJECTED, Head, predict_proba
from fedtl.shared.metrics import classification_metrics
from fedtl.shared.secure_noise import SecureRandom

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What one local training call produced; `arrays` are the only tensors that leave the site."""

    arrays: "OrderedDict[str, np.ndarray]"
    num_examples: int
    train_loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float  # 0.0: no noise (the non-private baseline, or a run that fixed noise 0)


def steps_per_epoch(num_examples: int, batch_size: int) -> tuple[float, int]:
    """Return (sample_rate, optimizer steps per epoch) of Poisson sampling, exactly as Opacus' DPDataLoader sets them.

    Opacus sets the sample rate to 1 / ceil(N / B) (one over the plain loader's length) and runs
    int(1 / sample_rate) Poisson steps per epoch, which float rounding can make one less than
    ceil(N / B). The accountant must be charged with exactly these, not with B / N.
    """
    sample_rate = 1.0 / math.ceil(num_examples / min(batch_size, num_examples))
    return sample_rate, int(1 / sample_rate)


def train_model(
    model: nn.Module,
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_grad_norm: float | None,
    noise_multiplier: float,
    seed: int | None,
    global_arrays: dict[str, np.ndarray] | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train the model above the cut in place on its inputs and return its new tensors.

    With a clipping norm this is DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"):
    Poisson-sampled batches (expected size ~batch_size), per-sample clipping to `max_grad_norm` (flat, or
    per tensor with bounds whose L2 norm is `max_grad_norm`, as the model says), Gaussian noise of std
    noise_multiplier * max_grad_norm on every coordinate. `max_grad_norm=None` is plain SGD without
    clipping or noise: the labelled non-private baseline.

    Args:
        model: a `Head` or `AdaptedHead` (shared/); its current weights are the starting point.
        inputs: float32 inputs at the cut of the site's training split: (N, D) features or (N, C, H, W).
        labels: int (N,) classes.
        epochs: passes over the data; each is int(1/sample_rate) Poisson-sampled steps.
        batch_size: expected batch size (Poisson sampling gives variable batches).
        learning_rate: SGD step size of the head (the model may scale it for other tensors).
        max_grad_norm: per-sample clipping norm C; None: the non-private baseline.
        noise_multiplier: sigma (0.0: clipped but not noised).
        seed: seeds batch sampling and noise; None draws both from OS entropy. The release path
            (client/release.py) passes one only in simulation: a seed the server knows would let it
            regenerate and subtract the noise.
        global_arrays: the round's global tensors (message names); with `proximal_mu` > 0 they anchor
            FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").
        proximal_mu: FedProx weight mu.

    Returns:
        TrainResult with the tensors that travel and what the accountant was charged for.

    Raises:
        ValueError: the training split is empty.
        RuntimeError: Opacus sampled at another rate or ran another number of steps than the ledger was
            charged for (never expected; checked because the accounting depends on it).
    """
    num_examples = len(labels)
    if num_examples == 0:
        raise ValueError("cannot train on an empty training split; the site needs at least one example")
    private = max_grad_norm is not None
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # OS entropy
    else:
        generator.manual_seed(seed)
    sample_rate, per_epoch = steps_per_epoch(num_examples, batch_size)
    model.train()
    # The part of the model that every step runs (a head's fixed input map is applied once, here).
    trained, trained_inputs = model.trained_part(torch.as_tensor(inputs, dtype=torch.float32))
    dataset = _Rows(trained_inputs, torch.as_tensor(labels, dtype=torch.long))
    optimizer = torch.optim.SGD(model.param_groups(learning_rate), lr=learning_rate)
    anchor = None
    if proximal_mu > 0 and global_arrays is not None:
        names = model.wire_names()
        anchor = {
            id(p): torch.as_tensor(global_arrays[names[id(p)]])
            for group in optimizer.param_groups
            for p in group["params"]
        }
    with warnings.catch_warnings():
        # Opacus warns that its own secure RNG is off: simulated sites want reproducible noise, and real sites
        # draw batches and noise from a cryptographic generator of fedtl's (use_secure_randomness) instead.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        # Inputs are leaves (the part below the cut is frozen), so the first layer's full backward hook
        # fires on outputs only; Opacus' per-sample gradients need nothing more.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if private:
            loader = DataLoader(
                dataset, batch_size=min(batch_size, num_examples), generator=generator, collate_fn=_stacked
            )
            runner, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
                module=trained,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=model.clip_bounds(max_grad_norm),
                clipping=model.clipping,
                poisson_sampling=True,
                noise_generator=generator,
            )
            if seed is None:  # a real site: batches and noise from a cryptographic generator (shared/secure_noise.py)
                use_secure_randomness(optimizer, loader, SecureRandom())
            # The ledger was charged with (sample_rate, epochs * per_epoch) before training.
            if not (math.isclose(loader.sample_rate, sample_rate) and len(loader) == per_epoch):
                raise RuntimeError(
                    f"Opacus samples at rate {loader.sample_rate} over {len(loader)} steps per epoch, but the "
                    f"ledger was charged for {sample_rate} over {per_epoch}: refusing to train (a fedtl bug)"
                )
        else:
            loader = DataLoader(
                dataset,
                batch_size=min(batch_size, num_examples),
                shuffle=True,
                generator=generator,
                collate_fn=_stacked,
            )
            runner = trained
        try:
            with _intra_op_threads(1 if isinstance(model, Head) and model.kind == PROJECTED else None):
                losses, steps = _run_epochs(
                    runner, optimizer, loader, epochs=epochs, anchor=anchor, proximal_mu=proximal_mu, private=private
                )
        finally:
            if isinstance(runner, GradSampleModule):
                runner._close()  # remove Opacus' hooks and per-sample gradients from the caller's model
    if private and steps != epochs * per_epoch:
        raise RuntimeError(
            f"DP-SGD ran {steps} steps but the ledger was charged for {epochs * per_epoch}: a fedtl bug, the "
            "reported epsilon would be wrong"
        )
    model.eval()
    return TrainResult(
        arrays=model.arrays(),
        num_examples=num_examples,
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier if private else 0.0,
    )


@contextlib.contextmanager
def _intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block on `count` intra-op threads (None: as set), then restore the setting.

    A projected head's steps (the auto plan) are tiny matrix products (hundreds of rows, k <= 256 columns):
    parallelising them costs more than it saves, and on a loaded machine torch's waiting threads made 50
    full-batch steps of a 16-dim head 25x slower (11.4 s against 0.43 s on one thread, 2 busy cores). Only
    projected heads: the thread count can change the order of float sums, and other heads' runs are pinned
    bit for bit (tests/parity/); one thread also makes a projected head's run the same on any machine.
    """
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Rows(TensorDataset):
    """A TensorDataset that gives a batch's rows in one indexing per tensor (DataLoader calls `__getitems__`).

    The same batches, bit for bit, as fetching row by row and stacking them; full-batch DP-GD (the auto plan)
    otherwise spends most of each step fetching and stacking hundreds of single rows.
    """

    def __getitems__(self, indices: list[int]) -> list[list[torch.Tensor]]:
        if not len(indices):
            return []  # an empty Poisson batch: Opacus' collate wrapper makes it from the first batch's shapes
        index = torch.as_tensor(indices, dtype=torch.long)
        return [[tensor[index] for tensor in self.tensors]]


def _stacked(batch: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Return the one already-stacked [inputs, labels] `_Rows.__getitems__` made (default_collate's structure)."""
    return batch[0]


def _run_epochs(
    runner: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    epochs: int,
    anchor: dict[int, torch.Tensor] | None,
    proximal_mu: float,
    private: bool,
) -> tuple[list[float], int]:
    """Run the SGD steps of `epochs` passes; return the non-empty batches' losses and the step count."""
    criterion = nn.CrossEntropyLoss()
    losses: list[float] = []
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            logits = runner(x)  # (B, K); Opacus' empty Poisson batch keeps the input's trailing shape
            if len(y) == 0:
                loss = logits.sum()  # an empty Poisson batch is still a step: Opacus adds pure noise to it
            else:
                loss = criterion(logits, y)
                losses.append(float(loss.detach()))
            loss.backward()
            if private:
                drop_non_finite_samples(optimizer)
            optimizer.step()
            steps += 1
            if anchor is not None:
                # FedProx's proximal term mu/2 ||w - w_global||^2 depends on no data, so its gradient is
                # applied after the private step (post-processing); inside the loss Opacus would drop it,
                # because it keeps only per-sample gradients.
                with torch.no_grad():
                    for group in optimizer.param_groups:
                        for p in group["params"]:
                            p.sub_(group["lr"] * proximal_mu * (p - anchor[id(p)]))
    return losses, steps


class _SecurePoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson batch sampler with its coins drawn from a SecureRandom (`secure` is set on the instance)."""

    secure: SecureRandom

    def __iter__(self):  # type: ignore[no-untyped-def]
        for _ in range(self.steps):
            yield np.flatnonzero(self.secure.bernoulli(self.num_samples, self.sample_rate)).tolist()


def use_secure_randomness(optimizer: DPOptimizer, loader: DataLoader, secure: SecureRandom) -> None:
    """Make Opacus draw a real site's Poisson batches and Gaussian noise from `secure`, hardened as secure mode is.

    Opacus' own `secure_mode` needs torchcsprng, which is not built for the torch fedtl pins; this does what
    it intends with `cryptography`'s ChaCha20 instead. The sample rate, the steps and the noise's standard
    deviation (noise_multiplier x max_grad_norm, per-layer bounds included) are Opacus' own, so the ledger's
    charge is unchanged.
    """
    sampler = loader.batch_sampler
    if not isinstance(sampler, UniformWithReplacementSampler):
        raise RuntimeError(f"expected Opacus' Poisson sampler, got {type(sampler).__name__}: a fedtl bug")
    sampler.__class__ = _SecurePoissonSampler
    sampler.secure = secure

    def add_noise() -> None:  # DPOptimizer.add_noise with the noise drawn from `secure`
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            reference = p.summed_grad
            noise = torch.as_tensor(secure.normal(0.0, std, size=tuple(reference.shape)), dtype=reference.dtype)
            p.grad = (reference + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise


def drop_non_finite_samples(optimizer: torch.optim.Optimizer) -> int:
    """Zero every per-example gradient that holds a NaN or an infinity, before Opacus clips and sums; return how many.

    Clipping scales a gradient by C / its norm, which passes NaN and infinity through, so one example whose
    gradient is not finite would turn the whole noised update into NaN: a server that sends weights which
    overflow for one particular example could then read that example's presence off the update (a
    membership oracle that no noise hides). A zeroed gradient has norm 0 <= C, so the sensitivity, the
    noise and the accounting are unchanged; the example simply contributes nothing to this step.
    """
    params = [
        p for group in optimizer.param_groups for p in group["params"] if getattr(p, "grad_sample", None) is not None
    ]
    bad = None
    for p in params:
        sample = p.grad_sample  # (B, *p.shape)
        # One reduction first: a sum is finite when every term is (or overflows: then the rows are checked too).
        if not torch.isfinite(sample.sum()):
            rows = ~torch.isfinite(sample.reshape(len(sample), -1)).all(dim=1)  # (B,)
            bad = rows if bad is None else bad | rows
    if bad is None:
        return 0
    with torch.no_grad():
        for p in params:
            p.grad_sample[bad] = 0.0
    dropped = int(bad.sum())
    log.warning("%d example gradient(s) held NaN or Inf in this DP-SGD step and contribute nothing to it", dropped)
    return dropped


def evaluate_model(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Return the classification metrics of the model above the cut on a labelled split of its inputs."""
    return classification_metrics(labels, predict_proba(model, inputs))
