"""Per-site class counts of a simulated federation: written beside every run and shown by the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtl.server.setup import load_server_data
from fedtl.shared.config import RunConfig
from fedtl.shared.files import atomic_write_bytes
from fedtl.shared.partitioners import PartitionCounts, count_partitions, format_partition_counts, partition_indices


def describe_partition(cfg: RunConfig, num_sites: int) -> list[PartitionCounts]:
    """Return each simulated site's examples per class, as the sites themselves partition `cfg.data`.

    These are the partitions before each site splits off its local test set (site_split).
    """
    splits = load_server_data(cfg)
    train = splits.train
    parts = partition_indices(train.labels, num_sites, scheme=cfg.partition, seed=cfg.seed, groups=train.groups)
    return count_partitions(train.labels, parts, len(train.label_names))


def write_partition_report(cfg: RunConfig, num_sites: int, summary: dict[str, Any]) -> str:
    """Write `partition.json` into the run's folder and return the counts as a text table."""
    rows = describe_partition(cfg, num_sites)
    payload = {
        "partition": cfg.partition,
        "seed": cfg.seed,
        "permuted-label-sites": list(cfg.permuted_label_site_ids),
        "sites": [{"site": f"site-{r.partition_id}", **r.to_row()} for r in rows],
    }
    atomic_write_bytes(Path(summary["run-dir"]) / "partition.json", json.dumps(payload, indent=1).encode())
    splits = load_server_data(cfg)
    return format_partition_counts(rows, tuple(splits.train.label_names))
