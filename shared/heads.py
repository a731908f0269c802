"""Trainable heads on frozen-backbone features, and their tensors as they travel."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedtl.shared.errors import ConfigError, ReplyError

PROJECTED = "projected"  # the auto plan's head on a public projection of the features (shared/dp_heads.py)
FROZEN_ARRAYS = ("center", "projection")  # buffers the server fixes for a whole run; sites send them back unchanged


class Head(nn.Module):
    """Normalise features, subtract the federation's mean feature, normalise again, then classify.

    The per-example L2 normalisation uses no dataset statistics (no privacy cost) and bounds every
    input to norm 1, which keeps per-sample gradients near the clipping norm. Backbone features
    share one dominant direction (cosine ~0.9 to their mean on digits), so the head also subtracts
    `center`, the mean normalised feature of all sites. That statistic is NOT public: the server
    estimates it from Gaussian-noised per-site sums that every site charges to its privacy budget
    (see `fedtl.client.centering.feature_sum_round`). `center` is a buffer, never trained.

    The "projected" head (head-solver "auto", shared/dp_heads.py) first maps the normalised feature onto
    k public directions, `projection` (k, D), clips it to norm 1 and subtracts a k-dim `center`: both
    buffers, set by the server, so every site and the model file apply the same map. Its bias stays at zero
    in the training loop (`requires_grad` off): on unit inputs an example's gradient (p - y) [u; 1]^T has squared
    norm 2 ||p - y||^2, half of it the bias's, so without the bias the weights get the whole clipping bound against
    the same noise (shared/dp_heads.py says what that measured). Secure DP-SGD's gradient rows leave it out too
    (shared/secure_dp_sgd.clipped_gradient_rows).
    """

    def __init__(
        self, kind: str, in_features: int, num_classes: int, hidden: int = 128, *, projection_dim: int = 0
    ) -> None:
        super().__init__()
        if kind == "linear":
            self.layers = nn.Sequential(nn.Linear(in_features, num_classes))
        elif kind == "mlp":
            self.layers = nn.Sequential(
                nn.Linear(in_features, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, num_classes)
            )
        elif kind == PROJECTED:
            if not 1 <= projection_dim < in_features:
                raise ConfigError(
                    f"a projected head needs 1 <= projection-dim < the feature dim {in_features}, got {projection_dim}"
                )
            self.layers = nn.Sequential(nn.Linear(projection_dim, num_classes))
            self.layers[0].bias.requires_grad_(False)  # see the class docstring: the clip norm goes to W
        else:
            raise ValueError(f"`head` must be one of linear, mlp, {PROJECTED}; got {kind!r}")
        self.kind = kind
        if kind == PROJECTED:
            # P (k, D), the public synthetic basis (shared/public_basis.py), set by the server; never trained.
            self.register_buffer("projection", torch.zeros(projection_dim, in_features))
            self.register_buffer("center", torch.zeros(projection_dim))  # (k,)
        else:
            self.register_buffer("center", torch.zeros(in_features))  # (D,)

    # What the training loop and evaluation ask of any model above the cut (shared/deep.AdaptedHead too).
    clipping = "flat"  # one clipping bound over all trainable tensors (Opacus "flat")
    predict_batch_size = 4096

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, C)
        return self.layers(self.embed(features))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Return the inputs of `layers`: the head's fixed map of features (B, D) -> (B, D), or (B, k) projected."""
        if self.kind == PROJECTED:  # normalise(clip1(P normalise(x)) - c) (shared/public_basis.py)
            z = F.normalize(features, dim=1) @ self.projection.T  # (B, k)
            z = z / z.norm(dim=1, keepdim=True).clamp(min=1.0)  # whitened rows of P can lengthen z: clip to 1
            return F.normalize(z - self.center, dim=1)
        return F.normalize(F.normalize(features, dim=1) - self.center, dim=1)

    def trained_part(self, inputs: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
        """Return (the module the training loop runs, its inputs): `layers` on the embedded inputs (B, D) -> (B, ...).

        `embed` holds no trainable tensor, so one pass over a site's inputs replaces one per step; per row it is
        the same computation, so the steps see the same values.
        """
        with torch.no_grad():
            return self.layers, self.embed(inputs)

    def param_groups(self, learning_rate: float) -> list[dict]:
        """Return the optimiser's parameter groups: every head tensor at `learning_rate`."""
        return [{"params": list(self.parameters()), "lr": learning_rate}]

    def clip_bounds(self, max_grad_norm: float) -> float:
        """Return Opacus' clipping bound: one flat bound over the whole head."""
        return max_grad_norm

    def wire_names(self) -> dict[int, str]:
        """Return id(parameter) -> its name in messages (the state-dict name)."""
        return {id(p): name for name, p in self.named_parameters()}

    def arrays(self) -> "OrderedDict[str, np.ndarray]":
        """Return the tensors that travel (see `head_arrays`)."""
        return head_arrays(self)

    def load_arrays(self, arrays: dict[str, np.ndarray], *, source: str = "message") -> None:
        """Load a message's head tensors, checked (see `load_head_arrays`)."""
        load_head_arrays(self, arrays, source=source)


def build_head(
    kind: str, in_features: int, num_classes: int, *, hidden: int = 128, seed: int = 0, projection_dim: int = 0
) -> Head:
    """Return a freshly initialised head; the same seed gives the same initial weights everywhere.

    A projected head starts at zero, as the auto plan's full-batch DP-GD was tuned (benchmarks/dp_heads.py):
    its first step is then the clipped class means' direction, not a random start's.
    """
    gen_state = torch.random.get_rng_state()
    # The head is built on the CPU, so only the CPU generator draws. torch.manual_seed would also queue a seed
    # for every accelerator backend, recording a stack trace for each: 2 ms a call, 100 calls a default run.
    torch.random.default_generator.manual_seed(seed)
    try:
        head = Head(kind, in_features, num_classes, hidden, projection_dim=projection_dim)
    finally:
        torch.random.set_rng_state(gen_state)
    if kind == PROJECTED:
        with torch.no_grad():
            for p in head.layers.parameters():
                p.zero_()
    return head


def personal_array_names(kind: str) -> tuple[str, ...]:
    """Return the head tensors FedPer keeps at each site: the last layer of an mlp head.

    FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers") shares the
    lower layers and keeps the classifier local, so each site's own label distribution shapes it.
    """
    if kind != "mlp":
        raise ValueError(f"personal layers need an mlp head (a linear head is one layer), got head {kind!r}")
    return ("layers.2.weight", "layers.2.bias")


def normalize_features(features: np.ndarray) -> np.ndarray:
    """Return features (N, D) scaled to unit L2 norm per example, as the head's first step does."""
    return F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1).numpy()


