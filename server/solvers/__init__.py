"""Head solvers: how the federation fits the model above the cut from what the sites release.

A solver gets the set-up federation (`Federation`: the sites that accepted the run, the run's records and
its central evaluation) and returns the final model's tensors. A new solver is a module here with a class
implementing `HeadSolver`, an entry in SOLVERS, its name in shared/config.HEAD_SOLVERS, and the site's
side of its requests (client/solvers/ and client/client_app.QUERY_HANDLERS).
"""

from __future__ import annotations

from fedtl.server.solvers.auto import AutoSolver
from fedtl.server.solvers.base import Federation, HeadSolver, PlanInputs, RunPlan, SolverResult
from fedtl.server.solvers.closed_form import ClosedFormSolver
from fedtl.server.solvers.dp_sgd import DpSgdSolver
from fedtl.server.solvers.secure_dp_sgd import SecureDpSgdSolver

SOLVERS: dict[str, type[HeadSolver]] = {
    "auto": AutoSolver,  # planned from public quantities: DP-GD on a public projection (shared/dp_heads.py)
    "dp-sgd": DpSgdSolver,  # rounds of DP-SGD at every site, aggregated by a Flower strategy
    "closed-form": ClosedFormSolver,  # one noised release of sufficient statistics, solved once
    "secure-dp-sgd": SecureDpSgdSolver,  # distributed DP-FedSGD: every step's head gradient through the secure sum
}

__all__ = ["SOLVERS", "Federation", "HeadSolver", "PlanInputs", "RunPlan", "SolverResult"]
