"""Tests of fedtl.shared.data: loaders (digits, .npz, image folders), labels, partitions and site splits."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images
from sklearn.model_selection import train_test_split

from fedtl.shared import data, dataset
from fedtl.shared.data import (
    DataSplits,
    ImageDataset,
    check_federation_data,
    load_dataset,
    load_image_file,
    site_split,
    validate_labels,
)
from fedtl.shared.errors import ConfigError, DataError
from fedtl.shared.loaders import load_site_dataset
from fedtl.shared.partitioners import partition_indices

# --- helpers ---------------------------------------------------------------------------------------------


def _digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Independent oracle of the digits conversion: 0..16 -> round(x*255/16) as uint8."""
    bunch = load_digits()
    return np.round(bunch.images * 255 / 16).astype(np.uint8), bunch.target


def _save_png(array: np.ndarray, path: Path) -> Path:
    """Write a uint8 (H,W) or (H,W,3) array as a lossless PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _make_digit_folder(root: Path, per_class: int = 6, classes: dict[str, int] | None = None) -> dict[str, list]:
    """Save real digit images as root/<class>/<i>.png; returns the saved arrays per class name."""
    images, targets = _digits_uint8()
    classes = classes or {"zero": 0, "one": 1, "two": 2}
    saved: dict[str, list] = {}
    for name, digit in classes.items():
        picks = np.flatnonzero(targets == digit)[:per_class]
        saved[name] = [images[i] for i in picks]
        for j, i in enumerate(picks):
            _save_png(images[i], root / name / f"{j:03d}.png")
    return saved


def _assert_labels_match_folders(dataset: ImageDataset, saved: dict[str, list]) -> None:
    """Every loaded image must be one of the images saved under the folder its label names."""
    for image, label in zip(dataset.images, dataset.labels):
        candidates = saved[dataset.label_names[label]]
        assert any(np.array_equal(image, c) for c in candidates)


def _id_dataset(labels: np.ndarray) -> ImageDataset:
    """A dataset whose images encode their own position (pixels 0,1 = idx // 256, idx % 256)."""
    n = labels.size
    images = np.zeros((n, 2, 2), np.uint8)
    images[:, 0, 0] = np.arange(n) // 256
    images[:, 0, 1] = np.arange(n) % 256
    names = tuple(str(k) for k in range(int(labels.max()) + 1))
    return ImageDataset(images, labels.astype(np.int64), names, "ids")


def _ids(dataset: ImageDataset) -> np.ndarray:
    return dataset.images[:, 0, 0].astype(np.int64) * 256 + dataset.images[:, 0, 1]


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _medmnist_like(rng: np.random.Generator, n: int = 12, k: int = 3) -> dict[str, np.ndarray]:
    out = {}
    for split in ("train", "val", "test"):
        out[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(n) % k).astype(np.uint8)[:, None]
    return out


# --- module hygiene --------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["data", "dataset", "images", "labels", "loaders", "npz", "metrics"])
def test_module_does_not_import_flower_or_opacus(module):
    tree = ast.parse((Path(data.__file__).parent / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"flwr", "opacus"}


# --- digits ----------------------------------------------------------------------------------------------


def test_digits_loads_with_stratified_seeded_split():
    splits = load_dataset("digits", seed=3, test_fraction=0.2)
    train, test = splits.train, splits.test
    assert isinstance(splits, DataSplits) and test is not None
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (8, 8)
    assert train.labels.dtype == np.int64 and train.labels.shape == (len(train),)
    assert train.label_names == tuple(str(d) for d in range(10)) == test.label_names
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.images.max() == 255
    # Oracle: sklearn's own stratified split of the same seed, on the independently converted images.
    images, targets = _digits_uint8()
    tr, te = train_test_split(np.arange(1797), test_size=0.2, stratify=targets, random_state=3)
    np.testing.assert_array_equal(train.images, images[np.sort(tr)])
    np.testing.assert_array_equal(test.labels, targets[np.sort(te)])
    assert train.class_counts() == np.bincount(targets[tr], minlength=10).tolist()


def test_loading_and_splitting_data_and_scoring_do_not_import_scikit_learn():
    # Every site's ClientApp process loads, splits and scores; scikit-learn alone would add 1 s to each.
    code = (
        "import sys, numpy as np\n"
        "from fedtl.shared.data import load_dataset\n"
        "from fedtl.shared.metrics import classification_metrics\n"
        "s = load_dataset('digits', seed=1)\n"
        "classification_metrics(s.test.labels, np.full((len(s.test), 10), 0.1))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def _label_cases():
    rng = np.random.default_rng(7)
    yield np.repeat(np.arange(10), 2)  # the smallest stratifiable case
    yield np.array([0] * 7 + [1] * 3 + [2] * 2)  # unequal shares, ties in the remainders
    for _ in range(12):
        k = int(rng.integers(2, 12))
        yield rng.integers(0, k, int(rng.integers(3 * k, 400)))
    yield np.array([0, 1, 1, 1, 1])  # a class of one: not stratifiable, plain shuffle


@pytest.mark.parametrize("fraction", [0.2, 0.25, 0.5, 0.1])
@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1])
def test_split_draws_exactly_scikit_learns_split(fraction, seed):
    for labels in _label_cases():
        n = labels.size
        ours_train, ours_test, stratified = dataset._split_indices(labels, fraction, seed)  # noqa: SLF001
        n_test = min(max(int(np.ceil(fraction * n)), 1), n - 1)
        tr, te = train_test_split(
            np.arange(n), test_size=n_test, stratify=labels if stratified else None, random_state=seed
        )
        np.testing.assert_array_equal(ours_train, np.sort(tr))
        np.testing.assert_array_equal(ours_test, np.sort(te))


def test_bundled_digits_equal_load_digits():
    pixels, target = dataset._bundled_digits()  # noqa: SLF001
    bunch = load_digits()
    np.testing.assert_array_equal(pixels, bunch.images)
    np.testing.assert_array_equal(target, bunch.target)


def test_digits_is_deterministic_for_a_seed():
    a, b, c = (load_dataset("digits", seed=s) for s in (0, 0, 1))
    assert a.train.fingerprint() == b.train.fingerprint()
    assert a.test.fingerprint() == b.test.fingerprint()
    assert a.train.fingerprint() != c.train.fingerprint()


def test_fingerprint_is_stable_across_processes_and_sensitive_to_content():
    train = load_dataset("digits").train
    code = "from fedtl.shared.data import load_dataset; print(load_dataset('digits').train.fingerprint())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == train.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", train.fingerprint())

    images = train.images.copy()
    images[5, 3, 4] ^= 1
    assert ImageDataset(images, train.labels, train.label_names, "x").fingerprint() != train.fingerprint()
    labels = train.labels.copy()
    labels[0] = (labels[0] + 1) % 10
    assert ImageDataset(train.images, labels, train.label_names, "x").fingerprint() != train.fingerprint()
    renamed = tuple(f"d{n}" for n in train.label_names)
    assert ImageDataset(train.images, train.labels, renamed, "x").fingerprint() != train.fingerprint()
    # The source is a label for messages, not part of the data.
    assert ImageDataset(train.images, train.labels, train.label_names, "y").fingerprint() == train.fingerprint()


