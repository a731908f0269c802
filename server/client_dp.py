"""Client-level DP (DP-FedAvg) through Flower's fixed-clipping DP wrappers, with an RDP accountant of our own.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models": each round, every
sampled site's head update is clipped to L2 norm C (on the server, or at the site by the ClientApp's
clipping mod), the clipped updates are averaged with equal weights over a fixed denominator of m
sampled sites, and Gaussian noise of std z * C / m is added to the mean (Flower's
`DifferentialPrivacyServerSideFixedClipping` / `...ClientSideFixedClipping`). This protects a whole
site (user-level), on top of the sample-level DP-SGD each site runs; its epsilon is reported apart
(`client-epsilon`, never mixed with the sites' `epsilon-per-site`).

Flower's own accountant for these wrappers only counts rounds without sampling amplification and
refuses any strategy whose `aggregate_train` is not FedAvg's (ours screens replies first), so the
epsilon here comes from Opacus' RDP accountant (`fedtl.shared.privacy.client_level_epsilon`).

Assumptions, logged at run time:
- Sampling: the RDP bound is for Poisson sampling at rate q = m / N; Flower samples exactly m of the
  N sites without replacement. Using the Poisson bound is the usual approximation, not a proof.
- Sensitivity: add/remove-one site with a fixed denominator m (McMahan et al.'s estimator), so one
  site moves the mean by at most C / m. Hence the mean is unweighted (weights by `num-examples` would
  let a large site move it further) and a sampled site whose reply is missing, refused or rejected
  by screening counts as a zero update: the denominator stays m and the noise stays calibrated.
  Flower's wrapper only warns when fewer than m replies arrive; the round goes on.
- Screening: only per-reply checks (keys, shapes, finiteness, the frozen centre, an absolute
  `max-update-norm`) may reject an update; the relative limit (10x the round's median) is off, since
  one site's rejection would then depend on the others' data.
- Scope: the guarantee covers the aggregated head. Per-site training and evaluation metrics, and the
  feature sums released at set-up, are per-site releases outside it (covered, where they are, by the
  sites' sample-level epsilon only).
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Iterable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from fedtl.server.report import RunRecorder, reply_site_name
from fedtl.server.screening import RecordingMixin
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError
from fedtl.shared.privacy import client_level_epsilon, client_noise_stdv

log = logging.getLogger(__name__)

# A site-clipped update may exceed C by float32 rounding of (global + clipped update); beyond this it was not clipped.
CLIPPED_NORM_TOLERANCE = 1e-5


def num_sampled_sites(cfg: RunConfig, num_sites: int) -> int:
    """Return m, the sites Flower's FedAvg samples each round out of `num_sites`: max(int(N * fraction), min)."""
    return max(int(num_sites * cfg.fraction_train), cfg.min_train_sites)


def client_dp_report(
    cfg: RunConfig, *, num_sampled_clients: int, num_sites: int, sample_rates: Sequence[float]
) -> dict[str, Any]:
    """Return the client-level DP keys of a run after the noised rounds whose sample rates are given.

    `client-sample-rate` is the largest rate of those rounds (the least amplification), m / N before any.
    """
    return {
        k.CLIENT_DP: cfg.client_dp,
        k.CLIENT_EPSILON: client_level_epsilon(
            noise_multiplier=cfg.client_noise_multiplier, sample_rates=sample_rates, delta=cfg.client_dp_delta
        ),
        k.CLIENT_DELTA: cfg.client_dp_delta,
        k.CLIENT_NOISE_MULTIPLIER: cfg.client_noise_multiplier,
        k.CLIENT_CLIPPING_NORM: cfg.client_clipping_norm,
        k.CLIENT_NOISE_STDV: client_noise_stdv(
            noise_multiplier=cfg.client_noise_multiplier,
            clipping_norm=cfg.client_clipping_norm,
            num_sampled_clients=num_sampled_clients,
        ),
        k.CLIENT_SAMPLED_SITES: num_sampled_clients,
        k.CLIENT_SAMPLE_RATE: max(sample_rates, default=num_sampled_clients / num_sites),
        k.CLIENT_DP_ROUNDS: len(sample_rates),
    }


