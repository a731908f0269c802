"""DP heads at epsilon 1, 3, 8 (issue 17): today's defaults against the `auto` plan, on cached features.

Every cell simulates a federation faithfully on cached EfficientNet-Lite0 features at 64 px (the backbone's final
features; the product's auto plan now reads block 10's pooled output at 64 px, `shared/deep.choose_feature_block`,
and `--feature-blocks` prints the comparison that rule was chosen from): iid sites exactly
as `fedtl simulate` splits them (`dp_heads_data.py`), every site adding its own full noise to everything it
releases (no secure aggregation), every release charged to one accountant history per site (Opacus' RDP,
delta 1e-5), held-out accuracy on the server's split. Rows:

- `dp-sgd (defaults)`: today's run config: feature-centre release (sigma 4, raised to stay within 25% of the
  budget, dropped when its noise norm exceeds 0.5), then 10 rounds x 2 epochs of Poisson DP-SGD, batch 64,
  lr 8, clip 1, on the 1280-dim head, FedAvg weighted by examples. Simulated in numpy (same maths as Opacus).
- `closed form (defaults)`: the same centre, then one release of the 1280-dim Gram, class sums and counts
  (sensitivity sqrt(3)), ridge 1 plus the noise shift (`fedtl.shared.closed_form`).
- `auto (dp-gd)`: `fedtl.shared.dp_heads.plan_dp_head`: public synthetic basis, k-dim centre, full-batch DP-GD.
- `closed form (public basis)`: LDA (`solve_lda`) on the same public basis and centre, k = the largest of
  8..128 with k <= (1 / (2 eta)) ** (2/3) (the Gram's noise radius 2 sqrt(K k) sigma below N / k).

The defaults of the `auto` plan were chosen on digits only, on the sites' local test splits (never on a
held-out split), seeds 0-2; PneumoniaMNIST and BreastMNIST use them unchanged.

    python benchmarks/dp_heads.py                      # all three data sets, seeds 0-2 (about 10 min on 2 cores)
    python benchmarks/dp_heads.py --data digits --seeds 0
    python benchmarks/dp_heads.py --basis-report       # non-private LDA: synthetic vs ImageNet-classifier bases
    python benchmarks/dp_heads.py --feature-blocks --data digits --image-size 64   # the feature-block rule's table
    python benchmarks/dp_heads.py --public-counts 1500 512 --image-size 224      # how many public images suffice

FEDTL_HOME holds the feature caches (`dp_heads/`). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_heads_data import (  # noqa: E402
    DATASETS,
    FederatedFeatures,
    block_feature_tables,
    federated_features,
    synthetic_features,
)

DELTA = 1e-5
TARGETS = {("digits", 1.0): 0.60, ("digits", 3.0): 0.85, ("digits", 8.0): 0.90, ("pneumonia", 1.0): 0.83}
METHODS = ("dp-sgd (defaults)", "closed form (defaults)", "auto (dp-gd)", "closed form (public basis)")
CLOSED_FORM_DIMS = (8, 16, 32, 48, 64, 96, 128)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _fedavg(parts: list[tuple[np.ndarray, np.ndarray]], sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    wts = np.asarray(sizes, dtype=np.float64) / sum(sizes)
    return sum(w * p[0] for w, p in zip(wts, parts)), sum(w * p[1] for w, p in zip(wts, parts))


def default_centre(fed: FederatedFeatures, epsilon: float, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """Return today's feature centre (D,) and its ledger entries, as server_app.estimate_feature_center does."""
    from fedtl.shared.centering import MAX_CENTER_NOISE_NORM, center_noise_norm, centering_noise_multiplier
    from fedtl.shared.privacy import PrivacyStep

    dim = fed.test_x.shape[1]
    sigma = centering_noise_multiplier(requested=4.0, target_epsilon=epsilon, target_delta=DELTA)
    if sigma is None:
        return np.zeros(dim), []
    total = sum(_unit(x).astype(np.float64).sum(0) + rng.normal(0, sigma, dim) for x in fed.site_x)
    count = sum(fed.site_sizes)
    charged = [PrivacyStep(sigma, 1.0, 1)]
    if (
        center_noise_norm(noise_multiplier=sigma, dim=dim, num_sites=len(fed.site_x), count=count)
        > MAX_CENTER_NOISE_NORM
    ):
        return np.zeros(dim), charged  # dropped, still charged
    return total / count, charged


