"""The one place that starts Flower's simulation engine; swap it here when the API changes.

`flwr.simulation.run_simulation` is deprecated (since Flower 1.28) but runs the SAME ServerApp logic
and ClientApp that deployment uses, on Ray, and re-raises ServerApp errors to the caller.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtl.client.client_app import app as client_app
from fedtl.client.site import SIMULATION_ENV
from fedtl.server.server_app import run_federation
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError

log = logging.getLogger(__name__)


def simulate(
    cfg: RunConfig,
    *,
    num_sites: int,
    run_dir: Path | None = None,
    client_cpus: float = 1.0,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run a federation of `num_sites` simulated sites on Flower's simulation engine.

    Args:
        cfg: the run configuration; `min-available-nodes` is raised to `num_sites` so every site joins.
        num_sites: number of simulated SuperNodes (sites).
        run_dir: results folder; a fresh `out/<run-id>/` when None.
        client_cpus: CPUs Ray reserves per ClientApp (sites run in parallel up to cores / client_cpus).
        verbose: forward the sites' (Ray workers') output to this terminal.

    Returns:
        The run summary written to `summary.json`.

    Raises:
        Exception: whatever the ServerApp raised (Flower re-raises it here); Ray is shut down first.
    """
    if num_sites < 1:
        raise ConfigError(f"`sites` must be >= 1, got {num_sites}")
    cfg = cfg.replace(min_available_nodes=num_sites)
    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        outcome["summary"] = run_federation(grid, cfg, run_dir=run_dir)

    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": verbose},
    }
    # Each Ray actor would otherwise start one torch thread per core and oversubscribe the CPU.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(client_cpus))))
    # Keep Ray's current behaviour (no GPUs asked for: leave CUDA_VISIBLE_DEVICES alone) without its warning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    # Opt this machine's sites into simulation (Ray workers inherit the environment at start-up).
    previous = os.environ.get(SIMULATION_ENV)
    os.environ[SIMULATION_ENV] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_sites,
                backend_config=backend_config,
            )
    finally:
        if previous is None:
            os.environ.pop(SIMULATION_ENV, None)
        else:
            os.environ[SIMULATION_ENV] = previous
    if "summary" not in outcome:
        raise RuntimeError("the simulated federation ended without a summary; see the log above")
    return outcome["summary"]