class FixedDenominatorMean:
    """Strategy mixin (inside Flower's DP wrapper): the unweighted mean update over a fixed m sampled sites.

    new head = global + sum of the received (clipped) updates / m; a sampled site without an accepted
    reply adds a zero update (McMahan et al. 2018's fixed-denominator estimator), so one site moves the
    mean by at most C / m whatever the others do. Metrics are still aggregated by the strategy's function.
    """

    num_sampled_clients: int = 1
    _round_arrays: dict[str, np.ndarray]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):  # type: ignore[no-untyped-def]
        """Remember the global head the round starts from, then sample as the strategy does."""
        self._round_arrays = {name: a.numpy() for name, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
        """Return (global + sum of updates / m, the aggregated metrics); the global head itself without a reply.

        A round always releases its (then noised) aggregate, so whether sites replied is not revealed
        by a missing release.
        """
        valid, _ = self._check_and_log_replies(replies, is_train=True)  # type: ignore[attr-defined]
        if not valid:
            return ArrayRecord({name: Array(start) for name, start in self._round_arrays.items()}), None
        contents = [msg.content for msg in valid]
        total = {name: np.zeros(start.shape, np.float64) for name, start in self._round_arrays.items()}
        for content in contents:
            arrays = content.array_records[self.arrayrecord_key]  # type: ignore[attr-defined]
            for name, start in self._round_arrays.items():
                total[name] += arrays[name].numpy().astype(np.float64) - start
        mean = {
            name: (start + total[name] / self.num_sampled_clients).astype(start.dtype)
            for name, start in self._round_arrays.items()
        }
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)  # type: ignore[attr-defined]
        return ArrayRecord({name: Array(v) for name, v in mean.items()}), metrics


class ClientDPFedAvg(FixedDenominatorMean, FedAvg):
    """FedAvg with the unweighted fixed-denominator mean client-level DP needs."""


class ClientDPFedProx(FixedDenominatorMean, FedProx):
    """FedProx (proximal term at the sites) with the unweighted fixed-denominator mean."""


