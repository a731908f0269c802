"""Behaviour parity: whole federations give bit-identical models, metrics, epsilons and ledgers for a seed.

The fingerprints in tests/parity/ were recorded with the code before the one-pipeline restructuring
(tests/parity.py says how); any change of what a user can observe of these runs fails here.
"""

import pytest
from parity import CASES, SLOW_CASES, golden, run_case

FAST = [name for name in CASES if name not in SLOW_CASES]


def _compare(name, tmp_path):
    expected = golden(name)
    got = run_case(name, tmp_path)
    assert got["tensors"] == expected["tensors"], f"{name}: model tensors differ"
    assert got["metrics"] == expected["metrics"], f"{name}: metrics.jsonl differs"
    assert got["epsilon-per-site"] == expected["epsilon-per-site"], f"{name}: epsilon differs"
    assert got["ledgers"] == expected["ledgers"], f"{name}: ledger records differ"


@pytest.mark.slow
@pytest.mark.parametrize("name", FAST)
def test_parity(name, tmp_path):
    _compare(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_CASES)
def test_parity_slow(name, tmp_path):
    _compare(name, tmp_path)
