"""Partitioners of simulated federations: one dataset split over N sites (iid, label/quantity/class skew, natural).

Label skew, pathological class skew and quantity skew go through flwr-datasets' partitioners (Dirichlet,
Pathological, Size), run on a seeded shuffle of the data; iid and natural are plain numpy (see their
functions for why). Every result is checked to cover each sample exactly once, and memoized in-process:
each simulated site recomputes its federation's partitioning at every message, so the 2nd..Nth call for the
same (labels, groups, scheme, num_partitions, seed) must cost a hash, not a partitioning.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedtl.shared.constants import NUM_EXAMPLES, PARTITION_ID
from fedtl.shared.errors import ConfigError, DataError

__all__ = [
    "ACCEPTED_PARTITIONS",
    "CLASS_COUNTS",
    "PARTITION_KINDS",
    "PartitionCounts",
    "PartitionSpec",
    "clear_partition_cache",
    "count_partitions",
    "format_partition_counts",
    "minimum_partition_size",
    "parse_partition",
    "partition_class_counts",
    "partition_indices",
    "validate_groups",
]

IID, DIRICHLET, QUANTITY, CLASSES, NATURAL = "iid", "dirichlet", "quantity", "classes", "natural"
SAMPLE = "sample"  # lab only: each site draws k examples; sites may share examples (scale studies)
PARTITION_KINDS = (IID, DIRICHLET, QUANTITY, CLASSES, NATURAL, SAMPLE)
ACCEPTED_PARTITIONS = (
    "'iid'; 'dirichlet:<alpha>' (label skew, alpha > 0, e.g. 'dirichlet:0.5'); 'quantity:<alpha>' (quantity "
    "skew: site sizes ~ Dirichlet(alpha), e.g. 'quantity:0.5'); 'classes:<k>' (k classes per site, integer "
    "k >= 1, e.g. 'classes:2'); 'natural' (one site per site id of the data); 'sample:<k>' (lab scale studies: "
    "each site draws k distinct examples, sites may share examples, more sites than examples allowed)"
)
CLASS_COUNTS = "class-counts"  # JSON key of count_partitions' rows, next to PARTITION_ID and NUM_EXAMPLES
# Seeded redraws of a flwr-datasets partitioner before giving up. A Dirichlet redraw is itself up to 11
# draws (flwr-datasets retries min_partition_size 10 times), so label skew gets 220 draws in all.
MAX_PARTITIONER_ATTEMPTS = 20
# Literature minimum site size (Li et al. 2022, NIID-Bench `min_require_size = 10`).
LITERATURE_MIN_SIZE = 10
PARTITION_CACHE_SIZE = 32
MAX_SAMPLED_SITES = 1_000_000  # 'sample:k' allows more sites than examples, up to this many
_LABEL, _INDEX = "label", "index"  # columns of the Hugging Face dataset handed to flwr-datasets


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition scheme: its kind and its parameter (alpha for dirichlet/quantity, k for classes)."""

    kind: str
    parameter: float | int | None = None

    def __post_init__(self) -> None:
        _check_spec(self.kind, self.parameter, shown=str(self))

    def __str__(self) -> str:
        return self.kind if self.parameter is None else f"{self.kind}:{self.parameter}"