def run_dp_sgd_defaults(fed: FederatedFeatures, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Return held-out predictions of today's default DP-SGD run (numpy, Poisson sampling as Opacus)."""
    from fedtl.shared.dp_heads import clipped_gradient_sum
    from fedtl.shared.privacy import find_noise_multiplier

    centre, history = default_centre(fed, epsilon, rng)
    prep = [_unit(_unit(x) - centre) for x in fed.site_x]
    rounds, epochs, batch, lr = 10, 2, 64, 8.0
    num_classes, dim = fed.num_classes, prep[0].shape[1]
    weight, bias = np.zeros((num_classes, dim)), np.zeros(num_classes)
    plans = []
    for u in prep:  # every site plans its own noise over its own steps (client/rounds.plan_noise_multiplier)
        q = 1.0 / math.ceil(len(u) / min(batch, len(u)))
        per_epoch = int(1 / q)
        sigma = find_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=DELTA,
            sample_rate=q,
            steps=per_epoch * epochs * rounds,
            history=history,
        )
        plans.append((q, per_epoch, sigma))
    for _ in range(rounds):
        parts = []
        for u, y, (q, per_epoch, sigma) in zip(prep, fed.site_y, plans):
            w, b = weight.copy(), bias.copy()
            for _ in range(per_epoch * epochs):
                mask = rng.random(len(u)) < q
                gw, gb = clipped_gradient_sum(u[mask], y[mask], w, b, max_grad_norm=1.0)
                w -= lr * (gw + rng.normal(0, sigma, gw.shape)) / (q * len(u))
                b -= lr * (gb + rng.normal(0, sigma, gb.shape)) / (q * len(u))
            parts.append((w, b))
        weight, bias = _fedavg(parts, fed.site_sizes)
    return np.argmax(_unit(_unit(fed.test_x) - centre) @ weight.T + bias, axis=1)


def run_closed_form_defaults(fed: FederatedFeatures, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Return held-out predictions of today's closed-form run (ridge 1, no projection, centre first)."""
    from fedtl.shared.closed_form import compute_stats, prepare_features, release_stats, solve_ridge, sum_stats
    from fedtl.shared.privacy import find_noise_multiplier

    centre, history = default_centre(fed, epsilon, rng)
    sigma = find_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=1.0, steps=1, history=history)
    parts = [
        release_stats(
            compute_stats(prepare_features(x, center=centre), y, fed.num_classes), noise_multiplier=sigma, rng=rng
        )
        for x, y in zip(fed.site_x, fed.site_y)
    ]
    weight, bias = solve_ridge(sum_stats(parts), ridge=1.0)
    return np.argmax(prepare_features(fed.test_x, center=centre) @ weight.T + bias, axis=1)


def _centre(fed, basis, plan, rng) -> np.ndarray:
    """Return the k-dim centre: the sites' noised sums of projected features, or the public one (plan's choice)."""
    from fedtl.shared.dp_heads import estimate_center
    from fedtl.shared.public_basis import project_features

    if plan.center_noise_multiplier is None:
        return basis.center
    sums = [
        project_features(x, basis.projection).sum(0) + rng.normal(0, plan.center_noise_multiplier, basis.dim)
        for x in fed.site_x
    ]
    return estimate_center(sums, fed.site_sizes)


def run_auto(
    fed: FederatedFeatures, epsilon: float, rng: np.random.Generator, public: np.ndarray
) -> tuple[np.ndarray, str]:
    """Return held-out predictions of the `auto` plan (full-batch DP-GD on the public basis) and its reason."""
    from fedtl.shared.dp_heads import plan_dp_head, train_full_batch
    from fedtl.shared.public_basis import centre_features, compute_public_basis, project_features

    plan = plan_dp_head(
        target_epsilon=epsilon,
        target_delta=DELTA,
        site_sizes=fed.site_sizes,
        feature_dim=fed.test_x.shape[1],
        num_classes=fed.num_classes,
    )
    basis = compute_public_basis(public, dim=plan.projection_dim)
    centre = _centre(fed, basis, plan, rng)
    prep = [centre_features(project_features(x, basis.projection), centre) for x in fed.site_x]
    weight, bias = np.zeros((fed.num_classes, basis.dim)), np.zeros(fed.num_classes)
    schedule = {  # every site's every round trains on the plan's schedule
        "steps": plan.local_steps,
        "learning_rate": plan.learning_rate,
        "max_grad_norm": plan.max_grad_norm,
        "noise_multiplier": plan.noise_multiplier,
    }
    for _ in range(plan.num_rounds):
        parts = [
            train_full_batch(u, y, weight, bias, rng=rng, fit_bias=False, **schedule) for u, y in zip(prep, fed.site_y)
        ]
        weight, bias = _fedavg(parts, fed.site_sizes)
    test = centre_features(project_features(fed.test_x, basis.projection), centre)
    return np.argmax(test @ weight.T + bias, axis=1), plan.reason


