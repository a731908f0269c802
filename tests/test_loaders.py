"""Tests of fedtl.shared.loaders: image folders, CSV manifests, DICOM and .npz sites, and their validation."""

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from site_files import save_png, write_csv, write_dicom
from sklearn.datasets import load_digits

from fedtl.shared.errors import ConfigError, DataError
from fedtl.shared.loaders import LoadReport, SiteData, load_dicom_file, load_site_dataset

# Stored 16-bit values and the modality/VOI settings of the DICOM oracle tests.
STORED_SCALE, STORED_OFFSET = 250, 100  # digits 0..16 -> stored 100..4100
SLOPE, INTERCEPT = 0.5, -1024.0  # -> modality values -974..1026
CENTER, WIDTH = 40.0, 1001.0


@pytest.fixture(scope="module")
def digits():
    """sklearn digits: raw 0..16 (N,8,8) ints, uint8 (N,8,8) 0..255 and targets, de-duplicated by pixels."""
    bunch = load_digits()
    raw = bunch.images.astype(np.int64)
    _, first = np.unique(raw.reshape(len(raw), -1), axis=0, return_index=True)
    keep = np.sort(first)  # identical images could not tell us which label a loaded image carried
    raw = raw[keep]
    return raw, np.round(raw * (255.0 / 16.0)).astype(np.uint8), bunch.target[keep]


def pick(digits, classes, per_class):
    """Positions of the first `per_class` digits of each class."""
    _, _, target = digits
    return {c: np.flatnonzero(target == c)[:per_class] for c in classes}


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """Oracle: DICOM PS3.3 C.11.2.1.2.1 LINEAR window written piecewise, onto 0..255, rounded."""
    low = center - 0.5 - (width - 1) / 2
    high = center - 0.5 + (width - 1) / 2
    y = np.where(x <= low, 0.0, np.where(x > high, 255.0, ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0))
    return np.round(y).astype(np.uint8)


def make_class_folder(root: Path, digits, classes=(0, 1, 2), per_class=10) -> dict[bytes, str]:
    """root/<class>/<i>.png from digits; returns image bytes -> class name."""
    _, images, _ = digits
    truth = {}
    for c, positions in pick(digits, classes, per_class).items():
        for i in positions:
            save_png(root / str(c) / f"{i}.png", images[i])
            truth[images[i].tobytes()] = str(c)
    return truth


def assert_labels_match(data: SiteData, truth: dict[bytes, str]) -> None:
    """Every loaded image carries the class name it was written under."""
    for ds in (data.splits.train, data.splits.test):
        for image, label in zip(ds.images, ds.labels):
            assert ds.label_names[label] == truth[image.tobytes()]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """SHA-256 and mtime of every file under `root`."""
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- formats ------------------------------------------------------------------------------------------


def test_folder_loads_sorted_class_folders_with_a_stratified_split(tmp_path, digits):
    truth = make_class_folder(tmp_path / "site", digits)
    data = load_site_dataset(tmp_path / "site", seed=3)
    report = data.report
    assert isinstance(report, LoadReport)
    assert report.format == "folder" and report.label_names == ("0", "1", "2")
    assert report.split_counts == {"train": 24, "test": 6}
    assert report.class_counts["test"] == {"0": 2, "1": 2, "2": 2}
    assert report.image_shape == (8, 8) and report.skipped == ()
    assert_labels_match(data, truth)
    again = load_site_dataset(tmp_path / "site", seed=3)
    assert again.splits.test.fingerprint() == data.splits.test.fingerprint()


def test_label_names_fix_the_order_and_an_absent_class_is_noted(tmp_path, digits):
    truth = make_class_folder(tmp_path / "site", digits)
    data = load_site_dataset(tmp_path / "site", label_names=["2", "9", "0", "1"])
    assert data.splits.train.label_names == ("2", "9", "0", "1")
    assert_labels_match(data, truth)
    assert data.report.class_counts["train"]["9"] == 0
    assert "declared class(es) with no images at this site: ['9']" in data.report.notes


def test_folder_train_val_test_layout_keeps_its_split(tmp_path, digits):
    _, images, _ = digits
    positions = pick(digits, (3, 4), 9)
    truth = {}
    for c, ix in positions.items():
        for k, i in enumerate(ix):
            split = ("train", "val", "test")[k % 3]
            save_png(tmp_path / "site" / split / f"c{c}" / f"{i}.png", images[i])
            truth[images[i].tobytes()] = f"c{c}"
    (tmp_path / "site" / "README.txt").write_text("not an image")
    data = load_site_dataset(tmp_path / "site")
    assert data.report.split_counts == {"train": 12, "test": 6}  # val joins train
    assert_labels_match(data, truth)
    assert any("1 file(s) ignored" in note and "README.txt" in note for note in data.report.notes)


