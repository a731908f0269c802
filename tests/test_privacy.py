"""Tests for shared/privacy.py (epsilon of a history, noise for a budget) and client/privacy_store.py (the ledger)."""

import json
import math
import multiprocessing
import re

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtl.client.privacy_store import DP_SGD, FEATURE_SUM, PrivacyCharge, PrivacyStore, new_charge
from fedtl.shared.errors import ConfigError, DataError, PrivacyBudgetError
from fedtl.shared.privacy import PrivacyStep, compute_epsilon, find_noise_multiplier

# Opacus' default RDP orders, written out here (opacus/accountants/rdp.py, RDPAccountant.DEFAULT_ALPHAS)
# so the oracle does not go through the accountant class fedtl itself uses.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def oracle_epsilon(stretches: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon from Opacus' pure RDP analysis: sum each stretch's RDP curve, then convert once."""
    rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS) for sigma, q, steps in stretches)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


# --- compute_epsilon -------------------------------------------------------------------------------


def test_compute_epsilon_matches_opacus_rdp_analysis_for_one_stretch():
    eps = compute_epsilon([PrivacyStep(1.1, 0.01, 1000)], delta=1e-5)
    assert eps == pytest.approx(oracle_epsilon([(1.1, 0.01, 1000)], 1e-5), rel=1e-9)


def test_compute_epsilon_pinned_value():
    # Recorded once, when this test was written, from compute_epsilon with Opacus 1.6.0's RDP
    # accountant (default orders): sigma=1.1, q=0.01, 1000 steps, delta=1e-5 -> 1.7117700912203435.
    # A change here means the accounting changed (orders, conversion, history handling), not a refactor.
    assert compute_epsilon([PrivacyStep(1.1, 0.01, 1000)], delta=1e-5) == pytest.approx(1.7117700912203435, rel=1e-6)


def test_compute_epsilon_composes_heterogeneous_history_like_summed_rdp_curves():
    history = [PrivacyStep(1.1, 0.01, 1000), PrivacyStep(0.8, 0.05, 120)]
    eps = compute_epsilon(history, delta=1e-5)
    assert eps == pytest.approx(oracle_epsilon([(1.1, 0.01, 1000), (0.8, 0.05, 120)], 1e-5), rel=1e-9)
    # Composition commutes, and composing costs more than either stretch alone.
    assert compute_epsilon(history[::-1], delta=1e-5) == pytest.approx(eps, rel=1e-12)
    assert eps > max(compute_epsilon([s], delta=1e-5) for s in history)


def test_compute_epsilon_ignores_zero_step_stretches():
    base = [PrivacyStep(1.1, 0.01, 1000)]
    assert compute_epsilon(base + [PrivacyStep(0.5, 0.5, 0)], delta=1e-5) == compute_epsilon(base, delta=1e-5)
    # A zero-step, zero-noise stretch spent nothing, so it must not make epsilon infinite either.
    assert math.isfinite(compute_epsilon(base + [PrivacyStep(0.0, 0.5, 0)], delta=1e-5))


def test_compute_epsilon_of_empty_history_is_zero():
    assert compute_epsilon([], delta=1e-5) == 0.0
    assert compute_epsilon([], delta=1e-5, accountant="prv") == 0.0


def test_compute_epsilon_of_a_noise_free_stretch_is_infinite():
    history = [PrivacyStep(1.1, 0.01, 1000), PrivacyStep(0.0, 0.1, 1)]
    assert compute_epsilon(history, delta=1e-5) == math.inf
    assert compute_epsilon(history, delta=1e-5, accountant="prv") == math.inf


def test_prv_accountant_is_available_and_no_looser_than_rdp():
    history = [PrivacyStep(1.1, 0.01, 1000)]
    eps_rdp = compute_epsilon(history, delta=1e-5, accountant="rdp")
    eps_prv = compute_epsilon(history, delta=1e-5, accountant="prv")
    assert eps_prv <= eps_rdp * 1.01
    assert eps_prv >= eps_rdp * 0.8  # both bound the same mechanism; PRV is tighter by ~10%, not by 2x


def test_unknown_accountant_is_a_config_error():
    with pytest.raises(ConfigError, match=r"`accountant` must be one of rdp, prv; got 'gdp'"):
        compute_epsilon([PrivacyStep(1.0, 0.1, 1)], delta=1e-5, accountant="gdp")


# --- find_noise_multiplier -------------------------------------------------------------------------


def test_find_noise_multiplier_meets_the_target_and_is_minimal():
    target, delta, q, steps, precision = 2.0, 1e-5, 0.05, 200, 0.005
    sigma = find_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, precision=precision
    )
    assert oracle_epsilon([(sigma, q, steps)], delta) <= target
    assert oracle_epsilon([(sigma - precision, q, steps)], delta) > target


