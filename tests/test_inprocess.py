"""The in-process executor against Flower's simulation engine, and its Grid against Flower's message rules."""

import inspect
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.server.superlink.fleet.vce import vce_api
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from fedtl.client.site import SIMULATION_ENV
from fedtl.server.report import short_reason
from fedtl.shared.config import RunConfig
from fedtl.simulations import federation as lab
from fedtl.simulations import stopping
from fedtl.simulations.engine import ENGINE_LOOK, simulate
from fedtl.simulations.inprocess import NODE_ID_BASE, InProcessGrid, run_inprocess

SITES = 3


def _dp_config(out: Path) -> RunConfig:
    """A DP-SGD run with noise derived from the target epsilon, federated evaluation on, every site every round."""
    return RunConfig(
        head_solver="dp-sgd",  # rounds in which a failing site's reply is rejected (auto leaves it out at its plan)
        backbone="tiny",
        data="digits",
        num_rounds=2,
        noise_multiplier="auto",
        target_epsilon=4.0,
        federated_evaluation=True,
        fraction_train=1.0,
        out=str(out),
        seed=3,
    )


@pytest.fixture(scope="module")
def both_engines(tmp_path_factory):
    """Run the same config on Flower's engine and in process, each with its own fresh fedtl home."""
    summaries, polls, wakers = {}, {}, {}
    run_app = lab.FederationApp.run

    def polling_run(app: lab.FederationApp, grid) -> dict:  # noqa: ANN001 - either executor's Grid
        polls[engine] = getattr(grid, "poll_s", None)
        on_push = getattr(grid, "on_push", None)
        if on_push is not None:  # the engine's waker, and whether Flower's engine looks through it during the run
            wakers[engine] = on_push.__self__
            wakers["looks-through-waker"] = getattr(vce_api.add_messages_to_queue, "__self__", None) is on_push.__self__
        return run_app(app, grid)

    for engine, run in (("flower", simulate), ("inprocess", run_inprocess)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lab.FederationApp, "run", polling_run)
            mp.setenv("FEDTL_HOME", str(tmp_path_factory.mktemp(f"home-{engine}")))
            cfg = _dp_config(tmp_path_factory.mktemp(f"runs-{engine}"))
            summaries[engine] = run(cfg, num_sites=SITES)
    summaries["reply-polls"], summaries["wakers"] = polls, wakers
    return summaries


@pytest.mark.slow
def test_the_lab_looks_for_replies_on_flowers_engine_every_10_ms(both_engines):
    # Flower's InMemoryGrid polls each 0.1 s: two exchanges a round then wait about 0.1 s for nothing.
    assert both_engines["reply-polls"] == {"flower": stopping.REPLY_POLL_S, "inprocess": None}
    assert stopping.REPLY_POLL_S == 0.01


@pytest.mark.slow
def test_a_push_wakes_flowers_engine_instead_of_waiting_for_its_next_look(both_engines):
    # Flower's engine looks for pushed messages every 0.1 s: each exchange (two a round) waited for that look.
    wakers = both_engines["wakers"]
    assert set(wakers) == {"flower", "looks-through-waker"} and wakers["looks-through-waker"]
    # Every exchange's push woke it: 2 rounds of training and evaluation, at least, and the set-up's.
    assert wakers["flower"].woken >= 4
    assert vce_api.add_messages_to_queue.__module__ == vce_api.__name__  # Flower's own again after the run


def test_flowers_engine_still_has_the_look_the_waker_replaces():
    # Pinned Flower: a new one whose look has other parameters would run unwoken (with a warning); this says so first.
    assert tuple(inspect.signature(vce_api.add_messages_to_queue).parameters) == ENGINE_LOOK


