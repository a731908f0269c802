"""`fedtl rank-backbones` in the lab: a ServerApp around `rank_backbones`, run on simulated sites.

The same ClientApp and the same site code as a federation; the ServerApp's main calls `rank_backbones`
instead of `run_federation`, executed in this process (`inprocess`, no Ray) or on Flower's simulation engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from fedtl.server.ranking import rank_backbones
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError
from fedtl.simulations.engine import simulate
from fedtl.simulations.federation import FederationApp
from fedtl.simulations.inprocess import run_inprocess

EXECUTORS = ("inprocess", "flower")


@dataclass
class RankingApp(FederationApp):
    """A ServerApp whose main ranks `candidates` on the connected sites and keeps the summary."""

    candidates: list[str] = field(default_factory=list)
    what = "ranking"

    def prepare(self, num_sites: int) -> None:
        """Prepare nothing: the sites score each candidate's features in the run (never `cfg.backbone`'s)."""

    def run(self, grid: Grid) -> dict[str, Any]:
        """Rank the candidates on `grid`'s sites and return the summary."""
        return rank_backbones(grid, self.cfg, self.candidates, run_dir=self.run_dir)


def rank_simulated(
    cfg: RunConfig,
    candidates: list[str],
    *,
    num_sites: int,
    executor: str = "inprocess",
    run_dir: Path | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Rank `candidates` on `num_sites` simulated sites of `cfg.data` and return the summary (ranking.json).

    Args:
        cfg: the run configuration the candidates would be trained with (data, partition, seed, image-size).
        candidates: registered backbone names, at least 2.
        num_sites: number of simulated sites; every one must join.
        executor: "inprocess" (this process, no Ray) or "flower" (Flower's simulation engine).
        run_dir: where ranking.json/ranking.md go; a fresh `out/<id>/` when None.
        verbose: show the sites' logs.

    Raises:
        ConfigError: an unknown executor, `sites` < 1, or bad candidates.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"`executor` must be one of {', '.join(EXECUTORS)}, got {executor!r}")

    def make(run_cfg: RunConfig, folder: Path | None) -> RankingApp:
        return RankingApp(run_cfg, folder, candidates=list(candidates))

    if executor == "inprocess":
        return run_inprocess(cfg, num_sites=num_sites, run_dir=run_dir, verbose=verbose, app=make)
    return simulate(cfg, num_sites=num_sites, run_dir=run_dir, verbose=verbose, app=make)


def format_ranking(summary: dict[str, Any]) -> str:
    """Return the terminal table: each estimator's weighted mean ± SE per candidate, the pick, the warning count."""
    estimators = summary["estimators"]
    header = f"{'rank':>4}  {'backbone':<20}" + "".join(f"{e + ' ± SE':>22}" for e in estimators)
    header += f"{'sites':>6}{'examples':>9}{'px':>5}"
    lines = [header]
    for i, name in enumerate(summary["ranking"], start=1):
        b = summary["backbones"][name]
        cells = "".join(f"{_pm(b[e], b[f'{e}-standard-error']):>22}" for e in estimators)
        lines.append(f"{i:>4}  {name:<20}{cells}{b['num-sites']:>6}{b[k.NUM_EXAMPLES]:>9}{b['image-size']:>5}")
    m = summary["margin"]
    lines.append(
        f"recommended: {summary['recommended']} ({m['estimator']} lead {m['value']:.4g} ± "
        f"{_num(m['standard-error'])} over {m['runner-up']}, {m['num-sites']} sites"
        f"{': WITHIN NOISE' if m['within-noise'] else ''})"
    )
    if summary["warnings"]:  # the server logged each one as it ranked (above this table): not again here
        lines.append(f"{len(summary['warnings'])} warning(s), logged above and kept in ranking.md")
    lines.append(f"report: {Path(summary['run-dir']) / 'ranking.md'}")
    return "\n".join(lines)


def _num(value: float) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.3g}"


def _pm(mean: float, se: float) -> str:
    return f"{mean:.4f} ± {_num(se)}"
