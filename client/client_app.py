"""The site's Flower ClientApp: decode the message, call a plain function, encode the reply.

Flower starts a fresh ClientApp process per message in deployment, so nothing here is cached in
Python globals: backbones, inputs at the cut and the privacy ledger live in the site's folders on disk.
Replies carry the trained tensors and scalar metrics, plus, once per run, the noised feature sum or the
closed form's noised statistics (each charged first).

Every request is first checked against the site's own policy; a request it does not allow, an
exhausted budget or unusable local data is answered with a refusal record naming the reason
(`refused`), which the server logs; the federation goes on with the other sites.

Handlers by message: `train` and `evaluate` (the DP-SGD solver's rounds, sent by Flower's strategies),
and `query` with an action (QUERY_HANDLERS): set-up, centring, ranking, and each head solver's own
requests. A new head solver's site requests are a handler here and an entry in QUERY_HANDLERS.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from fedtl.client import secagg
from fedtl.client.centering import feature_sum_round
from fedtl.client.inputs import load_site_inputs
from fedtl.client.policy import PolicyRefusal
from fedtl.client.ranking import score_site
from fedtl.client.release import ReleaseRequest, charge_release
from fedtl.client.secagg import SessionPlan
from fedtl.client.secure_releases import SecureRelease, secure_release
from fedtl.client.site import Site, keep_private, resolve_site
from fedtl.client.solvers.closed_form import sufficient_stats_round
from fedtl.client.solvers.dp_sgd import evaluate_round, finetune_round, train_round
from fedtl.shared import constants as k
from fedtl.shared.cut import Cut
from fedtl.shared.errors import FedtlError, ReplyError
from fedtl.shared.heads import check_incoming_tensor
from fedtl.shared.mechanisms import EVALUATION, FINETUNE_SCORES, RANKING, Mechanism
from fedtl.shared.protocol import RoundSettings, SimulationSettings, decode

log = logging.getLogger(__name__)


def client_dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:  # type: ignore[no-untyped-def]
    """Clip the update of a training reply as Flower's `fixedclipping_mod` does, when the server asks.

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


def _release_noise_free(
    site: Site, settings: RoundSettings, mechanism: Mechanism, server_round: int, what: str
) -> None:
    """Refuse noise-free scores unless the policy releases them; else record them within its quotas, first."""
    if site.policy is not None and not site.policy.release_evaluation_metrics:
        raise PolicyRefusal(
            f"site {site.name} keeps its evaluation metrics local (policy release-evaluation-metrics = false), "
            f"so it does not release {what}: they are not covered by its epsilon"
        )
    charge_release(site, settings, ReleaseRequest(mechanism, server_round, 0.0, 0, what, 0.0))


def _refusable(handler):  # type: ignore[no-untyped-def]
    """Turn anything that stops a site from answering into a refusal the server can log by site name.

    A real site sends the server only the error's code and its public reason (shared/errors.py): a data
    error's message names files, lines and counts, so the details go to the site's own log, never to the
    server. An unexpected exception (a bug) is refused the same way, with its traceback in the site's log
    only. A simulated site (the lab, one machine, one person) sends the whole message.
    """

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        site = _site(msg, context)
        # A real site: everything it writes is its own (0600 files, 0700 folders), for as long as it answers.
        umask = keep_private() if site.policy is not None else None
        try:
            return Message(content=handler(msg, site), reply_to=msg)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a refusal that carries no private detail
            error = exc if isinstance(exc, FedtlError) else FedtlError()
            if isinstance(exc, FedtlError):
                log.warning(
                    "site %s refused a %s message (%s): %s", site.name, msg.metadata.message_type, error.code, exc
                )
            else:
                log.exception("site %s failed on a %s message", site.name, msg.metadata.message_type)
            # A simulated site's data is the lab's own, and its operator reads the server's report: it says all.
            reason = str(exc) if site.simulation is not None and str(exc) else error.public()
            record = ConfigRecord({k.SITE_NAME: site.name, k.REFUSED: reason, k.REFUSAL_CODE: error.code})
            return Message(content=RecordDict({k.SITE: record}), reply_to=msg)
        finally:
            if umask is not None:
                os.umask(umask)

    return wrapper


def _settings(msg: Message, site: Site, action: str) -> RoundSettings:
    """Decode the run's settings and check them against the site's policy before anything is stored or computed."""
    settings = decode(RoundSettings, _config(msg))
    if site.policy is not None:
        site.policy.check_settings(settings, action=action)
    return settings