def test_manifest_with_split_column_reads_names_relative_and_absolute_paths(tmp_path, digits):
    _, images, _ = digits
    rows, truth = [], {}
    for c, ix in pick(digits, (5, 7), 6).items():
        for k, i in enumerate(ix):
            file = save_png(tmp_path / "site" / "img" / f"{i}.png", images[i])
            name = str(file) if k == 0 else f"img/{i}.png"  # one absolute path per class
            rows.append([name, f"digit-{c}", ("train", "TEST", "val")[k % 3]])
            truth[images[i].tobytes()] = f"digit-{c}"
    manifest = write_csv(tmp_path / "site" / "labels.csv", rows, header=("path", "label", "split"))
    data = load_site_dataset(manifest)
    assert data.report.format == "csv"
    assert data.report.label_names == ("digit-5", "digit-7")
    assert data.report.split_counts == {"train": 8, "test": 4}
    assert_labels_match(data, truth)


def test_manifest_without_split_column_splits_stratified_by_seed(tmp_path, digits):
    _, images, _ = digits
    rows, truth = [], {}
    for c, ix in pick(digits, (1, 2, 3, 4), 10).items():
        for i in ix:
            save_png(tmp_path / "site" / f"{i}.png", images[i])
            rows.append([f"{i}.png", f"d{c}", f"patient-{i}"])
            truth[images[i].tobytes()] = f"d{c}"
    manifest = write_csv(tmp_path / "site" / "m.csv", rows, header=(" Path", "LABEL ", "patient"))
    first = load_site_dataset(manifest, seed=1, test_fraction=0.25)
    assert set(first.report.class_counts["test"].values()) <= {2, 3}  # 10 of 40 over 4 balanced classes
    assert first.report.split_counts == {"train": 30, "test": 10}
    assert_labels_match(first, truth)
    assert "manifest column(s) ['patient'] ignored" in first.report.notes
    same = load_site_dataset(manifest, seed=1, test_fraction=0.25)
    other = load_site_dataset(manifest, seed=2, test_fraction=0.25)
    assert same.splits.test.fingerprint() == first.splits.test.fingerprint()
    assert other.splits.test.fingerprint() != first.splits.test.fingerprint()


def test_manifest_site_column_fills_site_ids_through_both_splits(tmp_path, digits):
    from fedtl.shared.data import load_dataset, site_split

    _, images, _ = digits
    rows, site_of = [], {}
    for c, ix in pick(digits, (0, 1), 12).items():
        for k, i in enumerate(ix):
            save_png(tmp_path / "site" / f"{i}.png", images[i])
            site = ("north", "south", "east")[k % 3]
            rows.append([f"{i}.png", f"d{c}", "test" if k % 4 == 0 else "train", f" {site} "])
            site_of[images[i].tobytes()] = site
    manifest = write_csv(tmp_path / "site" / "m.csv", rows, header=("path", "label", "split", "Site"))
    data = load_site_dataset(manifest)
    assert not any("ignored" in note for note in data.report.notes)
    for ds in (data.splits.train, data.splits.test):
        assert ds.groups.tolist() == [site_of[image.tobytes()] for image in ds.images]
    pool = load_dataset(manifest).train  # the simulation's path to the same manifest
    for site, name in enumerate(["east", "north", "south"]):
        train, test = site_split(pool, site, 3, scheme="natural")
        assert {site_of[image.tobytes()] for image in np.concatenate([train.images, test.images])} == {name}
    blank = write_csv(
        tmp_path / "site" / "blank.csv", [rows[0], [*rows[1][:3], " "]], header=("path", "label", "split", "site")
    )
    with pytest.raises(DataError, match=r"blank\.csv line 3 has an empty site: .*fix: name the image's site"):
        load_site_dataset(blank)
    twice = write_csv(
        tmp_path / "site" / "twice.csv", [[*rows[0], "x"]], header=("path", "label", "split", "site", "SITE")
    )
    with pytest.raises(DataError, match=r"repeated column\(s\) \['site'\]"):
        load_site_dataset(twice)


