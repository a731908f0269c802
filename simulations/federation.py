"""What every executor of a simulated federation shares: the ServerApp around `run_federation`, the opt-in."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtl.client.inputs import load_site_inputs
from fedtl.client.site import SIMULATION_ENV, Site, resolve_site
from fedtl.server.app import run_federation
from fedtl.server.evaluation import CentralEvaluation
from fedtl.server.setup import Backbone, federation_label_names, load_server_backbone, load_server_data
from fedtl.server.solvers import extract_public_inputs
from fedtl.server.solvers.auto import resolve_feature_block
from fedtl.shared import constants as k
from fedtl.shared.backbones import get_backbone_spec
from fedtl.shared.config import RunConfig, fedtl_home
from fedtl.shared.cut import Cut
from fedtl.shared.data import check_federation_data
from fedtl.shared.errors import ConfigError, FedtlError, StorageError
from fedtl.shared.files import storage_error
from fedtl.shared.heap import reuse_freed_memory
from fedtl.shared.named_data import federation_schema
from fedtl.shared.protocol import RoundSettings, SimulationSettings
from fedtl.simulations.stopping import StoppingGrid


@dataclass
class FederationApp:
    """A ServerApp whose main runs one federation of `cfg` and keeps its summary.

    Subclasses run other server logic on the same simulated sites (e.g. the backbone ranking) by
    overriding `run`; every executor takes a factory of such apps.
    """

    cfg: RunConfig
    run_dir: Path | None = None
    outcome: dict[str, Any] = field(default_factory=dict)
    backbone: Backbone | None = None  # built by `prepare`; the server's own run uses it instead of building it again
    what = "federation"

    def run(self, grid: Grid) -> dict[str, Any]:
        """Run the server logic on `grid` and return its summary."""
        # simulated_config made min-available-nodes the number of simulated sites; a resumed run needs it.
        return run_federation(
            grid,
            self.cfg,
            run_dir=self.run_dir,
            record={SIMULATED_SITES: self.cfg.min_available_nodes},
            backbone=self.backbone,
        )

    def prepare(self, num_sites: int) -> None:
        """Extract the simulated sites' inputs before the engine starts (a run of `cfg.backbone` uses them)."""
        self.backbone = prepare_simulated_sites(self.cfg, num_sites)

    def server_app(
        self, *, stop: threading.Event | None = None, on_push: Callable[[], None] | None = None
    ) -> ServerApp:
        """Return the ServerApp (Flower calls its main with the Grid of whichever executor runs it).

        With `stop` (Flower's engine), the run waits for replies on a StoppingGrid: it ends at its next exchange once
        `stop` is set, and calls `on_push` after each push (engine.PushWakesTheEngine).
        """
        app = ServerApp()

        @app.main()
        def _main(grid: Grid, context: Context) -> None:
            self.outcome["summary"] = self.run(grid if stop is None else StoppingGrid(grid, stop, on_push=on_push))

        return app

    def summary(self) -> dict[str, Any]:
        """Return the run's summary.

        Raises:
            RuntimeError: the ServerApp ended without one (the executor swallowed its error).
        """
        if "summary" not in self.outcome:
            raise RuntimeError(f"the simulated {self.what} ended without a summary; see the log above")
        return self.outcome["summary"]


log = logging.getLogger(__name__)

SIMULATED_SITES = "simulated-sites"  # config.json key: how many sites the lab simulated for the run

MIN_FREE_BYTES = 16 * 2**20  # below this a simulation cannot even cache one site's backbone and features


def check_storage(*folders: Path) -> None:
    """Check, before anything starts, that fedtl can write in `folders` (FEDTL_HOME, the runs folder) and has room.

    Raises:
        StorageError: a folder cannot be created or written, or its file system has less than 16 MiB free.
    """
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".fedtl-probe-"):
                pass
        except OSError as exc:
            raise storage_error(folder, exc) from exc
        free = shutil.disk_usage(folder).free
        if free < MIN_FREE_BYTES:
            raise StorageError(
                f"cannot write {folder}: only {free // 1024} KiB free there; the disk is full: free space there, or "
                "point FEDTL_HOME / --out elsewhere"
            )


def start_simulation(cfg: RunConfig, num_sites: int, app: AppFactory, run_dir: Path | None) -> FederationApp:
    """Return the server app of a simulated federation after checking its data and storage and preparing its sites.

    What every executor does before its engine starts (`simulated_config`, then the app's `prepare`).
    """
    federation = app(simulated_config(cfg, num_sites), run_dir)
    federation.prepare(num_sites)
    return federation


