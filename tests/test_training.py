"""Tests for client/training.py: DP-SGD head training (Opacus), its step count, FedProx and evaluation."""

import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedtl.client.training import evaluate_model, steps_per_epoch, train_model
from fedtl.shared import constants as k
from fedtl.shared.heads import build_head, head_arrays, load_head_arrays

# Reported bug (see test_dp_training_silences_the_backward_hook_warning); kept out of the other tests' output.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

D = 8  # feature width of the synthetic problems


def separable(n: int, *, num_classes: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, D) from one Gaussian per class, means far apart in direction (the head L2-normalises)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    means = np.zeros((num_classes, D))
    means[:, 0] = 1.0  # shared offset, as backbone features have
    for c in range(num_classes):
        means[c, 1 + c] = 4.0
    features = means[labels] + rng.normal(size=(n, D))
    return features.astype(np.float32), labels.astype(np.int64)


def train(head, features, labels, **overrides):
    """train_model with the defaults of these tests; noise_multiplier=None is the non-private baseline (no clipping)."""
    kwargs = dict(epochs=5, batch_size=50, learning_rate=1.0, max_grad_norm=1.0, noise_multiplier=0.5, seed=1)
    kwargs.update(overrides)
    if kwargs["noise_multiplier"] is None:
        kwargs.update(max_grad_norm=None, noise_multiplier=0.0)
    return train_model(head, features, labels, **kwargs)


def dp_loader(num_examples: int, batch_size: int):
    """The DataLoader + make_private(poisson_sampling=True) that train_head builds, on a throwaway model."""
    dataset = TensorDataset(torch.zeros((num_examples, 2)), torch.zeros(num_examples, dtype=torch.long))
    loader = DataLoader(dataset, batch_size=min(batch_size, num_examples))
    model = nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure RNG off
        _, _, private = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
        )
    return private