def test_subset_and_class_counts():
    train = load_dataset("digits").train
    picked = train.subset(np.array([4, 0, 9]))
    np.testing.assert_array_equal(picked.images, train.images[[4, 0, 9]])
    np.testing.assert_array_equal(picked.labels, train.labels[[4, 0, 9]])
    assert len(train.subset(np.array([], dtype=np.int64))) == 0
    assert len(train.subset(np.array([]))) == 0
    counts = train.class_counts()
    assert len(counts) == 10 and sum(counts) == len(train)


def test_image_dataset_rejects_bad_arrays():
    labels = np.zeros(2, np.int64)
    with pytest.raises(DataError, match=r"src: `images` must be a uint8 numpy array, got float32"):
        ImageDataset(np.zeros((2, 4, 4), np.float32), labels, ("a",), "src")
    with pytest.raises(DataError, match=r"must have shape \(N,H,W\) or \(N,H,W,3\), got \(2, 4, 4, 4\)"):
        ImageDataset(np.zeros((2, 4, 4, 4), np.uint8), labels, ("a",), "src")
    with pytest.raises(DataError, match=r"`labels` must have shape \(2,\) to match 2 images, got \(3,\)"):
        ImageDataset(np.zeros((2, 4, 4), np.uint8), np.zeros(3, np.int64), ("a",), "src")
    with pytest.raises(DataError, match=r"src: label 1 at index 1 is outside the allowed range \[0, 1\)"):
        ImageDataset(np.zeros((2, 4, 4), np.uint8), np.array([0, 1]), ("a",), "src")