@app.train()
@_refusable
def train(msg: Message, site: Site) -> RecordDict:
    """Train the model above the cut under DP-SGD; reply with its trained tensors only."""
    config = _config(msg)
    settings = _settings(msg, site, f"round {config[k.SERVER_ROUND]}")
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
            k.NOISE_MULTIPLIER: res.noise_multiplier,
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
    """Evaluate the global model on the site's local test split.

    PRIVACY SHORTCUT: these metrics are computed on the site's private test examples without noise
    and are NOT covered by its epsilon; the server warns at run time, and `federated-evaluation =
    false` turns them off. A real site records each release first and caps their number per run and per
    24 hours (policy max-noise-free-releases-*, client/quotas.py).
    """
    settings = _settings(msg, site, "evaluation")
    _release_noise_free(site, settings, EVALUATION, int(_config(msg).get(k.SERVER_ROUND, 0)), "evaluation metrics")
    scores, num_examples = evaluate_round(site, settings, _global_arrays(msg))
    metrics = MetricRecord({k.NUM_EXAMPLES: num_examples, **scores})
    return RecordDict({k.METRICS: metrics, k.SITE: _site_record(site, settings)})


@app.query()
@_refusable
def query(msg: Message, site: Site) -> RecordDict:
    """Answer the server's requests by action (QUERY_HANDLERS), after checking the run against the policy."""
    action = str(_config(msg).get(k.ACTION, ""))
    if action not in QUERY_HANDLERS:
        raise ReplyError(f"unknown query action {action!r}; expected one of {', '.join(QUERY_HANDLERS)}")
    settings = _settings(msg, site, f"the {action} request")
    return QUERY_HANDLERS[action](msg, settings, site)


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


def _has_backbone(msg: Message, settings: RoundSettings, site: Site) -> RecordDict:
    """Say whether the run's backbone is in the site's cache (and whether the site releases evaluation metrics)."""
    return _backbone_reply(site, settings.backbone_fingerprint)


def _install_backbone(msg: Message, settings: RoundSettings, site: Site) -> RecordDict:
    """Verify the received weights against the announced fingerprint, then store them."""
    name, fingerprint = settings.backbone_name, settings.backbone_fingerprint
    if k.BACKBONE_ARRAYS not in msg.content.array_records:
        raise ReplyError(f"install-backbone message carries no `{k.BACKBONE_ARRAYS}` ArrayRecord")
    record = msg.content.array_records[k.BACKBONE_ARRAYS]
    received = record.count_bytes()
    path = site.backbones.install(name, fingerprint, record.to_torch_state_dict())
    log.info("site %s: installed backbone %s %s (%d bytes) at %s", site.name, name, fingerprint[:12], received, path)
    return _backbone_reply(site, fingerprint, received)


def _feature_sum(msg: Message, settings: RoundSettings, site: Site) -> RecordDict:
    """Release the noised sum of the site's normalised features (charged to its budget first).

    Under the auto plan the message carries the public projection (ArrayRecord `arrays`, tensor
    `projection`, (projection-dim, D)): the sum is then of the projected, clipped features.
    """
    sigma = _config(msg).get(k.CENTERING_NOISE_MULTIPLIER)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise ReplyError(f"the {k.ACTION_FEATURE_SUM} query needs a number `{k.CENTERING_NOISE_MULTIPLIER}`")
    projection = None
    record = msg.content.array_records.get(k.ARRAYS)
    if record is not None and "projection" in record:
        shape = (settings.projection_dim, Cut.of(settings).feature_dim)
        projection = check_incoming_tensor("projection", record["projection"].numpy(), shape, source="the server")
    total, count, release = feature_sum_round(site, settings, noise_multiplier=float(sigma), projection=projection)
    return RecordDict(
        {
            k.ARRAYS: numpy_to_arrays({k.FEATURE_SUM: total}),
            k.METRICS: MetricRecord({k.NUM_EXAMPLES: count, k.EPSILON: release.epsilon}),
            k.SITE: _site_record(site, settings),
        }
    )


def _count_examples(msg: Message, settings: RoundSettings, site: Site) -> RecordDict:
    """Reply with the number of the site's training examples, which the auto plan is computed from.

    The count is declared public (every training reply carries it to weight the average; README, privacy
    model), so it is no release of its own; the site loads its inputs at the cut to count them (and caches
    them for the run), and refuses like any other request when it cannot.
    """
    count = len(load_site_inputs(site, settings, cut=Cut.of(settings).at_end_cut()).train_y)
    return RecordDict({k.METRICS: MetricRecord({k.NUM_EXAMPLES: count}), k.SITE: _site_record(site, settings)})


def _rank(msg: Message, settings: RoundSettings, site: Site) -> RecordDict:
    """Reply with transferability scores (scalars) of the announced backbone on the site's features.

    PRIVACY SHORTCUT: exact scores and the example count leave the site without DP (client/ranking.py);
    refused unless the policy releases evaluation metrics, counted against its quotas (client/quotas.py), and
    logged as a warning each time.
    """
    _release_noise_free(site, settings, RANKING, 0, "transferability scores")
    result = score_site(site, settings)  # logs the shortcut, as a warning, each time
    metrics = MetricRecord({k.NUM_EXAMPLES: result.num_examples, **result.scores})
    return RecordDict({k.METRICS: metrics, k.SITE: _site_record(site, settings)})


