"""The site's privacy ledger (client/ledger.py): write-ahead, torn records, concurrent writers, recomputation."""

import hashlib
import hmac
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtl.client.ledger import TORN, PrivacyCharge, PrivacyLedger, noise_free_charge
from fedtl.shared import mechanisms
from fedtl.shared.errors import DataError, PrivacyBudgetError
from fedtl.shared.privacy import PrivacyStep

DP_SGD = mechanisms.DP_SGD.kind
FEATURE_SUM = mechanisms.FEATURE_SUM.kind

# Opacus' default RDP orders written out, so the oracle does not go through the accountant class fedtl uses.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def oracle_epsilon(stretches: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon from Opacus' pure RDP analysis: sum each stretch's RDP curve, then convert once."""
    rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS) for sigma, q, steps in stretches)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def _charge(
    run_id: str, server_round: int, noise: float, *, kind: str = DP_SGD, rate: float = 0.1, steps: int = 10
) -> PrivacyCharge:
    return PrivacyCharge(
        run_id=run_id,
        server_round=server_round,
        noise_multiplier=noise,
        sample_rate=rate,
        steps=steps,
        delta=1e-5,
        kind=kind,
    )


def test_ledger_without_file_is_empty(tmp_path):
    ledger = PrivacyLedger(tmp_path / "none" / "ledger.jsonl")
    assert ledger.charges() == []
    assert ledger.epsilon(delta=1e-5) == 0.0


def test_charges_persist_across_ledger_objects_bit_for_bit(tmp_path):
    path = tmp_path / "site" / "privacy" / "ledger.jsonl"  # parents do not exist yet
    written = [
        _charge("a", 0, 4.0, kind=FEATURE_SUM, rate=1.0, steps=1),
        _charge("a", 1, 1.234567891234, rate=1 / 3, steps=6),
        _charge("a", 2, 1.234567891234, rate=1 / 3, steps=6),
    ]
    for c in written:
        PrivacyLedger(path).charge(c)
    assert PrivacyLedger(path).charges() == written
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    record = json.loads(lines[1])
    # Accounting fields come first (a torn record keeps them), the MAC last.
    assert list(record)[:3] == ["noise_multiplier", "sample_rate", "steps"] and list(record)[-1] == "mac"