def test_load_dataset_rejects_unknown_sources_and_fractions(tmp_path):
    with pytest.raises(DataError, match=r"data source 'nope/x' does not exist; accepted: 'digits'"):
        load_dataset("nope/x")
    text = tmp_path / "data.csv"
    text.write_text("1,2\n")
    with pytest.raises(DataError, match=r"CSV manifest .*data.csv: missing column\(s\) 'path', 'label'"):
        load_dataset(str(text))
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ConfigError, match=rf"`test_fraction` must be a number in \(0, 1\), got {bad}"):
            load_dataset("digits", test_fraction=bad)
    with pytest.raises(ConfigError, match=r"`seed` must be an integer in \[0, 2\*\*32\), got -1"):
        load_dataset("digits", seed=-1)


# --- labels ----------------------------------------------------------------------------------------------


def test_validate_labels_accepts_column_and_integral_floats():
    out = validate_labels(np.array([[0], [2], [1]], np.uint8), 3, source="s")
    assert out.dtype == np.int64 and out.tolist() == [0, 2, 1]
    assert validate_labels(np.array([1.0, 0.0]), 2, source="s").tolist() == [1, 0]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1, 3, 1]), r"f\.csv: label 3 at index 2 is outside the allowed range \[0, 3\)"),
        (np.array([0, -2, 1]), r"f\.csv: label -2 at index 1 is negative"),
        (np.array([0.0, 1.0, 1.5]), r"f\.csv: label 1\.5 at index 2 is not an integer"),
        (np.array([0.0, np.nan]), r"f\.csv: label nan at index 1 is not an integer"),
        (np.array(["a", "b"]), r"f\.csv: labels must be integers, got dtype <U1"),
        (np.zeros((4, 3)), r"f\.csv: labels must have shape \(N,\) or \(N,1\), got \(4, 3\)"),
    ],
)
def test_validate_labels_names_the_first_bad_label(labels, message):
    with pytest.raises(DataError, match=message):
        validate_labels(labels, 3, source="f.csv")
    with pytest.raises(DataError, match="fix"):
        validate_labels(labels, 3, source="f.csv")


# --- .npz ------------------------------------------------------------------------------------------------


