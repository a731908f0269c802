"""The secure DP-SGD head solver: distributed DP-FedSGD, every step's head gradient through the secure sum.

`head-solver = "secure-dp-sgd"` turns `secure-aggregation` on. Every step the server sends the current head; each
site draws a Poisson sample of its cached features at the public sample rate q, sums the per-example gradients
clipped to max-grad-norm C, quantises the sum and adds 1 / t of the Skellam noise (client/secure_releases.py,
release "head-gradient"); the secure sum (server/secagg.py) gives the server only the total over the sites in it,
which carries one curator's noise sigma C as long as at least t of them are honest. The server divides the total
by the expected total batch, sum_i q N_i (public), and takes a gradient step. Between rounds it records the
round's central scores; there is no FedAvg (the server owns the one head).

Accounting, per site (the ledger record of each step says it): one Skellam release per step (Agarwal et al. 2021,
Thm 3.5, integer RDP orders) of noise multiplier sigma on the site's quantised sum, integer L2 sensitivity = the
quantisation scale gamma and L1 sensitivity sqrt(d) gamma (one example's clipped, quantised gradient row), on a
Poisson sample at q (Zhu & Wang 2019, Thm 6: the general subsampling bound; q = 1 is the release itself),
composed over the run's steps, all under the assumption "at least t of the n sites of each sum are honest"
(`honest_sites` / `num_sites` in each record). Without that assumption a site's guarantee is its own share's,
noise sigma / sqrt(t) (`epsilon-if-alone` in summary.json and the model card).

The schedule, from public quantities only (target epsilon and delta, the sites' example counts, the feature dim,
the classes, t): the auto plan's rules (shared/dp_heads.py) with the secure sum's noise, eta = sigma_1 sqrt(n / t)
/ N instead of sigma_1 sqrt(n) / N (sigma_1: the noise of one release spending the budget): the public projection's
width k, its clip MAX_GRAD_NORM, lr x steps x clip = min(LOGIT_NOISE / eta, MAX_LR_STEPS), the configured rounds
of ceil(STEPS / rounds) full-batch steps, and the step noise sigma from the secure closed form's own planner
(server/secure_releases.plan_secure_noise), the smallest that keeps all the steps within target epsilon. q is 1
(full batches, as the auto plan: its lab found Poisson rates 0.1 and 0.25 no better); the site's release and the
accountant also take q < 1 (tests).
The k-dim centre: by the auto plan's public rule (noise sigma_1 / sqrt(CENTER_SHARE), released when its expected
noise norm in the pooled mean is at most MAX_CENTER_NOISE_NORM), one secure sum of the sites' projected features
(release "feature-sum" with the projection sent, ledger kind `secagg-feature-sum`), planned into the steps' noise;
otherwise the public synthetic centre. Non-image backbones: a linear head on the full features.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.app import Array, ArrayRecord

from fedtl.server.report import reply_site_name
from fedtl.server.secagg import SecureSumResult, secure_sum
from fedtl.server.secure_releases import FEATURE_SUM, centre_sensitivities, secure_noise, skellam_step, trust_record
from fedtl.server.solvers.auto import HEAD_PLAN, plan_record, planned_config, public_basis, site_counts
from fedtl.server.solvers.base import Federation, PlanInputs, RunPlan, SolverResult
from fedtl.shared import constants as k
from fedtl.shared import dp_heads
from fedtl.shared.backbones import get_backbone_spec
from fedtl.shared.config import RunConfig
from fedtl.shared.dataset import IMAGES
from fedtl.shared.distributed_noise import quantization_shrink
from fedtl.shared.errors import ConfigError, FederationError
from fedtl.shared.heads import PROJECTED
from fedtl.shared.privacy import PrivacyStep, compute_epsilon, find_noise_multiplier
from fedtl.shared.secure_dp_sgd import split_gradient
from fedtl.shared.secure_sum import feature_sum_scale, feature_sum_sensitivities, read_feature_sum

log = logging.getLogger(__name__)
progress = logging.getLogger("fedtl.progress")

HEAD_GRADIENT = "head-gradient"  # client/secure_releases.RELEASES
SAMPLE_RATE = 1.0  # full batches (module docstring)
SECURE_DP_FEDSGD = "secure-dp-sgd"  # the plan's method, recorded in config.json and summary.json
MECHANISM = (
    "distributed DP-FedSGD: per step, Skellam noise (Agarwal et al. 2021) on the sites' quantised sums of clipped "
    "per-example gradients under SecAgg+ secure aggregation (Bell et al. 2020), Poisson-sampled (Zhu & Wang 2019)"
)


def gradient_dim(projection_dim: int, feature_dim: int, num_classes: int) -> int:
    """Return the entries of one head gradient: C k for a projected head (its bias is held), else C (D + 1)."""
    return num_classes * projection_dim if projection_dim else num_classes * (feature_dim + 1)


def gradient_sensitivities(dim: int):  # type: ignore[no-untyped-def]
    """Return noise multiplier -> (L2, L1) integer sensitivities of a head-gradient release of `dim` entries."""
    return lambda sigma: feature_sum_sensitivities(dim, feature_sum_scale(sigma))


def plan_secure_dp_sgd(
    cfg: RunConfig,
    site_sizes: list[int],
    *,
    feature_dim: int,
    num_classes: int,
    honest_sites: int,
    project: bool,
    sample_rate: float = SAMPLE_RATE,
) -> dp_heads.HeadPlan:
    """Return the secure DP-SGD schedule for these public inputs (module docstring).

    `cfg` gives target epsilon and delta, the rounds, and a fixed `noise-multiplier` or a non-private run.

    Raises:
        ConfigError: no sites, a site without examples, t outside [1, n], or rounds < 1.
        PrivacyBudgetError: no noise meets target epsilon.
    """
    sizes, local_steps, steps = dp_heads.dp_gd_schedule(site_sizes, cfg.num_rounds)
    if not 1 <= honest_sites <= len(sizes):
        raise ConfigError(f"`secagg-honest-sites` must be in [1, {len(sizes)}] once resolved, got {honest_sites}")
    total = sum(sizes)
    one = (
        0.0
        if cfg.non_private
        else find_noise_multiplier(
            target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta, sample_rate=1.0, steps=1
        )
    )
    # Every site adds 1 / t of the variance, so a sum of all n carries n / t curators' noise (t = n: one).
    spread = math.sqrt(len(sizes) / honest_sites)
    eta = one * spread / total
    k_dim = dp_heads.choose_projection_dim(eta, feature_dim=feature_dim) if project else 0
    # The k-dim centre, securely summed, by the auto plan's public rule (shared/dp_heads.plan_dp_head, step 3):
    # released at noise one / sqrt(CENTER_SHARE) when its expected noise norm is at most MAX_CENTER_NOISE_NORM.
    centre_sigma = one / math.sqrt(dp_heads.CENTER_SHARE)
    centre_noise = centre_sigma * spread * math.sqrt(k_dim) / total
    release_centre = bool(k_dim) and centre_noise <= dp_heads.MAX_CENTER_NOISE_NORM
    history = (
        [skellam_step(centre_sigma, centre_sensitivities(k_dim))] if release_centre and not cfg.non_private else []
    )
    sensitivities = gradient_sensitivities(gradient_dim(k_dim, feature_dim, num_classes))
    sigma = secure_noise(cfg, sensitivities, sample_rate=sample_rate, steps=steps, history=history)
    released = skellam_step(sigma, sensitivities, sample_rate=sample_rate, steps=steps) if sigma > 0 else None
    epsilon = compute_epsilon([*history, released], delta=cfg.target_delta) if released is not None else math.inf
    lr_steps = dp_heads.lr_times_steps(eta)
    width = f"the top {k_dim} public synthetic-image directions" if k_dim else f"all {feature_dim} features"
    centre_text = (
        f"the {k_dim}-dim feature centre is securely summed at noise {centre_sigma:.2f} (expected noise norm "
        f"{centre_noise:.3f} <= {dp_heads.MAX_CENTER_NOISE_NORM})"
        if release_centre
        else "the centre is the public synthetic one"
    )
    reason = (
        f"secure DP-FedSGD: {len(sizes)} sites, {total} examples, {num_classes} classes, at least {honest_sites} "
        f"honest assumed: one curator's noise {one:.2f} leaves eta = {eta:.4f} per coordinate of the pooled mean; "
        f"the head reads {width}; {centre_text}; {steps} steps ({cfg.num_rounds} rounds of {local_steps}) at "
        f"sample rate {sample_rate:g}, "
        f"noise {sigma:.2f} on the secure sum, clip {dp_heads.MAX_GRAD_NORM:g}, learning rate "
        f"{dp_heads.plan_learning_rate(eta, steps):.3g} (lr x steps x clip = {lr_steps:.0f}); "
        f"planned epsilon {epsilon:.3f} per site"
    )
    return dp_heads.HeadPlan(
        SECURE_DP_FEDSGD,
        k_dim,
        centre_sigma if release_centre else None,  # None: the public synthetic centre, no release
        sigma,
        steps,
        local_steps,
        dp_heads.plan_learning_rate(eta, steps),
        dp_heads.MAX_GRAD_NORM,
        eta,
        epsilon,
        reason,
        sample_rate=sample_rate,
        honest_sites=honest_sites,
    )


def projection_applies(cfg: RunConfig) -> bool:
    """Return whether the head reads the public projection: an image backbone wider than the smallest k."""
    spec = get_backbone_spec(cfg.backbone)
    return spec.kind == IMAGES and spec.feature_dim > min(dp_heads.PROJECTION_DIMS)


class SecureDpSgdSolver:
    """Distributed DP-FedSGD on a linear head through the secure sum (module docstring)."""

    def __init__(self) -> None:
        self.head_plan: dp_heads.HeadPlan | None = None

    @staticmethod
    def configure(cfg: RunConfig) -> RunConfig:
        """Return the config with secure aggregation on, the step schedule's fixed part and no feature centre.

        Raises:
            ConfigError: the run asks for what a server-side gradient step on one linear head cannot do.
        """
        unsupported = {
            "trainable-blocks / lora-rank (deeper fine-tuning)": cfg.trainable_blocks or cfg.lora_rank,
            f"personalization = {cfg.personalization!r}": cfg.personalization != "none",
            'head = "mlp"': cfg.head == "mlp",
            f"client-dp = {cfg.client_dp!r}": cfg.client_dp != "off",
            "resume": bool(cfg.resume),
        }
        asked = [name for name, on in unsupported.items() if on]
        if asked:
            raise ConfigError(
                f'head-solver "secure-dp-sgd" trains one linear head by secure gradient steps; it cannot take '
                f'{", ".join(asked)}. Leave those keys at their defaults, or use head-solver "dp-sgd"'
            )
        return cfg.replace(
            secure_aggregation=True,
            local_epochs=math.ceil(dp_heads.STEPS / cfg.num_rounds),
            max_grad_norm=dp_heads.MAX_GRAD_NORM,
            feature_centering=False,
        )

    def plan(self, cfg: RunConfig, inputs: PlanInputs) -> RunPlan:
        """Ask every site its training-example count (public) and plan the schedule from public quantities.

        Raises:
            FederationError: fewer than two sites (or min-train-sites) said how many examples they hold.
        """
        counts, setup = site_counts(cfg, inputs, least=2, what="a secure DP-SGD plan")
        sizes = [counts[n] for n in sorted(counts)]
        honest = cfg.secagg_honest_sites or len(sizes)
        if honest > len(sizes):
            raise FederationError(
                f"secagg-honest-sites = {honest} but only {len(sizes)} sites take part; lower it (0: all sites)"
            )
        plan = plan_secure_dp_sgd(
            cfg,
            sizes,
            feature_dim=inputs.backbone.feature_dim,
            num_classes=len(inputs.label_names),
            honest_sites=honest,
            project=projection_applies(cfg),
        )
        self.head_plan = plan
        planned = planned_config(cfg, plan, sizes, head=PROJECTED if plan.projection_dim else "linear")
        progress.info("head-solver secure-dp-sgd: %s", plan.reason)
        return RunPlan(planned, setup, {HEAD_PLAN: plan_record(plan, setup, counts)})

    @staticmethod
    def _secure_centre(
        fed: Federation, projection: np.ndarray, plan: dp_heads.HeadPlan
    ) -> tuple[np.ndarray, list[PrivacyStep]]:
        """Return the k-dim centre from the sites' securely summed projected features, and its release as charged.

        Raises:
            FederationError: fewer than min-train-sites (at least one) sites are in the secure sum.
        """
        sigma = 0.0 if fed.cfg.non_private else float(plan.center_noise_multiplier or 0.0)
        dim = plan.projection_dim
        result = _summed(fed, FEATURE_SUM, dim, plan, sigma, {"projection": projection}, {}, what="the centre's")
        scale = feature_sum_scale(sigma)
        shrink = quantization_shrink(dim, scale)
        count = sum(int(r.content.metric_records[k.METRICS][k.NUM_EXAMPLES]) for r in result.replies.values())
        centre = read_feature_sum(result.total, scale, shrink) / count  # (k,)
        # Each of the summed sites added variance (sigma gamma)^2 / t, in units of gamma c per coordinate.
        noise = sigma * math.sqrt(len(result.replies) / result.honest_sites * dim) / shrink / count
        progress.info(
            "head-solver secure-dp-sgd: %d-dim centre from a secure sum of %d sites, %d examples (noise %.2f, "
            "expected noise norm %.3f)",
            dim,
            len(result.replies),
            count,
            sigma,
            noise,
        )
        history = [skellam_step(sigma, centre_sensitivities(dim))] if sigma > 0 else []
        return centre.astype(np.float32), history

    def fit(self, fed: Federation) -> SolverResult:
        """Run every step's secure sum and gradient step; record each round's central scores and the trust record."""
        plan = self.head_plan
        assert plan is not None, "plan() runs before fit()"
        cfg, arrays = fed.cfg, dict(fed.initial)
        history: list[PrivacyStep] = []  # the centre's release, as the trust record accounts it
        if plan.projection_dim:
            arrays["projection"], arrays["center"], _ = public_basis(fed.backbone, cfg)  # image backbones only
            if plan.center_noise_multiplier is not None:
                arrays["center"], history = self._secure_centre(fed, arrays["projection"], plan)
        weight = arrays["layers.0.weight"].astype(np.float64)
        bias = arrays["layers.0.bias"].astype(np.float64)
        num_classes, dim = weight.shape
        fit_bias = not plan.projection_dim  # a projected head's bias is held (shared/heads.py)
        length = gradient_dim(plan.projection_dim, dim, num_classes)
        sensitivities = gradient_sensitivities(length)
        sigma = plan.noise_multiplier
        scale = feature_sum_scale(sigma)
        shrink = quantization_shrink(length, scale)
        step, result = 0, None
        for server_round in range(1, plan.num_rounds + 1):
            for _ in range(plan.local_steps):
                step += 1
                sent = {
                    **arrays,
                    "layers.0.weight": weight.astype(np.float32),
                    "layers.0.bias": bias.astype(np.float32),
                }
                values = {k.SECAGG_STEP: step, k.SECAGG_SAMPLE_RATE: float(plan.sample_rate)}
                result = _summed(fed, HEAD_GRADIENT, length, plan, sigma, sent, values, what=f"step {step}'s")
                counts = [int(r.content.metric_records[k.METRICS][k.NUM_EXAMPLES]) for r in result.replies.values()]
                batch = plan.sample_rate * sum(counts)  # expected, public: the estimate stays unbiased
                total = read_feature_sum(result.total, scale, shrink) * plan.max_grad_norm
                grad_w, grad_b = split_gradient(total, num_classes=num_classes, dim=dim, fit_bias=fit_bias)
                weight = weight - plan.learning_rate * grad_w / batch
                bias = bias - plan.learning_rate * grad_b / batch
                for reply in result.replies.values():
                    metrics = reply.content.metric_records[k.METRICS]
                    fed.recorder.site_epsilon[reply_site_name(reply)] = float(metrics[k.EPSILON])
                    fed.recorder.site_delta[reply_site_name(reply)] = float(metrics[k.DELTA])
            arrays["layers.0.weight"], arrays["layers.0.bias"] = weight.astype(np.float32), bias.astype(np.float32)
            record = ArrayRecord({name: Array(np.asarray(v, dtype=np.float32)) for name, v in arrays.items()})
            fed.recorder.finish_round(server_round, fed.central(record) if fed.central is not None else None)
        assert result is not None
        fed.recorder.trust.update(
            trust_record(
                cfg,
                result,
                sigma=sigma,
                sigma_centre=plan.center_noise_multiplier,
                history=history,
                sensitivities=sensitivities,
                sample_rate=plan.sample_rate,
                steps=plan.steps,
            )
        )
        fed.recorder.trust["mechanism"] = MECHANISM
        fed.recorder.trust["steps"] = plan.steps
        fed.recorder.trust["sample-rate"] = plan.sample_rate
        return SolverResult(ArrayRecord({name: Array(np.asarray(v, dtype=np.float32)) for name, v in arrays.items()}))


def _summed(
    fed: Federation,
    release: str,
    length: int,
    plan: dp_heads.HeadPlan,
    sigma: float,
    arrays: dict[str, np.ndarray],
    values: dict[str, int | float],
    *,
    what: str,
) -> SecureSumResult:
    """Return one secure sum of `release` over the run's sites, with `arrays` and `values` sent in its request.

    Raises:
        FederationError: fewer than min-train-sites (at least one) sites are in the sum.
    """
    result = secure_sum(
        fed.grid,
        fed.node_ids,
        fed.config,
        release=release,
        length=length,
        honest_sites=plan.honest_sites,
        noise_multiplier=sigma,
        arrays=ArrayRecord({name: Array(np.asarray(v, dtype=np.float32)) for name, v in arrays.items()}),
        values=values,
        timeout=fed.cfg.round_timeout,
    )
    if len(result.replies) < max(fed.cfg.min_train_sites, 1):
        raise FederationError(
            f"only {len(result.replies)} sites are in {what} secure sum (min-train-sites {fed.cfg.min_train_sites})"
        )
    return result
