"""Client-level DP through Flower's fixed-clipping wrappers: noise scale, unweighted mean, accountant, a real run."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtl.server.report import RunRecorder
from fedtl.server.strategy import FedtlFedAvg, make_strategy
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError
from fedtl.shared.privacy import client_level_epsilon, client_noise_stdv

SHAPES = {"center": (8,), "layers.0.weight": (10, 8), "layers.0.bias": (10,)}
HEAD = ("layers.0.weight", "layers.0.bias")


@pytest.fixture(autouse=True)
def _serverapp_identity(flower_identity):
    """Every test here builds Messages as a ServerApp would."""


class _Grid:
    """A stand-in Grid with `n` connected nodes: what configure_train needs to sample and build messages."""

    def __init__(self, n: int) -> None:
        self.nodes = list(range(1, n + 1))

    def get_node_ids(self):
        return self.nodes

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)


def _reply(sent: Message, arrays: dict[str, np.ndarray], num_examples: int, *, site: str) -> Message:
    content = RecordDict(
        {
            k.ARRAYS: ArrayRecord({name: Array(np.asarray(v, np.float32)) for name, v in arrays.items()}),
            k.METRICS: MetricRecord(
                {
                    k.NUM_EXAMPLES: num_examples,
                    k.EPSILON: 1.0,
                    k.DELTA: 1e-5,
                    k.ROUND_EPSILON_STEPS: 10,
                    k.SAMPLE_RATE: 0.1,
                    k.NOISE_MULTIPLIER: 1.0,
                }
            ),
            k.SITE: ConfigRecord({k.SITE_NAME: site}),
        }
    )
    return Message(content=content, reply_to=sent)


def _start(shapes=SHAPES, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def _strategy(tmp_path, cfg: RunConfig, *, num_sites: int, shapes=SHAPES):
    recorder = RunRecorder(
        run_dir=tmp_path, expected_arrays={n: (s, "float32") for n, s in shapes.items()}, frozen_arrays=("center",)
    )
    return make_strategy(cfg, recorder, num_sites=num_sites), recorder


def _round(strategy, start: dict[str, np.ndarray], num_sites: int, server_round: int = 1):
    """Configure one round on `num_sites` connected nodes; return the messages sent."""
    record = ArrayRecord({name: Array(v) for name, v in start.items()})
    strategy.recorder.set_global_arrays(record)
    return list(strategy.configure_train(server_round, record, ConfigRecord(), _Grid(num_sites)))


def _moved(start: dict[str, np.ndarray], rng, norm: float) -> dict[str, np.ndarray]:
    """The start head plus a random update of L2 norm `norm` over the head tensors (the centre untouched)."""
    step = {name: rng.normal(size=start[name].shape) for name in HEAD}
    scale = norm / math.sqrt(sum(float(np.sum(s**2)) for s in step.values()))
    return {name: (v + scale * step[name] if name in step else v).astype(np.float32) for name, v in start.items()}


def _oracle_epsilon(z: float, rates: list[float], delta: float) -> float:
    """Opacus' RDP analysis, summed over rounds, at its accountant's default orders."""
    if not rates:
        return 0.0
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(compute_rdp(q=q, noise_multiplier=z, steps=1, orders=orders) for q in rates)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def test_noise_added_by_the_server_side_wrapper_has_std_z_c_over_m(tmp_path):
    z, clip, num_sites = 1.3, 0.7, 8
    shapes = {"center": (8,), "layers.0.weight": (50, 400), "layers.0.bias": (50,)}
    cfg = RunConfig(client_dp="server", client_noise_multiplier=z, client_clipping_norm=clip, fraction_train=0.5)
    strategy, recorder = _strategy(tmp_path, cfg, num_sites=num_sites, shapes=shapes)
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    start = _start(shapes)
    sent = _round(strategy, start, num_sites)
    m = num_sites // 2
    assert len(sent) == m
    # Known inputs: two updates of norm 0.3 < C (left as they are by clipping) and two zero updates (the global
    # head sent back; Flower's own clipping would divide by their zero norm). Aggregate minus the exact mean is noise.
    rng = np.random.default_rng(4)
    heads = [_moved(start, rng, 0.3), _moved(start, rng, 0.3), start, start]
    np.random.seed(0)  # Flower draws its noise from numpy's global generator
    arrays, _ = strategy.aggregate_train(
        1, [_reply(msg, h, 10 * (i + 1), site=f"s{i}") for i, (msg, h) in enumerate(zip(sent, heads))]
    )
    mean = {n: start[n] + sum(h[n].astype(np.float64) - start[n] for h in heads) / m for n in HEAD}
    noise = np.concatenate([(arrays[n].numpy().astype(np.float64) - mean[n]).ravel() for n in HEAD])  # (20050,)
    expected = z * clip / m
    # The sample std of n normal draws has relative standard error 1/sqrt(2n) = 0.5 % here: 3 % is six of them.
    assert abs(noise.std() / expected - 1) < 0.03, (noise.std(), expected)
    assert abs(noise.mean()) < 5 * expected / math.sqrt(noise.size)
    np.testing.assert_array_equal(arrays["center"].numpy(), start["center"])  # the fixed centre is not noised
    assert recorder.client_dp[k.CLIENT_NOISE_STDV] == pytest.approx(expected, rel=1e-12)
    assert client_noise_stdv(noise_multiplier=z, clipping_norm=clip, num_sampled_clients=m) == pytest.approx(expected)


def test_mean_is_unweighted_over_m_of_server_clipped_updates_and_screening_is_per_reply(tmp_path):
    clip, num_sites = 1.0, 4
    cfg = RunConfig(client_dp="server", client_noise_multiplier=0.0, client_clipping_norm=clip)
    strategy, recorder = _strategy(tmp_path, cfg, num_sites=num_sites)
    start = _start()
    sent = _round(strategy, start, num_sites)
    assert len(sent) == num_sites
    rng = np.random.default_rng(1)
    # Norms 0.01 and 0.02 pass unclipped; 5.0 (25x the median: rejected by the relative limit without client DP)
    # is clipped to 1; the NaN reply is rejected, and counts as a zero update in the mean over m = 4.
    updates = [_moved(start, rng, norm) for norm in (0.01, 0.02, 5.0)]
    bad = _moved(start, rng, 0.01)
    bad["layers.0.bias"][0] = np.nan
    replies = [_reply(sent[i], u, n, site=f"s{i}") for i, (u, n) in enumerate(zip(updates, (1, 100, 10000)))]
    replies.append(_reply(sent[3], bad, 50, site="s3"))
    arrays, _ = strategy.aggregate_train(1, replies)

    def clipped(u):
        delta = {n: u[n].astype(np.float64) - start[n] for n in HEAD}
        norm = math.sqrt(sum(float(np.sum(d**2)) for d in delta.values()))
        return {n: d * min(1.0, clip / norm) for n, d in delta.items()}

    for name in HEAD:
        expected = start[name] + sum(clipped(u)[name] for u in updates) / num_sites
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert [r["site"] for r in recorder.rejected] == ["s3"]
    assert "NaN or Inf" in recorder.rejected[0]["reason"]


def test_client_side_mode_sends_the_norm_and_rejects_updates_the_site_did_not_clip(tmp_path):
    clip, num_sites = 0.5, 3
    cfg = RunConfig(client_dp="client", client_noise_multiplier=0.0, client_clipping_norm=clip)
    strategy, recorder = _strategy(tmp_path, cfg, num_sites=num_sites)
    assert isinstance(strategy, DifferentialPrivacyClientSideFixedClipping)
    assert k.CLIPPING_NORM == KEY_CLIPPING_NORM
    start = _start()
    sent = _round(strategy, start, num_sites)
    assert all(msg.content.config_records[k.CONFIG][k.CLIPPING_NORM] == clip for msg in sent)
    rng = np.random.default_rng(2)
    ok = [_moved(start, rng, clip), _moved(start, rng, 0.1)]
    replies = [_reply(sent[0], ok[0], 5, site="a"), _reply(sent[1], ok[1], 500, site="b")]
    replies.append(_reply(sent[2], _moved(start, rng, 2 * clip), 50, site="unclipped"))
    arrays, _ = strategy.aggregate_train(1, replies)
    for name in HEAD:
        expected = start[name] + sum(u[name].astype(np.float64) - start[name] for u in ok) / num_sites
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert [r["site"] for r in recorder.rejected] == ["unclipped"]
    assert "the site did not clip it" in recorder.rejected[0]["reason"]


def test_client_app_mod_clips_training_replies_only_when_asked(flower_identity):
    from fedtl.client.client_app import client_dp_clipping_mod

    start = _start()
    rng = np.random.default_rng(3)
    trained = _moved(start, rng, 3.0)

    def message(message_type: str, config: dict) -> Message:
        content = RecordDict(
            {k.ARRAYS: ArrayRecord({n: Array(v) for n, v in start.items()}), k.CONFIG: ConfigRecord(config)}
        )
        return Message(content=content, dst_node_id=1, message_type=message_type)

    def handler(msg: Message, context: Context) -> Message:  # the site's reply: a head moved by norm 3
        return _reply(msg, trained, 10, site="a")

    def norm(reply: Message) -> float:
        arrays = reply.content.array_records[k.ARRAYS]
        return math.sqrt(sum(float(np.sum((arrays[n].numpy().astype(np.float64) - start[n]) ** 2)) for n in start))

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    asked = client_dp_clipping_mod(message(MessageType.TRAIN, {k.CLIPPING_NORM: 0.5}), context, handler)
    assert norm(asked) == pytest.approx(0.5, rel=1e-5)
    assert norm(client_dp_clipping_mod(message(MessageType.TRAIN, {}), context, handler)) == pytest.approx(3.0, 1e-5)
    evaluate = client_dp_clipping_mod(message(MessageType.EVALUATE, {k.CLIPPING_NORM: 0.5}), context, handler)
    assert norm(evaluate) == pytest.approx(3.0, rel=1e-5)

    def refuse(msg: Message, context: Context) -> Message:
        return Message(content=RecordDict({k.SITE: ConfigRecord({k.REFUSED: "budget"})}), reply_to=msg)

    refused = client_dp_clipping_mod(message(MessageType.TRAIN, {k.CLIPPING_NORM: 0.5}), context, refuse)
    assert not refused.has_error() and refused.content.config_records[k.SITE][k.REFUSED] == "budget"


def test_reported_client_epsilon_equals_opacus_rdp_round_by_round(tmp_path):
    z, delta, num_sites = 1.1, 1e-5, 5
    cfg = RunConfig(client_dp="server", client_noise_multiplier=z, client_dp_delta=delta, fraction_train=0.4)
    strategy, recorder = _strategy(tmp_path, cfg, num_sites=num_sites)
    q = 2 / num_sites  # FedAvg samples int(5 * 0.4) = 2 of 5 sites
    assert recorder.finish_round(0, None)[k.CLIENT_EPSILON] == 0.0
    start = _start()
    for server_round in (1, 2, 3):
        sent = _round(strategy, start, num_sites, server_round)
        replies = [_reply(msg, start, 10, site=f"s{i}") for i, msg in enumerate(sent)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        start = {name: a.numpy() for name, a in arrays.items()}
        line = recorder.finish_round(server_round, None)
        expected = _oracle_epsilon(z, [q] * server_round, delta)
        assert line[k.CLIENT_EPSILON] == pytest.approx(expected, rel=1e-9)
        assert line[k.CLIENT_DP_ROUNDS] == server_round and line[k.CLIENT_SAMPLE_RATE] == q
        assert line[k.CLIENT_DELTA] == delta
        assert line["epsilon-per-site"] == {"s0": 1.0, "s1": 1.0}  # the sites' own epsilon, apart
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x[k.CLIENT_EPSILON] for x in lines] == [x[k.CLIENT_EPSILON] for x in recorder.history]
    assert recorder.state()["client-dp-sample-rates"] == [q, q, q]  # the accountant's history, for resuming


def test_client_level_epsilon_composes_rounds_of_different_sample_rates():
    rates = [0.5, 0.25, 0.5, 1.0]
    got = client_level_epsilon(noise_multiplier=0.9, sample_rates=rates, delta=1e-6)
    assert got == pytest.approx(_oracle_epsilon(0.9, rates, 1e-6), rel=1e-9)
    assert client_level_epsilon(noise_multiplier=0.9, sample_rates=[], delta=1e-6) == 0.0
    assert client_level_epsilon(noise_multiplier=0.0, sample_rates=[0.5], delta=1e-6) == math.inf


def test_client_dp_settings_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="`client-dp` must be one of off, server, client; got 'both'"):
        RunConfig(client_dp="both")
    with pytest.raises(ConfigError, match="`client-clipping-norm` must be > 0.0, got 0.0"):
        RunConfig(client_clipping_norm=0.0)
    with pytest.raises(ConfigError, match="`client-dp-delta` must be > 0.0 and < 1.0, got 1.0"):
        RunConfig(client_dp_delta=1.0)
    # Refused when the config is read, before any site spends budget on the set-up releases.
    with pytest.raises(ConfigError, match=r'`client-dp = "server"` needs a strategy whose server step is a mean'):
        RunConfig(client_dp="server", strategy="fedadam")
    with pytest.raises(ConfigError, match="needs the number of sites N for its sample rate m / N, got None"):
        make_strategy(RunConfig(client_dp="client"), RunRecorder(run_dir=tmp_path, expected_arrays={}))
    with pytest.raises(ConfigError, match="samples m = 3 sites a round .* out of only 2; lower min-train-sites"):
        _strategy(tmp_path, RunConfig(client_dp="server", min_train_sites=3, min_available_nodes=3), num_sites=2)
    with pytest.raises(ConfigError, match="`num-sampled-clients` must be >= 1, got 0"):
        client_noise_stdv(noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=0)
    off, recorder = _strategy(tmp_path, RunConfig(), num_sites=4)
    assert isinstance(off, FedtlFedAvg) and recorder.client_dp == {}
    prox, _ = _strategy(tmp_path, RunConfig(client_dp="server", strategy="fedprox", proximal_mu=0.3), num_sites=4)
    assert prox.strategy.proximal_mu == 0.3


@pytest.mark.slow
def test_simulated_run_reports_client_epsilon_per_round_apart_from_site_epsilon(tmp_path):
    from fedtl.simulations.engine import simulate

    cfg = RunConfig(
        backbone="tiny",
        num_rounds=2,
        client_dp="server",
        fraction_train=0.5,
        federated_evaluation=False,
        out=str(tmp_path),
    )
    summary = simulate(cfg, num_sites=4)
    run_dir = Path(summary["run-dir"])
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2]
    q = 0.5  # 2 of 4 sites a round
    for line in lines:
        expected = _oracle_epsilon(cfg.client_noise_multiplier, [q] * line["round"], cfg.client_dp_delta)
        assert line[k.CLIENT_EPSILON] == pytest.approx(expected, rel=1e-9)
        assert line[k.CLIENT_DP_ROUNDS] == line["round"]
    for line in lines[1:]:
        trained = {name: s["train"] for name, s in line["sites"].items() if "train" in s}
        assert len(trained) == 2, trained
        # The sites' sample-level epsilon is still reported per site, under its own keys.
        for name, metrics in trained.items():
            assert line["epsilon-per-site"][name] == metrics[k.EPSILON]
        assert line["epsilon-max"] == max(line["epsilon-per-site"].values())
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved[k.CLIENT_EPSILON] == pytest.approx(_oracle_epsilon(1.0, [q, q], 1e-5), rel=1e-9)
    assert saved[k.CLIENT_NOISE_STDV] == pytest.approx(1.0 * 1.0 / 2)
    assert saved["epsilon-per-site"] == lines[-1]["epsilon-per-site"]
    assert saved["epsilon-max"] == max(saved["epsilon-per-site"].values())
    assert not any(key.startswith("client-") for key in saved["epsilon-per-site"])
