"""The heap during a backbone pass: freed blocks are reused inside `reuse_freed_memory`, returned after it."""

from __future__ import annotations

import platform
import resource
import threading

import numpy as np
import pytest

from fedtl.shared import heap
from fedtl.shared.backbones import build_backbone, resolve_preprocessing
from fedtl.shared.features import extract_features

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the heap settings are glibc's; elsewhere reuse_freed_memory does nothing"
)

BLOCK = 16 * 2**20  # float32 values: 64 MiB, over glibc's largest mmap threshold (32 MiB)


def _faults_of(work) -> int:
    """Return the minor page faults this process takes while `work()` runs."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    work()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _resident_mib() -> float:
    """Return this process's resident memory in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _returned_on_free() -> float:
    """Return how many MiB of 256 MiB, written in four blocks, leave the process when the blocks are freed."""
    blocks = [np.ones(BLOCK, np.float32) for _ in range(4)]
    holding = _resident_mib()
    del blocks
    return holding - _resident_mib()


def test_freed_memory_is_kept_during_a_pass_and_returned_when_it_ends():
    before = _resident_mib()
    with heap.reuse_freed_memory():
        assert _returned_on_free() < 50  # kept for the next batch (outside a pass most of it leaves at once)
        assert _returned_on_free() < 50
    assert _resident_mib() < before + 50  # the pass's end returned what it grew by


def test_nested_and_concurrent_passes_restore_only_when_the_last_ends():
    inner_done, outer_may_end = threading.Event(), threading.Event()

    def other_pass() -> None:
        with heap.reuse_freed_memory():
            inner_done.set()
            outer_may_end.wait(10)

    worker = threading.Thread(target=other_pass)
    before = _resident_mib()
    try:
        with heap.reuse_freed_memory():
            with heap.reuse_freed_memory():
                pass
            assert _returned_on_free() < 50  # the inner pass's end left the outer one's heap as it was
            worker.start()
            assert inner_done.wait(10)
            holding = _resident_mib()  # the 256 MiB just freed, kept
        assert _resident_mib() > holding - 50  # this pass's end handed nothing back: the other thread's still runs
        assert _returned_on_free() < 50
    finally:
        outer_may_end.set()
        worker.join(10)
    assert _resident_mib() < before + 50  # the last pass's end returned it


def test_a_backbone_pass_faults_its_activations_in_once_not_at_every_batch(monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (96, 28, 28), dtype=np.uint8)
    backbone, pre = build_backbone("efficientnet_lite0"), resolve_preprocessing("efficientnet_lite0", 224)

    def six_batches() -> None:  # 224 px, 16 a batch: MBConv block 1 expands each to 77 MiB
        extract_features(backbone, images, pre, batch_size=16, device="cpu", progress=False)

    six_batches()  # weights and thread pools in place
    reused = _faults_of(six_batches)  # the first batch grows the heap, the other five reuse it
    monkeypatch.setattr(heap, "_LIBC", None)  # glibc as it is outside a pass
    mapped = _faults_of(six_batches)  # every batch maps its largest blocks afresh
    assert reused * 3 < mapped, (reused, mapped)


def test_features_are_the_same_bits_whatever_the_heap_does(monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    backbone, pre = build_backbone("efficientnet_lite0"), resolve_preprocessing("efficientnet_lite0", 64)
    reused = extract_features(backbone, images, pre, batch_size=16, device="cpu", progress=False)
    monkeypatch.setattr(heap, "_LIBC", None)  # glibc's own settings throughout
    np.testing.assert_array_equal(
        extract_features(backbone, images, pre, batch_size=16, device="cpu", progress=False), reused
    )
