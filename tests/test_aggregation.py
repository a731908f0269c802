"""Server-side aggregation: FedAvg against np.average, FedAdam/FedProx wiring, and reply screening."""

import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtl.server.checkpoint import Checkpoint, load_checkpoint, restore_strategy_state, save_checkpoint, strategy_state
from fedtl.server.report import RunRecorder
from fedtl.server.strategy import make_strategy
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError, FederationError


@pytest.fixture(autouse=True)
def _serverapp_identity(flower_identity):
    """Every test here builds Messages as a ServerApp would."""


SHAPES = {"center": (4,), "layers.0.weight": (3, 4), "layers.0.bias": (3,)}


def _reply(arrays: dict[str, np.ndarray], num_examples: int, *, site: str, epsilon: float = 1.0, **extra) -> Message:
    content = RecordDict(
        {
            k.ARRAYS: ArrayRecord({name: Array(v) for name, v in arrays.items()}),
            k.METRICS: MetricRecord(
                {
                    k.NUM_EXAMPLES: num_examples,
                    k.EPSILON: epsilon,
                    k.DELTA: 1e-5,
                    k.ROUND_EPSILON_STEPS: 10,
                    k.SAMPLE_RATE: 0.1,
                    k.NOISE_MULTIPLIER: 1.0,
                    **extra,
                }
            ),
            k.SITE: ConfigRecord({k.SITE_NAME: site}),
        }
    )
    instruction = Message(content=RecordDict(), dst_node_id=2, message_type=MessageType.TRAIN)
    return Message(content=content, reply_to=instruction)


def _random_arrays(rng) -> dict[str, np.ndarray]:
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def _strategy(tmp_path, name="fedavg"):
    recorder = RunRecorder(run_dir=tmp_path, expected_arrays={n: (s, "float32") for n, s in SHAPES.items()})
    return make_strategy(RunConfig(strategy=name), recorder), recorder


def test_fedavg_equals_weighted_np_average(tmp_path):
    rng = np.random.default_rng(0)
    sites = [(_random_arrays(rng), n) for n in (10, 30, 60)]
    strategy, _ = _strategy(tmp_path)
    arrays, metrics = strategy.aggregate_train(
        1, [_reply(a, n, site=f"s{i}", epsilon=float(i)) for i, (a, n) in enumerate(sites)]
    )
    for name in SHAPES:
        expected = np.average([a[name] for a, _ in sites], axis=0, weights=[n for _, n in sites])
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-6)
    assert metrics[k.EPSILON] == 2.0  # the worst site's, never an average
    assert metrics[k.NUM_EXAMPLES] == 100


def test_malformed_replies_are_rejected_not_averaged(tmp_path):
    rng = np.random.default_rng(1)
    good = [_random_arrays(rng) for _ in range(2)]
    extra = dict(_random_arrays(rng), **{"backbone.weight": np.zeros((2, 2), np.float32)})
    nan = _random_arrays(rng)
    nan["layers.0.bias"][0] = np.nan
    wrong_shape = dict(_random_arrays(rng), **{"layers.0.weight": np.zeros((4, 3), np.float32)})
    wrong_dtype = dict(_random_arrays(rng), **{"layers.0.bias": np.zeros(3, np.float64)})
    replies = [
        _reply(good[0], 10, site="a"),
        _reply(good[1], 30, site="b"),
        _reply(extra, 50, site="leaky"),
        _reply(nan, 50, site="nan"),
        _reply(wrong_shape, 50, site="shape"),
        _reply(wrong_dtype, 50, site="dtype"),
    ]
    strategy, recorder = _strategy(tmp_path)
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = np.average([good[0]["layers.0.weight"], good[1]["layers.0.weight"]], axis=0, weights=[10, 30])
    np.testing.assert_allclose(arrays["layers.0.weight"].numpy(), expected, rtol=1e-6)
    reasons = {r["site"]: r["reason"] for r in recorder.rejected}
    assert set(reasons) == {"leaky", "nan", "shape", "dtype"}
    assert "only head tensors may be sent" in reasons["leaky"]
    assert "NaN or Inf" in reasons["nan"]
    assert "expected float32(3, 4)" in reasons["shape"]
    assert "float64" in reasons["dtype"]


def test_fedadam_and_fedprox_are_flower_strategies(tmp_path):
    from flwr.serverapp.strategy import FedAdam, FedProx

    adam, _ = _strategy(tmp_path, "fedadam")
    prox, _ = _strategy(tmp_path, "fedprox")
    assert isinstance(adam, FedAdam) and isinstance(prox, FedProx)
    assert prox.proximal_mu == RunConfig().proximal_mu


