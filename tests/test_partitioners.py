"""Tests of fedtl.shared.partitioners: schemes, coverage, skew properties, seeding, memoization and counts."""

import json
import subprocess
import sys
from collections import Counter

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import DirichletPartitioner, NaturalIdPartitioner
from sklearn.datasets import load_digits

from fedtl.shared import partitioners
from fedtl.shared.errors import ConfigError, DataError
from fedtl.shared.partitioners import (
    PartitionCounts,
    PartitionSpec,
    clear_partition_cache,
    count_partitions,
    format_partition_counts,
    minimum_partition_size,
    parse_partition,
    partition_class_counts,
    partition_indices,
    validate_groups,
)

GENERATED = ["iid", "dirichlet:0.5", "dirichlet:0.05", "quantity:0.5", "classes:2", "classes:3"]


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return load_digits().target


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    everything = np.concatenate(parts)
    assert everything.size == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))
    for part in parts:
        np.testing.assert_array_equal(part, np.sort(part))


def _class_counts_oracle(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(P, K) counts by walking the samples one by one with a Counter."""
    site_of = {int(i): p for p, part in enumerate(parts) for i in part}
    pairs = Counter((site_of[i], int(y)) for i, y in enumerate(labels))
    return np.array([[pairs[(p, k)] for k in range(num_classes)] for p in range(len(parts))])


# --- parsing -----------------------------------------------------------------------------------------------


def test_parse_partition_accepts_every_form():
    assert parse_partition("iid") == PartitionSpec("iid")
    assert parse_partition(" Dirichlet:2 ") == PartitionSpec("dirichlet", 2.0)
    assert parse_partition("quantity: 0.5") == PartitionSpec("quantity", 0.5)
    assert parse_partition("classes:2") == PartitionSpec("classes", 2)
    assert parse_partition("NATURAL") == PartitionSpec("natural")
    for text in ("iid", "dirichlet:0.5", "quantity:2.0", "classes:3", "natural"):
        assert str(parse_partition(text)) == text
        assert parse_partition(str(parse_partition(text))) == parse_partition(text)


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        ("dirichlet:-1", r"'dirichlet:-1': dirichlet alpha must be a finite number > 0, got -1\.0"),
        ("dirichlet:0", r"dirichlet alpha must be a finite number > 0, got 0\.0"),
        ("dirichlet:inf", r"dirichlet alpha must be a finite number > 0, got inf"),
        ("dirichlet:x", r"'dirichlet:x': dirichlet alpha 'x' is not a number; accepted: 'iid'; 'dirichlet:<alpha>'"),
        ("quantity:0", r"'quantity:0': quantity alpha must be a finite number > 0, got 0\.0; .*skew of site sizes"),
        ("classes:0", r"'classes:0': classes k must be an integer >= 1, got 0"),
        ("classes:2.5", r"'classes:2.5': classes k '2\.5' is not an integer; accepted: .*'classes:<k>'"),
        ("zipf", r"unknown partition scheme 'zipf'; accepted: 'iid'; .*'quantity:<alpha>'.*'natural'"),
        ("dirichlet", r"unknown partition scheme 'dirichlet'; accepted"),
        ("iid:3", r"unknown partition scheme 'iid:3'; accepted"),
    ],
)
def test_bad_specs_name_the_value_and_the_accepted_forms(scheme, message):
    with pytest.raises(ConfigError, match=message):
        parse_partition(scheme)
    with pytest.raises(ConfigError, match=message):
        partition_indices(np.zeros(10, np.int64), 2, scheme=scheme)


def test_spec_built_directly_is_validated():
    with pytest.raises(ConfigError, match=r"'iid:1': iid takes no parameter"):
        PartitionSpec("iid", 1)
    with pytest.raises(ConfigError, match=r"unknown partition scheme 'shards'"):
        PartitionSpec("shards")
    with pytest.raises(ConfigError, match=r"partition scheme must be a string, got 3"):
        parse_partition(3)  # type: ignore[arg-type]


def test_run_config_validates_the_partition():
    from fedtl.shared.config import RunConfig

    assert RunConfig(partition="classes:2").partition == "classes:2"
    with pytest.raises(ConfigError, match=r"'classes:0': classes k must be an integer >= 1"):
        RunConfig(partition="classes:0")


# --- every scheme ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", GENERATED)
def test_every_sample_once_counts_add_up_and_minimum_size(scheme, digits_labels):
    labels = digits_labels
    parts = partition_indices(labels, 7, scheme=scheme, seed=11)
    assert len(parts) == 7
    _assert_disjoint_cover(parts, labels.size)
    assert min(p.size for p in parts) >= minimum_partition_size(labels.size, 7) == 10
    counts = partition_class_counts(labels, parts, 10)
    np.testing.assert_array_equal(counts, _class_counts_oracle(labels, parts, 10))
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(labels, minlength=10))
    np.testing.assert_array_equal(counts.sum(axis=1), [p.size for p in parts])


@pytest.mark.parametrize("scheme", GENERATED)
def test_seeded_partitions_are_recomputed_identically_and_differ_across_seeds(scheme, digits_labels):
    first = partition_indices(digits_labels, 7, scheme=scheme, seed=3)
    clear_partition_cache()  # recompute rather than read the memo back
    again = partition_indices(digits_labels, 7, scheme=scheme, seed=3)
    assert first[0] is not again[0]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other = partition_indices(digits_labels, 7, scheme=scheme, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_partitions_are_identical_in_a_fresh_process_that_never_imports_flower(digits_labels):
    """Simulated sites run in different processes: each must derive the same partitioning from the seed."""
    code = (
        "import json, sys; from sklearn.datasets import load_digits; "
        "from fedtl.shared.partitioners import partition_indices; y = load_digits().target; "
        "lazy = 'flwr_datasets' not in sys.modules; "
        f"parts = {{s: partition_indices(y, 5, scheme=s, seed=9) for s in {GENERATED}}}; "
        "flower = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')); "
        "print(json.dumps([lazy, flower, {s: [p.tolist() for p in ps] for s, ps in parts.items()}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lazy, flower, theirs = json.loads(out)
    assert lazy, "importing the module must not import flwr_datasets (2-3 s); only skewed schemes need it"
    assert flower == []
    for scheme in GENERATED:
        ours = [p.tolist() for p in partition_indices(digits_labels, 5, scheme=scheme, seed=9)]
        assert theirs[scheme] == ours, scheme


def test_iid_sizes_are_balanced_and_class_mix_is_global(digits_labels):
    parts = partition_indices(digits_labels, 10, scheme="iid", seed=0)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    global_share = np.bincount(digits_labels) / digits_labels.size
    for p in parts:
        assert np.abs(np.bincount(digits_labels[p], minlength=10) / p.size - global_share).max() < 0.1


def test_dirichlet_small_alpha_gives_near_single_class_sites():
    labels = np.repeat(np.arange(4), 60)
    shares = []
    for seed in range(5):
        parts = partition_indices(labels, 4, scheme="dirichlet:0.01", seed=seed)
        _assert_disjoint_cover(parts, labels.size)
        shares += [np.bincount(labels[p]).max() / p.size for p in parts]
    assert np.mean(shares) > 0.9


def test_dirichlet_large_alpha_is_near_iid():
    labels = np.repeat(np.arange(5), 400)
    parts = partition_indices(labels, 4, scheme="dirichlet:1000", seed=0)
    for p in parts:
        assert np.abs(np.bincount(labels[p], minlength=5) / p.size - 0.2).max() < 0.05


def test_dirichlet_too_extreme_is_a_config_error_and_is_remembered():
    labels = np.repeat(np.arange(2), 100)
    message = r"'dirichlet:0.001' with num_partitions=20 over 200 samples of 2 classes .* too extreme.*fix: raise alpha"
    for _ in range(2):  # the second answer comes from the memo, with the same message
        with pytest.raises(ConfigError, match=message):
            partition_indices(labels, 20, scheme="dirichlet:0.001", seed=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_classes_k_gives_at_most_k_classes_per_site_and_uses_every_class(k, digits_labels):
    for seed in range(3):
        parts = partition_indices(digits_labels, 12, scheme=f"classes:{k}", seed=seed)
        _assert_disjoint_cover(parts, digits_labels.size)
        present = [set(np.unique(digits_labels[p]).tolist()) for p in parts]
        assert all(len(classes) <= k for classes in present)
        assert set().union(*present) == set(range(10))


def test_classes_with_fewer_sites_than_classes_still_covers_every_class():
    labels = np.repeat(np.arange(4), 30)
    parts = partition_indices(labels, 2, scheme="classes:2", seed=0)
    _assert_disjoint_cover(parts, labels.size)
    assert [np.unique(labels[p]).size for p in parts] == [2, 2]


def test_classes_impossible_settings_are_config_errors(digits_labels):
    with pytest.raises(ConfigError, match=r"'classes:11' asks for 11 classes per site but the 1797 samples hold 10"):
        partition_indices(digits_labels, 20, scheme="classes:11")
    with pytest.raises(
        ConfigError,
        match=r"'classes:2' with num_partitions=4 places at most 8 classes but the 1797 samples hold 10.*"
        r"fix: use at least 5 partitions",
    ):
        partition_indices(digits_labels, 4, scheme="classes:2")


def test_quantity_skew_gives_unequal_sizes_with_global_class_mix(digits_labels):
    parts = partition_indices(digits_labels, 5, scheme="quantity:0.5", seed=1)
    sizes = np.array([p.size for p in parts])
    assert sizes.sum() == digits_labels.size
    assert sizes.max() > 2 * sizes.min()
    global_share = np.bincount(digits_labels) / digits_labels.size
    for p in parts:
        if p.size >= 200:  # labels are iid within a site: big sites mirror the global mix
            assert np.abs(np.bincount(digits_labels[p], minlength=10) / p.size - global_share).max() < 0.08
    iid = partition_indices(digits_labels, 5, scheme="iid", seed=1)
    assert np.std(sizes) > 10 * np.std([p.size for p in iid])


def test_quantity_skew_with_many_small_sites_keeps_the_floor():
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    parts = partition_indices(labels, 1000, scheme="quantity:1.0", seed=0)
    _assert_disjoint_cover(parts, labels.size)
    sizes = np.array([p.size for p in parts])
    assert sizes.min() >= minimum_partition_size(5000, 1000) == 2
    assert sizes.max() >= 5 * sizes.min()


# --- natural -------------------------------------------------------------------------------------------------


def test_natural_partitions_are_the_groups_in_sorted_order_like_flwr_datasets():
    rng = np.random.default_rng(0)
    groups = rng.choice(np.array(["hosp-b", "hosp-a", "clinic-c"]), 90)
    labels = rng.integers(0, 3, 90)
    parts = partition_indices(labels, 3, scheme="natural", groups=groups)
    _assert_disjoint_cover(parts, 90)
    for site, part in zip(["clinic-c", "hosp-a", "hosp-b"], parts):
        np.testing.assert_array_equal(part, np.flatnonzero(groups == site))
    oracle = NaturalIdPartitioner(partition_by="site")
    oracle.dataset = datasets.Dataset.from_dict({"site": groups.tolist(), "row": list(range(90))})
    for p, part in enumerate(parts):
        np.testing.assert_array_equal(part, oracle.load_partition(p)["row"])
    numbered = partition_indices(labels, 3, scheme="natural", groups=np.array([7, 3, 5] * 30))
    np.testing.assert_array_equal(numbered[0], np.arange(1, 90, 3))  # site 3 first


def test_natural_needs_groups_and_the_matching_number_of_partitions():
    labels = np.zeros(6, np.int64)
    with pytest.raises(ConfigError, match=r"'natural' needs `groups` .* got None; fix: .*'site' column"):
        partition_indices(labels, 2, scheme="natural")
    with pytest.raises(ConfigError, match=r"the data has 2 site id\(s\) but num_partitions=3; fix: .* to 2"):
        partition_indices(labels, 3, scheme="natural", groups=np.array(list("aabbab")))
    with pytest.raises(DataError, match=r"site ids \(`groups`\) must have shape \(6,\), one per image, got \(5,\)"):
        partition_indices(labels, 2, scheme="natural", groups=np.array(list("aabba")))


def test_validate_groups():
    assert validate_groups(np.array(["a", "b"], dtype=object), 2, source="s").dtype.kind == "U"
    assert validate_groups(np.array([b"x", b"y"]), 2, source="s").tolist() == ["x", "y"]
    assert validate_groups(np.array([3, 4], np.uint8), 2, source="s").dtype == np.int64
    with pytest.raises(DataError, match=r"s: site id at index 1 is empty \(1 empty in all\)"):
        validate_groups(np.array(["a", " "]), 2, source="s")
    with pytest.raises(DataError, match=r"s: site ids \(`groups`\) must be strings or integers, got dtype float64"):
        validate_groups(np.array([1.0, 2.0]), 2, source="s")


# --- ranges, memoization, the flwr-datasets read-out ----------------------------------------------------------


def test_num_partitions_out_of_range():
    labels = np.zeros(5, np.int64)
    for bad in (0, 6, True):
        with pytest.raises(ConfigError, match=rf"`num_partitions` must be an integer in \[1, 5\].*got {bad}"):
            partition_indices(labels, bad)
    assert [p.size for p in partition_indices(labels, 5)] == [1] * 5
    with pytest.raises(ConfigError, match=r"`seed` must be an integer in \[0, 2\*\*32\), got -1"):
        partition_indices(labels, 2, seed=-1)
    with pytest.raises(DataError, match=r"partition labels must be >= 0, got -1"):
        partition_indices(np.array([0, -1]), 2)


def test_repeated_calls_share_read_only_arrays_keyed_by_content():
    labels = np.repeat(np.arange(3), 20)
    first = partition_indices(labels, 3, scheme="dirichlet:1", seed=0)
    second = partition_indices(labels.copy(), 3, scheme="dirichlet:1.0", seed=0)
    assert all(a is b for a, b in zip(first, second))  # same content and scheme: the memo answers
    assert not first[0].flags.writeable
    changed = labels.copy()
    changed[0] = 2
    third = partition_indices(changed, 3, scheme="dirichlet:1", seed=0)
    assert third[0] is not first[0]  # other labels: computed afresh


def test_fast_read_out_matches_flwr_datasets_public_load_partition():
    labels = np.random.default_rng(1).integers(0, 4, 300)
    order = np.random.default_rng(2).permutation(300)

    def fresh() -> DirichletPartitioner:
        p = DirichletPartitioner(num_partitions=6, partition_by="label", alpha=0.5, min_partition_size=0, seed=5)
        p.dataset = datasets.Dataset.from_dict({"label": labels[order], "index": order})
        return p

    fast = partitioners._read_partitions(fresh(), 6)
    public = fresh()
    for p in range(6):
        np.testing.assert_array_equal(np.sort(fast[p]), np.sort(public.load_partition(p)["index"]))


# --- per-site counts -------------------------------------------------------------------------------------------


def test_count_partitions_rows_and_table(digits_labels):
    parts = partition_indices(digits_labels, 4, scheme="dirichlet:0.5", seed=2)
    rows = count_partitions(digits_labels, parts, 10)
    oracle = _class_counts_oracle(digits_labels, parts, 10)
    assert rows == [PartitionCounts(p, parts[p].size, tuple(oracle[p].tolist())) for p in range(4)]
    decoded = json.loads(json.dumps([row.to_row() for row in rows]))
    assert decoded[2] == {"partition-id": 2, "num-examples": int(parts[2].size), "class-counts": oracle[2].tolist()}
    table = format_partition_counts(rows, tuple(f"d{k}" for k in range(10))).splitlines()
    assert table[0].split() == ["site", "n", *[f"d{k}" for k in range(10)]]
    assert table[-1].split() == ["all", str(digits_labels.size), *map(str, np.bincount(digits_labels).tolist())]
    with pytest.raises(DataError, match=r"label 9 is outside \[0, 5\); fix: pass num_classes = len\(label_names\)"):
        partition_class_counts(digits_labels, parts, 5)


def test_read_out_falls_back_to_load_partition_when_the_mapping_is_not_kept():
    from flwr_datasets.partitioner import IidPartitioner  # keeps no index mapping: the public path runs

    index = np.random.default_rng(3).permutation(50)
    partitioner = IidPartitioner(num_partitions=4)
    partitioner.dataset = datasets.Dataset.from_dict({"label": np.zeros(50, np.int64), "index": index})
    parts = partitioners._read_partitions(partitioner, 4)
    for part, expected in zip(parts, np.array_split(index, 4)):  # IidPartitioner: contiguous shards
        np.testing.assert_array_equal(part, expected)
