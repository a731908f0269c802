"""Head solvers: how the federation fits the model above the cut from what the sites release.

A solver gets the set-up federation (`Federation`: the sites that accepted the run, the run's records and
its central evaluation) and returns the final model's tensors. A new solver is a module here with a class
implementing `HeadSolver`, an entry in SOLVERS, its name in shared/config.HEAD_SOLVERS, and the site's
side of its requests (client/solvers/ and client/client_app.QUERY_HANDLERS).
"""

from __future__ import annotations

import logging

from fedtl.server.setup import Backbone
from fedtl.server.solvers.auto import AutoSolver, basis_names, fallback_reason, public_features
from fedtl.server.solvers.base import Federation, HeadSolver, PlanInputs, RunPlan, SolverResult
from fedtl.server.solvers.closed_form import ClosedFormSolver
from fedtl.server.solvers.dp_sgd import DpSgdSolver
from fedtl.server.solvers.secure_dp_sgd import SecureDpSgdSolver, projection_applies
from fedtl.shared.config import RunConfig

progress = logging.getLogger("fedtl.progress")  # the user's terminal (cli/main.show_progress)

SOLVERS: dict[str, type[HeadSolver]] = {
    "auto": AutoSolver,  # planned from public quantities: DP-GD on a public projection (shared/dp_heads.py)
    "dp-sgd": DpSgdSolver,  # rounds of DP-SGD at every site, aggregated by a Flower strategy
    "closed-form": ClosedFormSolver,  # one noised release of sufficient statistics, solved once
    "secure-dp-sgd": SecureDpSgdSolver,  # distributed DP-FedSGD: every step's head gradient through the secure sum
}


def solver_for(cfg: RunConfig) -> HeadSolver:
    """Return the solver of `cfg.head_solver`; "auto" under `secure-aggregation = true` is secure DP-FedSGD.

    The run's trust assumption (at least secagg-honest-sites honest sites in every secure sum) is public and the
    sites' own policies check it, so auto plans under it: every step's gradient through the secure sum, carrying
    one curator's noise, instead of each site noising its own updates (shared/dp_heads.py says what that gains).
    """
    solver = _solver_class(cfg)
    if solver is not SOLVERS[cfg.head_solver]:
        progress.info(
            "head-solver auto: secure-aggregation = true, so the head trains by secure DP-FedSGD (as head-solver "
            "\"secure-dp-sgd\"): every step's gradient goes through the secure sum and carries one curator's noise "
            "while at least secagg-honest-sites of the sites in it are honest"
        )
    return solver()


def _solver_class(cfg: RunConfig) -> type[HeadSolver]:
    """Return the class of the solver `cfg` runs (`solver_for` says why when it is not head-solver's own)."""
    if cfg.head_solver == "auto" and cfg.secure_aggregation:
        return SecureDpSgdSolver
    return SOLVERS[cfg.head_solver]


def extract_public_inputs(
    backbone: Backbone, cfg: RunConfig, label_names: tuple[str, ...], *, progress: bool = True
) -> None:
    """Extract the features of the public inputs the run's solver will read, if any, into the server's cache.

    The auto plan's public basis (and secure DP-FedSGD's) is computed from the backbone's features of seeded
    synthetic inputs. The lab calls this before its engine starts, where a bar can show and the main thread runs
    the pass (Flower's engine runs the ServerApp in a thread, whose heap arena maps and unmaps a 224 px pass's
    largest activations at every batch: 3x slower there, shared/heap.py); the ServerApp then reads them cached.
    """
    solver = _solver_class(cfg)
    if solver is SecureDpSgdSolver and projection_applies(cfg):
        public_features(backbone, cfg, progress=progress)
    elif solver is AutoSolver and fallback_reason(cfg) is None:
        public_features(backbone, cfg, basis_names(backbone, label_names), progress=progress)


__all__ = [
    "SOLVERS",
    "Federation",
    "HeadSolver",
    "PlanInputs",
    "RunPlan",
    "SolverResult",
    "extract_public_inputs",
    "solver_for",
]