def parse_partition(scheme: str | PartitionSpec) -> PartitionSpec:
    """Parse 'iid', 'dirichlet:ALPHA', 'quantity:ALPHA', 'classes:K' or 'natural' (case and spaces ignored).

    Raises:
        ConfigError: naming the scheme received and listing ACCEPTED_PARTITIONS.
    """
    if isinstance(scheme, PartitionSpec):
        return scheme
    if not isinstance(scheme, str):
        raise ConfigError(f"partition scheme must be a string, got {scheme!r}; accepted: {ACCEPTED_PARTITIONS}")
    name, sep, raw = (part.strip() for part in scheme.strip().lower().partition(":"))
    if name in (IID, NATURAL) and not sep:
        return PartitionSpec(name)
    if name in (DIRICHLET, QUANTITY, CLASSES, SAMPLE) and sep:
        number: float | int
        try:
            number = int(raw) if name in (CLASSES, SAMPLE) else float(raw)
        except ValueError:
            what = "k" if name in (CLASSES, SAMPLE) else "alpha"
            kind = "an integer" if name in (CLASSES, SAMPLE) else "a number"
            raise ConfigError(
                f"partition scheme {scheme!r}: {name} {what} {raw!r} is not {kind}; accepted: {ACCEPTED_PARTITIONS}"
            ) from None
        _check_spec(name, number, shown=scheme)
        return PartitionSpec(name, number)
    raise ConfigError(f"unknown partition scheme {scheme!r}; accepted: {ACCEPTED_PARTITIONS}")


# The schemes whose parameter is an integer k: its least value and what k means.
_INTEGER_K = {
    SAMPLE: (2, "k = the examples each site draws (a training and a local test split need 2 at least)"),
    CLASSES: (1, "k = the number of classes on each site (1 or 2 is the pathological split of McMahan et al. 2017)"),
}


def _check_spec(kind: str, parameter: object, *, shown: str) -> None:
    """Raise ConfigError unless (kind, parameter) is a valid scheme; `shown` is the text the user gave."""
    if kind not in PARTITION_KINDS:
        raise ConfigError(f"unknown partition scheme {shown!r}; accepted: {ACCEPTED_PARTITIONS}")
    if kind in (IID, NATURAL):
        if parameter is not None:
            raise ConfigError(f"partition scheme {shown!r}: {kind} takes no parameter; accepted: {ACCEPTED_PARTITIONS}")
        return
    if kind in _INTEGER_K:
        least, meaning = _INTEGER_K[kind]
        if isinstance(parameter, bool) or not isinstance(parameter, numbers.Integral) or parameter < least:
            raise ConfigError(
                f"partition scheme {shown!r}: {kind} k must be an integer >= {least}, got {parameter!r}; {meaning}"
            )
        return
    if isinstance(parameter, bool) or not isinstance(parameter, numbers.Real) or not math.isfinite(parameter):
        ok = False
    else:
        ok = parameter > 0
    if not ok:
        skew = "label skew" if kind == DIRICHLET else "skew of site sizes"
        raise ConfigError(
            f"partition scheme {shown!r}: {kind} alpha must be a finite number > 0, got {parameter!r}; "
            f"smaller alpha = more {skew} (0.1 strong, 1.0 mild, 100 near-iid)"
        )