class StepCounter:
    """Counts the SGD updates really applied (DPOptimizer.step ends in the wrapped SGD.step)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = torch.optim.SGD.step

        def step(opt, *args, **kwargs):
            self.calls += 1
            return original(opt, *args, **kwargs)

        monkeypatch.setattr(torch.optim.SGD, "step", step)


# --- steps_per_epoch -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_examples", "batch_size"),
    [(200, 50), (10, 32), (10, 3), (1, 1), (7, 7), (1000, 64), (4, 1)],
    ids=["even", "N<B", "N%B!=0", "one", "N=B", "1000/64", "B=1"],
)
def test_steps_per_epoch_agrees_with_opacus(num_examples, batch_size):
    sample_rate, per_epoch = steps_per_epoch(num_examples, batch_size)
    loader = dp_loader(num_examples, batch_size)
    assert len(loader) == per_epoch
    assert loader.sample_rate == sample_rate
    assert per_epoch == -(-num_examples // min(batch_size, num_examples))  # ceil(N / min(B, N))


@pytest.mark.parametrize(("num_examples", "batch_size"), [(93, 1), (930, 10), (9900, 100)])
def test_steps_per_epoch_agrees_with_opacus_when_one_over_rate_rounds_down(num_examples, batch_size):
    sample_rate, per_epoch = steps_per_epoch(num_examples, batch_size)
    loader = dp_loader(num_examples, batch_size)
    assert (len(loader), loader.sample_rate) == (per_epoch, sample_rate)


def test_train_head_runs_when_one_over_rate_rounds_down():
    features, labels = separable(186)
    result = train(build_head("linear", D, 2), features, labels, epochs=1, batch_size=2)
    assert result.steps == steps_per_epoch(186, 2)[1]


# --- DP training ---------------------------------------------------------------------------------


def test_dp_training_learns_a_separable_problem_and_reports_its_privacy_inputs(monkeypatch):
    features, labels = separable(200)
    features_before = features.copy()
    head = build_head("linear", D, 2, seed=0)
    with torch.no_grad():
        head.center.copy_(torch.linspace(-0.1, 0.1, D))  # a non-trivial centre, to see it is not trained
    center_before = head.center.clone()
    before = evaluate_model(head, features, labels)
    counter = StepCounter(monkeypatch)

    result = train(head, features, labels, epochs=5, batch_size=50, noise_multiplier=0.5)

    after = evaluate_model(head, features, labels)
    assert after[k.LOSS] < before[k.LOSS] * 0.5
    assert after[k.ACCURACY] > 0.9
    sample_rate, per_epoch = steps_per_epoch(200, 50)
    assert (result.steps, result.sample_rate, result.noise_multiplier) == (5 * per_epoch, sample_rate, 0.5)
    assert counter.calls == result.steps  # every counted step really updated the weights
    assert result.num_examples == 200
    assert np.isfinite(result.train_loss)
    assert list(result.arrays) == list(head.state_dict()) == ["center", "layers.0.weight", "layers.0.bias"]
    for key, value in head.state_dict().items():
        assert result.arrays[key].dtype == np.float32
        np.testing.assert_array_equal(result.arrays[key], value.numpy())
    np.testing.assert_array_equal(result.arrays["center"], center_before.numpy())
    assert torch.equal(head.center, center_before)
    np.testing.assert_array_equal(features, features_before)
    assert not head.training  # handed back in eval mode


def test_dp_training_arrays_load_into_a_fresh_head_with_the_same_predictions():
    features, labels = separable(100)
    head = build_head("mlp", D, 2, hidden=4)
    result = train(head, features, labels, epochs=2)
    fresh = build_head("mlp", D, 2, hidden=4, seed=7)
    load_head_arrays(fresh, result.arrays)
    assert evaluate_model(fresh, features, labels) == evaluate_model(head, features, labels)


@pytest.mark.parametrize("noise", [0.5, None], ids=["dp", "non-private"])
def test_same_seed_same_arrays_other_seed_other_arrays(noise):
    features, labels = separable(100)

    def run(seed):
        return train(build_head("linear", D, 2), features, labels, epochs=2, noise_multiplier=noise, seed=seed).arrays

    first, again, other = run(1), run(1), run(2)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["layers.0.weight"], other["layers.0.weight"])


def test_seed_none_draws_fresh_noise_each_call():
    features, labels = separable(100)
    a = train(build_head("linear", D, 2), features, labels, epochs=1, seed=None).arrays
    b = train(build_head("linear", D, 2), features, labels, epochs=1, seed=None).arrays
    assert not np.array_equal(a["layers.0.weight"], b["layers.0.weight"])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_one_dp_step_is_the_mean_of_clipped_per_sample_gradients(kind):
    """Oracle: per-sample gradients one example at a time, each clipped to C, summed, / expected batch size.

    Opacus (optimizers/optimizer.py) clips with factor min(1, C / (||g_i|| + 1e-6)) over all parameters
    together, adds noise of std sigma*C (0 here) and divides by expected_batch_size = int(N * sample_rate)
    for loss_reduction="mean". batch_size=N gives sample rate 1, and Poisson sampling at rate 1 takes all N.
    """
    n, clip, lr = 12, 0.05, 1.0
    features, labels = separable(n, num_classes=3, seed=3)
    head = build_head(kind, D, 3, hidden=4, seed=5)
    with torch.no_grad():
        head.center.copy_(torch.full((D,), 0.05))
    start = {name: p.detach().clone() for name, p in head.named_parameters()}

    oracle_head = build_head(kind, D, 3, hidden=4, seed=5)
    oracle_head.load_state_dict(head.state_dict())
    summed = {name: torch.zeros_like(p) for name, p in start.items()}
    plain = {name: torch.zeros_like(p) for name, p in start.items()}
    norms = []
    for i in range(n):
        oracle_head.zero_grad()
        x = torch.as_tensor(features[i : i + 1])
        F.cross_entropy(oracle_head(x), torch.as_tensor(labels[i : i + 1])).backward()
        grads = {name: p.grad.detach().clone() for name, p in oracle_head.named_parameters()}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        norms.append(float(norm))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for name, g in grads.items():
            summed[name] += factor * g
            plain[name] += g
    assert max(norms) > 2 * clip  # clipping is active, so the oracle differs from plain SGD
    expected = {name: start[name] - lr * summed[name] / n for name in start}
    unclipped = {name: start[name] - lr * plain[name] / n for name in start}

    result = train_model(
        head,
        features,
        labels,
        epochs=1,
        batch_size=n,
        learning_rate=lr,
        max_grad_norm=clip,
        noise_multiplier=0.0,
        seed=0,
    )

    assert (result.steps, result.sample_rate) == (1, 1.0)
    for name, param in head.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], atol=1e-5, rtol=0)
    assert any(not torch.allclose(expected[name], unclipped[name], atol=1e-3) for name in start)


def test_empty_poisson_batches_still_count_as_steps(monkeypatch):
    # N=4 at batch size 1: sample rate 1/4, so about a third of the steps draw an empty batch.
    features, labels = separable(4)
    head = build_head("linear", D, 2)
    sizes = []
    # every step runs the head's layers on its batch (the fixed input map ran once before the steps)
    head.layers.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    counter = StepCounter(monkeypatch)
    result = train(head, features, labels, epochs=5, batch_size=1, noise_multiplier=1.0, seed=3)
    assert result.steps == 5 * 4 == counter.calls == len(sizes)
    assert 0 in sizes  # the seed does draw empty batches
    assert all(np.isfinite(v).all() for v in result.arrays.values())


def test_train_head_twice_on_the_same_head():
    features, labels = separable(100)
    head = build_head("linear", D, 2)
    train(head, features, labels, epochs=1)
    second = train(head, features, labels, epochs=1, seed=2)
    assert second.steps == 2


def test_dp_training_silences_the_backward_hook_warning():
    features, labels = separable(100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(build_head("linear", D, 2), features, labels, epochs=1)
    assert [str(w.message) for w in caught if "Full backward hook" in str(w.message)] == []


# --- non-private mode and FedProx ----------------------------------------------------------------


def test_non_private_training_learns_without_opacus(monkeypatch):
    features, labels = separable(200)
    head = build_head("linear", D, 2)
    counter = StepCounter(monkeypatch)
    result = train(head, features, labels, epochs=3, noise_multiplier=None)
    assert result.noise_multiplier == 0.0
    assert counter.calls == result.steps == 3 * 4
    assert evaluate_model(head, features, labels)[k.ACCURACY] > 0.9
    # Opacus would leave per-sample gradients on the parameters and hooks on the layers.
    assert all(getattr(p, "grad_sample", None) is None for p in head.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in head.modules())


def test_dp_training_leaves_no_opacus_state_on_the_head():
    features, labels = separable(100)
    head = build_head("linear", D, 2)
    train(head, features, labels, epochs=1)
    assert all(getattr(p, "grad_sample", None) is None for p in head.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in head.modules())


@pytest.mark.parametrize("noise", [0.5, None], ids=["dp", "non-private"])
def test_fedprox_keeps_weights_closer_to_the_global_head(noise):
    features, labels = separable(200)
    start = head_arrays(build_head("linear", D, 2))

    def drift(mu):
        head = build_head("linear", D, 2)
        train(
            head,
            features,
            labels,
            epochs=3,
            learning_rate=0.1,
            noise_multiplier=noise,
            seed=4,
            global_arrays=start,
            proximal_mu=mu,
        )
        arrays = head_arrays(head)
        return sum(float(np.sum((arrays[key] - start[key]) ** 2)) for key in start) ** 0.5

    free, prox = drift(0.0), drift(5.0)
    assert free > 0.1
    assert prox < 0.5 * free


def test_empty_training_split_is_refused():
    with pytest.raises(ValueError, match=r"cannot train on an empty training split; the site needs at least one"):
        train(build_head("linear", D, 2), np.zeros((0, D), np.float32), np.zeros(0, np.int64))


# --- evaluate_model -------------------------------------------------------------------------------


def oracle_scores(head, features, labels, num_classes):
    """Metrics computed directly from the head's logits with numpy (no sklearn)."""
    with torch.no_grad():
        logits = head(torch.as_tensor(features))
    loss = float(F.cross_entropy(logits, torch.as_tensor(labels)))
    preds = logits.argmax(dim=1).numpy()
    recalls, f1s = [], []
    for c in range(num_classes):
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        if np.any(labels == c):
            recalls.append(tp / (tp + fn))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    out = {
        k.LOSS: loss,
        k.ACCURACY: float(np.mean(preds == labels)),
        k.BALANCED_ACCURACY: float(np.mean(recalls)),
        k.MACRO_F1: float(np.mean(f1s)),
    }
    if num_classes == 2:
        score = torch.softmax(logits, dim=1)[:, 1].numpy()
        pos, neg = score[labels == 1], score[labels == 0]
        # AUROC as the Mann-Whitney probability that a positive outscores a negative (ties count half).
        out[k.AUROC] = float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))
    return out