def run_closed_form_public(
    fed: FederatedFeatures, epsilon: float, rng: np.random.Generator, public: np.ndarray
) -> np.ndarray:
    """Return held-out predictions of LDA on the public basis (the closed form with the auto plan's centre)."""
    from fedtl.shared.closed_form import compute_stats, release_stats, solve_lda, sum_stats
    from fedtl.shared.dp_heads import CENTER_SHARE, MAX_CENTER_NOISE_NORM, mean_noise
    from fedtl.shared.privacy import PrivacyStep, find_noise_multiplier
    from fedtl.shared.public_basis import centre_features, compute_public_basis, project_features

    sigma = find_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=1.0, steps=1)
    eta = mean_noise(noise_multiplier=sigma, site_sizes=fed.site_sizes)
    k = max([d for d in CLOSED_FORM_DIMS if d <= (1 / (2 * eta)) ** (2 / 3)] or [CLOSED_FORM_DIMS[0]])
    basis = compute_public_basis(public, dim=k)
    center_sigma = sigma / math.sqrt(CENTER_SHARE)
    released = center_sigma * math.sqrt(len(fed.site_x) * k) / sum(fed.site_sizes) <= MAX_CENTER_NOISE_NORM
    history = [PrivacyStep(center_sigma, 1.0, 1)] if released else []

    class _Plan:  # the centre decision, in the shape `_centre` reads
        center_noise_multiplier = center_sigma if released else None

    centre = _centre(fed, basis, _Plan, rng)
    stats_sigma = find_noise_multiplier(
        target_epsilon=epsilon, target_delta=DELTA, sample_rate=1.0, steps=1, history=history
    )
    parts = [
        release_stats(
            compute_stats(centre_features(project_features(x, basis.projection), centre), y, fed.num_classes),
            noise_multiplier=stats_sigma,
            rng=rng,
        )
        for x, y in zip(fed.site_x, fed.site_y)
    ]
    weight, bias = solve_lda(sum_stats(parts), ridge=1e-3)
    return np.argmax(centre_features(project_features(fed.test_x, basis.projection), centre) @ weight.T + bias, axis=1)


def _balanced(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f}±{np.std(values, ddof=1) / math.sqrt(len(values)):.3f}"


def basis_report(seed: int) -> None:
    """Print non-private LDA accuracy on the sites' local test splits for public bases of several dims."""
    from fedtl.shared.backbones import build_imagenet_classifier
    from fedtl.shared.public_basis import centre_features, compute_public_basis, project_features

    fc = build_imagenet_classifier("efficientnet_lite0")._fc.weight.detach().double().numpy()  # (1000, D)
    classifier_basis = np.linalg.svd(fc, full_matrices=False)[2]  # (1000, D) right singular vectors
    public = synthetic_features()
    print("non-private LDA, sites' local test splits, centre = pooled training mean (seed %d)" % seed)
    for name in DATASETS:
        fed = federated_features(name, seed=seed)
        for k in (16, 32, 64):
            row = []
            for label, projection in (
                ("synthetic", compute_public_basis(public, dim=k, whitening=0.0).projection),
                ("imagenet-classifier", classifier_basis[:k]),
            ):
                z = [project_features(x, projection) for x in fed.site_x]
                centre = np.concatenate(z).mean(0)
                u, y = np.concatenate([centre_features(v, centre) for v in z]), np.concatenate(fed.site_y)
                means = np.stack([u[y == c].mean(0) for c in range(fed.num_classes)])
                within = sum((u[y == c] - means[c]).T @ (u[y == c] - means[c]) for c in range(fed.num_classes)) / len(u)
                w = np.linalg.solve(within + 1e-3 * np.eye(k), means.T).T
                b = -0.5 * np.sum(w * means, 1) + np.log(np.bincount(y) / len(y))
                val = centre_features(project_features(fed.val_x, projection), centre)
                row.append(f"{label} {np.mean(np.argmax(val @ w.T + b, 1) == fed.val_y):.3f}")
            print(f"  {name:9s} k={k:3d}: " + ", ".join(row))


