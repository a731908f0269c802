"""Tests for shared/features.py: frozen-backbone feature extraction, the cache key and the on-disk cache."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fedtl.shared.backbones import Preprocessing, build_backbone, fingerprint_backbone, get_backbone_spec
from fedtl.shared.features import (
    ExampleStore,
    FeatureCache,
    cached_features,
    example_hashes,
    extract_features,
    feature_cache_key,
    resolve_device,
)

TINY_DIM = 32


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Twelve 8x8 sklearn digits as uint8 grey images (N, 8, 8), and their labels."""
    bunch = load_digits()
    images = np.round(bunch.images[:12] * 255 / 16).astype(np.uint8)
    return images, bunch.target[:12].astype(np.int64)


@pytest.fixture
def tiny() -> torch.nn.Module:
    return build_backbone("tiny")


@pytest.fixture
def pre() -> Preprocessing:
    return get_backbone_spec("tiny").preprocessing


# --- extract_features ------------------------------------------------------------------------------


def test_extract_features_with_tiny_backbone(tiny, pre, digits):
    images, _ = digits
    fingerprint = fingerprint_backbone(tiny)
    tiny.train()  # extract_features must switch it to eval itself
    feats = extract_features(tiny, images, pre, batch_size=5, device="cpu", progress=False)
    assert feats.shape == (12, TINY_DIM)
    assert feats.dtype == np.float32
    assert np.isfinite(feats).all()
    assert len(np.unique(feats.round(5), axis=0)) == 12  # different digits, different features
    assert not tiny.training
    assert fingerprint_backbone(tiny) == fingerprint  # frozen: weights bit-identical
    # Oracle: one forward pass of the whole preprocessed batch.
    with torch.no_grad():
        direct = tiny(pre.apply(images)).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-6)


def test_extract_features_is_deterministic_and_batch_size_free(tiny, pre, digits):
    images, _ = digits
    a = extract_features(tiny, images, pre, batch_size=64, device="cpu", progress=False)
    b = extract_features(tiny, images, pre, batch_size=64, device="cpu", progress=False)
    c = extract_features(build_backbone("tiny"), images, pre, batch_size=1, device="cpu", progress=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_extract_features_leaves_the_images_alone(tiny, pre, digits):
    images, _ = digits
    before = images.copy()
    extract_features(tiny, images, pre, device="cpu", progress=False)
    np.testing.assert_array_equal(images, before)


def test_extract_features_of_no_images_keeps_the_feature_width(tiny, pre):
    feats = extract_features(tiny, np.zeros((0, 8, 8), np.uint8), pre, device="cpu", progress=False)
    assert feats.shape == (0, TINY_DIM)


# --- feature_cache_key -----------------------------------------------------------------------------


def test_without_a_terminal_an_extraction_says_once_done_what_it_passed(tiny, pre, digits, caplog):
    # pytest captures the output: no terminal, so tqdm draws no bar, and a log would otherwise show nothing.
    with caplog.at_level(logging.INFO, logger="fedtl.progress"):
        extract_features(tiny, digits[0][:7], pre, device="cpu", desc="site-0 train features")
        extract_features(tiny, digits[0][:7], pre, device="cpu", progress=False)  # asked for none: none
        extract_features(tiny, digits[0][:0], pre, device="cpu")  # nothing passed: nothing to say
    lines = [r.getMessage() for r in caplog.records if r.name == "fedtl.progress"]
    assert len(lines) == 1 and lines[0].startswith("site-0 train features: 7 inputs through the backbone in ")


def test_feature_cache_key_is_stable_and_sensitive_to_each_input(pre):
    base = feature_cache_key("bb-1", "data-1", pre)
    assert len(base) == 64 and int(base, 16) >= 0  # SHA-256 hex
    assert feature_cache_key("bb-1", "data-1", pre) == base
    # An equal Preprocessing built from lists (as from JSON) is the same key.
    assert feature_cache_key("bb-1", "data-1", Preprocessing(pre.image_size, list(pre.mean), list(pre.std))) == base
    variants = [
        feature_cache_key("bb-2", "data-1", pre),
        feature_cache_key("bb-1", "data-2", pre),
        feature_cache_key("bb-1", "data-1", Preprocessing(pre.image_size + 1, pre.mean, pre.std)),
        feature_cache_key("bb-1", "data-1", Preprocessing(pre.image_size, (0.4, 0.5, 0.5), pre.std)),
        feature_cache_key("bb-1", "data-1", Preprocessing(pre.image_size, pre.mean, (0.5, 0.5, 0.6))),
        feature_cache_key("data-1", "bb-1", pre),  # fields are not interchangeable
    ]
    assert len({base, *variants}) == len(variants) + 1


# --- FeatureCache ----------------------------------------------------------------------------------


def test_feature_cache_round_trip(tmp_path):
    cache = FeatureCache(tmp_path / "features")
    feats = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0], dtype=np.int64)
    assert cache.load("k") is None
    path = cache.save("k", feats, labels)
    assert path == cache.path("k") == tmp_path / "features" / "k.npz"
    loaded_feats, loaded_labels = cache.load("k")
    np.testing.assert_array_equal(loaded_feats, feats)
    np.testing.assert_array_equal(loaded_labels, labels)
    assert (loaded_feats.dtype, loaded_labels.dtype) == (np.float32, np.int64)
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["k.npz"]  # no temp file left behind