class ClientDPAccounting:
    """Between fedtl's reply screening and Flower's DP wrapper: cap the sample at m, check, account, report.

    After screening (RecordingMixin) it drops, in client-side mode, updates the site did not clip;
    lines each update's tensors up in the global head's order (Flower's server-side clipping pairs
    them by position); after Flower's wrapper has clipped, averaged and noised, it puts back the
    tensors the server fixes for the run (the feature centre: noise there would only hurt, and
    resetting it to the public value is post-processing), then charges the round to the accountant
    and writes the report keys into the run recorder.
    """

    recorder: RunRecorder
    client_dp_config: RunConfig
    num_sites: int
    num_sampled_clients: int
    clipping_norm: float
    _round_sample_rate: float = 0.0
    _round_start: dict[str, np.ndarray]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):  # type: ignore[no-untyped-def]
        """Sample as the strategy does, at most m sites; remember the round's sample rate for the accountant."""
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        if len(messages) > self.num_sampled_clients:
            # More sites connected than at the start: keep m of the random sample, so the mean's denominator,
            # and with it the noise calibration, stays m.
            log.warning(
                "round %d: %d sites sampled, client-level DP averages over m = %d; only the first %d are asked",
                server_round,
                len(messages),
                self.num_sampled_clients,
                self.num_sampled_clients,
            )
            messages = messages[: self.num_sampled_clients]
        population = len(list(grid.get_node_ids()))
        self._round_sample_rate = min(1.0, len(messages) / population) if population else 1.0
        self._round_start = {name: a.numpy() for name, a in arrays.items()}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
        """Clip (server-side mode), average over m, add noise (Flower's wrapper); then account and report."""
        kept = [self._in_global_order(msg) for msg in replies]
        if self.client_dp_config.client_dp == "client":
            kept = [msg for msg in kept if self._site_clipped(server_round, msg)]
        # A zero update adds nothing to the fixed-denominator sum, and Flower's clipping divides by its norm.
        moved = [msg for msg in kept if self._update_norm(msg) > 0]
        if len(kept) < self.num_sampled_clients:
            log.warning(
                "round %d: %d of m = %d sampled sites' updates are aggregated under client-level DP; the missing "
                "ones count as zero updates (the mean's denominator stays m, so the noise stays calibrated)",
                server_round,
                len(kept),
                self.num_sampled_clients,
            )
        arrays, metrics = super().aggregate_train(server_round, moved)  # type: ignore[misc]
        for name in self.recorder.frozen_arrays:
            if name in arrays.keys():
                arrays[name] = Array(self._round_start[name])
        rates = self.recorder.client_dp_sample_rates
        rates.append(self._round_sample_rate)
        report = client_dp_report(
            self.client_dp_config,
            num_sampled_clients=self.num_sampled_clients,
            num_sites=self.num_sites,
            sample_rates=rates,
        )
        self.recorder.client_dp = report
        log.info(
            "round %d client-level DP: noise std %.4g on the mean of %d site updates clipped to %g; "
            "client epsilon %.4f at delta %g after %d noised rounds (sample rate %.3f)",
            server_round,
            report[k.CLIENT_NOISE_STDV],
            self.num_sampled_clients,
            self.clipping_norm,
            report[k.CLIENT_EPSILON],
            report[k.CLIENT_DELTA],
            len(rates),
            self._round_sample_rate,
        )
        return arrays, metrics

    def _in_global_order(self, msg: Message) -> Message:
        """Return the reply with its head tensors in the order of the global head (screening checked the names)."""
        arrays = msg.content.array_records[k.ARRAYS]
        msg.content[k.ARRAYS] = ArrayRecord({name: arrays[name] for name in self._round_start})
        return msg

    def _update_norm(self, msg: Message) -> float:
        """Return the L2 norm of (reply head - global head) over all tensors."""
        arrays = msg.content.array_records[k.ARRAYS]
        return math.sqrt(
            sum(
                float(np.sum((arrays[name].numpy().astype(np.float64) - start.astype(np.float64)) ** 2))
                for name, start in self._round_start.items()
            )
        )

    def _site_clipped(self, server_round: int, msg: Message) -> bool:
        """Return True when the update's L2 norm is within the clipping norm; else reject it as not clipped."""
        norm = self._update_norm(msg)
        start_norm = math.sqrt(
            sum(float(np.sum(start.astype(np.float64) ** 2)) for start in self._round_start.values())
        )
        limit = self.clipping_norm * (1 + CLIPPED_NORM_TOLERANCE) + CLIPPED_NORM_TOLERANCE * start_norm
        if norm <= limit:
            return True
        name = self.recorder.node_names.get(msg.metadata.src_node_id) or reply_site_name(msg)
        self.recorder.reject(
            server_round,
            name,
            f"update L2 norm {norm:.6g} > client-clipping-norm {self.clipping_norm:g}: the site did not "
            'clip it (client-dp = "client" needs the ClientApp\'s clipping mod); counted as a zero update',
        )
        return False


class ServerSideClientDP(RecordingMixin, ClientDPAccounting, DifferentialPrivacyServerSideFixedClipping):
    """Screened, recorded client-level DP with the server clipping each update (Flower's server-side wrapper)."""


class ClientSideClientDP(RecordingMixin, ClientDPAccounting, DifferentialPrivacyClientSideFixedClipping):
    """Screened, recorded client-level DP with each site clipping its update (Flower's client-side wrapper)."""


