"""What every executor of a simulated federation shares: the ServerApp around `run_federation`, the opt-in."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtl.client.site import SIMULATION_ENV
from fedtl.server.app import run_federation
from fedtl.shared.backbones import get_backbone_spec
from fedtl.shared.config import RunConfig
from fedtl.shared.data import check_federation_data
from fedtl.shared.errors import ConfigError
from fedtl.shared.named_data import federation_schema


@dataclass
class FederationApp:
    """A ServerApp whose main runs one federation of `cfg` and keeps its summary.

    Subclasses run other server logic on the same simulated sites (e.g. the backbone ranking) by
    overriding `run`; every executor takes a factory of such apps.
    """

    cfg: RunConfig
    run_dir: Path | None = None
    outcome: dict[str, Any] = field(default_factory=dict)
    what = "federation"

    def run(self, grid: Grid) -> dict[str, Any]:
        """Run the server logic on `grid` and return its summary."""
        return run_federation(grid, self.cfg, run_dir=self.run_dir)

    def server_app(self) -> ServerApp:
        """Return the ServerApp (Flower calls its main with the Grid of whichever executor runs it)."""
        app = ServerApp()

        @app.main()
        def _main(grid: Grid, context: Context) -> None:
            self.outcome["summary"] = self.run(grid)

        return app

    def summary(self) -> dict[str, Any]:
        """Return the run's summary.

        Raises:
            RuntimeError: the ServerApp ended without one (the executor swallowed its error).
        """
        if "summary" not in self.outcome:
            raise RuntimeError(f"the simulated {self.what} ended without a summary; see the log above")
        return self.outcome["summary"]


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