def test_npz_is_delegated_and_mapped_onto_the_federation_label_names(tmp_path, digits):
    _, images, target = digits
    keep = np.isin(target, (0, 1))
    x, y = images[keep][:40], (target[keep][:40] == 1).astype(np.int64)
    named = tmp_path / "named.npz"
    np.savez(
        named,
        train_images=x[:30],
        train_labels=y[:30],
        test_images=x[30:],
        test_labels=y[30:],
        label_names=np.array(["zero", "one"]),
    )
    data = load_site_dataset(named, label_names=("one", "zero"))
    assert data.report.format == "npz" and data.splits.train.label_names == ("one", "zero")
    np.testing.assert_array_equal(data.splits.train.labels, 1 - y[:30])
    np.testing.assert_array_equal(data.splits.test.images, x[30:])
    with pytest.raises(DataError, match=r"1 label\(s\) not in the federation's label_names: 'zero'.*allowed: \['one'"):
        load_site_dataset(named, label_names=("one", "two"))

    bare = tmp_path / "bare.npz"
    np.savez(bare, train_images=x[:30], train_labels=y[:30], test_images=x[30:], test_labels=y[30:])
    data = load_site_dataset(bare, label_names=("a", "b", "c"))
    np.testing.assert_array_equal(data.splits.train.labels, y[:30])
    assert any("indices into label_names" in note for note in data.report.notes)
    assert not any(note.startswith("class(es) with no") for note in data.report.notes)  # no per-split note
    assert "declared class(es) with no images at this site: ['c']" in data.report.notes
    with pytest.raises(ConfigError, match=r"`label_names`: 1 class name\(s\) \['a'\]; a classifier needs at least 2"):
        load_site_dataset(bare, label_names=("a",))
    three = tmp_path / "three.npz"
    np.savez(three, train_images=x[:30], train_labels=y[:30] * 2, test_images=x[30:], test_labels=y[30:])
    with pytest.raises(DataError, match=r"label 2 is outside the federation's 2 classes \['a', 'b'\]"):
        load_site_dataset(three, label_names=("a", "b"))


# --- DICOM --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_rescale_window_and_monochrome1_match_a_numpy_oracle(tmp_path, digits, photometric):
    raw, _, _ = digits
    stored = raw[7] * STORED_SCALE + STORED_OFFSET
    path = write_dicom(
        tmp_path / "a.dcm", stored, photometric=photometric, rescale=(SLOPE, INTERCEPT), window=(CENTER, WIDTH)
    )
    expected = linear_window(stored * SLOPE + INTERCEPT, CENTER, WIDTH)
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    image = load_dicom_file(path)
    assert image.dtype == np.uint8 and image.shape == (8, 8)
    np.testing.assert_array_equal(image, expected)
    assert 0 < np.count_nonzero(expected == 0) < 64 and np.count_nonzero(expected == 255) > 0  # both clips used


def test_dicom_first_window_value_override_and_min_max_fallback(tmp_path, digits):
    raw, _, _ = digits
    stored = raw[11] * STORED_SCALE + STORED_OFFSET
    modality = stored * SLOPE + INTERCEPT
    multi = write_dicom(
        tmp_path / "multi.dcm", stored, rescale=(SLOPE, INTERCEPT), window=([CENTER, 500.0], [WIDTH, 20.0])
    )
    np.testing.assert_array_equal(load_dicom_file(multi), linear_window(modality, CENTER, WIDTH))
    np.testing.assert_array_equal(load_dicom_file(multi, window=(0.0, 300.0)), linear_window(modality, 0.0, 300.0))

    bare = write_dicom(tmp_path / "bare.dcm", stored, rescale=(SLOPE, INTERCEPT))
    low, high = modality.min(), modality.max()
    np.testing.assert_array_equal(load_dicom_file(bare), np.round((modality - low) / (high - low) * 255))

    exact = write_dicom(tmp_path / "exact.dcm", stored, window=(2000.0, 3000.0), voi_function="LINEAR_EXACT")
    expected = np.round(np.clip((stored - 2000.0) / 3000.0 + 0.5, 0, 1) * 255)
    np.testing.assert_array_equal(load_dicom_file(exact), expected)

    with pytest.raises(ConfigError, match=r"`window` must be \(center, width\).*got \(0, 0.5\)"):
        load_dicom_file(bare, window=(0, 0.5))


def test_dicom_rgb_is_returned_as_hwc(tmp_path, digits):
    _, images, _ = digits
    rgb = np.stack([images[0], images[1], 255 - images[2]], axis=-1)
    path = write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")
    np.testing.assert_array_equal(load_dicom_file(path), rgb)