@pytest.mark.parametrize("num_classes", [2, 3])
def test_evaluate_model_matches_direct_computation(num_classes):
    # An untrained head on overlapping classes, so every metric sits strictly between 0 and 1.
    features, labels = separable(60, num_classes=num_classes, seed=9)
    features = features + np.random.default_rng(1).normal(scale=4.0, size=features.shape).astype(np.float32)
    head = build_head("linear", D, num_classes, seed=2)
    scores = evaluate_model(head, features, labels)
    expected = oracle_scores(head, features, labels, num_classes)
    assert set(scores) == set(expected)
    assert (k.AUROC in scores) == (num_classes == 2)
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, rel=1e-5), key
    assert 0 < scores[k.ACCURACY] < 1


# --- real sites: cryptographic randomness; hostile weights -------------------------------------------


def test_a_real_site_draws_batches_and_noise_from_the_cryptographic_generator(monkeypatch):
    from fedtl.shared import secure_noise

    calls = {"normal": [], "bernoulli": 0}
    normal, bernoulli = secure_noise.SecureRandom.normal, secure_noise.SecureRandom.bernoulli

    def counting_normal(self, loc=0.0, scale=1.0, size=1):
        calls["normal"].append(scale)
        return normal(self, loc, scale, size)

    def counting_bernoulli(self, size, p):
        calls["bernoulli"] += 1
        return bernoulli(self, size, p)

    monkeypatch.setattr(secure_noise.SecureRandom, "normal", counting_normal)
    monkeypatch.setattr(secure_noise.SecureRandom, "bernoulli", counting_bernoulli)
    features, labels = separable(100)
    a = train(build_head("linear", D, 2), features, labels, epochs=2, noise_multiplier=0.8, seed=None)
    b = train(build_head("linear", D, 2), features, labels, epochs=2, noise_multiplier=0.8, seed=None)
    assert calls["bernoulli"] == a.steps + b.steps  # one Poisson mask per step
    assert set(calls["normal"]) == {0.8 * 1.0}  # noise_multiplier x max_grad_norm, for every tensor of every step
    assert len(calls["normal"]) == 2 * (a.steps + b.steps)  # weight and bias
    assert not np.array_equal(a.arrays["layers.0.weight"], b.arrays["layers.0.weight"])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_an_example_whose_gradient_overflows_contributes_nothing_instead_of_poisoning_the_update(kind):
    """The membership oracle through NaN: a head that overflows for one example must not make the update NaN."""
    features, labels = separable(60, num_classes=2, seed=2)
    # One example whose loss and gradient are not finite (here an infinite input entry, as a tampered block
    # or a head crafted to overflow on it would give); without the defence the whole update turns NaN.
    target = features[0].copy()
    target[0] = np.inf
    outcomes = {}
    for member in (True, False):
        x = np.concatenate([features, target[None]]) if member else features
        y = np.concatenate([labels, labels[:1]]) if member else labels
        finite = []
        for seed in range(20):
            head = build_head(kind, D, 2, hidden=4, seed=0)
            result = train(head, x.astype(np.float32), y, epochs=1, batch_size=61, noise_multiplier=1.0, seed=seed)
            finite.append(all(np.all(np.isfinite(v)) for v in result.arrays.values()))
        outcomes[member] = sum(finite)
    assert outcomes == {True: 20, False: 20}


def test_incoming_tensors_must_be_finite_and_bounded():
    from fedtl.shared.errors import ReplyError
    from fedtl.shared.heads import MAX_TENSOR_VALUE

    head = build_head("linear", D, 2)
    arrays = head_arrays(head)
    crafted = {**arrays, "layers.0.weight": np.full_like(arrays["layers.0.weight"], 10 * MAX_TENSOR_VALUE)}
    with pytest.raises(ReplyError, match=r"holds a value of magnitude 1e\+05 > 10000"):
        load_head_arrays(head, crafted, source="the server")
    with pytest.raises(ReplyError, match=r"contains NaN or Inf"):
        load_head_arrays(head, {**arrays, "layers.0.bias": np.array([np.inf, 0.0], np.float32)}, source="the server")