def _finetune(msg: Message, settings: RoundSettings, site: Site) -> RecordDict:
    """Finetune the final head locally (charged) and report both heads' test scores; the finetuned head stays here.

    PRIVACY SHORTCUT: like federated evaluation, the scores come from the site's private test examples
    without noise and are not covered by its epsilon; a site whose policy keeps evaluation metrics local
    refuses the request, and the scores count against its quotas (client/quotas.py).
    """
    _release_noise_free(site, settings, FINETUNE_SCORES, settings.num_rounds + 1, "finetuned scores")
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


def _sufficient_stats(msg: Message, settings: RoundSettings, site: Site) -> RecordDict:
    """Reply with the closed form's noised statistics (float64) and the release's privacy metrics.

    The message may carry the federation's feature centre as the ArrayRecord `arrays` (tensor `center`).
    """
    center = None
    record = msg.content.array_records.get(k.ARRAYS)
    if record is not None and "center" in record:
        center = record["center"].numpy().astype(np.float32)
    release = sufficient_stats_round(site, settings, center=center)
    metrics = MetricRecord(
        {
            k.NUM_EXAMPLES: release.num_examples,
            k.EPSILON: release.epsilon,
            k.DELTA: release.delta,
            k.NOISE_MULTIPLIER: release.noise_multiplier,
        }
    )
    return RecordDict(
        {
            k.ARRAYS: numpy_to_arrays(release.stats.arrays()),
            k.METRICS: metrics,
            k.SITE: _site_record(site, settings),
        }
    )


def _wire(config: ConfigRecord, key: str, kind: type) -> object:
    """Return `config[key]`, or a list of `kind` when `kind` is list-typed in the request (ReplyError otherwise)."""
    value = config.get(key)
    if isinstance(value, list):
        if all(type(v) is kind for v in value):
            return value
    elif type(value) is kind:
        return value
    raise ReplyError(
        f"malformed secure aggregation request: `{key}` should be {kind.__name__} (or a list), got {value!r}"
    )


def _secagg_setup(msg: Message, settings: RoundSettings, site: Site) -> RecordDict:
    """Secure aggregation, stage 1: check the sum's plan against the run and the policy, reply two public keys."""
    config = _config(msg)
    plan = SessionPlan(
        session=str(_wire(config, k.SECAGG_SESSION, str)),
        run_id=settings.run_id,
        index=int(_wire(config, k.SECAGG_INDEX, int)),  # type: ignore[arg-type]
        num_sites=int(_wire(config, k.SECAGG_SITES, int)),  # type: ignore[arg-type]
        threshold=int(_wire(config, k.SECAGG_THRESHOLD, int)),  # type: ignore[arg-type]
        honest_sites=int(_wire(config, k.SECAGG_HONEST, int)),  # type: ignore[arg-type]
        release=str(_wire(config, k.SECAGG_RELEASE, str)),
    )
    if not settings.secure_aggregation:
        raise ReplyError(f"run {settings.run_id} did not announce secure-aggregation, yet a secure sum was started")
    if plan.honest_sites != (settings.secagg_honest_sites or plan.num_sites):
        raise ReplyError(
            f"the secure sum assumes {plan.honest_sites} honest sites, but the run announced secagg-honest-sites "
            f"{settings.secagg_honest_sites} over {plan.num_sites} sites"
        )
    pk1, pk2 = secagg.setup_session(site, plan)
    record = ConfigRecord({k.PUBLIC_KEY_1: pk1, k.PUBLIC_KEY_2: pk2})
    return RecordDict({k.SECAGG: record, k.SITE: _site_record(site, settings)})


def _secagg_share_keys(msg: Message, settings: RoundSettings, site: Site) -> RecordDict:
    """Secure aggregation, stage 2: reply the encrypted shares of this site's secrets, one per other site."""
    config = _config(msg)
    indices = _wire(config, k.SECAGG_INDICES, int)
    keys1, keys2 = _wire(config, k.SECAGG_PUBLIC_KEYS_1, bytes), _wire(config, k.SECAGG_PUBLIC_KEYS_2, bytes)
    if not (isinstance(indices, list) and isinstance(keys1, list) and isinstance(keys2, list)):
        raise ReplyError("malformed secure aggregation request: indices and public keys must be lists")
    if not len(indices) == len(keys1) == len(keys2):
        raise ReplyError("malformed secure aggregation request: indices and public keys differ in length")
    public_keys = {int(i): (a, b) for i, a, b in zip(indices, keys1, keys2)}
    sent = secagg.share_keys(site, str(_wire(config, k.SECAGG_SESSION, str)), public_keys)
    record = ConfigRecord({k.SECAGG_DESTINATIONS: list(sent), k.SECAGG_CIPHERTEXTS: list(sent.values())})
    return RecordDict({k.SECAGG: record, k.SITE: _site_record(site, settings)})