def test_dicom_bad_files_are_data_errors_naming_the_path(tmp_path, digits):
    raw, _, _ = digits
    stored = raw[:2] * STORED_SCALE
    multi = write_dicom(tmp_path / "multi.dcm", stored, frames=2)
    with pytest.raises(DataError, match=r"multi.dcm is multi-frame \(2 frames\).*fix: export single frames"):
        load_dicom_file(multi)
    empty = write_dicom(tmp_path / "nopix.dcm", stored[0], pixels=False)
    with pytest.raises(DataError, match=r"nopix.dcm has no pixel data"):
        load_dicom_file(empty)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all")
    with pytest.raises(DataError, match=r"cannot read DICOM file .*junk.dcm: InvalidDicomError"):
        load_dicom_file(junk)
    with pytest.raises(DataError, match=r"DICOM file .*absent.dcm does not exist"):
        load_dicom_file(tmp_path / "absent.dcm")


def test_dicom_class_folder_loads_with_dicom_format(tmp_path, digits):
    raw, _, _ = digits
    truth = {}
    for c, ix in pick(digits, (0, 6), 8).items():
        for k, i in enumerate(ix):
            stored = raw[i] * STORED_SCALE + STORED_OFFSET
            photometric = ("MONOCHROME2", "MONOCHROME1")[k % 2]
            # nested series folder and, for one file, no extension (as PACS exports name them)
            name = f"series1/{i}" if k == 0 else f"{i}.dcm"
            write_dicom(
                tmp_path / "site" / f"class{c}" / name,
                stored,
                photometric=photometric,
                rescale=(SLOPE, INTERCEPT),
                window=(CENTER, WIDTH),
            )
            expected = linear_window(stored * SLOPE + INTERCEPT, CENTER, WIDTH)
            truth[(255 - expected if k % 2 else expected).tobytes()] = f"class{c}"
    data = load_site_dataset(tmp_path / "site")
    assert data.report.format == "dicom"
    assert data.report.split_counts == {"train": 12, "test": 4}
    assert_labels_match(data, truth)
    assert any("16 DICOM file(s) decoded" in note for note in data.report.notes)


