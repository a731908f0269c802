"""Run records on the server: screened replies, per-site metrics, `metrics.jsonl` and the final table."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedtl.shared import constants as k
from fedtl.shared.files import atomic_write_bytes
from fedtl.shared.protocol import jsonable

log = logging.getLogger(__name__)
progress = logging.getLogger("fedtl.progress")  # one line per round; the CLI shows it (simulate, sweep)

UPDATE_NORM = "update-norm"  # recorded per site: L2 norm of its head update this round
RELATIVE_NORM_LIMIT = 10.0


@dataclass
class RunRecorder:
    """Collects what each round produced and appends one JSON line per round to `metrics.jsonl`.

    `expected_arrays` maps each head tensor name to its (shape, dtype); a training reply whose
    ArrayRecord differs in any name, shape or dtype, holds NaN/Inf, changes a frozen tensor
    (`frozen_arrays`, e.g. the feature centre), or moves the head implausibly far (see
    `max_update_norm`) is rejected before averaging, and so is a site's refusal.
    """

    run_dir: Path
    expected_arrays: dict[str, tuple[tuple[int, ...], str]]
    non_private: bool = False
    frozen_arrays: tuple[str, ...] = ()
    # Largest accepted L2 norm of (site head - global head) over all tensors; 0: at most
    # RELATIVE_NORM_LIMIT x the median of the round's updates, when at least 3 sites answered.
    max_update_norm: float = 0.0
    site_epsilon: dict[str, float] = field(default_factory=dict)
    site_delta: dict[str, float] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    _round: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    _global: dict[str, np.ndarray] = field(default_factory=dict)
    node_names: dict[int, str] = field(default_factory=dict)  # node id -> site name, from the set-up queries
    # Client-level DP (server/client_dp.py): its report keys, written in every round line and the summary, and
    # the sample rate of every noised round (its accountant's history, kept for resumed runs). Empty when off.
    client_dp: dict[str, Any] = field(default_factory=dict)
    client_dp_sample_rates: list[float] = field(default_factory=list)
    num_rounds: int = 0  # for the progress line "round r/N"
    _round_started: float = field(default_factory=time.monotonic)
    # Secure aggregation (server/secure_releases.py): the trust assumption each securely summed release holds
    # under, for the summary and the model card. Empty when off.
    trust: dict[str, Any] = field(default_factory=dict)
    _sent_messages: list[Message] = field(default_factory=list)  # this round's training messages

    def expect_replies(self, messages: list[Message]) -> None:
        """Remember this round's training messages, to name the sites that never answer.

        Flower's Grid sets each message's id when it sends it, so they are read at screening time.
        """
        self._sent_messages = list(messages)

    def set_global_arrays(self, arrays: ArrayRecord) -> None:
        """Remember the global head sent this round: updates are measured against it."""
        self._global = {name: arr.numpy() for name, arr in arrays.items()}

    def state(self) -> dict[str, Any]:
        """Return what a checkpoint needs to continue these records (JSON-able)."""
        return jsonable(
            {
                "site-epsilon": self.site_epsilon,
                "site-delta": self.site_delta,
                "rejected": self.rejected,
                "history": self.history,
                "client-dp": self.client_dp,
                "client-dp-sample-rates": self.client_dp_sample_rates,
            }
        )

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the records saved by `state` (a resumed run)."""
        self.site_epsilon = {k_: float(v) for k_, v in state.get("site-epsilon", {}).items()}
        self.site_delta = {k_: float(v) for k_, v in state.get("site-delta", {}).items()}
        self.rejected = list(state.get("rejected", []))
        self.history = list(state.get("history", []))
        self.client_dp = dict(state.get("client-dp", {}))
        self.client_dp_sample_rates = [float(q) for q in state.get("client-dp-sample-rates", [])]
        # Rounds that finished after the checkpoint was written (a crash between the two) are redone.
        text = "".join(_metrics_line(line) for line in self.history)
        atomic_write_bytes(self.metrics_path, text.encode())

    @property
    def metrics_path(self) -> Path:
        """Return the path of the per-round metrics file."""
        return Path(self.run_dir) / "metrics.jsonl"

    def screen_train(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Return the acceptable training replies and record each site's metrics; log the rest."""
        sent = self._sent_messages
        destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
        answered = {_node_of(m, destinations) for m in replies}
        for node_id in sorted({m.metadata.dst_node_id for m in sent} - answered):
            self.reject(server_round, self._name_of(node_id), "no reply within round-timeout")
        self._sent_messages = []
        candidates = []
        sites = self._round.setdefault("sites", {})
        for name, msg in self._answered(server_round, replies, destinations):
            problem = self._check_train_reply(msg)
            if problem:
                self.reject(server_round, name, problem)
            else:
                candidates.append((name, msg, self._update_norm(msg)))
        limit = self._norm_limit([norm for _, _, norm in candidates])
        kept = []
        for name, msg, norm in candidates:
            if norm > limit:
                self.reject(
                    server_round,
                    name,
                    f"implausible update: the head moved by L2 norm {norm:.4g} > limit {limit:.4g} "
                    f"({'max-update-norm' if self.max_update_norm else f'{RELATIVE_NORM_LIMIT:g}x the round median'})",
                )
                continue
            metrics = dict(next(iter(msg.content.metric_records.values())))
            metrics[UPDATE_NORM] = norm
            sites.setdefault(name, {})["train"] = metrics
            self.site_epsilon[name] = float(metrics[k.EPSILON])
            self.site_delta[name] = float(metrics[k.DELTA])
            kept.append(msg)
        eps = {n: s["train"][k.EPSILON] for n, s in sites.items() if "train" in s}
        if eps:
            log.info(
                "round %d epsilon per site (cumulative): %s; max %.3f",
                server_round,
                ", ".join(f"{n}={e:.3f}" for n, e in sorted(eps.items())),
                max(eps.values()),
            )
        return kept

    def _update_norm(self, msg: Message) -> float:
        """Return the L2 norm of (reply head - global head) over all tensors (0 before any global is set)."""
        if not self._global:
            return 0.0
        arrays = next(iter(msg.content.array_records.values()))
        total = 0.0
        for name, arr in arrays.items():
            diff = arr.numpy().astype(np.float64) - self._global[name].astype(np.float64)
            total += float(np.sum(diff * diff))
        return math.sqrt(total)

    def _norm_limit(self, norms: list[float]) -> float:
        if self.max_update_norm > 0:
            return self.max_update_norm
        if self.client_dp:
            # Under client-level DP clipping bounds every site's influence; a limit relative to the other
            # sites' updates would make one site's rejection depend on another's data, breaking the C / m
            # sensitivity the noise is calibrated to.
            return math.inf
        if len(norms) >= 3:
            return RELATIVE_NORM_LIMIT * float(np.median(norms))
        return math.inf

    def screen_evaluate(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Return the evaluation replies that carry metrics and record each site's scores."""
        kept = []
        sites = self._round.setdefault("sites", {})
        for name, msg in self._answered(server_round, replies):
            if len(msg.content.metric_records) != 1:
                self.reject(server_round, name, "evaluation reply without exactly one MetricRecord")
                continue
            metrics = dict(next(iter(msg.content.metric_records.values())))
            if k.NUM_EXAMPLES not in metrics:
                self.reject(server_round, name, f"evaluation reply lacks `{k.NUM_EXAMPLES}`")
                continue
            sites.setdefault(name, {})["evaluate"] = metrics
            kept.append(msg)
        return kept

    def finish_round(
        self,
        server_round: int,
        central: dict[str, float] | None,
        checkpoint: Callable[[], object] | None = None,
    ) -> dict[str, Any]:
        """Append the round's line (per-site, aggregate and central metrics, epsilon) to metrics.jsonl.

        `checkpoint`, when given, is called once the line is in the records and before it is written, so
        every line in metrics.jsonl has its checkpoint on disk: a run killed after a line appears resumes
        after that round.
        """
        sites = self._round.get("sites", {})
        line: dict[str, Any] = {"round": server_round, "non-private": self.non_private, "sites": sites}
        for phase in ("train", "evaluate"):
            per_site = [s[phase] for s in sites.values() if phase in s]
            if per_site:
                line[phase] = weighted_site_metrics(per_site)
        if self.site_epsilon:
            line["epsilon-per-site"] = dict(sorted(self.site_epsilon.items()))
            line["epsilon-max"] = max(self.site_epsilon.values())
        line.update(self.client_dp)  # client-level DP keys, apart from the sites' sample-level epsilon
        if central is not None:
            line["central"] = central
        self.history.append(line)
        self._report_progress(line)
        if checkpoint is not None:
            checkpoint()
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(_metrics_line(line))
        self._round = {}
        return line

    def _report_progress(self, line: dict[str, Any]) -> None:
        """Log one line for the round: held-out and site accuracy, sites that answered, epsilon, seconds."""
        now = time.monotonic()
        parts = [f"round {line['round']}/{self.num_rounds}" if self.num_rounds else f"round {line['round']}"]
        if "central" in line:
            parts.append(f"held-out accuracy {line['central'].get(k.ACCURACY, math.nan):.3f}")
        if "evaluate" in line:
            parts.append(f"site accuracy {line['evaluate'].get(k.ACCURACY, math.nan):.3f}")
        trained = sum(1 for s in line["sites"].values() if "train" in s)
        if trained:
            parts.append(f"{trained} site update(s)")
        if line.get("rejected"):
            parts.append(f"{len(line['rejected'])} rejected")
        if "epsilon-max" in line:
            parts.append(
                "epsilon max " + ("inf" if not math.isfinite(line["epsilon-max"]) else f"{line['epsilon-max']:.3f}")
            )
        parts.append(f"{now - self._round_started:.1f} s")
        self._round_started = now
        progress.info(", ".join(parts))

    def _answered(
        self, server_round: int, replies: list[Message], destinations: dict[str, int] | None = None
    ) -> list[tuple[str, Message]]:
        """Return (site name, reply) of the replies without an error; record the errors as rejections."""
        answered = []
        for msg in replies:
            node = _node_of(msg, destinations or {})
            # Named as the site introduced itself at set-up; a reply cannot take another site's name.
            name = self.node_names.get(node) or (reply_site_name(msg) if not msg.has_error() else f"node-{node}")
            if msg.has_error():
                self.reject(server_round, name, f"site error: {short_reason(msg.error.reason)}")
            elif refusal(msg) is not None:
                self.reject(server_round, name, f"refused by the site: {refusal(msg)}")
            else:
                answered.append((name, msg))
        return answered

    def _name_of(self, node_id: int) -> str:
        return self.node_names.get(node_id, f"node-{node_id}")

    def _check_train_reply(self, msg: Message) -> str | None:
        content = msg.content
        if list(content.array_records) != [k.ARRAYS] or list(content.metric_records) != [k.METRICS]:
            return (
                f"training reply must hold exactly the ArrayRecord `{k.ARRAYS}` and the MetricRecord `{k.METRICS}`, "
                f"got {list(content.array_records)} and {list(content.metric_records)}"
            )
        arrays = content.array_records[k.ARRAYS]
        if set(arrays.keys()) != set(self.expected_arrays):
            return (
                f"head tensors {sorted(arrays.keys())} differ from the expected {sorted(self.expected_arrays)}; "
                "only head tensors may be sent"
            )
        for name, arr in arrays.items():
            shape, dtype = self.expected_arrays[name]
            if tuple(arr.shape) != tuple(shape) or arr.dtype != dtype:
                return f"head tensor `{name}` is {arr.dtype}{tuple(arr.shape)}, expected {dtype}{tuple(shape)}"
            if not np.all(np.isfinite(arr.numpy())):
                return f"head tensor `{name}` contains NaN or Inf"
            if name in self.frozen_arrays and self._global and not np.array_equal(arr.numpy(), self._global[name]):
                return f"head tensor `{name}` is fixed by the server for the whole run, but the site changed it"
        metrics = content.metric_records[k.METRICS]
        expected = set(k.TRAIN_REPLY_METRICS) | ({k.TRAIN_LOSS} if self.non_private else set())
        if set(metrics) != expected:
            return f"training reply metrics {sorted(metrics)} differ from the expected {sorted(expected)}"
        for key, value in metrics.items():
            if isinstance(value, (list, bool)) or not isinstance(value, (int, float)):
                return f"metric `{key}` must be one number, got {value!r}"
            if math.isnan(value) or (key != k.EPSILON and not math.isfinite(value)):
                return f"metric `{key}` must be a finite number, got {value}"
        if not float(metrics[k.NUM_EXAMPLES]) > 0:
            return f"`{k.NUM_EXAMPLES}` must be > 0, got {metrics[k.NUM_EXAMPLES]}"
        return None

    def reject(self, server_round: int, site: str, reason: str) -> None:
        """Log and record a reply (or a missing one) that is not aggregated."""
        log.warning("round %d: reply from %s rejected, not aggregated: %s", server_round, site, reason)
        self.rejected.append({"round": server_round, "site": site, "reason": reason})
        self._round.setdefault("rejected", []).append({"site": site, "reason": reason})


def refusal(msg: Message) -> str | None:
    """Return a site's reason for refusing a request, or None when the reply is not a refusal."""
    if msg.has_error() or k.SITE not in msg.content.config_records:
        return None
    site = msg.content.config_records[k.SITE]
    if k.REFUSED not in site:
        return None
    code = site.get(k.REFUSAL_CODE)
    return f"[{code}] {site[k.REFUSED]}" if code else str(site[k.REFUSED])


def _metrics_line(line: dict[str, Any]) -> str:
    """Return one round's line of metrics.jsonl."""
    return json.dumps(jsonable(line), sort_keys=True) + "\n"


def _node_of(msg: Message, destinations: dict[str, int]) -> int:
    """Return the node a reply answers for (the SuperLink answers for a node that went offline).

    `destinations` maps the ids of the messages sent to their destination nodes.
    """
    return destinations.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)


def failure_reason(msg: Message) -> str | None:
    """Return why a reply carries no result (the site's error, or its refusal), or None for a usable reply."""
    return short_reason(msg.error.reason) if msg.has_error() else refusal(msg)


def short_reason(reason: str) -> str:
    """Return the part of a site's error that names the problem, without the runtime's traceback."""
    # Flower wraps ClientApp exceptions as "... Exception <type> occurred. Message: <text>".
    text = reason.rsplit("Message:", 1)[-1] if "Message:" in reason else reason
    return text.strip().strip("'>\"").strip()[-1000:]


def reply_site_name(msg: Message) -> str:
    if not msg.has_error() and k.SITE in msg.content.config_records:
        return str(msg.content.config_records[k.SITE].get(k.SITE_NAME, msg.metadata.src_node_id))
    return f"node-{msg.metadata.src_node_id}"


def weighted_site_metrics(per_site: list[dict[str, Any]]) -> dict[str, float]:
    """Aggregate site metrics: example-weighted means; epsilon/delta the worst site's, counts the sum."""
    weights = np.array([float(m.get(k.NUM_EXAMPLES, 0)) for m in per_site])
    out: dict[str, float] = {}
    for key in per_site[0]:
        values = np.array([float(m.get(key, math.nan)) for m in per_site])
        if key in (k.EPSILON, k.DELTA):
            out[key] = float(values.max())
        elif key in (k.NUM_EXAMPLES, k.ROUND_EPSILON_STEPS):
            out[key] = float(values.sum())
        else:
            ok = np.isfinite(values) & (weights > 0)
            out[key] = float(np.average(values[ok], weights=weights[ok])) if ok.any() else math.nan
    return out