def minimum_partition_size(num_samples: int, num_partitions: int) -> int:
    """The fewest samples a generated partition may hold: min(10, N // (2P)), at least 1.

    10 is NIID-Bench's floor (Li et al. 2022); half the mean size keeps skewed schemes drawable with many
    small sites (1,000 sites over 5,000 samples need 2 each, enough for a local train/test split).
    """
    return max(1, min(LITERATURE_MIN_SIZE, num_samples // (2 * num_partitions)))


def validate_groups(groups: object, num_samples: int, *, source: str) -> np.ndarray:
    """Return `groups` as one non-empty site id per sample: a str (N,) or int64 (N,) array, else DataError."""
    array = np.asarray(groups)
    if array.dtype.kind == "O" and array.ndim == 1:
        if all(isinstance(g, str) for g in array.tolist()):
            array = array.astype(str)
        elif all(isinstance(g, numbers.Integral) and not isinstance(g, bool) for g in array.tolist()):
            array = array.astype(np.int64)
    if array.dtype.kind == "S":
        try:
            array = np.char.decode(array, "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{source}: site ids are not UTF-8 text: {exc}; fix: store them as str") from None
    if array.dtype.kind not in "iuU":
        raise DataError(
            f"{source}: site ids (`groups`) must be strings or integers, got dtype {array.dtype}; "
            "fix: store one site name or number per image"
        )
    if array.shape != (num_samples,):
        raise DataError(
            f"{source}: site ids (`groups`) must have shape ({num_samples},), one per image, got {array.shape}; "
            "fix: give every image exactly one site id"
        )
    if array.dtype.kind == "U":
        empty = np.flatnonzero(np.char.str_len(np.char.strip(array)) == 0)
        if empty.size:
            raise DataError(
                f"{source}: site id at index {int(empty[0])} is empty ({empty.size} empty in all); "
                "fix: name the site of every image"
            )
        return array
    return array.astype(np.int64)


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    *,
    scheme: str | PartitionSpec = IID,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split sample positions into `num_partitions` disjoint, sorted index arrays that cover every sample once.

    Memoized in-process on (labels, groups, scheme, num_partitions, seed): repeated calls cost a hash of
    the labels. The returned arrays are shared and read-only.

    Args:
        labels: class index per sample, (N,) or (N,1).
        num_partitions: number of simulated sites, in [1, N]; for 'natural', the number of distinct site ids.
        scheme: see ACCEPTED_PARTITIONS. Generated schemes give every partition at least
            minimum_partition_size(N, num_partitions) samples.
        seed: the same seed gives the same partitions, in any process.
        groups: one site id (str or int) per sample; used by 'natural' only, whose partition p is the
            p-th site id in sorted order.

    Raises:
        ConfigError: bad scheme or seed; num_partitions out of range or (natural) not the number of site
            ids; 'natural' without groups; a skew too extreme for the minimum size within the attempts.
        DataError: labels that are not class indices, or groups not one site id per sample.
    """
    spec = parse_partition(scheme)
    _check_seed(seed)
    labels = _as_labels(labels)
    n = labels.size
    if spec.kind == NATURAL:
        if groups is None:
            raise ConfigError(
                "partition scheme 'natural' needs `groups` (one site id per sample), got None; fix: load data "
                "that names each image's site (a 'site' column in the CSV manifest, 'train_sites' in the .npz) "
                "or choose another scheme"
            )
        keyed_groups = _Keyed(validate_groups(groups, n, source="partition groups"))
        # The site ids alone fix the partitioning: one memo entry whatever num_partitions and seed say.
        parts = _partition_cached(_Keyed(labels), keyed_groups, spec, 0, 0)
        if not isinstance(parts, ConfigError) and num_partitions != len(parts):
            raise ConfigError(
                f"partition scheme 'natural' makes one partition per site id: the data has {len(parts)} site id(s) "
                f"but num_partitions={num_partitions!r}; fix: set num_partitions (the number of simulated sites) "
                f"to {len(parts)}"
            )
    elif (
        isinstance(num_partitions, bool)
        or not isinstance(num_partitions, numbers.Integral)
        or not 1 <= num_partitions <= (MAX_SAMPLED_SITES if spec.kind == SAMPLE else n)
    ):
        raise ConfigError(
            f"`num_partitions` must be an integer in [1, {n}] (the number of samples), got {num_partitions!r}; "
            "fix: use fewer sites or more data"
        )
    else:
        parts = _partition_cached(_Keyed(labels), None, spec, int(num_partitions), int(seed))
    if isinstance(parts, ConfigError):
        raise ConfigError(str(parts))  # a fresh error: re-raising the cached one would grow its traceback
    return list(parts)


def clear_partition_cache() -> None:
    """Forget every memoized partitioning (tests use it to check that recomputation is deterministic)."""
    _partition_cached.cache_clear()


class _Keyed:
    """An array keyed by a SHA-256 of its values and shape, so lru_cache can memoize on its content."""

    __slots__ = ("array", "digest")

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        if array.dtype.kind in "iu" and array.size and array.min() >= 0:
            # Class indices and site numbers fit a byte or two: hashing those bytes, not int64, is 4-8x faster.
            array = array.astype(np.min_scalar_type(array.max()))
        array = np.ascontiguousarray(array)
        digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())  # SHA-NI: ~2x blake2b here
        digest.update(memoryview(array).cast("B"))
        self.digest = digest.digest()

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Keyed) and other.digest == self.digest


@functools.lru_cache(maxsize=PARTITION_CACHE_SIZE)
def _partition_cached(
    labels: _Keyed, groups: _Keyed | None, spec: PartitionSpec, num_partitions: int, seed: int
) -> tuple[np.ndarray, ...] | ConfigError:
    """The partitioning of partition_indices, computed once per distinct argument set.

    A scheme too extreme for the data is memoized as its ConfigError too: every simulated site would
    otherwise spend the whole search again before failing.
    """
    try:
        parts = _compute_partition(labels, groups, spec, num_partitions, seed)
    except ConfigError as exc:
        return exc
    for part in parts:
        part.flags.writeable = False  # shared by every caller through the cache
    return tuple(parts)


def _compute_partition(
    labels: _Keyed, groups: _Keyed | None, spec: PartitionSpec, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """Dispatch on the scheme's kind; checks the result covers every sample exactly once."""
    y = labels.array
    if spec.kind == NATURAL:
        assert groups is not None
        parts = _natural_partition(groups.array)
    elif spec.kind == IID:
        parts = _iid_partition(y.size, num_partitions, seed)
    elif spec.kind == QUANTITY:
        parts = _quantity_partition(y, num_partitions, float(spec.parameter), seed)  # type: ignore[arg-type]
    elif spec.kind == SAMPLE:
        return _sample_partition(y.size, num_partitions, int(spec.parameter), seed)  # type: ignore[arg-type]
    else:
        parts = _skewed_partition(y, num_partitions, spec, seed)
    assert _covers_once(parts, y.size), "partitions must cover every sample exactly once"
    return parts


def _sample_partition(n: int, num_partitions: int, k: int, seed: int) -> list[np.ndarray]:
    """Each site draws k distinct examples, independently of the others (sites may share examples).

    A lab scheme for scale studies only: many more sites than examples. Sites that share an example are not
    separate people's data, so the federation's privacy claims do not hold across them; the README says so.
    """
    if k > n:
        raise ConfigError(f"partition scheme 'sample:{k}': each site draws {k} examples, but the data has {n}")
    return [
        np.sort(np.random.default_rng([seed, 0x5A3, site]).choice(n, size=k, replace=False))
        for site in range(num_partitions)
    ]


def _iid_partition(n: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle cut into near-equal contiguous chunks (sizes differ by at most one).

    This is flwr-datasets' IidPartitioner (contiguous `Dataset.shard`) applied to shuffled data; numpy does
    it without building a Hugging Face dataset, and IidPartitioner alone would not shuffle.
    """
    rng = np.random.default_rng(seed)
    return [np.sort(part) for part in np.array_split(rng.permutation(n), num_partitions)]


def _natural_partition(groups: np.ndarray) -> list[np.ndarray]:
    """One partition per distinct site id, in sorted id order (as flwr-datasets' NaturalIdPartitioner numbers them).

    Not NaturalIdPartitioner itself: it loops over samples in Python and prints a tqdm bar on every
    partitioning, which every simulated site of a run would repeat; the result is the same (the tests
    check it against NaturalIdPartitioner).
    """
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # stable: positions stay increasing within each site
    bounds = np.cumsum(np.bincount(inverse))[:-1]
    return list(np.split(order, bounds))


def _quantity_partition(labels: np.ndarray, num_partitions: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Quantity skew: site sizes ~ Dirichlet(alpha) above a floor, samples (so labels) iid within each site.

    The 'iid-diff-quantity' split of Li et al. 2022 (NIID-Bench) draws shares ~ Dir(alpha) and redraws
    until every site has 10 samples; with many small sites no draw ever qualifies (1,000 sites over 5,000
    samples at alpha 1: P(every size >= 2) is about 0). So every site gets the floor
    minimum_partition_size(N, P) and the other N - P * floor samples are split by one Dir(alpha) draw:
    near NIID-Bench's sizes when the floor is small next to N / P, and never a failed draw.
    flwr-datasets' SizePartitioner then cuts the seeded shuffle of the data to those sizes.
    """
    from flwr_datasets.partitioner import SizePartitioner

    n = labels.size
    floor = minimum_partition_size(n, num_partitions)
    spare = n - num_partitions * floor  # >= 0: floor <= N // (2P), or 1 with P <= N
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    shares = rng.dirichlet(np.full(num_partitions, alpha))  # (P,)
    if not np.all(np.isfinite(shares)):  # alpha so small that the draw underflows: all on one site
        shares = np.eye(num_partitions)[rng.integers(num_partitions)]
    cuts = np.minimum((np.cumsum(shares)[:-1] * spare).astype(np.int64), spare)  # (P-1,), guards cumsum above 1
    sizes = floor + np.diff(np.concatenate([[0], cuts, [spare]]))  # (P,), sums to N
    partitioner = SizePartitioner([int(s) for s in sizes])
    partitioner.dataset = _hf_dataset(labels, order)
    mapping = partitioner.partition_id_to_indices  # public: row positions in the shuffled dataset
    return [np.sort(order[np.asarray(mapping[p], dtype=np.int64)]) for p in range(num_partitions)]


def _skewed_partition(labels: np.ndarray, num_partitions: int, spec: PartitionSpec, seed: int) -> list[np.ndarray]:
    """Label skew (Dirichlet) or k classes per site (Pathological) via flwr-datasets, redrawn until valid.

    flwr-datasets splits each class in dataset order, so it gets a seeded shuffle of the data (which
    samples of a class a site gets is then random too). A draw is kept when it covers every sample once
    and gives each site minimum_partition_size samples; redraws use seeds derived from (seed, attempt).
    """
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner

    n = labels.size
    min_size = minimum_partition_size(n, num_partitions)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    make: Callable[[int], object]
    if spec.kind == DIRICHLET:
        # Per-class proportions ~ Dir(alpha) over sites: Yurochkin et al. 2019 / Wang et al. 2020 (FedMA),
        # the label skew studied by Hsu et al. 2019; no self-balancing, as in those codes.
        dataset = _hf_dataset(labels, order)

        def make(attempt_seed: int) -> object:
            return DirichletPartitioner(
                num_partitions=num_partitions,
                partition_by=_LABEL,
                alpha=float(spec.parameter),  # type: ignore[arg-type]
                min_partition_size=min_size,
                self_balancing=False,
                shuffle=False,
                seed=attempt_seed,
            )

        knob = "alpha"
    else:
        # McMahan et al. 2017's pathological non-IID split: each site holds exactly k classes, each class
        # divided evenly among the sites holding it. 'first-deterministic' gives site p class p % C first,
        # so with P >= C every class has a site; the classes are renamed by a seeded permutation so which
        # classes get the extra sites is random rather than always the lowest ids. With P < C its random
        # extra classes rarely cover the rest (5 sites x 2 of 10 classes: about 1 draw in 500), so that case is ours.
        k = int(spec.parameter)  # type: ignore[arg-type]
        if k > classes.size:
            raise ConfigError(
                f"partition scheme {str(spec)!r} asks for {k} classes per site but the {n} samples hold "
                f"{classes.size} classes; fix: use classes:<k> with k <= {classes.size}"
            )
        if num_partitions * k < classes.size:
            raise ConfigError(
                f"partition scheme {str(spec)!r} with num_partitions={num_partitions} places at most "
                f"{num_partitions * k} classes but the {n} samples hold {classes.size}, so some samples would "
                f"belong to no site; fix: use at least {math.ceil(classes.size / k)} partitions or a larger k"
            )
        if num_partitions < classes.size:
            parts = _class_cycle_partition(labels, num_partitions, k, rng)
            if min(p.size for p in parts) < min_size:
                raise _too_extreme(spec, num_partitions, n, labels, min_size, 1, "k")
            return parts
        renamed = rng.permutation(classes.size)[np.searchsorted(classes, labels)]
        dataset = _hf_dataset(renamed, order)

        def make(attempt_seed: int) -> object:
            return PathologicalPartitioner(
                num_partitions=num_partitions,
                partition_by=_LABEL,
                num_classes_per_partition=k,
                class_assignment_mode="first-deterministic",
                shuffle=False,
                seed=attempt_seed,
            )

        knob = "k"
    for attempt in range(MAX_PARTITIONER_ATTEMPTS):
        attempt_seed = int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])
        partitioner = make(attempt_seed)
        partitioner.dataset = dataset  # type: ignore[attr-defined]
        with warnings.catch_warnings():
            # Failed draws are retried here; flwr-datasets warns about each one (and about unused classes).
            warnings.filterwarnings("ignore", message=r"The specified min_partition_size", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"Classes: .* will NOT be used", category=UserWarning)
            try:
                positions = _read_partitions(partitioner, num_partitions)
            except ValueError:  # flwr-datasets: min size not met in its 11 draws, or a class on too many sites
                continue
        parts = [np.sort(p) for p in positions]
        if _covers_once(parts, n) and min(p.size for p in parts) >= min_size:
            return parts
    raise _too_extreme(spec, num_partitions, n, labels, min_size, MAX_PARTITIONER_ATTEMPTS, knob)


def _class_cycle_partition(
    labels: np.ndarray, num_partitions: int, k: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """k classes per site with fewer sites than classes: site p takes entries p*k .. p*k+k-1 of a seeded class cycle.

    So P*k >= C uses every class and a site's k classes are distinct; each class's shuffled samples are
    divided evenly among the sites holding it, as PathologicalPartitioner does.
    """
    classes = np.unique(labels)
    cycle = classes[rng.permutation(classes.size)]
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for p in range(num_partitions):
        for i in range(k):
            holders[int(cycle[(p * k + i) % classes.size])].append(p)
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for c, sites in holders.items():
        members = rng.permutation(np.flatnonzero(labels == c))
        for site, chunk in zip(sites, np.array_split(members, len(sites))):
            chunks[site].append(chunk)
    return [np.sort(np.concatenate(parts)) for parts in chunks]


def _read_partitions(partitioner: object, num_partitions: int) -> list[np.ndarray]:
    """The original sample positions (the dataset's index column) in each partition of a flwr-datasets partitioner.

    The public way, load_partition(p), builds a Hugging Face `Dataset.select` per partition whose
    fingerprinting costs 1-4 ms each (seconds for 1,000 sites). flwr-datasets 0.6.1 (pinned) keeps the
    row mapping it computed in `_partition_id_to_indices` once `num_partitions` is read; we read that, and
    fall back to load_partition when a later version stores it differently (the tests check both agree).
    """
    partitioner.num_partitions  # type: ignore[attr-defined]  # computes the assignment (may raise ValueError)
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(mapping, dict) and sorted(mapping) == list(range(num_partitions)):
        index = np.asarray(partitioner.dataset[_INDEX], dtype=np.int64)  # type: ignore[attr-defined]
        return [index[np.asarray(mapping[p], dtype=np.int64)] for p in range(num_partitions)]
    return [
        np.asarray(partitioner.load_partition(p)[_INDEX], dtype=np.int64)  # type: ignore[attr-defined]
        for p in range(num_partitions)
    ]


def _too_extreme(
    spec: PartitionSpec, num_partitions: int, n: int, labels: np.ndarray, min_size: int, attempts: int, knob: str
) -> ConfigError:
    """The ConfigError of a skewed scheme that found no valid draw: names scheme, sites, samples and the fix."""
    remedy = "raise alpha (e.g. 0.1 or more)" if knob == "alpha" else "change k"
    return ConfigError(
        f"partition scheme {str(spec)!r} with num_partitions={num_partitions} over {n} samples of "
        f"{np.unique(labels).size} classes left some partition with fewer than {min_size} samples (or some "
        f"sample on no site) in all {attempts} attempts: {knob}/num_partitions is too extreme for this data; "
        f"fix: {remedy}, use fewer partitions or more data"
    )


def _hf_dataset(labels: np.ndarray, order: np.ndarray) -> object:
    """A Hugging Face dataset of the rows in `order`: their label and original position (to map results back)."""
    import datasets

    return datasets.Dataset.from_dict({_LABEL: labels[order], _INDEX: order})


def _covers_once(parts: list[np.ndarray], n: int) -> bool:
    """Whether `parts` hold every position 0..n-1 exactly once."""
    everything = np.concatenate(parts) if parts else np.empty(0, np.int64)
    return everything.size == n and bool(np.all(np.bincount(everything, minlength=n) == 1))


def partition_class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Samples per class in each partition: int64 (P, K); row p sums to len(parts[p])."""
    labels = _as_labels(labels)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ConfigError(f"`num_classes` must be an integer >= 1, got {num_classes!r}")
    if labels.size and labels.max() >= num_classes:
        raise DataError(
            f"label {int(labels.max())} is outside [0, {num_classes}); fix: pass num_classes = len(label_names)"
        )
    counts = np.zeros((len(parts), int(num_classes)), dtype=np.int64)
    for p, part in enumerate(parts):
        counts[p] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return counts


@dataclass(frozen=True)
class PartitionCounts:
    """One site's share of a partitioning: its id, its number of samples and its samples per class."""

    partition_id: int
    num_examples: int
    class_counts: tuple[int, ...]

    def to_row(self) -> dict[str, object]:
        """The JSON row of this site (kebab-case keys)."""
        return {PARTITION_ID: self.partition_id, NUM_EXAMPLES: self.num_examples, CLASS_COUNTS: list(self.class_counts)}


def count_partitions(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[PartitionCounts]:
    """Per-site rows (partition id, samples, samples per class) of a partitioning, for reports and JSON."""
    counts = partition_class_counts(labels, parts, num_classes)
    return [PartitionCounts(p, int(row.sum()), tuple(int(c) for c in row)) for p, row in enumerate(counts)]


def format_partition_counts(rows: list[PartitionCounts], label_names: tuple[str, ...] | None = None) -> str:
    """A plain-text table of `rows`: one line per site, one column per class, then the totals."""
    num_classes = len(rows[0].class_counts) if rows else len(label_names or ())
    names = list(label_names) if label_names is not None else [str(k) for k in range(num_classes)]
    if len(names) != num_classes:
        raise ConfigError(f"`label_names` has {len(names)} names for {num_classes} classes; fix: one name per class")
    totals = [sum(r.class_counts[k] for r in rows) for k in range(num_classes)]
    cells = [["site", "n", *names]]
    cells += [[str(r.partition_id), str(r.num_examples), *map(str, r.class_counts)] for r in rows]
    cells.append(["all", str(sum(r.num_examples for r in rows)), *map(str, totals)])
    widths = [max(len(row[j]) for row in cells) for j in range(len(cells[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells)


def _as_labels(labels: np.ndarray) -> np.ndarray:
    """`labels` as int64 (N,) class indices (an (N,1) column is flattened), else DataError."""
    array = np.asarray(labels)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iub"):
        raise DataError(
            f"partition labels must be integer class indices of shape (N,) or (N,1), got dtype {array.dtype} "
            f"shape {array.shape}; fix: pass the dataset's labels (ImageDataset.labels)"
        )
    if array.size and array.min() < 0:
        raise DataError(f"partition labels must be >= 0, got {int(array.min())}; fix: use class indices 0..K-1")
    return array.astype(np.int64)


def _check_seed(seed: int) -> None:
    """Raise ConfigError unless `seed` is an integer in [0, 2**32) (what numpy accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not (0 <= seed < 2**32):
        raise ConfigError(f"`seed` must be an integer in [0, 2**32), got {seed!r}")