def test_ledger_epsilon_equals_an_independent_recomputation(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    stretches = [(4.0, 1.0, 1), (1.1, 0.01, 1000), (0.8, 0.05, 120)]
    for i, (sigma, q, steps) in enumerate(stretches):
        ledger.charge(_charge("run", i, sigma, rate=q, steps=steps))
    assert ledger.epsilon(delta=1e-5) == pytest.approx(oracle_epsilon(stretches, 1e-5), rel=1e-9)
    assert ledger.history() == [PrivacyStep(*s) for s in stretches]


def test_non_private_charge_makes_epsilon_infinite(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.charge(_charge("a", 1, 1.1))
    ledger.charge(_charge("a", 2, 0.0))
    assert ledger.epsilon(delta=1e-5) == math.inf


def test_charge_past_the_budget_is_refused_with_the_numbers_and_writes_nothing(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.charge(_charge("a", 1, 1.0, rate=0.1, steps=100))
    spent = oracle_epsilon([(1.0, 0.1, 100)], 1e-5)
    with pytest.raises(
        PrivacyBudgetError,
        match=rf"refusing round 2: .* would reach \d+\.\d+ > its budget {spent + 0.1:g} \(delta 1e-05\); "
        rf"spent so far {spent:.3f}, left 0.100",
    ):
        ledger.charge(_charge("a", 2, 1.0, rate=0.1, steps=100), max_epsilon=spent + 0.1, what="round 2")
    assert len(ledger.charges()) == 1


def test_a_changed_record_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    for r in range(3):
        ledger.charge(_charge("a", r, 1.0))
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"noise_multiplier": 1.0', '"noise_multiplier": 9.0')  # a budget "edited" up
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=rf"privacy ledger {re.escape(str(path))} line 2 fails its MAC"):
        ledger.charges()
    with pytest.raises(DataError, match="never delete or edit the ledger to reset a budget"):
        ledger.charge(_charge("a", 4, 1.0))
    assert path.read_text() == "".join(lines)  # nothing rewritten


def _torn(path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


def test_a_torn_last_record_is_counted_pessimistically_and_repaired_on_the_next_charge(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.charge(_charge("a", 1, 1.0, rate=0.1, steps=10))
    whole = json.dumps(_charge("a", 2, 0.7, rate=0.2, steps=30).record())
    _torn(path, whole[: whole.index('"run_id"') + 5])  # a crash mid-write: accounting fields whole, no newline
    expected = oracle_epsilon([(1.0, 0.1, 10), (0.7, 0.2, 30)], 1e-5)
    assert ledger.epsilon(delta=1e-5) == pytest.approx(expected, rel=1e-9)  # counted as if it ran
    assert ledger.charges()[-1].kind == TORN
    ledger.charge(_charge("a", 3, 1.0, rate=0.1, steps=10))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and path.read_text().endswith("\n")
    repaired = json.loads(lines[1])
    assert repaired["kind"] == "torn" and repaired["note"].startswith('{"noise_multiplier": 0.7')
    expected = oracle_epsilon([(1.0, 0.1, 10), (0.7, 0.2, 30), (1.0, 0.1, 10)], 1e-5)
    assert PrivacyLedger(path).epsilon(delta=1e-5) == pytest.approx(expected, rel=1e-9)


def test_a_torn_record_whose_cost_is_lost_counts_as_unbounded(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.charge(_charge("a", 1, 1.0))
    _torn(path, '{"noise_multiplier": 1.2')  # cut inside the first number
    assert ledger.epsilon(delta=1e-5) == math.inf
    with pytest.raises(PrivacyBudgetError, match=r"would reach inf > its budget 8"):
        ledger.charge(_charge("a", 2, 1.0), max_epsilon=8.0)


def test_a_crash_between_charge_and_training_keeps_the_charge(tmp_path):
    """A real training round in a child process, SIGKILLed once its charge is on disk."""
    script = textwrap.dedent(
        f"""
        import json, os, sys
        os.environ["FEDTL_SIMULATED_SITES"] = "1"
        from fedtl.client.solvers.dp_sgd import train_round
        from fedtl.client.site import resolve_site
        from fedtl.shared.backbones import backbone_state_dict, build_backbone, fingerprint_state_dict
        from fedtl.shared.heads import build_head, head_arrays
        from fedtl.shared.config import RunConfig
        from fedtl.shared.protocol import RoundSettings, SimulationSettings
        sim = SimulationSettings(data="digits", partition="iid", seed=0, test_fraction=0.2,
            local_test_fraction=0.2, permuted_label_sites="",
            site_root={str(tmp_path / "state")!r}, cache_root={str(tmp_path / "cache")!r})
        site = resolve_site({{"partition-id": 0, "num-partitions": 1}}, sim)
        state = backbone_state_dict(build_backbone("tiny"))
        fp = site.backbones.install("tiny", fingerprint_state_dict(state), state).stem
        cfg = RunConfig(backbone="tiny", num_rounds=1, head_hidden=8, local_epochs=5000, batch_size=16,
            learning_rate=1.0, noise_multiplier=1.0, target_epsilon=1e6, device="cpu", finetune_epochs=1,
            feature_block=-1)
        settings = RoundSettings.for_run(cfg, run_id="r", backbone_fingerprint=fp, image_size=32,
            label_names=tuple(str(i) for i in range(10)))
        train_round(site, settings, head_arrays(build_head("linear", 32, 10)), server_round=1)
        print("TRAINING FINISHED", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    ledger_path = tmp_path / "state" / "site-0" / "privacy" / "ledger.jsonl"
    try:
        deadline = time.time() + 120
        while not (ledger_path.is_file() and ledger_path.read_text().endswith("\n")):
            assert proc.poll() is None, "the child exited before charging"
            assert time.time() < deadline, "no charge written within 120 s"
            time.sleep(0.05)
        time.sleep(0.5)  # well into the 5000 epochs of training
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == -signal.SIGKILL and b"TRAINING FINISHED" not in out
    (charge,) = PrivacyLedger(ledger_path).charges()
    assert (charge.kind, charge.server_round, charge.noise_multiplier) == (DP_SGD, 1, 1.0)
    expected = oracle_epsilon([(1.0, charge.sample_rate, charge.steps)], 1e-5)
    assert PrivacyLedger(ledger_path).epsilon(delta=1e-5) == pytest.approx(expected, rel=1e-9)


def _charge_many(path: str, worker: int, count: int, barrier) -> None:
    """Spawned worker: wait for every worker, then append `count` charges tagged with `worker`."""
    ledger = PrivacyLedger(path)
    barrier.wait()
    for i in range(count):
        ledger.charge(_charge(f"worker-{worker}", i, 1.0 + worker))


def _spawn(target, args_per_worker) -> list:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in args_per_worker]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    return [p.exitcode for p in procs]


@pytest.mark.slow
def test_concurrent_appends_from_processes_lose_nothing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    workers, count = 2, 30
    barrier = multiprocessing.get_context("spawn").Barrier(workers)
    assert _spawn(_charge_many, [(str(path), w, count, barrier) for w in range(workers)]) == [0] * workers
    charges = PrivacyLedger(path).charges()  # every line parses: no torn or interleaved records
    assert sorted((c.run_id, c.server_round) for c in charges) == sorted(
        (f"worker-{w}", i) for w in range(workers) for i in range(count)
    )
    assert np.unique([c.noise_multiplier for c in charges]).tolist() == [1.0, 2.0]


def _charge_within(path: str, budget: float, barrier, results) -> None:
    """Spawned worker: try to spend a release that fits the budget once but not twice."""
    barrier.wait()
    try:
        PrivacyLedger(path).charge(_charge("race", 1, 1.0, rate=1.0, steps=1), max_epsilon=budget)
        results.put("charged")
    except PrivacyBudgetError:
        results.put("refused")


@pytest.mark.slow
def test_two_processes_cannot_both_spend_the_last_of_a_budget(tmp_path):
    path = tmp_path / "ledger.jsonl"
    one = oracle_epsilon([(1.0, 1.0, 1)], 1e-5)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    assert _spawn(_charge_within, [(str(path), one * 1.2, barrier, results) for _ in range(3)]) == [0, 0, 0]
    assert sorted(results.get(timeout=5) for _ in range(3)) == ["charged", "refused", "refused"]
    assert len(PrivacyLedger(path).charges()) == 1


def test_spend_by_run(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.charge(_charge("a", 0, 4.0, kind=FEATURE_SUM, rate=1.0, steps=1))
    ledger.charge(_charge("a", 1, 1.0, rate=0.1, steps=10))
    ledger.charge(_charge("b", 1, 1.0, rate=0.1, steps=10))
    a, b = ledger.spend_by_run(delta=1e-5)
    assert (a.run_id, a.rounds, a.steps, b.run_id, b.rounds) == ("a", 1, 11, "b", 1)
    assert a.epsilon_alone == pytest.approx(oracle_epsilon([(4.0, 1.0, 1), (1.0, 0.1, 10)], 1e-5), rel=1e-9)
    assert b.epsilon_alone == pytest.approx(oracle_epsilon([(1.0, 0.1, 10)], 1e-5), rel=1e-9)
    assert b.epsilon_after == pytest.approx(ledger.epsilon(delta=1e-5), rel=1e-12)


def test_a_crash_that_lost_only_the_final_newline_is_mended_on_the_next_charge(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.charge(_charge("a", 1, 1.0))
    ledger.charge(_charge("a", 2, 1.0))
    path.write_bytes(path.read_bytes()[:-1])  # the second record whole, its newline lost
    assert [c.server_round for c in ledger.charges()] == [1, 2]  # a whole record is not torn
    ledger.charge(_charge("a", 3, 1.0))
    assert [c.server_round for c in PrivacyLedger(path).charges()] == [1, 2, 3]
    assert path.read_text().count("\n") == 3


def test_a_ledger_of_the_earlier_version_must_be_imported_not_ignored(tmp_path):
    (tmp_path / "history.jsonl").write_text('{"run_id": "old"}\n')
    with pytest.raises(DataError, match=r"history.jsonl is the privacy history of an earlier fedtl version"):
        PrivacyLedger(tmp_path / "ledger.jsonl").charges()


# --- tamper evidence: a keyed, chained ledger and its head (issue 11) ----------------------------------


def _three(tmp_path) -> tuple[PrivacyLedger, float]:
    """A ledger of three charges, and their epsilon from the independent oracle."""
    ledger = PrivacyLedger(tmp_path / "state" / "ledger.jsonl", tmp_path / "secret")
    stretches = [(1.0, 0.1, 10), (1.2, 0.2, 20), (0.9, 0.05, 40)]
    for i, (sigma, q, steps) in enumerate(stretches):
        ledger.charge(_charge("a", i, sigma, rate=q, steps=steps))
    return ledger, oracle_epsilon(stretches, 1e-5)


def _refused_everywhere(ledger: PrivacyLedger, message: str) -> None:
    """Reading, accounting and charging are all refused with `message`; nothing is written."""
    before = ledger.path.read_bytes() if ledger.path.exists() else None
    for attempt in (ledger.charges, lambda: ledger.epsilon(delta=1e-5), lambda: ledger.charge(_charge("b", 1, 5.0))):
        with pytest.raises(DataError, match=message):
            attempt()
    assert (ledger.path.read_bytes() if ledger.path.exists() else None) == before


def test_the_key_is_the_sites_secret_and_each_record_carries_a_chained_hmac(tmp_path):
    ledger, _ = _three(tmp_path)
    assert ledger.key_path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o700
    key = bytes.fromhex(ledger.key_path.read_text().strip())
    previous = "0" * 64
    for line in ledger.path.read_text().splitlines():  # the construction the module docstring documents
        record = json.loads(line)
        mac = record.pop("mac")
        body = b"fedtl-ledger-v2\n" + previous.encode() + b"\n" + json.dumps(record, sort_keys=True).encode()
        assert mac == hmac.new(key, body, hashlib.sha256).hexdigest()
        previous = mac
    assert json.loads(ledger.head_path.read_text())["records"] == 3
    assert json.loads(ledger.head_path.read_text())["mac"] == previous


def test_a_sites_new_key_is_a_warning_to_back_it_up_and_a_lab_ledgers_is_not(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fedtl.client.ledger"):
        PrivacyLedger(tmp_path / "site" / "ledger.jsonl", secret_dir=tmp_path / "secret").charge(_charge("a", 1, 1.0))
        PrivacyLedger(tmp_path / "lab" / "ledger.jsonl").charge(_charge("a", 1, 1.0))
    site, lab = [r for r in caplog.records if "created its key" in r.getMessage()]
    assert site.levelno == logging.WARNING and "back up" in site.getMessage()
    assert lab.levelno == logging.INFO and "back up" not in lab.getMessage()


def test_a_deleted_ledger_is_refused_and_does_not_reset_the_budget(tmp_path):
    ledger, _ = _three(tmp_path)
    ledger.path.unlink()
    _refused_everywhere(
        ledger, r"ledger\.jsonl is missing, but its head .*ledger\.head says 3: it was truncated or del"
    )
    shutil.rmtree(ledger.path.parent)  # the whole state folder, lock file included
    _refused_everywhere(ledger, r"is missing, but its head .* says 3.* never delete or edit the ledger to reset")
    assert not ledger.path.exists()


@pytest.mark.parametrize("keep", [2, 0])
def test_a_truncated_ledger_is_refused(tmp_path, keep):
    ledger, _ = _three(tmp_path)
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text("".join(lines[:keep]))
    _refused_everywhere(ledger, rf"holds {keep} records, but its head .* says 3: it was truncated or deleted")


def test_an_edited_record_with_a_recomputed_crc_is_refused(tmp_path):
    ledger, expected = _three(tmp_path)
    lines = ledger.path.read_text().splitlines(keepends=True)
    record = json.loads(lines[1])
    del record["mac"]
    record["noise_multiplier"] = 50.0  # the round "cost" almost nothing
    record["crc32"] = zlib.crc32(json.dumps(record, sort_keys=True).encode())  # what passed the CRC-32 ledger
    lines[1] = json.dumps(record) + "\n"
    ledger.path.write_text("".join(lines))
    _refused_everywhere(ledger, r"line 2 carries no MAC: a record was added or rewritten outside fedtl")
    # The same edit signed with a key the editor made up fails its MAC.
    del record["crc32"]
    body = (
        b"fedtl-ledger-v2\n"
        + json.loads(lines[0])["mac"].encode()
        + b"\n"
        + json.dumps(record, sort_keys=True).encode()
    )
    lines[1] = json.dumps({**record, "mac": hmac.new(b"guess" * 8, body, hashlib.sha256).hexdigest()}) + "\n"
    ledger.path.write_text("".join(lines))
    _refused_everywhere(ledger, r"line 2 fails its MAC: the record was changed")


def test_a_record_with_its_checksum_dropped_is_refused(tmp_path):
    ledger, _ = _three(tmp_path)
    lines = ledger.path.read_text().splitlines(keepends=True)
    record = json.loads(lines[2])
    del record["mac"]
    lines[2] = json.dumps(record) + "\n"
    ledger.path.write_text("".join(lines))
    _refused_everywhere(ledger, r"line 3 carries no MAC")


def test_a_removed_or_reordered_record_breaks_the_chain(tmp_path):
    ledger, _ = _three(tmp_path)
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text(lines[0] + lines[2] + lines[1])
    _refused_everywhere(ledger, r"line 2 fails its MAC")
    ledger.path.write_text(lines[1] + lines[2])  # the first record dropped: same length as a head of 2 would say
    _refused_everywhere(ledger, r"line 1 fails its MAC")


def test_an_older_copy_of_the_ledger_is_refused(tmp_path):
    ledger, _ = _three(tmp_path)
    old = ledger.path.read_bytes()
    ledger.charge(_charge("a", 3, 1.0))
    ledger.charge(_charge("a", 4, 1.0))
    ledger.path.write_bytes(old)  # a backup from before the last two charges
    _refused_everywhere(ledger, r"holds 3 records, but its head .* says 5")


def test_a_missing_key_or_head_is_refused_with_the_fix(tmp_path):
    ledger, _ = _three(tmp_path)
    head = ledger.head_path.read_bytes()
    ledger.head_path.unlink()
    _refused_everywhere(ledger, r"has 3 signed records but its head .* is missing.*`fedtl site ledger adopt")
    ledger.head_path.write_bytes(head)
    key = ledger.key_path.read_bytes()
    ledger.key_path.unlink()
    _refused_everywhere(ledger, r"ledger key .*ledger\.key is missing but its head .* restore .*secret from a backup")
    ledger.head_path.unlink()
    _refused_everywhere(ledger, r"is signed, but its key .*ledger\.key is missing: restore")
    ledger.key_path.write_bytes(key)
    ledger.head_path.write_bytes(head)
    os.chmod(ledger.key_path, 0o644)
    _refused_everywhere(ledger, r"ledger key .* is readable or writable by others \(mode 644\).*chmod 600")
    os.chmod(ledger.key_path, 0o600)
    assert len(ledger.charges()) == 3


def test_a_crash_between_the_record_and_its_head_is_accepted_and_the_head_repaired(tmp_path):
    ledger, _ = _three(tmp_path)
    head_at_3 = ledger.head_path.read_bytes()
    ledger.charge(_charge("a", 3, 1.0))
    ledger.head_path.write_bytes(head_at_3)  # the record was fsynced, the head not yet moved
    assert [c.server_round for c in ledger.charges()] == [0, 1, 2, 3]
    assert ledger.read_state().head_behind
    ledger.charge(_charge("a", 4, 1.0))
    assert json.loads(ledger.head_path.read_text())["records"] == 5 and not ledger.read_state().head_behind
    ledger.charge(_charge("a", 5, 1.0))
    ledger.head_path.write_bytes(head_at_3)  # three behind: not a crash
    _refused_everywhere(ledger, r"holds 6 records but its head .* says 3: the head was restored from an older backup")


def test_a_torn_noise_free_record_costs_nothing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.charge(_charge("a", 1, 1.0, rate=0.1, steps=10))
    whole = json.dumps(noise_free_charge(run_id="a", server_round=1, kind="evaluation", delta=1e-5).record())
    _torn(path, whole[: whole.index('"kind"') + 3])
    assert ledger.epsilon(delta=1e-5) == pytest.approx(oracle_epsilon([(1.0, 0.1, 10)], 1e-5), rel=1e-9)


def test_noise_free_records_add_no_epsilon_for_fedtl_or_for_opacus_over_every_record(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.charge(_charge("a", 1, 1.1, rate=0.05, steps=100))
    for kind in ("evaluation", "ranking", "finetune-scores"):
        ledger.charge(noise_free_charge(run_id="a", server_round=1, kind=kind, delta=1e-5))
    ledger.charge(_charge("a", 2, 1.1, rate=0.05, steps=100))
    expected = oracle_epsilon([(1.1, 0.05, 200)], 1e-5)
    assert ledger.epsilon(delta=1e-5) == pytest.approx(expected, rel=1e-9)
    # A reviewer who feeds every record's accounting fields to Opacus gets the same: RDP at q = 0 is 0.
    raw = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    everything = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in raw]
    assert everything[1:4] == [(0.0, 0.0, 0)] * 3
    assert oracle_epsilon(everything, 1e-5) == pytest.approx(expected, rel=1e-9)
    (run,) = ledger.spend_by_run(delta=1e-5)
    assert (run.rounds, run.steps, run.noise_free) == (2, 200, 3)


def _legacy_ledger(path, charges: list[PrivacyCharge], *, unchecked: int = 0) -> None:
    """Write records as fedtl 0.2 did (a CRC-32 each), the first `unchecked` as fedtl 0.1 did (none)."""
    lines = []
    for i, c in enumerate(charges):
        record = c.record()
        if i >= unchecked:
            record["crc32"] = zlib.crc32(json.dumps(record, sort_keys=True).encode())
        lines.append(json.dumps(record) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))


def test_a_crc_ledger_is_refused_until_adopted_and_adoption_keeps_every_charge(tmp_path):
    ledger = PrivacyLedger(tmp_path / "state" / "ledger.jsonl", tmp_path / "secret")
    old = [_charge("old", 1, 1.3, rate=0.2, steps=30), _charge("old", 2, 1.3, rate=0.2, steps=30)]
    _legacy_ledger(ledger.path, old, unchecked=1)
    _refused_everywhere(ledger, r"was written by an earlier fedtl: its 2 record\(s\) carry a CRC-32 or no checksum")
    adoption = ledger.plan_adoption()
    assert adoption.charges == tuple(old) and adoption.unchecked == 1
    backup = ledger.adopt(adoption)
    assert backup.read_bytes() != ledger.path.read_bytes() and "pre-adopt" in backup.name
    charges = ledger.charges()
    assert charges[:2] == old and charges[2].kind == "adopted"
    assert f"file sha256 {adoption.sha256}" in charges[2].note and "1 unchecked" in charges[2].note
    assert ledger.epsilon(delta=1e-5) == pytest.approx(oracle_epsilon([(1.3, 0.2, 60)], 1e-5), rel=1e-9)
    with pytest.raises(DataError, match=r"verifies \(key, chain and head\): nothing to adopt"):
        ledger.plan_adoption()
    ledger.charge(_charge("new", 1, 1.0))
    assert len(ledger.charges()) == 4


def test_adoption_never_papers_over_an_edit_or_a_truncation(tmp_path):
    ledger, _ = _three(tmp_path)
    whole = ledger.path.read_text()
    lines = whole.splitlines(keepends=True)
    ledger.path.write_text(lines[0].replace('"noise_multiplier": 1.0', '"noise_multiplier": 9.0') + "".join(lines[1:]))
    with pytest.raises(DataError, match=r"line 1 fails its MAC"):
        ledger.plan_adoption()
    ledger.path.write_text("".join(lines[:2]))
    with pytest.raises(DataError, match=r"cannot adopt .*holds 2 records, but its head .* says 3"):
        ledger.plan_adoption()
    ledger.path.write_text(whole)
    ledger.key_path.unlink()
    ledger.head_path.unlink()
    with pytest.raises(DataError, match=r"cannot adopt .*`fedtl site ledger adopt --new-key` re-signs"):
        ledger.plan_adoption()
    adoption = ledger.plan_adoption(new_key=True)
    assert adoption.unchecked == 3
    ledger.adopt(adoption)
    assert [c.kind for c in ledger.charges()] == [DP_SGD] * 3 + ["adopted"]


def test_a_lost_head_is_resealed_by_adoption_when_the_chain_verifies(tmp_path):
    ledger, expected = _three(tmp_path)
    ledger.head_path.unlink()
    adoption = ledger.plan_adoption()
    assert adoption.unchecked == 0 and "head was missing or behind" in adoption.reason
    ledger.adopt(adoption)
    assert ledger.epsilon(delta=1e-5) == pytest.approx(expected, rel=1e-9)
    assert json.loads(ledger.head_path.read_text())["records"] == 4


def test_a_read_only_copy_of_a_ledger_can_be_read_and_verified(tmp_path):
    """A reviewer mounts a site's state read-only: reading and verifying need no lock file written there."""
    path = tmp_path / "state" / "privacy" / "ledger.jsonl"
    written = [_charge("a", 0, 4.0, kind=FEATURE_SUM, rate=1.0, steps=1), _charge("a", 1, 1.1, rate=0.1, steps=30)]
    for c in written:
        PrivacyLedger(path).charge(c)
    view = tmp_path / "view"
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path / "state"), str(view)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=False, capture_output=True)
        with pytest.raises(OSError):
            (view / "privacy" / "probe").write_text("")  # the view is read-only
        secret = tmp_path / "state" / "privacy" / "secret"  # the key, where the lab keeps it (not on the view)
        ledger = PrivacyLedger(view / "privacy" / "ledger.jsonl", secret_dir=secret)
        assert ledger.charges() == written
        (path.with_name(path.name + ".lock")).unlink()  # a copy that never had a lock file reads the same
        assert ledger.charges() == written
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)