def test_manifest_mixing_dicom_and_png_converts_grey_to_rgb(tmp_path, digits):
    raw, images, _ = digits
    rows = []
    for k in range(12):
        if k % 3 == 0:
            save_png(tmp_path / f"{k}.png", np.stack([images[k]] * 2 + [images[k] // 2], axis=-1))
            rows.append([f"{k}.png", "colour", ("train", "test")[k % 2]])
        else:
            write_dicom(tmp_path / f"{k}.dcm", raw[k] * STORED_SCALE, window=(CENTER, WIDTH))
            rows.append([f"{k}.dcm", "grey", ("train", "test")[k % 2]])
    data = load_site_dataset(write_csv(tmp_path / "m.csv", rows, header=("path", "label", "split")))
    assert data.report.format == "csv" and data.report.image_shape == (8, 8, 3)
    assert not any("stratified" in note for note in data.report.notes)
    assert "8 grey image(s) converted to RGB to match 4 colour image(s)" in data.report.notes
    grey = data.splits.train.images[data.splits.train.labels == data.splits.train.label_names.index("grey")]
    assert np.all(grey[..., 0] == grey[..., 2])


def test_breastmnist_written_as_dicom_with_a_manifest(tmp_path, breastmnist_path):
    with np.load(breastmnist_path) as npz:
        parts = {s: (npz[f"{s}_images"][:60], npz[f"{s}_labels"].reshape(-1)[:60]) for s in ("train", "test")}
    names = ("malignant", "benign")  # MedMNIST BreastMNIST: 0 malignant, 1 normal/benign
    rows, expected = [], {}
    for split, (images, labels) in parts.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            stored = image.astype(np.int64) * 16 + 8  # 12-bit-like range, no window: min-max applies
            write_dicom(tmp_path / split / f"{i}.dcm", stored, rescale=(2.0, -500.0))
            values = stored * 2.0 - 500.0
            oracle = np.round((values - values.min()) / max(values.max() - values.min(), 1e-12) * 255)
            expected[oracle.astype(np.uint8).tobytes()] = names[label]
            rows.append([f"{split}/{i}.dcm", names[label], split])
    manifest = write_csv(tmp_path / "manifest.csv", rows, header=("path", "label", "split"))
    data = load_site_dataset(manifest, label_names=names)
    assert data.report.format == "dicom" and data.report.image_shape == (28, 28)
    assert data.report.split_counts == {"train": 60, "test": 60}
    for ds in (data.splits.train, data.splits.test):
        for image, label in zip(ds.images, ds.labels):
            assert expected[image.tobytes()] == names[label]


# --- bad input ----------------------------------------------------------------------------------------


def test_empty_folder_and_folders_without_classes_or_images(tmp_path, digits):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"image folder .*empty is empty; expected .*<class name>/<image>"):
        load_site_dataset(tmp_path / "empty")
    _, images, _ = digits
    save_png(tmp_path / "loose" / "a.png", images[0])
    with pytest.raises(DataError, match=r"has no class sub-folders \(it holds 1 file\(s\) directly, e.g. a.png\)"):
        load_site_dataset(tmp_path / "loose")
    (tmp_path / "hollow" / "cats").mkdir(parents=True)
    (tmp_path / "hollow" / "cats" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"class folder\(s\) \['cats'\] but no image or DICOM files"):
        load_site_dataset(tmp_path / "hollow")


def test_manifest_structure_errors(tmp_path, digits):
    _, images, _ = digits
    save_png(tmp_path / "a.png", images[0])
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(DataError, match=r"CSV manifest .*empty.csv is empty; expected a header row path,label"):
        load_site_dataset(tmp_path / "empty.csv")
    with pytest.raises(DataError, match=r"header.csv has a header row but no data rows"):
        load_site_dataset(write_csv(tmp_path / "header.csv", []))
    cols = write_csv(tmp_path / "cols.csv", [["a.png", "x"]], header=("file", "Label"))
    with pytest.raises(DataError, match=r"missing column\(s\) 'path'; found columns \['file', 'Label'\]"):
        load_site_dataset(cols)
    split = write_csv(
        tmp_path / "split.csv",
        [["a.png", "x", "train"], ["a.png", "x", "validation"]],
        header=("path", "label", "split"),
    )
    with pytest.raises(DataError, match=r"line 3: split 'validation' is not one of 'train', 'test' or 'val'"):
        load_site_dataset(split)
    twice = write_csv(tmp_path / "twice.csv", [["a.png", "x"], ["./a.png", "y"]])
    with pytest.raises(DataError, match=r"lists ./a.png twice \(lines 2 and 3\)"):
        load_site_dataset(twice)
    ragged = write_csv(tmp_path / "ragged.csv", [["a,b.png", "x"]], header=None)
    ragged.write_text("path,label\na,b.png,x\n")
    with pytest.raises(DataError, match=r"line 2 has 3 field\(s\) but the header has 2"):
        load_site_dataset(ragged)


def test_unknown_labels_name_the_label_rows_and_allowed_names(tmp_path, digits):
    _, images, _ = digits
    rows = []
    for i in range(6):
        save_png(tmp_path / f"{i}.png", images[i])
        rows.append([f"{i}.png", ("benign", "Malignant", "cyst")[i % 3]])
    manifest = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(
        DataError,
        match=r"2 label\(s\) not in the federation's label_names: 'Malignant' \(line 3, line 6, differs only in "
        r"case from 'malignant'\); 'cyst' \(line 4, line 7\); allowed: \['benign', 'malignant'\]",
    ):
        load_site_dataset(manifest, label_names=("benign", "malignant"), bad_files="skip")
    make_class_folder(tmp_path / "site", digits, classes=(0, 1), per_class=2)
    with pytest.raises(DataError, match=r"'1' \(1/.*png, 1/.*png\); allowed: \['0', '2'\]"):
        load_site_dataset(tmp_path / "site", label_names=("0", "2"))


def test_missing_and_corrupt_files_are_errors_or_recorded_skips(tmp_path, digits, caplog):
    raw, images, _ = digits
    rows = []
    for i in range(10):
        save_png(tmp_path / f"{i}.png", images[i])
        rows.append([f"{i}.png", str(i % 2), ("train", "test")[i % 2]])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    whole = write_dicom(tmp_path / "whole.dcm", raw[0] * STORED_SCALE).read_bytes()
    (tmp_path / "broken.dcm").write_bytes(whole[:-40])  # pixel data cut short
    rows += [["broken.png", "0", "train"], ["broken.dcm", "1", "test"], ["gone.png", "0", "train"]]
    manifest = write_csv(tmp_path / "m.csv", rows, header=("path", "label", "split"))
    with pytest.raises(
        DataError,
        match=r"1 listed file\(s\) cannot be read: .*gone.png \(line 14: file does not exist\); relative paths are "
        r"resolved against the manifest's folder .*a site may set bad-files = \"skip\" in its policy",
    ):
        load_site_dataset(manifest)
    (tmp_path / "gone.png").write_bytes(images[0].tobytes())  # exists now, but is not a PNG
    with pytest.raises(
        DataError,
        match=r"3 file\(s\) cannot be read: cannot decode image file .*broken.png.*\| "
        r"cannot decode the pixels of DICOM file .*broken.dcm.*may be truncated.*\| .*gone.png.*"
        r"a site may set bad-files = \"skip\" in its policy",
    ) as err:
        load_site_dataset(manifest)
    # one fix per file, said once: each file's own (they differ: a DICOM file may be cut short)
    for reason in str(err.value).split(" cannot be read: ", 1)[1].split(" | "):
        assert reason.count("fix:") == 1, reason
    (tmp_path / "gone.png").unlink()
    with caplog.at_level(logging.WARNING, logger="fedtl.shared.loaders"):
        data = load_site_dataset(manifest, bad_files="skip")
    assert data.report.split_counts == {"train": 5, "test": 5}
    skipped = {Path(s.path).name: s.reason for s in data.report.skipped}
    assert set(skipped) == {"broken.png", "broken.dcm", "gone.png"}
    assert skipped["gone.png"] == "file does not exist"
    assert "cannot decode image file" in skipped["broken.png"]
    assert "skipped 3 missing or unreadable file(s)" in caplog.text and "broken.png" in caplog.text
    assert "skipped 3 file(s):" in data.report.summary()


def test_skipping_that_empties_a_split_and_a_source_without_test_images(tmp_path, digits):
    _, images, _ = digits
    for i in range(4):
        save_png(tmp_path / f"{i}.png", images[i])
    (tmp_path / "bad.png").write_bytes(b"garbage")
    rows = [[f"{i}.png", "a", "train"] for i in range(4)]
    skip = write_csv(tmp_path / "skip.csv", rows + [["bad.png", "a", "test"]], header=("path", "label", "split"))
    classes = ("a", "b")  # declared: a site may hold one class of the federation's
    with pytest.raises(DataError, match=r"all 1 test image\(s\) were skipped .*leaving the test split empty"):
        load_site_dataset(skip, bad_files="skip", label_names=classes)
    only = write_csv(tmp_path / "only.csv", rows, header=("path", "label", "split"))
    with pytest.raises(DataError, match=r"no images in the test split; a site needs both train and test images"):
        load_site_dataset(only, label_names=classes)
    everything = write_csv(tmp_path / "all.csv", [["bad.png", "a"], ["nope.png", "a"]])
    with pytest.raises(DataError, match=r"all 2 listed file\(s\) were skipped as missing or unreadable"):
        load_site_dataset(everything, bad_files="skip", label_names=classes)


def test_mixed_sizes_list_the_odd_files_even_when_skipping(tmp_path, digits):
    truth = make_class_folder(tmp_path / "site", digits, classes=(0, 1), per_class=4)
    assert truth
    big = np.zeros((10, 12), dtype=np.uint8)
    save_png(tmp_path / "site" / "1" / "big.png", big)
    with pytest.raises(
        DataError,
        match=r"images must all have the same size; most are 8x8 \(width x height\) but 1 differ: "
        r".*big.png \(12x10\); fix: resize them to 8x8",
    ):
        load_site_dataset(tmp_path / "site", bad_files="skip")


def test_config_errors(tmp_path, digits):
    make_class_folder(tmp_path / "site", digits, classes=(0, 1), per_class=2)
    with pytest.raises(ConfigError, match=r"`bad_files` must be one of \['error', 'skip'\], got 'ignore'"):
        load_site_dataset(tmp_path / "site", bad_files="ignore")
    with pytest.raises(ConfigError, match=r"`label_names`: class names must be unique.*duplicates: \['a'\]"):
        load_site_dataset(tmp_path / "site", label_names=("a", "a"))
    with pytest.raises(ConfigError, match=r"`label_names`: class names must be a sequence of non-empty strings"):
        load_site_dataset(tmp_path / "site", label_names="ab")
    with pytest.raises(ConfigError, match=r"`test_fraction` must be a number in \(0, 1\)"):
        load_site_dataset(tmp_path / "site", test_fraction=1.5)


def test_unsupported_sources(tmp_path, digits):
    raw, _, _ = digits
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"'.*notes.txt' is a file of an unsupported type; accepted: a directory"):
        load_site_dataset(tmp_path / "notes.txt")
    with pytest.raises(DataError, match=r"'.*nowhere' does not exist"):
        load_site_dataset(tmp_path / "nowhere")
    single = write_dicom(tmp_path / "one.dcm", raw[0])
    with pytest.raises(DataError, match=r"is a single DICOM file, which carries no class label"):
        load_site_dataset(single)


def test_loading_never_modifies_the_source(tmp_path, digits):
    raw, images, _ = digits
    make_class_folder(tmp_path / "folder", digits, classes=(0, 1), per_class=3)
    (tmp_path / "folder" / "1" / "bad.png").write_bytes(b"garbage")
    rows = []
    for i in range(6):
        write_dicom(tmp_path / "dicom" / f"{i}.dcm", raw[i] * STORED_SCALE, photometric="MONOCHROME1")
        rows.append([f"{i}.dcm", "x" if i else "y"])  # one 'y' image: too few to stratify
    manifest = write_csv(tmp_path / "dicom" / "m.csv", rows + [["gone.dcm", "x"]])
    before = snapshot(tmp_path)
    folder = load_site_dataset(tmp_path / "folder", bad_files="skip")
    with pytest.warns(UserWarning, match="too small for a stratified") as caught:
        dicom = load_site_dataset(manifest, bad_files="skip")
    assert {w.filename for w in caught} == {__file__}  # the warning points at the caller
    assert any("using a plain seeded split" in note for note in dicom.report.notes)
    assert snapshot(tmp_path) == before
    assert len(folder.report.skipped) == 1 and dicom.report.format == "dicom"
    summary = dicom.report.summary()
    assert summary.startswith(f"source: {manifest} (dicom)")
    assert "images: 4 train, 2 test; 8x8 grey" in summary and "gone.dcm: file does not exist" in summary


# --- issue 12: nothing silent -------------------------------------------------------------------------


def test_labels_that_differ_by_case_or_type_are_refused_with_their_lines(tmp_path, digits):
    _, images, _ = digits
    labels = ["0", "1.0", "MALIGNANT", "malignant", "0", "malignant"]
    rows = [[str(save_png(tmp_path / f"{i}.png", images[i])), label] for i, label in enumerate(labels)]
    manifest = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(
        DataError,
        match=r"m.csv: labels that would train as separate classes but look like one: 'MALIGNANT' and 'malignant' "
        r"differ only by case; '0' and '1.0' are numbers written both as integers and as decimals; .* mix numeric "
        r"codes with class names \('0' at line 2, line 6; '1.0' at line 3; 'MALIGNANT' at line 4; 'malignant' at "
        r"line 5, line 7\); fix: write each class one way",
    ):
        load_site_dataset(manifest)
    # Declared classes: each stray spelling is an unknown label, named with its line and near match.
    with pytest.raises(DataError, match=r"'MALIGNANT' \(line 4, differs only in case from 'malignant'\)"):
        load_site_dataset(manifest, label_names=("0", "malignant"))


def test_misspelt_class_folder_and_a_single_class_are_refused(tmp_path, digits):
    make_class_folder(tmp_path / "site", digits, classes=(0, 1), per_class=3)
    (tmp_path / "site" / "0").rename(tmp_path / "site" / "benign")
    (tmp_path / "site" / "1").rename(tmp_path / "site" / "begnin")
    with pytest.raises(
        DataError, match=r"'begnin' and 'benign' differ only by a misspelling \('begnin' at begnin/1.png, begnin/11.png"
    ):
        load_site_dataset(tmp_path / "site")
    data = load_site_dataset(tmp_path / "site", label_names=("benign", "begnin"))  # declared: really two classes
    assert data.report.classes_from == "declared (label-names)"
    make_class_folder(tmp_path / "one", digits, classes=(4,), per_class=4)
    with pytest.raises(DataError, match=r"one: only the class '4'; a classifier needs at least 2 classes"):
        load_site_dataset(tmp_path / "one")
    assert len(load_site_dataset(tmp_path / "one", label_names=("4", "5")).splits.train) == 3  # one class of two


def test_any_declared_class_order_is_accepted_and_mapped_by_name(tmp_path, digits):
    truth = make_class_folder(tmp_path / "site", digits, classes=(0, 1))
    data = load_site_dataset(tmp_path / "site", label_names=("1", "0"))
    assert data.splits.train.label_names == ("1", "0")
    assert_labels_match(data, truth)


def test_report_says_where_classes_came_from_and_the_bit_depth(tmp_path, digits):
    _, images, _ = digits
    for c, ix in pick(digits, (0, 1), 4).items():
        for i in ix:
            wide = np.round(images[i] * (4095 / 255)).astype(np.uint16)  # a 12-bit detector export
            path = tmp_path / "site" / f"c{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            from PIL import Image

            Image.fromarray(wide).save(path)
    data = load_site_dataset(tmp_path / "site")
    for ds in (data.splits.train, data.splits.test):
        assert {image.tobytes() for image in ds.images} <= {images[i].tobytes() for i in range(len(images))}
    report = data.report
    assert report.pixel_depth.startswith("12-bit values in 16-bit PNG (from the data's largest value): 8")
    assert report.classes_from.startswith("derived from the class-folder names (no label-names declared")
    summary = report.summary()
    assert "pixels: 12-bit values in 16-bit PNG" in summary and "classes (2, derived from the class-folder" in summary
    stored = write_dicom(tmp_path / "d" / "a.dcm", digits[0][0] * STORED_SCALE)
    write_dicom(tmp_path / "d" / "b.dcm", digits[0][1] * STORED_SCALE)
    manifest = write_csv(tmp_path / "d" / "m.csv", [[stored.name, "x"], ["b.dcm", "y"]])
    dicom = load_site_dataset(manifest)
    assert dicom.report.pixel_depth.startswith("DICOM Bits Stored 16: 2")


def test_missing_file_hints_name_the_right_fix(tmp_path, digits):
    _, images, _ = digits
    save_png(tmp_path / "a.png", images[0])
    absolute = write_csv(tmp_path / "abs.csv", [[str(tmp_path / "a.png"), "x"], [str(tmp_path / "gone.png"), "y"]])
    with pytest.raises(DataError) as caught:
        load_site_dataset(absolute)
    message = str(caught.value)
    assert "gone.png (line 3: file does not exist)" in message and "relative" not in message
    assert 'a site may set bad-files = "skip" in its policy' in message and "bad_files='skip'" not in message


def test_symbolic_links_that_cannot_be_read_are_refused_or_listed_as_skipped(tmp_path, digits):
    make_class_folder(tmp_path / "site", digits, classes=(0, 1), per_class=3)
    make_class_folder(tmp_path / "elsewhere", digits, classes=(2,), per_class=2)
    (tmp_path / "site" / "0" / "more").symlink_to(tmp_path / "elsewhere" / "2", target_is_directory=True)
    (tmp_path / "site" / "1" / "lost.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError) as caught:
        load_site_dataset(tmp_path / "site")
    message = str(caught.value)
    assert "2 listed file(s) cannot be read" in message
    assert "0/more: symbolic link to the folder" in message and "which is not followed" in message
    assert "1/lost.png: symbolic link to" in message and "nowhere.png, which does not exist" in message
    data = load_site_dataset(tmp_path / "site", bad_files="skip")
    skipped = {Path(s.path).name: s.reason for s in data.report.skipped}
    assert set(skipped) == {"more", "lost.png"} and "not followed" in skipped["more"]
    assert "skipped 2 file(s):" in data.report.summary()


def test_npz_without_names_gets_medmnists_documented_names_honestly_labelled(tmp_path, digits):
    _, images, target = digits
    keep = np.isin(target, (0, 1))
    x, y = images[keep][:40], (target[keep][:40] == 1).astype(np.uint8)[:, None]
    path = tmp_path / "breastmnist_64.npz"
    np.savez(path, train_images=x[:30], train_labels=y[:30], test_images=x[30:], test_labels=y[30:])
    data = load_site_dataset(path)
    assert data.splits.train.label_names == ("malignant", "normal/benign")
    assert data.report.classes_from == "MedMNIST's documentation (not in the file)"
    assert any("from MedMNIST's documentation, not from the file" in note for note in data.report.notes)
    swapped = load_site_dataset(path, label_names=("normal/benign", "malignant"))  # by name, any order
    np.testing.assert_array_equal(swapped.splits.train.labels, 1 - y[:30, 0])
    indices = load_site_dataset(path, label_names=("0", "1"))  # the old index names still read as indices
    np.testing.assert_array_equal(indices.splits.train.labels, y[:30, 0])
    with pytest.raises(DataError, match=r"carries no class names; MedMNIST documents 0 'malignant', 1 'normal/benign'"):
        load_site_dataset(path, label_names=("benign", "malignant"))  # index order would swap the classes


def test_breastmnist_file_reads_with_documented_names(breastmnist_path):
    data = load_site_dataset(breastmnist_path)
    assert data.report.label_names == ("malignant", "normal/benign")
    assert "pixels: 8-bit (uint8 arrays in the .npz)" in data.report.summary()


def test_the_data_module_and_the_loaders_import_one_way_without_delayed_imports():
    import ast

    import fedtl.shared as shared

    modules = ("data", "dataset", "images", "labels", "loaders", "npz")
    graph = {}
    for name in modules:
        tree = ast.parse((Path(shared.__file__).parent / f"{name}.py").read_text())
        top = {n.module.rsplit(".", 1)[-1] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        graph[name] = top & set(modules)
        nested = [
            node
            for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(fn)
            if isinstance(node, (ast.Import, ast.ImportFrom))
        ]
        assert not nested, f"shared/{name}.py imports inside a function (line {nested[0].lineno})"
    assert "data" not in graph["loaders"] and "loaders" in graph["data"]

    def reaches(start, goal, seen=()):
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, (*seen, nxt))) for nxt in graph[start])

    assert not any(reaches(name, name) for name in modules), graph