def test_breastmnist_npz_loads_train_plus_val(breastmnist_path):
    splits = load_dataset(str(breastmnist_path))
    train, test = splits.train, splits.test
    assert len(train) == 546 + 78 and len(test) == 156
    assert train.images.shape == (624, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (156, 28, 28)
    assert train.label_names == ("malignant", "normal/benign") and train.labels.dtype == np.int64  # MedMNIST docs
    with np.load(breastmnist_path) as raw:
        np.testing.assert_array_equal(train.images, np.concatenate([raw["train_images"], raw["val_images"]]))
        np.testing.assert_array_equal(train.labels, np.concatenate([raw["train_labels"], raw["val_labels"]])[:, 0])
        np.testing.assert_array_equal(test.labels, raw["test_labels"][:, 0])
    assert sum(train.class_counts()) == 624


def test_npz_label_names_and_inferred_class_count(tmp_path):
    arrays = _medmnist_like(np.random.default_rng(0))
    inferred = load_dataset(str(_write_npz(tmp_path / "a.npz", **arrays)))
    assert inferred.train.label_names == ("0", "1", "2") and len(inferred.train) == 24
    named = load_dataset(str(_write_npz(tmp_path / "b.npz", label_names=np.array(["x", "y", "z", "w"]), **arrays)))
    assert named.train.label_names == ("x", "y", "z", "w")
    assert named.train.class_counts() == [8, 8, 8, 0]


def test_npz_label_out_of_range_names_value_and_index(tmp_path):
    arrays = _medmnist_like(np.random.default_rng(1), k=2)
    arrays["val_labels"][4, 0] = 7
    path = _write_npz(tmp_path / "bad.npz", label_names=np.array(["benign", "malignant"]), **arrays)
    with pytest.raises(DataError, match=r"bad\.npz key 'val_labels': label 7 at index 4 is outside .*\[0, 2\)"):
        load_dataset(str(path))
    arrays["val_labels"][4, 0] = 1
    arrays["test_labels"] = arrays["test_labels"].astype(np.int64)
    arrays["test_labels"][2, 0] = -1
    path = _write_npz(tmp_path / "neg.npz", **arrays)
    with pytest.raises(DataError, match=r"neg\.npz key 'test_labels': label -1 at index 2 is negative"):
        load_dataset(str(path))


def test_npz_missing_key_names_it(tmp_path):
    arrays = _medmnist_like(np.random.default_rng(2))
    del arrays["test_labels"]
    path = _write_npz(tmp_path / "partial.npz", **arrays)
    with pytest.raises(DataError, match=r"missing key\(s\) 'test_labels'; found keys \['test_images', 'train_images'"):
        load_dataset(str(path))
    arrays = _medmnist_like(np.random.default_rng(2))
    del arrays["val_labels"]
    with pytest.raises(DataError, match=r"missing key\(s\) 'val_labels'"):
        load_dataset(str(_write_npz(tmp_path / "noval.npz", **arrays)))


def test_npz_without_val_pair_and_bad_files(tmp_path):
    arrays = _medmnist_like(np.random.default_rng(3))
    del arrays["val_labels"], arrays["val_images"]
    splits = load_dataset(str(_write_npz(tmp_path / "noval.npz", **arrays)))
    assert len(splits.train) == 12 and len(splits.test) == 12
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=r"cannot read .*garbage\.npz as \.npz: it is not a zip archive") as err:
        load_dataset(str(garbage))
    assert "pickle" not in str(err.value)  # numpy's own message would suggest loading it unsafely
    single = tmp_path / "single.npz"
    np.save(single.with_suffix(".npy"), arrays["train_images"])
    single.with_suffix(".npy").rename(single)
    with pytest.raises(DataError, match=r"single\.npz as \.npz: it is one \.npy array, not an \.npz archive"):
        load_dataset(str(single))
    whole = _write_npz(tmp_path / "whole.npz", **arrays).read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    with pytest.raises(DataError, match=r"cannot read .*cut\.npz as \.npz: BadZipFile.*; fix: save it"):
        load_dataset(str(cut))
    arrays = _medmnist_like(np.random.default_rng(3))
    arrays["test_images"] = arrays["test_images"].astype(np.float32) / 255
    with pytest.raises(DataError, match=r"'test_images' has dtype float32, expected uint8"):
        load_dataset(str(_write_npz(tmp_path / "float.npz", **arrays)))


def test_npz_site_arrays_fill_groups_and_must_cover_the_pool(tmp_path):
    arrays = _medmnist_like(np.random.default_rng(5))
    sites = {split: np.array([f"{split}-{i % 2}" for i in range(12)]) for split in ("train", "val", "test")}
    path = _write_npz(tmp_path / "sites.npz", **arrays, **{f"{k}_sites": v for k, v in sites.items()})
    splits = load_dataset(str(path))
    np.testing.assert_array_equal(splits.train.groups, np.concatenate([sites["train"], sites["val"]]))
    np.testing.assert_array_equal(splits.test.groups, sites["test"])
    train, _ = site_split(splits.train, 3, 4, scheme="natural")  # sorted ids: train-0, train-1, val-0, val-1
    assert set(train.groups.tolist()) == {"val-1"}
    assert load_dataset(str(_write_npz(tmp_path / "plain.npz", **arrays))).train.groups is None
    partial = _write_npz(tmp_path / "partial.npz", **arrays, train_sites=sites["train"])
    with pytest.raises(DataError, match=r"has \['train_sites'\] but not \['val_sites'\]; .*fix: save the missing key"):
        load_dataset(str(partial))
    short = _write_npz(tmp_path / "short.npz", **arrays, train_sites=sites["train"][:5], val_sites=sites["val"])
    with pytest.raises(DataError, match=r"short\.npz key 'train_sites': site ids \(`groups`\) must have shape \(12,\)"):
        load_dataset(str(short))


