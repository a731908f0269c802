"""Server-side aggregation: FedAvg against np.average, FedAdam/FedProx wiring, and reply screening."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtl.server.report import RunRecorder
from fedtl.server.strategy import make_strategy
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    """Messages are stamped with the identity of the process that creates them, as in a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


SHAPES = {"center": (4,), "layers.0.weight": (3, 4), "layers.0.bias": (3,)}


def _reply(arrays: dict[str, np.ndarray], num_examples: int, *, site: str, epsilon: float = 1.0, **extra) -> Message:
    content = RecordDict(
        {
            k.ARRAYS: ArrayRecord({name: Array(v) for name, v in arrays.items()}),
            k.METRICS: MetricRecord(
                {k.NUM_EXAMPLES: num_examples, k.EPSILON: epsilon, k.DELTA: 1e-5, k.TRAIN_LOSS: 0.5, **extra}
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