def _metrics(summary: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(summary["run-dir"]) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_inprocess_equals_flower_engine_for_one_seed(both_engines):
    flower, inprocess = both_engines["flower"], both_engines["inprocess"]
    assert flower["run-dir"] != inprocess["run-dir"]
    expected = load_file(flower["model"])
    got = load_file(inprocess["model"])
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name

    flower_lines, inprocess_lines = _metrics(flower), _metrics(inprocess)
    assert [line["round"] for line in flower_lines] == [0, 1, 2]
    assert [line["central"] for line in inprocess_lines] == [line["central"] for line in flower_lines]
    # Everything else a round records (per-site training and evaluation metrics, update norms) too.
    assert inprocess_lines == flower_lines

    assert set(flower["epsilon-per-site"]) == {f"site-{i}" for i in range(SITES)}
    assert inprocess["epsilon-per-site"] == flower["epsilon-per-site"]
    assert all(0 < eps <= 4.0 for eps in flower["epsilon-per-site"].values())
    assert inprocess["rejected-replies"] == flower["rejected-replies"] == []


def test_a_failing_site_is_rejected_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    home = tmp_path / "home"
    monkeypatch.setenv("FEDTL_HOME", str(home))
    # A real fault: site-1's feature cache folder is a file, so writing its features fails: the site refuses
    # every request, saying why, and the run goes on with the others.
    broken = home / "sim-sites" / "site-1" / "features"
    broken.parent.mkdir(parents=True)
    broken.write_text("not a folder")
    cfg = _dp_config(tmp_path / "runs").replace(feature_centering=False)
    with caplog.at_level(logging.WARNING):
        summary = run_inprocess(cfg, num_sites=SITES)

    rejected = summary["rejected-replies"]
    assert {(r["round"], r["site"]) for r in rejected} == {(1, "site-1"), (2, "site-1")}
    assert all(r["reason"].startswith("refused by the site: [storage] cannot write") for r in rejected), rejected
    assert "round 1: reply from site-1 rejected, not aggregated: refused by the site: [storage]" in caplog.text
    assert summary["site-outcomes"]["site-1"]["status"] == "failed" and not summary["all-sites-completed"]
    assert set(summary["epsilon-per-site"]) == {"site-0", "site-2"}
    assert [line["round"] for line in _metrics(summary)] == [0, 1, 2]
    assert Path(summary["model"]).is_file()


def _probe_app() -> ClientApp:
    """A ClientApp that echoes its node config and a per-node message count, and fails at partition 1."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("disk full at partition 1")
        seen = context.state.config_records.setdefault("seen", ConfigRecord({"count": 0}))
        seen["count"] = int(seen["count"]) + 1
        msg.content.config_records["config"]["touched"] = True  # must not reach the server's copy
        echo = ConfigRecord({**dict(context.node_config), "count": seen["count"]})
        return Message(RecordDict({"echo": echo}), reply_to=msg)

    return app


def _grid(num_nodes: int = 3) -> InProcessGrid:
    grid = InProcessGrid(_probe_app(), num_nodes=num_nodes)
    grid.set_run(Run.create_empty(run_id=1))  # the run id the `flower_identity` fixture stamps on messages
    return grid


def test_grid_replies_like_flower(flower_identity):
    grid = _grid()
    assert grid.get_node_ids() == [NODE_ID_BASE, NODE_ID_BASE + 1, NODE_ID_BASE + 2]
    content = RecordDict({"config": ConfigRecord({"x": 1})})
    for count in (1, 2):  # the node's Context (its state) persists between messages
        sent = [Message(content, n, MessageType.TRAIN, group_id=str(count)) for n in (NODE_ID_BASE, NODE_ID_BASE + 2)]
        replies = list(grid.send_and_receive(sent))
        assert len(replies) == 2
        for msg, reply in zip(sent, replies):
            meta = reply.metadata
            assert meta.reply_to_message_id == msg.metadata.message_id != ""
            assert (meta.src_node_id, meta.dst_node_id) == (msg.metadata.dst_node_id, SUPERLINK_NODE_ID)
            assert (meta.run_id, meta.group_id, meta.message_type) == (1, str(count), MessageType.TRAIN)
            assert meta.message_id not in ("", msg.metadata.message_id)
            echo = reply.content.config_records["echo"]
            assert echo["partition-id"] == msg.metadata.dst_node_id - NODE_ID_BASE
            assert (echo["num-partitions"], echo["count"]) == (3, count)
    assert "touched" not in content.config_records["config"]


def test_grid_turns_a_handler_exception_into_an_error_reply(flower_identity, caplog):
    grid = _grid()
    msg = Message(RecordDict({"config": ConfigRecord({})}), NODE_ID_BASE + 1, MessageType.TRAIN)
    with caplog.at_level(logging.ERROR, logger="fedtl.simulations.inprocess"):
        (reply,) = grid.send_and_receive([msg])
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason.startswith("<class 'flwr.clientapp.client_app.ClientAppException'>:<'")
    assert short_reason(reply.error.reason) == "disk full at partition 1"
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert reply.metadata.src_node_id == NODE_ID_BASE + 1
    assert "ClientApp of node 1000001 (partition 1) raised" in caplog.text
    # The failure stays at that node: the next message to another node is answered normally.
    (ok,) = grid.send_and_receive([Message(RecordDict({"config": ConfigRecord({})}), NODE_ID_BASE, MessageType.TRAIN)])
    assert ok.has_content()


def test_grid_answers_no_message_to_an_unknown_node(flower_identity):
    grid = _grid(num_nodes=1)
    msg = Message(RecordDict(), NODE_ID_BASE + 5, MessageType.TRAIN)
    assert list(grid.send_and_receive([msg])) == []


def test_inprocess_restores_the_environment_it_borrows(tmp_path, monkeypatch):
    monkeypatch.delenv(SIMULATION_ENV, raising=False)
    monkeypatch.setattr(TaskIdentity, "_run_id", None)
    with pytest.raises(ValueError, match="`sites` must be >= 1, got 0"):
        run_inprocess(_dp_config(tmp_path), num_sites=0)
    run_inprocess(_dp_config(tmp_path).replace(num_rounds=1, federated_evaluation=False), num_sites=1)
    assert SIMULATION_ENV not in os.environ
    assert TaskIdentity._run_id is None


def test_a_simulated_run_builds_the_servers_backbone_once(tmp_path, monkeypatch):
    import fedtl.server.setup as setup

    monkeypatch.setenv("FEDTL_HOME", str(tmp_path / "home"))
    built = []
    build = setup.build_backbone
    monkeypatch.setattr(setup, "build_backbone", lambda *a, **kw: built.append(a) or build(*a, **kw))
    cfg = _dp_config(tmp_path).replace(num_rounds=1, federated_evaluation=False)
    summary = run_inprocess(cfg, num_sites=2)
    assert summary["all-sites-completed"]
    # From the registry (its weights read and fingerprinted) once: the lab's preparation built it, and the ServerApp's
    # run took that one. Modules made from that state (to extract the held-out set's features) are not counted.
    assert [a for a in built if len(a) == 1] == [("tiny",)]


def test_a_backbone_built_for_another_preprocessing_is_built_again(tmp_path):
    from fedtl.server.setup import load_server_backbone

    cfg = RunConfig(backbone="tiny", data="digits", image_size=16, out=str(tmp_path))
    first = load_server_backbone(cfg)
    assert load_server_backbone(cfg, built=first) is first
    other = load_server_backbone(cfg.replace(image_size=24), built=first)
    assert other is not first and other.preprocessing.image_size == 24
    assert other.fingerprint == first.fingerprint  # the same weights; only what is fed to them differs
