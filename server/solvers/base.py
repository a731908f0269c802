"""What every head solver gets and gives: the run config in, a plan after set-up, the final model's tensors out.

A solver is asked three times: `configure` (before any site is asked anything), `plan` (after set-up, before
any release: the auto solver reads the sites' public example counts here and fixes the schedule), `fit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedtl.server.evaluation import CentralEvaluation
from fedtl.server.report import RunRecorder
from fedtl.server.run_folder import RunFolder
from fedtl.server.setup import Backbone, SiteSetup
from fedtl.shared.config import RunConfig


@dataclass
class Federation:
    """A run after set-up: the sites that accepted it, what they receive, its records and its evaluation."""

    grid: Grid
    cfg: RunConfig
    run: RunFolder
    backbone: Backbone
    label_names: tuple[str, ...]
    config: ConfigRecord  # the round settings every site receives (server/setup.round_config)
    setup: SiteSetup
    node_ids: list[int]  # the sites that accepted the run
    recorder: RunRecorder
    central: CentralEvaluation | None  # the server's held-out test set, when it has one
    initial: dict[str, np.ndarray]  # the initial model's tensors (with the feature centre), or the checkpoint's


@dataclass(frozen=True)
class PlanInputs:
    """What a solver may plan from after set-up: public set-up answers, never a release."""

    grid: Grid
    setup: SiteSetup  # the set-up answers
    node_ids: list[int]  # the sites that accepted the run
    config: ConfigRecord  # the round settings every site receives
    backbone: Backbone
    label_names: tuple[str, ...]


@dataclass(frozen=True)
class RunPlan:
    """What a solver fixed after set-up: the run config the sites receive, who takes part, and a record of why."""

    cfg: RunConfig
    setup: SiteSetup  # set-up answers, with any site that refused the solver's own set-up request
    record: dict[str, Any] = field(default_factory=dict)  # written into config.json and summary.json


def plan_as_configured(cfg: RunConfig, inputs: PlanInputs) -> RunPlan:
    """Return the run as configured: a solver whose schedule needs nothing from the sites' answers."""
    return RunPlan(cfg, inputs.setup)


@dataclass(frozen=True)
class SolverResult:
    """The final model, and each site's personalised scores where the solver has them."""

    arrays: ArrayRecord
    personalization: dict[str, dict[str, float]] = field(default_factory=dict)


class HeadSolver(Protocol):
    """Fits the model above the cut from the sites' releases."""

    @staticmethod
    def configure(cfg: RunConfig) -> RunConfig:
        """Return the run config the solver runs with (checked before any site is asked anything)."""
        ...

    def plan(self, cfg: RunConfig, inputs: PlanInputs) -> RunPlan:
        """Return the run's final config after set-up, before any release (public set-up answers only)."""
        ...

    def fit(self, fed: Federation) -> SolverResult:
        """Run the solver's rounds or releases over `fed` and return the final model."""
        ...
