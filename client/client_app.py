"""The site's Flower ClientApp: decode the message, call a plain function, encode the reply.

Flower starts a fresh ClientApp process per message in deployment, so nothing here is cached in
Python globals: backbones, features and the privacy history live in the site's folders on disk.
Replies carry head tensors and scalar metrics, plus, once per run, the noised feature sum (charged).

Every request is first checked against the site's own policy; a request it does not allow, an
exhausted budget or unusable local data is answered with a refusal record naming the reason
(`refused`), which the server logs; the federation goes on with the other sites.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from fedtl.client.closed_form_site import answer_stats_query
from fedtl.client.policy import PolicyRefusal
from fedtl.client.ranking import answer_rank_query
from fedtl.client.rounds import evaluate_round, feature_sum_round, finetune_round, site_accountant, train_round
from fedtl.client.site import Site, resolve_site
from fedtl.shared import constants as k
from fedtl.shared.errors import (
    BackboneError,
    DataError,
    FingerprintMismatchError,
    PrivacyBudgetError,
    ReplyError,
)
from fedtl.shared.protocol import RoundSettings, SimulationSettings, decode

log = logging.getLogger(__name__)


def client_dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:  # type: ignore[no-untyped-def]
    """Clip the head update of a training reply as Flower's `fixedclipping_mod` does, when the server asks.

    Flower's client-side DP wrapper (client-dp = "client") sends the clipping norm in the round config;
    other messages, and training under client-dp = "off" or "server", pass through untouched, and so
    does a refusal, which carries no update (Flower's mod would turn it into an error).
    """
    config = msg.content.config_records.get(k.CONFIG)
    if msg.metadata.message_type != MessageType.TRAIN or config is None or k.CLIPPING_NORM not in config:
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error() or k.ARRAYS not in reply.content.array_records:
        return reply
    sent, trained = msg.content.array_records.get(k.ARRAYS), reply.content.array_records[k.ARRAYS]
    if sent is not None and all(np.array_equal(trained[n].numpy(), a.numpy()) for n, a in sent.items() if n in trained):
        return reply  # a zero update needs no clipping (Flower's mod would divide by its zero norm)
    return fixedclipping_mod(msg, context, lambda _msg, _context: reply)


app = ClientApp(mods=[client_dp_clipping_mod])


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Return an ArrayRecord's arrays as numpy, by name."""
    return {name: arr.numpy() for name, arr in record.items()}


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Return named numpy arrays as an ArrayRecord, keeping their names."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def _site(msg: Message, context: Context) -> Site:
    # The server always sends the simulation settings; a real site's node config takes precedence.
    config = _config(msg)
    simulation = decode(SimulationSettings, config, what="simulation config") if k.SITE_ROOT in config else None
    return resolve_site(context.node_config, simulation)


def _config(msg: Message) -> ConfigRecord:
    if k.CONFIG not in msg.content.config_records:
        raise ReplyError(f"malformed {msg.metadata.message_type} message: no `{k.CONFIG}` ConfigRecord")
    return msg.content.config_records[k.CONFIG]


def _global_arrays(msg: Message) -> dict[str, np.ndarray]:
    if k.ARRAYS not in msg.content.array_records:
        raise ReplyError(f"malformed {msg.metadata.message_type} message: no `{k.ARRAYS}` ArrayRecord")
    return arrays_to_numpy(msg.content.array_records[k.ARRAYS])


def _site_record(site: Site, settings: RoundSettings) -> ConfigRecord:
    return ConfigRecord({k.SITE_NAME: site.name, k.BACKBONE_FINGERPRINT: settings.backbone_fingerprint})


# What a site refuses with a reason the server should log by name: its policy, its budget, its data,
# or backbone weights that fail verification. Anything else is a bug and surfaces as a Flower error.
SITE_REFUSALS = (PolicyRefusal, PrivacyBudgetError, DataError, FingerprintMismatchError, BackboneError)


def _refusable(handler):  # type: ignore[no-untyped-def]
    """Turn the site's own refusals (policy, budget, data) into a reply the server can log by site name."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        site = _site(msg, context)
        try:
            return Message(content=handler(msg, site), reply_to=msg)
        except SITE_REFUSALS as exc:
            log.warning("site %s refused a %s message: %s", site.name, msg.metadata.message_type, exc)
            record = ConfigRecord({k.SITE_NAME: site.name, k.REFUSED: str(exc), k.REFUSAL_TYPE: type(exc).__name__})
            return Message(content=RecordDict({k.SITE: record}), reply_to=msg)

    return wrapper


@app.train()
@_refusable
def train(msg: Message, site: Site) -> RecordDict:
    """Train the head on the site's cached features under DP-SGD; reply with head tensors only."""
    config = _config(msg)
    settings = decode(RoundSettings, config)
    if site.policy is not None:
        site.policy.check_settings(settings, action=f"round {config[k.SERVER_ROUND]}")
    report = train_round(
        site,
        settings,
        _global_arrays(msg),
        server_round=int(config[k.SERVER_ROUND]),
        proximal_mu=float(config.get(k.PROXIMAL_MU, 0.0)),
    )
    res = report.result
    metrics = MetricRecord(
        {
            k.NUM_EXAMPLES: res.num_examples,  # declared public: it weights the average (README, privacy model)
            k.EPSILON: report.epsilon,
            k.DELTA: report.delta,
            k.ROUND_EPSILON_STEPS: res.steps,
            k.SAMPLE_RATE: res.sample_rate,
            k.NOISE_MULTIPLIER: res.noise_multiplier if res.noise_multiplier is not None else 0.0,
        }
    )
    if settings.non_private:
        # The mean training loss is computed on private examples without noise, so it is released
        # only by the non-private baseline; private runs show loss from evaluation instead.
        metrics[k.TRAIN_LOSS] = res.train_loss
    return RecordDict({k.ARRAYS: numpy_to_arrays(res.arrays), k.METRICS: metrics, k.SITE: _site_record(site, settings)})


@app.evaluate()
@_refusable
def evaluate(msg: Message, site: Site) -> RecordDict:
    """Evaluate the global head on the site's local test split.

    PRIVACY SHORTCUT: these metrics are computed on the site's private test examples without noise
    and are NOT covered by its epsilon; the server warns at run time, and `federated-evaluation =
    false` turns them off.
    """
    settings = decode(RoundSettings, _config(msg))
    if site.policy is not None:
        site.policy.check_settings(settings, action="evaluation")
        if not site.policy.release_evaluation_metrics:
            raise PolicyRefusal(
                f"site {site.name} keeps its evaluation metrics local (policy release-evaluation-metrics = false): "
                "they are not covered by its epsilon"
            )
    scores, num_examples = evaluate_round(site, settings, _global_arrays(msg))
    metrics = MetricRecord({k.NUM_EXAMPLES: num_examples, **scores})
    return RecordDict({k.METRICS: metrics, k.SITE: _site_record(site, settings)})


@app.query()
@_refusable
def query(msg: Message, site: Site) -> RecordDict:
    """Answer the server's set-up questions (is the backbone cached, install it, release the feature sum)
    and, after the last round, its request to finetune the final head locally."""
    config = _config(msg)
    action = str(config.get(k.ACTION, ""))
    handlers = {
        k.ACTION_HAS_BACKBONE: _has_backbone,
        k.ACTION_INSTALL_BACKBONE: _install_backbone,
        k.ACTION_FEATURE_SUM: _feature_sum,
        k.ACTION_FINETUNE: _finetune,
        k.ACTION_RANK: answer_rank_query,  # non-DP scalars, refused unless release-evaluation-metrics
        k.ACTION_SUFFICIENT_STATS: answer_stats_query,  # closed-form head: one noised release, charged
    }
    if action not in handlers:
        raise ReplyError(f"unknown query action {action!r}; expected one of {', '.join(handlers)}")
    settings = decode(RoundSettings, config)
    if site.policy is not None:  # checked before anything is stored or computed
        site.policy.check_settings(settings, action=f"the {action} request of run {settings.run_id}")
    return handlers[action](msg, config, site)


def _backbone_reply(site: Site, fingerprint: str, received: int = 0) -> RecordDict:
    releases = site.policy.release_evaluation_metrics if site.policy is not None else True
    record = ConfigRecord(
        {
            k.SITE_NAME: site.name,
            k.HAS_BACKBONE: site.backbones.has(fingerprint),
            k.BYTES_RECEIVED: received,
            k.RELEASES_EVALUATION: releases,
        }
    )
    return RecordDict({k.SITE: record})


def _has_backbone(msg: Message, config: ConfigRecord, site: Site) -> RecordDict:
    return _backbone_reply(site, str(config[k.BACKBONE_FINGERPRINT]))


def _install_backbone(msg: Message, config: ConfigRecord, site: Site) -> RecordDict:
    """Verify the received weights against the announced fingerprint, then store them."""
    name, fingerprint = str(config[k.BACKBONE_NAME]), str(config[k.BACKBONE_FINGERPRINT])
    if k.BACKBONE_ARRAYS not in msg.content.array_records:
        raise ReplyError(f"install-backbone message carries no `{k.BACKBONE_ARRAYS}` ArrayRecord")
    record = msg.content.array_records[k.BACKBONE_ARRAYS]
    received = record.count_bytes()
    path = site.backbones.install(name, fingerprint, record.to_torch_state_dict())
    log.info("site %s: installed backbone %s %s (%d bytes) at %s", site.name, name, fingerprint[:12], received, path)
    return _backbone_reply(site, fingerprint, received)


def _feature_sum(msg: Message, config: ConfigRecord, site: Site) -> RecordDict:
    """Release the noised sum of the site's normalised features (charged to its budget first)."""
    settings = decode(RoundSettings, config)
    total, count = feature_sum_round(site, settings, noise_multiplier=float(config[k.CENTERING_NOISE_MULTIPLIER]))
    epsilon = site.ledger.epsilon(delta=settings.target_delta, accountant=site_accountant(site, settings))
    return RecordDict(
        {
            k.ARRAYS: numpy_to_arrays({k.FEATURE_SUM: total}),
            k.METRICS: MetricRecord({k.NUM_EXAMPLES: count, k.EPSILON: epsilon}),
            k.SITE: _site_record(site, settings),
        }
    )


def _finetune(msg: Message, config: ConfigRecord, site: Site) -> RecordDict:
    """Finetune the final head locally (charged) and report both heads' test scores; the finetuned head stays here.

    PRIVACY SHORTCUT: like federated evaluation, the scores come from the site's private test examples
    without noise and are not covered by its epsilon; a site whose policy keeps evaluation metrics local
    refuses the request.
    """
    settings = decode(RoundSettings, config)
    if site.policy is not None and not site.policy.release_evaluation_metrics:
        raise PolicyRefusal(
            f"site {site.name} keeps its evaluation metrics local (policy release-evaluation-metrics = false), "
            "so it does not report finetuned scores"
        )
    report = finetune_round(site, settings, _global_arrays(msg))
    metrics = MetricRecord(
        {
            k.NUM_EXAMPLES: report.num_examples,
            k.SHARED_ACCURACY: report.shared[k.ACCURACY],
            k.PERSONALIZED_ACCURACY: report.personalized[k.ACCURACY],
            k.EPSILON: report.epsilon,
            k.DELTA: report.delta,
        }
    )
    return RecordDict({k.METRICS: metrics, k.SITE: _site_record(site, settings)})