def wrap_client_dp(strategy: FedAvg, cfg: RunConfig, *, num_sites: int | None) -> Strategy:
    """Return `strategy` under client-level DP per `cfg.client_dp`, or `strategy` itself when it is "off".

    The result is Flower's fixed-clipping DP wrapper (server- or client-side) around a copy of
    `strategy`'s settings whose mean is unweighted over a fixed m = max(int(N * fraction-train),
    min-train-sites) sites, with `strategy`'s screening and recording (RecordingMixin state) outside
    it, so rejected replies never reach the wrapper. Its epsilon is written to the run recorder.

    Args:
        strategy: a fedtl strategy from `make_strategy` (FedAvg or FedProx).
        cfg: the run configuration (`client-dp`, `client-noise-multiplier`, `client-clipping-norm`,
            `client-dp-delta`, `fraction-train`, `min-train-sites`).
        num_sites: N, the sites taking part in the run (those that accepted it at set-up).

    Raises:
        ConfigError: the strategy is FedAdam (its server step is not a mean, so z * C / m noise would not
            match its sensitivity), `num_sites` is missing, or m exceeds it.
    """
    if cfg.client_dp == "off":
        return strategy
    if isinstance(strategy, FedAdam) or not isinstance(strategy, FedAvg):
        raise ConfigError(
            f'`client-dp` = "{cfg.client_dp}" needs strategy "fedavg" or "fedprox", got strategy = "{cfg.strategy}": '
            "Flower's DP wrapper adds z * C / m noise after the inner strategy's aggregate, which matches the "
            'sensitivity of a mean only; set strategy = "fedavg" or client-dp = "off"'
        )
    if num_sites is None or num_sites < 1:
        raise ConfigError(
            f'`client-dp` = "{cfg.client_dp}" needs the number of sites N for its sample rate m / N, got {num_sites}; '
            "pass num_sites to make_strategy"
        )
    m = num_sampled_sites(cfg, num_sites)
    if m > num_sites:
        raise ConfigError(
            f"client-level DP samples m = {m} sites a round (min-train-sites {cfg.min_train_sites}) out of only "
            f"{num_sites}; lower min-train-sites to at most {num_sites}"
        )
    inner_class = ClientDPFedProx if isinstance(strategy, FedProx) else ClientDPFedAvg
    settings = [p for p in inspect.signature(inner_class.__init__).parameters if p != "self"]
    inner = inner_class(**{name: getattr(strategy, name) for name in settings})
    inner.num_sampled_clients = m
    wrapper_class = ServerSideClientDP if cfg.client_dp == "server" else ClientSideClientDP
    wrapped = wrapper_class(inner, cfg.client_noise_multiplier, cfg.client_clipping_norm, m)
    for name in RecordingMixin.__annotations__:  # the screening and recording state make_strategy set
        setattr(wrapped, name, getattr(strategy, name))
    wrapped.client_dp_config = cfg
    wrapped.num_sites = num_sites
    recorder = wrapped.recorder
    if not recorder.client_dp:  # a resumed run keeps its accountant's history
        recorder.client_dp = client_dp_report(cfg, num_sampled_clients=m, num_sites=num_sites, sample_rates=[])
    log.warning(
        'client-level DP (client-dp = "%s"): each round the mean of m = %d of N = %d sites\' head updates, each '
        "clipped to %g, gets Gaussian noise of std %.4g (z = %g). Its epsilon (client-epsilon, at delta %g) is "
        "the RDP bound for Poisson sampling at rate m / N = %.3f, the usual approximation for Flower's sampling "
        "of exactly m sites without replacement. It covers the aggregated head only: per-site metrics and the "
        "set-up feature sums are released outside it (under the sites' sample-level epsilon only)",
        cfg.client_dp,
        m,
        num_sites,
        cfg.client_clipping_norm,
        recorder.client_dp[k.CLIENT_NOISE_STDV],
        cfg.client_noise_multiplier,
        cfg.client_dp_delta,
        m / num_sites,
    )
    if cfg.client_noise_multiplier == 0:
        log.warning("client-noise-multiplier = 0: the aggregate is clipped but not noised; client epsilon is inf")
    return wrapped