def prepare_simulated_sites(cfg: RunConfig, num_sites: int, *, progress: bool = True) -> Backbone | None:
    """Extract every simulated site's inputs at the cut, the server's held-out set's and public ones, before the engine.

    The sites would otherwise extract them inside the engine's workers, where no progress can be shown and
    each worker builds the backbone again; here it is one pass over all the data, with a bar per site and
    split, through the sites' own code (client/inputs.py), into the same caches (FEDTL_HOME). A later run on
    the same partition reads them; the public inputs' (the auto plan's synthetic images) are extracted once per
    backbone. The backbone is installed in each site's cache as the server would send it.
    Returns the server's backbone it built (None when there was nothing to prepare: a resumed run, or no data).
    """
    if cfg.resume or not cfg.data:
        return None
    cfg = resolve_feature_block(cfg)  # as the server will: the sites' inputs are the features the run reads
    backbone = load_server_backbone(cfg)
    splits = load_server_data(cfg)
    label_names = federation_label_names(cfg, splits)
    settings, simulation = lab_settings(cfg, backbone, label_names)
    cuts = [Cut.of(settings)]
    if cfg.feature_centering and not cuts[0].at_end:
        cuts.append(cuts[0].at_end_cut())  # the centre is estimated from the features themselves
    # One heap for every pass below: each site's split would otherwise grow it afresh and hand it back (heap.py).
    with simulated_sites(), reuse_freed_memory():
        for site in lab_sites(num_sites, simulation, backbone):
            try:
                for cut in cuts:
                    load_site_inputs(site, settings, cut=cut, progress=progress)
            except FedtlError as exc:  # as in a deployment, the site will say so, and the run go on without it
                log.warning("%s could not be prepared (it will refuse the run's requests): %s", site.name, exc)
        if cfg.central_evaluation and splits is not None and splits.test is not None:
            CentralEvaluation(cfg, backbone, splits.test, label_names)
        extract_public_inputs(backbone, cfg, label_names, progress=progress)
    return backbone


def lab_settings(
    cfg: RunConfig, backbone: Backbone, label_names: tuple[str, ...]
) -> tuple[RoundSettings, SimulationSettings]:
    """Return what the simulated sites of `cfg` are sent (the lab reads their caches and trains as they do)."""
    settings = RoundSettings.for_run(
        cfg,
        run_id="lab",
        backbone_fingerprint=backbone.fingerprint,
        image_size=backbone.preprocessing.image_size,
        label_names=label_names,
        schema=backbone.schema,
    )
    with tempfile.TemporaryDirectory(prefix="fedtl-lab-") as tmp:  # no run folder: the lab writes no site state
        simulation = SimulationSettings.for_run(cfg, run_dir=Path(tmp))
    return settings, simulation


def lab_sites(num_sites: int, simulation: SimulationSettings, backbone: Backbone) -> Iterator[Site]:
    """Yield the simulated sites of a federation, each with `backbone` installed as the server would send it.

    Call it where simulated sites are enabled (`simulated_sites()`).
    """
    for pid in range(num_sites):
        site = resolve_site({k.PARTITION_ID: pid, k.NUM_PARTITIONS: num_sites}, simulation)
        if not site.backbones.has(backbone.fingerprint):
            site.backbones.install(backbone.name, backbone.fingerprint, backbone.state)
        yield site


AppFactory = Callable[[RunConfig, "Path | None"], FederationApp]


def simulated_config(cfg: RunConfig, num_sites: int) -> RunConfig:
    """Return `cfg` for `num_sites` simulated sites, after checking their data: every site must join first.

    The data is checked here, before any engine starts or any site is charged: its classes (declared or
    derived once), its images, and that every site's share can be split (shared/data.check_federation_data).

    Raises:
        ConfigError: `num_sites` < 1.
        DataError: the data cannot make this federation (the message names the input and the fix).
    """
    if num_sites < 1:
        raise ConfigError(f"`sites` must be >= 1, got {num_sites}")
    check_storage(fedtl_home(), Path(cfg.out))
    if cfg.data and not cfg.resume:
        checked = check_federation_data(
            cfg.data,
            label_names=cfg.label_name_list,
            num_sites=num_sites,
            partition=cfg.partition,
            seed=cfg.seed,
            test_fraction=cfg.test_fraction,
            local_test_fraction=cfg.local_test_fraction,
            permuted_label_sites=cfg.permuted_label_site_ids,
            schema=federation_schema(cfg.schema, cfg.data),
        )
        reads = get_backbone_spec(cfg.backbone).kind
        if checked.report.inputs != reads:
            hint = {"texts": "minilm_l6", "rows": "tabular"}.get(checked.report.inputs, "efficientnet_lite0")
            raise ConfigError(
                f"`data` {cfg.data!r} holds {checked.report.inputs} but backbone {cfg.backbone!r} reads {reads}; "
                f"fix: backbone = {hint!r} (--backbone {hint})"
            )
    return cfg.replace(min_available_nodes=num_sites)


@contextlib.contextmanager
def simulated_sites() -> Iterator[None]:
    """Opt this process's sites into simulation for the duration (FEDTL_SIMULATED_SITES=1), then restore it."""
    previous = os.environ.get(SIMULATION_ENV)
    os.environ[SIMULATION_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SIMULATION_ENV, None)
        else:
            os.environ[SIMULATION_ENV] = previous