def test_find_noise_multiplier_leaves_room_for_the_history():
    target, delta, q, steps, precision = 3.0, 1e-5, 0.05, 200, 0.005
    history = [PrivacyStep(2.0, 0.1, 50)]
    alone = find_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps)
    after = find_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, history=history, precision=precision
    )
    assert after > alone + precision
    stretches = [(2.0, 0.1, 50)]
    assert oracle_epsilon(stretches + [(after, q, steps)], delta) <= target
    assert oracle_epsilon(stretches + [(after - precision, q, steps)], delta) > target


def test_find_noise_multiplier_refuses_a_spent_budget_naming_both_numbers():
    history = [PrivacyStep(0.6, 0.1, 500)]
    spent = compute_epsilon(history, delta=1e-5)
    assert spent > 1.5
    expected = rf"epsilon already spent is {re.escape(f'{spent:.3f}')} >= target-epsilon 1\.5 \(delta 1e-05\)"
    with pytest.raises(PrivacyBudgetError, match=expected):
        find_noise_multiplier(target_epsilon=1.5, target_delta=1e-5, sample_rate=0.05, steps=10, history=history)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_find_noise_multiplier_gives_up_when_no_noise_is_enough():
    # RDP -> (eps, delta) conversion alone costs more than 0.01 at delta 1e-5, whatever the noise.
    with pytest.raises(
        PrivacyBudgetError, match=r"no noise multiplier up to 1e4 meets target-epsilon 0\.01 over 10 steps"
    ):
        find_noise_multiplier(target_epsilon=0.01, target_delta=1e-5, sample_rate=1.0, steps=10)


# --- PrivacyStep validation ------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [-0.1, math.inf, math.nan])
def test_privacy_step_rejects_bad_noise(noise):
    with pytest.raises(
        ConfigError, match=rf"`noise-multiplier` must be a finite number >= 0, got {re.escape(str(noise))}"
    ):
        PrivacyStep(noise, 0.1, 1)


@pytest.mark.parametrize("rate", [0.0, -0.5, 1.5, math.nan])
def test_privacy_step_rejects_sample_rate_outside_unit_interval(rate):
    with pytest.raises(ConfigError, match=rf"`sample-rate` must be in \(0, 1\], got {re.escape(str(rate))}"):
        PrivacyStep(1.0, rate, 1)


def test_privacy_step_rejects_negative_steps_and_accepts_the_edges():
    with pytest.raises(ConfigError, match=r"`steps` must be >= 0, got -1"):
        PrivacyStep(1.0, 0.5, -1)
    PrivacyStep(0.0, 1.0, 0)  # no noise, full batch, no steps: all legal


# --- PrivacyStore ----------------------------------------------------------------------------------


def _charge(
    run_id: str, server_round: int, noise: float, *, kind: str = DP_SGD, rate: float = 0.1, steps: int = 10
) -> PrivacyCharge:
    return new_charge(
        run_id=run_id,
        server_round=server_round,
        noise_multiplier=noise,
        sample_rate=rate,
        steps=steps,
        delta=1e-5,
        kind=kind,
    )


def test_store_without_file_is_empty(tmp_path):
    store = PrivacyStore(tmp_path / "none" / "history.jsonl")
    assert store.charges() == []
    assert store.epsilon(delta=1e-5) == 0.0
    assert store.run_noise_multiplier("run") is None


def test_charges_persist_across_store_objects(tmp_path):
    path = tmp_path / "site" / "privacy" / "history.jsonl"  # parents do not exist yet
    written = [
        _charge("a", 0, 4.0, kind=FEATURE_SUM, rate=1.0, steps=1),
        _charge("a", 1, 1.234567891234, rate=1 / 3, steps=6),
        _charge("a", 2, 1.234567891234, rate=1 / 3, steps=6),
    ]
    for c in written:
        PrivacyStore(path).charge(c)
    reread = PrivacyStore(path).charges()
    assert reread == written  # floats survive the JSON round trip bit for bit
    assert len(path.read_text().splitlines()) == 3


def test_store_epsilon_is_compute_epsilon_of_its_history(tmp_path):
    store = PrivacyStore(tmp_path / "h.jsonl")
    store.charge(_charge("a", 0, 4.0, kind=FEATURE_SUM, rate=1.0, steps=1))
    store.charge(_charge("a", 1, 1.1, rate=0.01, steps=1000))
    store.charge(_charge("b", 1, 0.8, rate=0.05, steps=120))
    expected = oracle_epsilon([(4.0, 1.0, 1), (1.1, 0.01, 1000), (0.8, 0.05, 120)], 1e-5)
    assert store.epsilon(delta=1e-5) == pytest.approx(expected, rel=1e-9)
    assert store.history() == [PrivacyStep(4.0, 1.0, 1), PrivacyStep(1.1, 0.01, 1000), PrivacyStep(0.8, 0.05, 120)]