def auto_cell(
    name: str, table: dict[str, np.ndarray], epsilon: float, seeds: list[int], public: np.ndarray
) -> tuple[float, float]:
    """Return the auto plan's accuracy on the sites' pooled local test splits and on the held-out split, mean over
    `seeds`, for data set `name` read through `table` (image key -> feature) and the public features `public`."""
    val, held = [], []
    for seed in seeds:
        fed = federated_features(name, seed=seed, table=table)
        both = dataclasses.replace(fed, test_x=np.concatenate([fed.test_x, fed.val_x]))
        pred, _ = run_auto(both, epsilon, np.random.default_rng([seed, int(10 * epsilon), 29]), public)
        held.append(np.mean(pred[: len(fed.test_y)] == fed.test_y))
        val.append(np.mean(pred[len(fed.test_y) :] == fed.val_y))
    return float(np.mean(val)), float(np.mean(held))


def feature_block_report(names: list[str], epsilons: list[float], seeds: list[int], image_size: int) -> None:
    """Print the auto plan's accuracy on the features after every block 6..15 and the final ones (shared/deep.py).

    Each cell: the sites' pooled local test splits (what the rule was chosen on, digits only) / the held-out split,
    mean over seeds; the same plan, basis rule and noise as the `auto (dp-gd)` row, only the features differ.
    """
    from fedtl.shared.data import load_dataset
    from fedtl.shared.deep import choose_feature_block
    from fedtl.shared.public_basis import generate_synthetic_images

    chosen = choose_feature_block("efficientnet_lite0", image_size)
    public_tables = block_feature_tables("synthetic", generate_synthetic_images(), image_size=image_size)
    layers = [f"b{i}" for i in range(6, 16)] + ["final"]
    for name in names:
        source, sites = DATASETS[name]
        splits = load_dataset(source, seed=0, test_fraction=0.2)
        tables = block_feature_tables(
            name, np.concatenate([splits.train.images, splits.test.images]), image_size=image_size
        )
        print(f"\n{name} ({sites} iid sites), {image_size} px: the auto plan per feature block, sites' local test "
              f"splits / held-out accuracy, mean over seeds {seeds} (the rule's block: {chosen})")  # fmt: skip
        print("block".ljust(12) + "".join(f"eps {e:g}".rjust(16) for e in epsilons))
        for layer in layers:
            public = np.stack(list(public_tables[layer].values())).astype(np.float32)
            cells = ["{:.3f} / {:.3f}".format(*auto_cell(name, tables[layer], eps, seeds, public)) for eps in epsilons]
            label = f"{layer} ({public.shape[1]})"
            print(label.ljust(12) + "".join(c.rjust(16) for c in cells), flush=True)


def public_count_report(
    names: list[str], epsilons: list[float], seeds: list[int], image_size: int, counts: list[int], draws: list[int]
) -> None:
    """Print the auto plan's accuracy with its public basis computed from `counts` synthetic images, per draw.

    Each count is drawn with every seed of `draws` (`generate_synthetic_images(count, seed=draw)`; the product
    draws SYNTHETIC_COUNT with SYNTHETIC_SEED) and extracted as a run extracts them (the run's cut at
    `image_size`); the data's features are the same block's. Cells as in `feature_block_report`: the sites'
    pooled local test splits / the held-out split, mean over `seeds`; then the mean over the draws.
    """
    from fedtl.server.solvers.auto import resolve_feature_block
    from fedtl.shared.backbones import build_backbone
    from fedtl.shared.config import RunConfig
    from fedtl.shared.cut import Cut
    from fedtl.shared.data import load_dataset
    from fedtl.shared.features import extract_features
    from fedtl.shared.public_basis import generate_synthetic_images

    cut = Cut.of(resolve_feature_block(RunConfig(image_size=image_size)), backbone_fingerprint="unchecked")
    layer = f"b{cut.adaptation.feature_block}"
    model = cut.frozen_part(build_backbone(cut.backbone_name))
    public = {
        (count, draw): extract_features(
            model, generate_synthetic_images(count, seed=draw), cut.preprocessing, progress=False
        )
        for count in counts
        for draw in draws
    }
    for name in names:
        source, sites = DATASETS[name]
        splits = load_dataset(source, seed=0, test_fraction=0.2)
        table = block_feature_tables(
            name, np.concatenate([splits.train.images, splits.test.images]), image_size=image_size
        )[layer]
        print(f"\n{name} ({sites} iid sites), {image_size} px, block {layer[1:]}: the auto plan per public count and "
              f"draw, sites' local test splits / held-out accuracy, mean over seeds {seeds}")  # fmt: skip
        print("images draw".ljust(12) + "".join(f"eps {e:g}".rjust(16) for e in epsilons))
        for count in counts:
            means = np.zeros((len(epsilons), 2))
            for draw in draws:
                scores = np.array([auto_cell(name, table, eps, seeds, public[(count, draw)]) for eps in epsilons])
                means += scores
                cells = [f"{v:.3f} / {h:.3f}" for v, h in scores]
                print(f"{count:5d} {draw:4d}".ljust(12) + "".join(c.rjust(16) for c in cells), flush=True)
            means /= len(draws)
            print(f"{count:5d} mean".ljust(12) + "".join(f"{v:.3f} / {h:.3f}".rjust(16) for v, h in means), flush=True)