def test_round_line_records_per_site_metrics_and_max_epsilon(tmp_path):
    rng = np.random.default_rng(2)
    strategy, recorder = _strategy(tmp_path)
    strategy.aggregate_train(
        1,
        [
            _reply(_random_arrays(rng), 10, site="a", epsilon=0.5),
            _reply(_random_arrays(rng), 10, site="b", epsilon=1.5),
        ],
    )
    line = recorder.finish_round(1, {"accuracy": 0.5})
    assert line["epsilon-per-site"] == {"a": 0.5, "b": 1.5}
    assert line["epsilon-max"] == 1.5
    assert set(line["sites"]) == {"a", "b"}
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def _near(global_arrays: dict[str, np.ndarray], rng, scale: float = 0.01) -> dict[str, np.ndarray]:
    """A plausible update: the global head plus a small step (the frozen centre untouched)."""
    return {
        name: (v if name == "center" else v + scale * rng.normal(size=v.shape)).astype(np.float32)
        for name, v in global_arrays.items()
    }


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(v) for name, v in arrays.items()})


def test_implausible_updates_and_a_changed_centre_are_rejected(tmp_path):
    rng = np.random.default_rng(3)
    global_arrays = _random_arrays(rng)
    recorder = RunRecorder(
        run_dir=tmp_path, expected_arrays={n: (s, "float32") for n, s in SHAPES.items()}, frozen_arrays=("center",)
    )
    strategy = make_strategy(RunConfig(), recorder)
    recorder.set_global_arrays(_record(global_arrays))
    honest = [_near(global_arrays, rng) for _ in range(4)]
    huge = _near(global_arrays, rng, scale=10.0)  # ~1000x the others' step
    moved_centre = dict(_near(global_arrays, rng), center=global_arrays["center"] + 1)
    replies = [_reply(a, 10, site=f"h{i}") for i, a in enumerate(honest)]
    replies += [_reply(huge, 10, site="huge"), _reply(moved_centre, 10, site="centre")]
    arrays, _ = strategy.aggregate_train(1, replies)
    reasons = {r["site"]: r["reason"] for r in recorder.rejected}
    assert set(reasons) == {"huge", "centre"}
    assert re.match(
        r"implausible update: the head moved by L2 norm [\d.]+ > limit [\d.]+ \(10x the round median\)", reasons["huge"]
    )
    assert reasons["centre"] == "head tensor `center` is fixed by the server for the whole run, but the site changed it"
    expected = np.mean([a["layers.0.weight"] for a in honest], axis=0)
    np.testing.assert_allclose(arrays["layers.0.weight"].numpy(), expected, rtol=1e-5)


def test_an_explicit_update_norm_limit_applies_with_any_number_of_sites(tmp_path):
    rng = np.random.default_rng(4)
    global_arrays = _random_arrays(rng)
    recorder = RunRecorder(
        run_dir=tmp_path, expected_arrays={n: (s, "float32") for n, s in SHAPES.items()}, max_update_norm=1.0
    )
    strategy = make_strategy(RunConfig(), recorder)
    recorder.set_global_arrays(_record(global_arrays))
    far = _near(global_arrays, rng, scale=1.0)
    strategy.aggregate_train(1, [_reply(_near(global_arrays, rng), 10, site="ok"), _reply(far, 10, site="far")])
    assert [r["site"] for r in recorder.rejected] == ["far"]
    assert "> limit 1 (max-update-norm)" in recorder.rejected[0]["reason"]


def test_refusals_are_logged_by_site_name_and_too_few_updates_stop_the_run(tmp_path):
    rng = np.random.default_rng(5)
    recorder = RunRecorder(run_dir=tmp_path, expected_arrays={n: (s, "float32") for n, s in SHAPES.items()})
    strategy = make_strategy(RunConfig(min_available_nodes=2, min_train_sites=2), recorder)
    refusal = Message(
        content=RecordDict(
            {k.SITE: ConfigRecord({k.SITE_NAME: "bank-2", k.REFUSED: "site bank-2 refuses round 1: budget"})}
        ),
        reply_to=Message(content=RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN),
    )
    with pytest.raises(
        FederationError,
        match=r"round 1: 1 accepted update\(s\) < min-train-sites 2; rejected or refused: .*bank-2.* "
        r"continue it with resume = ",
    ):
        strategy.aggregate_train(1, [_reply(_random_arrays(rng), 10, site="bank-1"), refusal])
    assert recorder.rejected == [
        {"round": 1, "site": "bank-2", "reason": "refused by the site: site bank-2 refuses round 1: budget"}
    ]