def _secagg_masked_input(msg: Message, settings: RoundSettings, site: Site) -> RecordDict:
    """Secure aggregation, stage 3: pay for the release, add the noise share, reply it masked (uint64)."""
    config = _config(msg)
    sources, ciphertexts = _wire(config, k.SECAGG_SOURCES, int), _wire(config, k.SECAGG_CIPHERTEXTS, bytes)
    if not (isinstance(sources, list) and isinstance(ciphertexts, list) and len(sources) == len(ciphertexts)):
        raise ReplyError("malformed secure aggregation request: sources and ciphertexts must be lists of one length")
    sigma = _wire(config, k.SECAGG_NOISE_MULTIPLIER, float)
    center = None
    record = msg.content.array_records.get(k.ARRAYS)
    if record is not None and "center" in record:
        center = record["center"].numpy().astype(np.float32)
    tensors = {name: a.numpy() for name, a in record.items()} if record is not None else {}
    step = {key: config[key] for key in (k.SECAGG_STEP, k.SECAGG_SAMPLE_RATE) if key in config}  # secure DP-SGD
    paid: list[SecureRelease] = []

    def release(plan: SessionPlan) -> np.ndarray:
        paid.append(
            secure_release(
                site,
                settings,
                plan,
                noise_multiplier=float(sigma),
                center=center,
                arrays=tensors,
                values=step,  # type: ignore[arg-type]
            )
        )
        return paid[0].values

    masked = secagg.mask_input(
        site, str(_wire(config, k.SECAGG_SESSION, str)), dict(zip(sources, ciphertexts)), release
    )
    metrics = MetricRecord(
        {
            k.NUM_EXAMPLES: paid[0].num_examples,  # declared public, as in every reply
            k.EPSILON: paid[0].release.epsilon,
            k.DELTA: paid[0].release.delta,
            k.NOISE_MULTIPLIER: paid[0].release.noise_multiplier,
        }
    )
    arrays = ArrayRecord({k.MASKED: Array(masked)})
    return RecordDict({k.SECAGG: arrays, k.METRICS: metrics, k.SITE: _site_record(site, settings)})


def _secagg_unmask(msg: Message, settings: RoundSettings, site: Site) -> RecordDict:
    """Secure aggregation, stage 4 (answered once): the shares that remove the masks; then the secrets go."""
    config = _config(msg)
    active, dropped = _wire(config, k.SECAGG_ACTIVE, int), _wire(config, k.SECAGG_DROPPED, int)
    if not (isinstance(active, list) and isinstance(dropped, list)):
        raise ReplyError("malformed secure aggregation request: active and dropped sites must be lists")
    shares = secagg.unmask(site, str(_wire(config, k.SECAGG_SESSION, str)), active=active, dropped=dropped)
    record = ConfigRecord({k.SECAGG_OWNERS: list(shares), k.SECAGG_SHARES: list(shares.values())})
    return RecordDict({k.SECAGG: record, k.SITE: _site_record(site, settings)})


QueryHandler = Callable[[Message, RoundSettings, Site], RecordDict]
QUERY_HANDLERS: dict[str, QueryHandler] = {
    k.ACTION_HAS_BACKBONE: _has_backbone,  # set-up
    k.ACTION_INSTALL_BACKBONE: _install_backbone,
    k.ACTION_COUNT_EXAMPLES: _count_examples,  # auto plan: the public training-example count
    k.ACTION_FEATURE_SUM: _feature_sum,  # centring: one noised release, charged
    k.ACTION_RANK: _rank,  # non-DP scalars, refused unless release-evaluation-metrics
    k.ACTION_FINETUNE: _finetune,  # DP-SGD solver, after the last round (personalization = "finetune")
    k.ACTION_SUFFICIENT_STATS: _sufficient_stats,  # closed-form solver: one noised release, charged
    k.ACTION_SECAGG_SETUP: _secagg_setup,  # secure aggregation (client/secagg.py): key pairs
    k.ACTION_SECAGG_SHARE_KEYS: _secagg_share_keys,  # ... encrypted secret shares
    k.ACTION_SECAGG_MASKED_INPUT: _secagg_masked_input,  # ... the release (charged), noised and masked
    k.ACTION_SECAGG_UNMASK: _secagg_unmask,  # ... shares that remove the masks, once
}