def zero_non_finite_rows(features: np.ndarray) -> tuple[np.ndarray, int]:
    """Return features (N, ...) with every example holding a NaN or Inf set to zero, and how many were.

    Before a sum or a statistic is released: one non-finite example would make the whole release NaN, so
    its presence could be read off it. A zero row has norm 0, within every sensitivity bound.
    """
    flat = features.reshape(len(features), -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if not bad.any():
        return features, 0
    cleaned = features.copy()
    cleaned[bad] = 0
    return cleaned, int(bad.sum())


def head_arrays(head: nn.Module) -> "OrderedDict[str, np.ndarray]":
    """Return the head's tensors as float32 numpy arrays, in state-dict order."""
    return OrderedDict(
        (k, v.detach().cpu().numpy().astype(np.float32, copy=True)) for k, v in head.state_dict().items()
    )


# No tensor a site trains comes near this (unit-norm features, clipped steps); a server could use larger values to
# make logits overflow for one particular example and read its presence off a NaN update (issue: membership oracle).
MAX_TENSOR_VALUE = 1e4


def check_incoming_tensor(name: str, value: np.ndarray, shape: tuple[int, ...], *, source: str) -> np.ndarray:
    """Return a received tensor as an array after checking its shape, that it is finite and that it is bounded.

    Raises:
        ReplyError: the shape differs, a value is NaN/Inf, or a value's magnitude exceeds MAX_TENSOR_VALUE.
    """
    value = np.asarray(value)
    if tuple(value.shape) != tuple(shape):
        raise ReplyError(f"tensor `{name}` from {source} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if not np.all(np.isfinite(value)):
        raise ReplyError(f"tensor `{name}` from {source} contains NaN or Inf")
    largest = float(np.max(np.abs(value))) if value.size else 0.0
    if largest > MAX_TENSOR_VALUE:
        raise ReplyError(
            f"tensor `{name}` from {source} holds a value of magnitude {largest:.3g} > {MAX_TENSOR_VALUE:g}; no "
            "trained model comes near it, and such values can make one example's loss overflow: refused"
        )
    return value


def load_head_arrays(head: nn.Module, arrays: dict[str, np.ndarray], *, source: str = "message") -> None:
    """Load arrays into the head after checking keys, shapes and finiteness.

    Raises:
        ReplyError: a key is missing or unexpected, a shape differs, or a value is NaN/Inf.
    """
    expected = head.state_dict()
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ReplyError(
            f"head tensors from {source} do not match the {getattr(head, 'kind', '')} head: "
            f"missing {missing}, unexpected {extra}; sender and receiver must use the same `head` and `num-classes`"
        )
    state = OrderedDict()
    for key, ref in expected.items():
        value = check_incoming_tensor(key, arrays[key], tuple(ref.shape), source=source)
        state[key] = torch.as_tensor(value, dtype=ref.dtype)
    head.load_state_dict(state)


@torch.no_grad()
def predict_proba(model: nn.Module, inputs: np.ndarray) -> np.ndarray:
    """Return softmax class probabilities (N, C) of a model above the cut on its inputs (features or activations).

    Batches are the model's `predict_batch_size` (activations are far larger than features).
    """
    model.eval()
    batch_size = getattr(model, "predict_batch_size", 4096)
    out = []
    for start in range(0, len(inputs), batch_size):
        logits = model(torch.as_tensor(inputs[start : start + batch_size], dtype=torch.float32))
        out.append(torch.softmax(logits, dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