def test_non_private_charge_makes_store_epsilon_infinite(tmp_path):
    store = PrivacyStore(tmp_path / "h.jsonl")
    store.charge(_charge("a", 1, 1.1))
    store.charge(_charge("a", 2, 0.0))
    assert store.epsilon(delta=1e-5) == math.inf


def test_run_noise_multiplier_is_the_first_dp_sgd_charge_of_that_run(tmp_path):
    store = PrivacyStore(tmp_path / "h.jsonl")
    store.charge(_charge("a", 0, 9.0, kind=FEATURE_SUM, rate=1.0, steps=1))  # same run, not training noise
    store.charge(_charge("b", 1, 0.7))
    store.charge(_charge("a", 1, 1.3))
    store.charge(_charge("a", 2, 1.9))
    store.charge(_charge("only-sum", 0, 5.0, kind=FEATURE_SUM, rate=1.0, steps=1))
    assert store.run_noise_multiplier("a") == 1.3
    assert store.run_noise_multiplier("b") == 0.7
    assert store.run_noise_multiplier("only-sum") is None
    assert store.run_noise_multiplier("never") is None


def test_history_outside_training_drops_only_that_runs_dp_sgd_charges(tmp_path):
    store = PrivacyStore(tmp_path / "h.jsonl")
    store.charge(_charge("old", 1, 0.9, rate=0.2, steps=5))
    store.charge(_charge("a", 0, 9.0, kind=FEATURE_SUM, rate=1.0, steps=1))
    store.charge(_charge("a", 1, 1.3, rate=0.1, steps=10))
    store.charge(_charge("old", 0, 6.0, kind=FEATURE_SUM, rate=1.0, steps=1))
    store.charge(_charge("a", 2, 1.3, rate=0.1, steps=10))
    assert store.history_outside_training("a") == [
        PrivacyStep(0.9, 0.2, 5),
        PrivacyStep(9.0, 1.0, 1),
        PrivacyStep(6.0, 1.0, 1),
    ]
    assert store.history_outside_training("old") == [
        PrivacyStep(9.0, 1.0, 1),
        PrivacyStep(1.3, 0.1, 10),
        PrivacyStep(6.0, 1.0, 1),
        PrivacyStep(1.3, 0.1, 10),
    ]


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"run_id": "a", "server_round": 3, "noise_mult',  # torn write
        '{"run_id": "a"}',  # valid JSON, missing fields
        "[1, 2, 3]",
    ],  # valid JSON, not a record
)
def test_corrupt_line_is_a_data_error_naming_file_and_line(tmp_path, bad_line):
    path = tmp_path / "h.jsonl"
    store = PrivacyStore(path)
    store.charge(_charge("a", 1, 1.0))
    with open(path, "a") as fh:
        fh.write("\n")  # blank lines are skipped but still numbered
        fh.write(bad_line + "\n")
    store.charge(_charge("a", 2, 1.0))
    with pytest.raises(DataError, match=rf"privacy history {re.escape(str(path))} line 3 is unreadable"):
        store.charges()
    with pytest.raises(DataError, match=r"never delete it to reset a budget"):
        store.epsilon(delta=1e-5)


def test_charge_lines_are_sorted_key_json_records(tmp_path):
    path = tmp_path / "h.jsonl"
    c = _charge("a", 1, 1.0)
    PrivacyStore(path).charge(c)
    (line,) = path.read_text().splitlines()
    record = json.loads(line)
    assert list(record) == sorted(record)
    assert record == {
        "run_id": "a",
        "server_round": 1,
        "noise_multiplier": 1.0,
        "sample_rate": 0.1,
        "steps": 10,
        "delta": 1e-5,
        "time": c.time,
        "kind": "dp-sgd",
    }


def _charge_many(path: str, worker: int, count: int, barrier) -> None:
    """Spawned worker: wait for every worker, then append `count` charges tagged with `worker`."""
    store = PrivacyStore(path)
    barrier.wait()
    for i in range(count):
        store.charge(_charge(f"worker-{worker}", i, 1.0 + worker))


def test_concurrent_appends_from_processes_lose_nothing(tmp_path):
    path = tmp_path / "h.jsonl"
    workers, count = 2, 30
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_charge_many, args=(str(path), w, count, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers
    charges = PrivacyStore(path).charges()  # every line parses: no torn or interleaved records
    assert len(charges) == workers * count
    got = sorted((c.run_id, c.server_round) for c in charges)
    assert got == sorted((f"worker-{w}", i) for w in range(workers) for i in range(count))
    for w in range(workers):
        mine = [c.server_round for c in charges if c.run_id == f"worker-{w}"]
        assert mine == list(range(count))  # each process's appends keep their order
    assert np.unique([c.noise_multiplier for c in charges]).tolist() == [1.0, 2.0]