def main() -> None:
    """Parse the arguments, run every cell, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--basis-report", action="store_true")
    parser.add_argument("--feature-blocks", action="store_true", help="the auto plan on every block's features")
    parser.add_argument("--image-size", type=int, default=64, help="--feature-blocks, --public-counts: 64 or 224 px")
    parser.add_argument("--public-counts", type=int, nargs="+", help="the auto plan per count of public images")
    parser.add_argument("--draws", type=int, nargs="+", default=[17, 18, 19, 20], help="--public-counts' seeds")
    args = parser.parse_args()
    if args.public_counts:
        public_count_report(args.data, args.epsilons, args.seeds, args.image_size, args.public_counts, args.draws)
        return
    if args.basis_report:
        basis_report(args.seeds[0])
        return
    if args.feature_blocks:
        feature_block_report(args.data, args.epsilons, args.seeds, args.image_size)
        return
    public = synthetic_features()
    results: dict = {}
    for name in args.data:
        for seed in args.seeds:
            fed = federated_features(name, seed=seed)
            for eps in args.epsilons:
                for method in args.methods:
                    rng = np.random.default_rng([seed, int(10 * eps), METHODS.index(method), 17])
                    if method == METHODS[0]:
                        pred = run_dp_sgd_defaults(fed, eps, rng)
                    elif method == METHODS[1]:
                        pred = run_closed_form_defaults(fed, eps, rng)
                    elif method == METHODS[2]:
                        pred, reason = run_auto(fed, eps, rng, public)
                        if seed == args.seeds[0]:
                            print(f"{name} eps {eps:g}: {reason}", flush=True)
                    else:
                        pred = run_closed_form_public(fed, eps, rng, public)
                    cell = results.setdefault((name, method, eps), {"acc": [], "bal": []})
                    cell["acc"].append(float(np.mean(pred == fed.test_y)))
                    cell["bal"].append(_balanced(fed.test_y, pred))
        results[(name, "majority")] = float(np.max(np.bincount(fed.test_y)) / len(fed.test_y))
        results[(name, "test-size")] = len(fed.test_y)
    width = 14
    print(
        f"\nheld-out accuracy, mean±standard error over seeds {args.seeds}; per-site epsilon at delta {DELTA:g}, "
        "each site adds its own noise"
    )
    for name in args.data:
        _, sites = DATASETS[name]
        print(f"\n{name} ({sites} iid sites, held-out majority rate {results[(name, 'majority')]:.3f})")
        print("method".ljust(28) + "".join(f"eps {e:g}".rjust(width) for e in args.epsilons))
        for method in args.methods:
            print(
                method.ljust(28) + "".join(_cell(results[(name, method, e)]["acc"]).rjust(width) for e in args.epsilons)
            )
        if name == "breast":
            for method in args.methods:
                print(
                    f"  balanced acc. {method}".ljust(28)
                    + "".join(_cell(results[(name, method, e)]["bal"]).rjust(width) for e in args.epsilons)
                )
        print(
            "target".ljust(28)
            + "".join(
                (f">= {TARGETS[(name, e)]:.2f}" if (name, e) in TARGETS else "-").rjust(width) for e in args.epsilons
            )
        )
        if name == "breast" and 3.0 in args.epsilons:
            acc = results[(name, "auto (dp-gd)", 3.0)]["acc"] if "auto (dp-gd)" in args.methods else []
            if acc:
                n_test = results[(name, "test-size")]
                maj = results[(name, "majority")]
                binomial = math.sqrt(maj * (1 - maj) / n_test)
                seeds_se = np.std(acc, ddof=1) / math.sqrt(len(acc)) if len(acc) > 1 else float("nan")
                print(
                    f"breast eps 3, auto: {np.mean(acc):.3f} - majority {maj:.3f} = {np.mean(acc) - maj:+.3f}; "
                    f"2 SE over seeds {2 * seeds_se:.3f}, 2 binomial SE of one test set {2 * binomial:.3f}"
                )


if __name__ == "__main__":
    os.environ.setdefault("FEDTL_HOME", str(Path.home() / ".cache" / "fedtl"))
    main()