# --- image folders ---------------------------------------------------------------------------------------


def test_image_folder_loads_with_labels_from_folder_names(tmp_path):
    saved = _make_digit_folder(tmp_path / "digits_png", per_class=6)
    (tmp_path / "digits_png" / "one" / "notes.txt").write_text("ignored: not an image")
    splits = load_dataset(str(tmp_path / "digits_png"), seed=0, test_fraction=0.5)
    train, test = splits.train, splits.test
    assert train.label_names == ("one", "two", "zero")  # sorted folder names
    assert train.images.shape == (9, 8, 8) and test.images.shape == (9, 8, 8)
    assert train.images.dtype == np.uint8
    assert train.class_counts() == [3, 3, 3] == test.class_counts()  # stratified
    _assert_labels_match_folders(train, saved)
    _assert_labels_match_folders(test, saved)
    again = load_dataset(str(tmp_path / "digits_png"), seed=0, test_fraction=0.5)
    assert again.train.fingerprint() == train.fingerprint()


def test_image_folder_with_one_colour_image_becomes_rgb(tmp_path):
    root = tmp_path / "mixed"
    saved = _make_digit_folder(root, per_class=3, classes={"grey": 0, "photo": 1})
    photo = load_sample_images().images[0][100:108, 200:208]  # (8, 8, 3) crop of china.jpg
    _save_png(photo, root / "photo" / "UPPER.PNG")
    splits = load_dataset(str(root), test_fraction=0.3)
    everything = np.concatenate([splits.train.images, splits.test.images])
    assert everything.shape == (7, 8, 8, 3)
    assert any(np.array_equal(image, photo) for image in everything)
    grey = np.stack([np.repeat(g[..., None], 3, axis=-1) for g in saved["grey"]])
    assert sum(any(np.array_equal(image, g) for g in grey) for image in everything) == 3


