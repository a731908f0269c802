"""A site's data as the frozen network's outputs at the cut: decoded and validated once, extracted once, cached.

Flower starts a fresh ClientApp process per message, so everything here lives on disk: the inputs at
the cut (features, or activations before the trainable blocks) in the site's cache, keyed by the cut's
fingerprint, the data's fingerprint and the preprocessing; and, for a real site, a data index that maps
its files' names, sizes and times to those data fingerprints, so unchanged data is not decoded again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtl.client.canaries import refuse_canaries
from fedtl.client.site import Site, load_site_data
from fedtl.shared.backbones import TablePreprocessing, fingerprint_state_dict
from fedtl.shared.config import fedtl_home
from fedtl.shared.cut import Cut, inputs_at_cut
from fedtl.shared.encoders import SchemaIdentity
from fedtl.shared.errors import BackboneError, DataError, FingerprintMismatchError
from fedtl.shared.features import EXAMPLE_STORE, FeatureCache, feature_cache_key
from fedtl.shared.files import atomic_write_bytes
from fedtl.shared.loaders import source_stamp
from fedtl.shared.protocol import RoundSettings

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class SiteInputs:
    """A site's inputs at the cut: its training split and its local test split."""

    train_x: np.ndarray  # (N_train, D) features, or (N_train, C, H, W) activations
    train_y: np.ndarray  # (N_train,)
    test_x: np.ndarray  # (N_test, ...)
    test_y: np.ndarray  # (N_test,)
    label_names: tuple[str, ...]
    cache_hits: int  # of the 2 splits


def load_site_inputs(
    site: Site, settings: RoundSettings, *, cut: Cut | None = None, progress: bool | None = None
) -> SiteInputs:
    """Return the site's inputs at `cut` (default: the run's), running the frozen part once per data and cut.

    Raises:
        BackboneError: the announced backbone is not in the site cache (the server must send it first).
        DataError: the site's label names differ from the federation's (names or order).
        PolicyRefusal: a real site was asked for audit canaries.
    """
    expected = settings.label_name_list
    if site.policy is not None:  # before the data index below can answer from cache
        refuse_canaries(site.name, site.audit_canaries)
    if not site.backbones.has(settings.backbone_fingerprint):
        raise BackboneError(
            f"backbone `{settings.backbone_name}` {settings.backbone_fingerprint[:12]} is not in site {site.name}'s "
            f"cache {site.backbones.root}; the server sends it before round 1"
        )
    site.backbones.verify(settings.backbone_name, settings.backbone_fingerprint)  # its features are only as good
    cut = cut or Cut.of(settings)
    schema = cut.preprocessing.schema if isinstance(cut.preprocessing, TablePreprocessing) else None
    if schema is not None:  # the schema that was sent must be the one the approved fingerprint pins
        pinned = fingerprint_state_dict(SchemaIdentity(schema).state_dict())
        if pinned != settings.backbone_fingerprint:
            raise FingerprintMismatchError(
                f"the run's table schema {schema.name!r} hashes to backbone fingerprint {pinned[:12]}, but the run "
                f"announced {settings.backbone_fingerprint[:12]}; refusing to read the data under it"
            )
    index = data_index(site, expected, schema.key() if schema is not None else "")
    if index is not None and index.is_file():  # the data was decoded and validated before, unchanged since
        recorded = json.loads(index.read_text())
        cache = FeatureCache(site.cache_dir / cut.cache_folder)
        found = [cache.load(feature_cache_key(cut.fingerprint, recorded[s], cut.preprocessing)) for s in SPLITS]
        if all(f is not None for f in found):
            (train_x, train_y), (test_x, test_y) = found  # type: ignore[misc]
            log.info("site %s: inputs at the cut of unchanged data from cache (data not decoded)", site.name)
            return SiteInputs(train_x, train_y, test_x, test_y, tuple(expected), 2)
    train, test = load_site_data(site, tuple(expected), schema)
    if list(train.label_names) != expected:
        raise DataError(
            f"site {site.name} data {site.data} has {len(train.label_names)} classes {list(train.label_names)}, "
            f"but the federation trains a {settings.num_classes}-class head on {expected}; every site needs the "
            "same label names in the same order (rename the class folders or set label_names in the .npz)"
        )
    if progress is None:  # a real site's log shows extraction progress; simulated sites stay quiet
        progress = site.simulation is None
    # Built at most once, and only on a cache miss.
    load = functools.cache(lambda: site.backbones.load(settings.backbone_name, settings.backbone_fingerprint))
    out, hits, fingerprints = [], 0, {}
    for name, split in zip(SPLITS, (train, test)):
        fingerprints[name] = split.fingerprint()
        x, y, hit = inputs_at_cut(
            site.cache_dir,
            cut,
            load,
            images=split.images,
            labels=split.labels,
            data_fingerprint=fingerprints[name],
            batch_size=settings.feature_batch_size,
            device=settings.device,
            progress=progress,
            desc=f"{site.name} {name} {cut.cache_folder}",
            # Simulated sites are one party (the researcher's data on one machine): a new partition reuses what
            # any of them extracted before. A real site's inputs never enter a shared store.
            store_root=None if site.simulation is None else fedtl_home() / EXAMPLE_STORE,
        )
        hits += int(hit)
        out.append((x, y))
    if index is not None:
        atomic_write_bytes(index, json.dumps(fingerprints).encode())
    log.info(
        "site %s: inputs at the cut (%s) %s per example for %d train / %d test examples (%d of 2 from cache)",
        site.name,
        cut.adaptation.describe(),
        tuple(out[0][0].shape[1:]),
        len(train),
        len(test),
        hits,
    )
    return SiteInputs(out[0][0], out[0][1], out[1][0], out[1][1], tuple(train.label_names), hits)


def data_index(site: Site, label_names: list[str], schema_key: str = "") -> Path | None:
    """Return where a real site records the fingerprints of its decoded, validated data (None: not indexed).

    Keyed by the files' names, sizes and modification times plus the loading settings, so unchanged data
    is not decoded again at every message; any change means one full load and validation.
    """
    policy = site.policy
    if policy is None:
        return None
    stamp = source_stamp(policy.data)
    if stamp is None:
        return None
    loading = [stamp, list(policy.label_names or label_names), policy.bad_files, policy.test_fraction]
    if schema_key:  # rows are parsed under the schema; images' and texts' index keys are unchanged
        loading.append(schema_key)
    settings = json.dumps(loading, sort_keys=True)
    return site.cache_dir / "data-index" / f"{hashlib.sha256(settings.encode()).hexdigest()}.json"