def _valid_npz_bytes(tmp_path) -> bytes:
    cache = FeatureCache(tmp_path / "scratch")
    return cache.save("x", np.ones((4, 3), np.float32), np.zeros(4, np.int64)).read_bytes()


CORRUPTIONS = [
    pytest.param(lambda valid: b"not an npz file at all" * 4, id="garbage"),
    pytest.param(lambda valid: valid[: len(valid) // 2], id="truncated-npz"),
    pytest.param(lambda valid: b"", id="empty-file"),
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_unreadable_cache_file_is_a_miss_and_gets_rewritten(tmp_path, tiny, pre, digits, corrupt, caplog):
    images, labels = digits
    cache = FeatureCache(tmp_path / "features")
    key = feature_cache_key(fingerprint_backbone(tiny), "digits-12", pre)
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_bytes(corrupt(_valid_npz_bytes(tmp_path)))

    with caplog.at_level(logging.WARNING, logger="fedtl.shared.features"):
        assert cache.load(key) is None
    assert "unreadable" in caplog.text

    feats, out_labels, hit = cached_features(
        cache,
        load_backbone=lambda: tiny,
        backbone_fingerprint=fingerprint_backbone(tiny),
        images=images,
        labels=labels,
        data_fingerprint="digits-12",
        preprocessing=pre,
        device="cpu",
        progress=False,
    )
    assert hit is False
    reloaded = cache.load(key)
    assert reloaded is not None
    np.testing.assert_array_equal(reloaded[0], feats)
    np.testing.assert_array_equal(reloaded[1], labels)


# --- cached_features -------------------------------------------------------------------------------


def test_cached_features_loads_the_backbone_only_on_a_miss(tmp_path, pre, digits):
    images, labels = digits
    calls = []

    def load_backbone():
        calls.append(1)
        return build_backbone("tiny")

    fingerprint = fingerprint_backbone(build_backbone("tiny"))
    cache = FeatureCache(tmp_path / "features")
    kwargs = dict(
        load_backbone=load_backbone,
        backbone_fingerprint=fingerprint,
        images=images,
        labels=labels.astype(np.int32),
        data_fingerprint="digits-12",
        device="cpu",
        progress=False,
    )

    feats, out_labels, hit = cached_features(cache, preprocessing=pre, **kwargs)
    assert (hit, len(calls)) == (False, 1)
    assert out_labels.dtype == np.int64
    np.testing.assert_array_equal(out_labels, labels)
    expected = extract_features(build_backbone("tiny"), images, pre, device="cpu", progress=False)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)

    feats2, labels2, hit2 = cached_features(cache, preprocessing=pre, **kwargs)
    assert (hit2, len(calls)) == (True, 1)  # a hit builds no backbone
    np.testing.assert_array_equal(feats2, feats)
    np.testing.assert_array_equal(labels2, out_labels)
    assert labels2.dtype == np.int64

    # Another preprocessing is another key: a miss again.
    other = Preprocessing(16, pre.mean, pre.std)
    _, _, hit3 = cached_features(cache, preprocessing=other, **kwargs)
    assert (hit3, len(calls)) == (False, 2)
    assert len(list((tmp_path / "features").glob("*.npz"))) == 2


# --- resolve_device --------------------------------------------------------------------------------


class CountingBackbone(torch.nn.Module):
    """The tiny backbone, counting the inputs it is run on (the oracle for what a store saves)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.seen = build_backbone("tiny"), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.inner(x)


def test_a_store_extracts_only_inputs_it_has_not_seen_and_gives_the_same_bits(tmp_path, pre):
    bunch = load_digits()
    images = np.round(bunch.images[:60] * 255 / 16).astype(np.uint8)
    labels = bunch.target[:60].astype(np.int64)
    backbone, store = CountingBackbone(), ExampleStore(tmp_path / "store")

    def features(idx, cache, store):
        return cached_features(
            FeatureCache(tmp_path / cache),
            load_backbone=lambda: backbone,
            backbone_fingerprint="fp",
            images=images[idx],
            labels=labels[idx],
            data_fingerprint=f"data-{idx.start}-{idx.stop}",
            preprocessing=pre,
            batch_size=7,
            device="cpu",
            progress=False,
            store=store,
        )[0]

    features(slice(0, 40), "site-a", store)  # a first partition
    assert backbone.seen == 40
    shifted = features(slice(20, 60), "site-b", store)  # another site's share overlaps it by 20 inputs
    assert backbone.seen == 60  # only the 20 new inputs ran through the backbone
    fresh = features(slice(20, 60), "site-c", None)  # no store: every input extracted again
    np.testing.assert_array_equal(shifted, fresh)  # a stored row is the same bits as a fresh pass


def test_a_store_hashes_inputs_by_content_and_skips_an_unreadable_shard(tmp_path, caplog):
    images = np.zeros((3, 8, 8), dtype=np.uint8)
    images[1, 0, 0] = 1
    hashes = example_hashes(images)
    assert hashes[0] == hashes[2] != hashes[1]  # same bytes, same hash
    assert example_hashes(images.astype(np.float32))[0] != hashes[0]  # the dtype counts
    assert example_hashes(np.array(["a loan", "a card"], dtype=object)) == example_hashes(["a loan", "a card"])
    store = ExampleStore(tmp_path)
    store.add("k", hashes[:2], np.eye(2, dtype=np.float32))
    np.testing.assert_array_equal(store.lookup("k", [hashes[1], "unseen"])[0], [0.0, 1.0])
    (tmp_path / "k" / "broken.npz").write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING):
        assert sorted(store.lookup("k", hashes)) == [0, 1, 2]  # 2 has 0's bytes; the broken shard is skipped
    assert "unreadable" in caplog.text


def test_resolve_device_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device().type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_cuda_without_cuda_is_refused():
    with pytest.raises(ValueError, match=r'`device` is "cuda" but no CUDA device is visible; use "auto" or "cpu"'):
        resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")
def test_cuda_bf16_features_agree_with_cpu():
    from fedtl.shared.data import load_dataset

    images = load_dataset("digits").train.images[:32]
    pre = get_backbone_spec("efficientnet_lite0").preprocessing
    cpu = extract_features(build_backbone("efficientnet_lite0"), images, pre, device="cpu", progress=False)
    gpu = extract_features(build_backbone("efficientnet_lite0"), images, pre, device="cuda", progress=False)
    # bf16 autocast: agreement to a few percent, and the same nearest neighbours.
    cos = (cpu * gpu).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))
    assert cos.min() > 0.98


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")
def test_cuda_extraction_runs_ahead_of_its_copies_and_returns_each_batch_in_order():
    from fedtl.shared.data import load_dataset
    from fedtl.shared.features import QUEUED_BATCHES

    batch = 8
    images = load_dataset("digits").train.images[: batch * (QUEUED_BATCHES + 5) + 3]  # past the queue's bound
    pre = get_backbone_spec("efficientnet_lite0").preprocessing
    model = build_backbone("efficientnet_lite0").eval().to("cuda", memory_format=torch.channels_last)
    queued = extract_features(model, images, pre, batch_size=batch, device="cuda", progress=False)
    cuda = torch.device("cuda")
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        one_by_one = [
            model(pre.apply(images[i : i + batch], device=cuda).contiguous(memory_format=torch.channels_last))
            .float()
            .cpu()
            .numpy()
            for i in range(0, len(images), batch)
        ]  # each batch sent, run and fetched before the next: the same kernels on the same inputs
    # A batch out of place or read before its copy arrived differs wholly, not in the last digits.
    np.testing.assert_allclose(queued, np.concatenate(one_by_one), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")
def test_a_federation_extracts_its_features_on_the_gpu(tmp_path):
    from fedtl.shared.config import RunConfig
    from fedtl.simulations.inprocess import run_inprocess

    cfg = RunConfig(backbone="efficientnet_lite0", image_size=64, num_rounds=1, device="cuda", out=str(tmp_path))
    summary = run_inprocess(cfg, num_sites=2)
    assert summary["all-sites-completed"] and summary["final"]["central-accuracy"] > 0.3


def test_a_store_reads_each_shard_once_and_finds_another_writers_shard(tmp_path, monkeypatch):
    reads = []
    load = np.load
    monkeypatch.setattr(np, "load", lambda path, *a, **kw: reads.append(Path(path).name) or load(path, *a, **kw))
    store = ExampleStore(tmp_path)
    hashes = [f"h{i}" for i in range(300)]
    for i in range(0, 300, 3):  # 100 sites, each looking up its inputs then adding them, as the lab prepares them
        assert store.lookup("k", hashes[i : i + 3]) == {}
        store.add("k", hashes[i : i + 3], np.full((3, 2), i, dtype=np.float32))
        assert sorted(store.lookup("k", hashes[: i + 3])) == list(range(i + 3))
    assert len(reads) == len(set(reads)) <= 100  # each shard read at most once, not once per lookup
    other = tmp_path / "k" / "from-another-process.npz"
    np.savez(other, hashes=np.asarray(["elsewhere"]), features=np.ones((1, 2), dtype=np.float32))
    os.utime(tmp_path / "k", ns=(0, 1))  # the folder's mtime moved (forced: same-tick writes may not move it)
    np.testing.assert_array_equal(store.lookup("k", ["elsewhere"])[0], [1.0, 1.0])