def test_image_folder_corrupt_files_are_named(tmp_path):
    root = tmp_path / "corrupt"
    _make_digit_folder(root, per_class=3)
    valid = (root / "one" / "000.png").read_bytes()
    truncated = root / "one" / "truncated.png"
    truncated.write_bytes(valid[: len(valid) // 2])
    with pytest.raises(DataError, match=rf"cannot decode image file {re.escape(str(truncated))}: \w+Error: \S"):
        load_dataset(str(root))
    truncated.unlink()
    noise = root / "two" / "noise.PNG"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=rf"cannot decode image file {re.escape(str(noise))}.*fix: re-export"):
        load_dataset(str(root))


def test_image_folder_empty_and_empty_class(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"image folder {re.escape(str(empty))} is empty; expected"):
        load_dataset(str(empty))
    root = tmp_path / "one_empty_class"
    _make_digit_folder(root, per_class=3)
    (root / "three").mkdir()
    (root / "three" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder\(s\) \['three'\] hold no image files; fix: add images"):
        load_dataset(str(root))


def test_image_folder_mixed_sizes_names_the_odd_file(tmp_path):
    root = tmp_path / "sizes"
    _make_digit_folder(root, per_class=4)
    odd = _save_png(np.zeros((10, 12), np.uint8), root / "two" / "odd.png")
    message = rf"most are 8x8 \(width x height\) but 1 differ: {re.escape(str(odd))} \(12x10\); fix: resize them"
    with pytest.raises(DataError, match=message):
        load_dataset(str(root))


def test_image_folder_train_test_layout_is_honoured(tmp_path):
    root = tmp_path / "layout"
    saved_train = _make_digit_folder(root / "train", per_class=5, classes={"a": 3, "b": 4})
    saved_test = _make_digit_folder(root / "test", per_class=2, classes={"a": 3, "b": 4})
    splits = load_dataset(str(root), test_fraction=0.5)
    assert splits.train.class_counts() == [5, 5] and splits.test.class_counts() == [2, 2]
    _assert_labels_match_folders(splits.train, saved_train)
    _assert_labels_match_folders(splits.test, saved_test)
    # A class only the test split has: a legal (if odd) data set; the site loader reports it.
    _make_digit_folder(root / "test", per_class=2, classes={"c": 5})
    splits = load_dataset(str(root))
    assert splits.train.label_names == ("a", "b", "c") and splits.train.class_counts() == [5, 5, 0]


def test_load_image_file_modes_and_errors(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image_file(tmp_path / "rgba.png"), rgba[..., :3])
    Image.fromarray(rgba[..., 0]).convert("P").save(tmp_path / "p.gif")
    assert load_image_file(tmp_path / "p.gif").shape == (5, 6, 3)
    Image.fromarray(rgba[..., 0] > 127).save(tmp_path / "bw.bmp")
    assert set(np.unique(load_image_file(tmp_path / "bw.bmp"))) <= {0, 255}
    deep = np.array([[0, 65535], [32768, 257]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    np.testing.assert_array_equal(load_image_file(tmp_path / "deep.tif"), [[0, 255], [128, 1]])

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match=rf"cannot decode image file {re.escape(str(corrupt))}"):
        load_image_file(corrupt)
    with pytest.raises(DataError, match=rf"image file {re.escape(str(tmp_path / 'gone.png'))} does not exist"):
        load_image_file(tmp_path / "gone.png")


# --- site_split ------------------------------------------------------------------------------------------


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    everything = np.concatenate(parts)
    assert everything.size == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3", "quantity:0.5", "classes:2"])
def test_site_split_sizes_add_up_and_sites_are_disjoint(scheme):
    labels = np.repeat(np.arange(4), 50)
    dataset = _id_dataset(labels)
    parts = partition_indices(labels, 5, scheme=scheme, seed=2)
    seen = []
    for site in range(5):
        train, test = site_split(dataset, site, 5, scheme=scheme, seed=2, local_test_fraction=0.25)
        assert len(train) + len(test) == parts[site].size and len(train) >= 1 and len(test) >= 1
        ids_train, ids_test = _ids(train), _ids(test)
        assert not set(ids_train) & set(ids_test)
        np.testing.assert_array_equal(np.sort(np.concatenate([ids_train, ids_test])), parts[site])
        np.testing.assert_array_equal(train.labels, labels[ids_train])
        seen.append(np.concatenate([ids_train, ids_test]))
    _assert_disjoint_cover(seen, labels.size)
    first, again = (site_split(dataset, 3, 5, scheme=scheme, seed=2, local_test_fraction=0.25) for _ in range(2))
    assert [d.fingerprint() for d in first] == [d.fingerprint() for d in again]


def test_site_split_is_stratified_when_possible():
    dataset = _id_dataset(np.repeat(np.arange(2), 40))
    train, test = site_split(dataset, 0, 2, seed=0, local_test_fraction=0.25)
    assert len(test) == 10
    assert abs(test.class_counts()[0] - 5) <= 1


def test_site_split_bad_arguments():
    dataset = _id_dataset(np.repeat(np.arange(2), 10))
    for bad in (-1, 4):
        with pytest.raises(ConfigError, match=rf"`partition_id` must be an integer in \[0, 4\).*got {bad}"):
            site_split(dataset, bad, 4)
    with pytest.raises(ConfigError, match=r"`local_test_fraction` must be a number in \(0, 1\), got 1\.0"):
        site_split(dataset, 0, 4, local_test_fraction=1.0)
    with pytest.raises(ConfigError, match=r"partition 0 of 20 over ids has 1 sample\(s\)"):
        site_split(dataset, 0, 20)


def test_permuted_labels_are_the_fixed_derangement_on_both_splits():
    labels = np.repeat(np.arange(3), 30)
    dataset = _id_dataset(labels)
    plain = site_split(dataset, 1, 3, scheme="dirichlet:1", seed=4)
    permuted = site_split(dataset, 1, 3, scheme="dirichlet:1", seed=4, permute_labels=True)
    for honest, moved in zip(plain, permuted):
        np.testing.assert_array_equal(_ids(moved), _ids(honest))  # same images, same split
        np.testing.assert_array_equal(moved.labels, [{0: 1, 1: 2, 2: 0}[y] for y in labels[_ids(honest)]])
        assert not np.any(moved.labels == honest.labels)
        assert moved.label_names == honest.label_names
    single = _id_dataset(np.zeros(10, np.int64))
    with pytest.raises(ConfigError, match=r"`permute_labels` needs at least 2 classes to permute, but ids has 1"):
        site_split(single, 0, 2, permute_labels=True)


def test_natural_site_split_follows_the_site_ids():
    labels = np.tile(np.arange(2), 30)
    groups = np.repeat(np.array(["b", "a", "c"]), 20)
    dataset = _id_dataset(labels)
    with_sites = ImageDataset(dataset.images, dataset.labels, dataset.label_names, "ids", groups=groups)
    for site, name in enumerate(["a", "b", "c"]):  # partitions in sorted site-id order
        train, test = site_split(with_sites, site, 3, scheme="natural", seed=0)
        ids = np.concatenate([_ids(train), _ids(test)])
        np.testing.assert_array_equal(np.sort(ids), np.flatnonzero(groups == name))
        assert set(train.groups.tolist()) == {name} == set(test.groups.tolist())
    with pytest.raises(DataError, match=r"'natural' needs the site of every image, but ids has no site ids; fix:"):
        site_split(dataset, 0, 3, scheme="natural")
    with pytest.raises(ConfigError, match=r"the data has 3 site id\(s\) but num_partitions=2"):
        site_split(with_sites, 0, 2, scheme="natural")
    lonely = np.array(["a"] * 59 + ["z"])
    one = ImageDataset(dataset.images, dataset.labels, dataset.label_names, "ids", groups=lonely)
    with pytest.raises(ConfigError, match=r"partition 1 \(site id 'z'\) of 2 over ids has 1 sample\(s\)"):
        site_split(one, 1, 2, scheme="natural")


def test_groups_are_validated_carried_by_subset_and_left_out_of_the_fingerprint():
    dataset = _id_dataset(np.tile(np.arange(2), 5))
    groups = np.array(list("aabbccddee"))
    with_sites = ImageDataset(dataset.images, dataset.labels, dataset.label_names, "ids", groups=groups)
    assert with_sites.fingerprint() == dataset.fingerprint()
    np.testing.assert_array_equal(with_sites.subset(np.array([9, 2])).groups, ["e", "b"])
    assert dataset.subset(np.array([1])).groups is None
    with pytest.raises(
        DataError, match=r"ids: site ids \(`groups`\) must have shape \(10,\), one per image, got \(3,\)"
    ):
        ImageDataset(dataset.images, dataset.labels, dataset.label_names, "ids", groups=groups[:3])


def test_load_dataset_reads_a_csv_manifest_of_dicom_files_like_a_site(tmp_path):
    from site_files import write_csv, write_dicom

    splits = load_dataset("digits", seed=0)
    rows = []
    for i in range(40):
        image, label = splits.train.images[i], str(splits.train.labels[i])
        write_dicom(tmp_path / "dcm" / f"{i}.dcm", image.astype(np.uint16) * 16, window=(2040.0, 4081.0))
        rows.append([f"dcm/{i}.dcm", label, "test" if i % 4 == 0 else "train"])
    loaded = load_dataset(str(write_csv(tmp_path / "manifest.csv", rows, header=("path", "label", "split"))))
    assert len(loaded.train) == 30 and len(loaded.test) == 10
    assert loaded.train.images.shape[1:] == (8, 8) and loaded.train.images.dtype == np.uint8


# --- issue 12: the federation's data is checked once, before any site trains ---------------------------


def _manifest(root: Path, labels: list[str]) -> Path:
    """A CSV manifest of real digit images (one per row) with the given labels."""
    images, _ = _digits_uint8()
    lines = ["path,label"]
    for i, label in enumerate(labels):
        _save_png(images[i], root / f"{i}.png")
        lines.append(f"{i}.png,{label}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root / "m.csv"


def test_simulation_data_with_clashing_labels_is_refused_before_any_site(tmp_path, _isolated_fedtl_home):
    manifest = _manifest(tmp_path, ["0", "1.0", "MALIGNANT", "malignant"] * 5)
    with pytest.raises(DataError, match=r"m.csv: labels that would train as separate classes.*'MALIGNANT' at line 4, "):
        load_dataset(manifest)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(DataError, match=r"differ only by case"):
        check_federation_data(str(manifest), num_sites=2)
    assert sorted(tmp_path.rglob("*")) == before and not any(_isolated_fedtl_home.iterdir())  # nothing left


def test_one_class_data_is_refused_for_a_federation(tmp_path):
    one = _manifest(tmp_path, ["benign"] * 10)
    with pytest.raises(DataError, match=r"m.csv: only the class 'benign'; a classifier needs at least 2 classes"):
        check_federation_data(str(one), num_sites=2)
    arrays = _medmnist_like(np.random.default_rng(7), k=2)
    for split in ("train", "val", "test"):
        arrays[f"{split}_labels"][:] = 0
    zero = _write_npz(tmp_path / "zero.npz", **arrays)
    with pytest.raises(DataError, match=r"zero.npz: every label is 0 and the file names no classes"):
        load_dataset(zero)
    with pytest.raises(DataError, match=r"only 1 class\(es\) \['a'\] have training images"):
        load_dataset(zero, label_names=["a", "b"])  # declared: a site may hold one class, a federation may not
    assert load_site_dataset(zero, label_names=["a", "b"]).report.class_counts["train"] == {"a": 24, "b": 0}
    named = _write_npz(tmp_path / "named.npz", label_names=np.array(["benign", "malignant"]), **arrays)
    with pytest.raises(DataError, match=r"only 1 class\(es\) \['benign'\] have training images .*'malignant': 0"):
        load_dataset(named)


def test_declared_classes_in_any_order_fix_the_class_order_everywhere(tmp_path):
    saved = _make_digit_folder(tmp_path / "f", per_class=4, classes={"malignant": 1, "benign": 0})
    splits = load_dataset(tmp_path / "f", label_names=["malignant", "benign"])
    assert splits.train.label_names == ("malignant", "benign")
    _assert_labels_match_folders(splits.train, saved)
    digits = load_dataset("digits", label_names=[str(d) for d in range(9, -1, -1)])
    oracle = load_dataset("digits")
    np.testing.assert_array_equal(digits.train.labels, 9 - oracle.train.labels)
    with pytest.raises(DataError, match=r"1 label\(s\) not in the federation's label_names: 'benign'"):
        load_dataset(tmp_path / "f", label_names=["malignant", "normal"])
    checked = check_federation_data(str(tmp_path / "f"), label_names=["malignant", "benign"], num_sites=2)
    assert checked.label_names == ("malignant", "benign")


def test_check_federation_data_reports_classes_depth_and_every_sites_share(tmp_path):
    checked = check_federation_data("digits", num_sites=3, partition="iid", seed=1)
    assert checked.label_names == tuple(str(d) for d in range(10))
    train = load_dataset("digits", seed=1).train
    oracle = partition_indices(train.labels, 3, scheme="iid", seed=1)
    assert [a + b for a, b in checked.site_sizes] == [part.size for part in oracle]
    summary = checked.summary()
    assert "pixels: 8-bit (sklearn digits 0..16 scaled to 0..255)" in summary and "sites: 3," in summary


def test_check_federation_data_refuses_what_a_site_would_refuse_later(tmp_path):
    with pytest.raises(
        ConfigError, match=r"`num_partitions` must be an integer in \[1, 1437\] .*got 2000; fix: use fewer"
    ):
        check_federation_data("digits", num_sites=2000)
    parts = partition_indices(load_dataset("digits").train.labels, 1000, scheme="iid", seed=0)
    small = next(k for k, part in enumerate(parts) if part.size < 2)  # the first site a round would lose
    with pytest.raises(ConfigError, match=rf"partition {small} of 1000 over sklearn digits \(train\) has 1 sample"):
        check_federation_data("digits", num_sites=1000)
    with pytest.raises(ConfigError, match=r"`permuted-label-sites` names site\(s\) \[5\], but the federation has"):
        check_federation_data("digits", num_sites=3, permuted_label_sites=[5])
    with pytest.raises(ConfigError, match=r"`data` is \"\", but simulated sites take their share"):
        check_federation_data("", num_sites=3)
    with pytest.raises(DataError, match=r"partition scheme 'natural' needs the site of every image"):
        check_federation_data("digits", num_sites=3, partition="natural")
    with pytest.raises(ConfigError, match=r"`label-names`: class names must be unique"):
        check_federation_data("digits", num_sites=3, label_names=["1", "1"])