def test_checkpoint_round_trips_the_head_fedadam_state_and_records(tmp_path):
    rng = np.random.default_rng(6)
    recorder = RunRecorder(run_dir=tmp_path, expected_arrays={n: (s, "float32") for n, s in SHAPES.items()})
    strategy = make_strategy(RunConfig(strategy="fedadam"), recorder)
    start = _random_arrays(rng)
    strategy.configure_train(1, _record(start), ConfigRecord(), _NoGrid())
    arrays, _ = strategy.aggregate_train(1, [_reply(_near(start, rng), 10, site="a")])
    recorder.finish_round(1, {"accuracy": 0.25})
    saved = Checkpoint(1, {n: a.numpy() for n, a in arrays.items()}, strategy_state(strategy), recorder.state())
    save_checkpoint(tmp_path, saved)
    loaded = load_checkpoint(tmp_path)
    assert loaded.server_round == 1 and loaded.records == recorder.state()
    for name, value in saved.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[name], value)
    assert set(loaded.strategy_state) == {"m_t", "v_t"}
    fresh = make_strategy(RunConfig(strategy="fedadam"), RunRecorder(run_dir=tmp_path, expected_arrays={}))
    restore_strategy_state(fresh, loaded.strategy_state)
    for part in ("m_t", "v_t"):
        for name, value in getattr(strategy, part).items():
            np.testing.assert_array_equal(getattr(fresh, part)[name], value)
    with pytest.raises(ConfigError, match="has no checkpoint.safetensors"):
        load_checkpoint(tmp_path / "elsewhere")


def test_a_round_line_reaches_metrics_jsonl_only_after_its_checkpoint(tmp_path):
    """A run killed as soon as a round's line appears resumes after that round (the line implies the checkpoint)."""
    recorder = RunRecorder(run_dir=tmp_path, expected_arrays={})
    recorder.finish_round(0, {"accuracy": 0.1})
    seen = []

    def checkpoint() -> None:
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        save_checkpoint(tmp_path, Checkpoint(1, {"w": np.zeros(2, np.float32)}, records=recorder.state()))
        seen.append(len(lines))

    recorder.finish_round(1, {"accuracy": 0.2}, checkpoint=checkpoint)
    assert seen == [1]  # round 1's line was not yet written when its checkpoint was
    assert [line["round"] for line in load_checkpoint(tmp_path).records["history"]] == [0, 1]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


class _NoGrid:
    """A stand-in Grid with a few connected nodes: enough for configure_train to build its messages."""

    def __init__(self, nodes=(7,)):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)


def test_replies_with_other_records_or_metric_keys_are_rejected_before_flower_sees_them(tmp_path):
    rng = np.random.default_rng(7)
    strategy, recorder = _strategy(tmp_path)
    renamed = _reply(_random_arrays(rng), 10, site="renamed")
    renamed.content["weights"] = renamed.content.array_records[k.ARRAYS]
    del renamed.content[k.ARRAYS]
    replies = [
        _reply(_random_arrays(rng), 10, site="ok"),
        _reply(_random_arrays(rng), 10, site="extra", **{k.TRAIN_LOSS: 0.1}),  # the loss only leaves non-private runs
        _reply(_random_arrays(rng), 10, site="nan-eps", epsilon=float("nan")),
        renamed,
    ]
    strategy.aggregate_train(1, replies)
    reasons = {r["site"]: r["reason"] for r in recorder.rejected}
    assert set(reasons) == {"extra", "nan-eps", "renamed"}
    assert "metrics" in reasons["extra"] and "differ from the expected" in reasons["extra"]
    assert reasons["nan-eps"] == "metric `epsilon` must be a finite number, got nan"
    assert "exactly the ArrayRecord `arrays`" in reasons["renamed"]


def test_implausible_feature_sums_are_refused(flower_identity):
    from fedtl.server.centering import _check_feature_sum

    def reply(total, n):
        content = RecordDict(
            {
                k.ARRAYS: ArrayRecord({k.FEATURE_SUM: Array(np.asarray(total, np.float32))}),
                k.METRICS: MetricRecord({k.NUM_EXAMPLES: n}),
            }
        )
        return Message(content=content, reply_to=Message(content=RecordDict(), dst_node_id=2, message_type="query"))

    rng = np.random.default_rng(8)
    unit = rng.normal(size=(50, 16))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    honest = unit.sum(axis=0) + rng.normal(0, 4.0, 16)
    assert _check_feature_sum(reply(honest, 50), 16, sigma=4.0) is None
    assert "shape (1,), expected (16,)" in _check_feature_sum(reply([1.0], 50), 16, sigma=4.0)
    assert "impossible for 50 unit vectors" in _check_feature_sum(reply(honest * 100, 50), 16, sigma=4.0)
    assert "a count > 0" in _check_feature_sum(reply(honest, 0), 16, sigma=4.0)


def test_sites_left_out_of_a_run_are_never_sampled(tmp_path):
    recorder = RunRecorder(run_dir=tmp_path, expected_arrays={n: (s, "float32") for n, s in SHAPES.items()})
    strategy = make_strategy(RunConfig(fraction_train=0.5), recorder, excluded_nodes=frozenset({7, 8}))
    grid = _NoGrid(nodes=[5, 6, 7, 8])
    for _ in range(10):
        messages = strategy.configure_train(1, _record(_random_arrays(np.random.default_rng(0))), ConfigRecord(), grid)
        assert len(messages) == 1 and messages[0].metadata.dst_node_id in (5, 6)
