"""The site's side of the DP-SGD head solver: a training round, evaluation, the finetune phase. No Flower here.

Each round the site builds the model above the cut (a head, or [trainable blocks + head]) with the
server's global tensors, pays for `local-epochs` of DP-SGD through the one release path
(client/release.py), then trains it with the one training loop (client/training.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedtl.client.inputs import SiteInputs, load_site_inputs
from fedtl.client.ledger import PrivacyCharge
from fedtl.client.policy import PolicyRefusal
from fedtl.client.quotas import check_rounds_per_day
from fedtl.client.release import ReleaseRequest, charge_release, site_accountant
from fedtl.client.site import Site
from fedtl.client.training import TrainResult, evaluate_model, steps_per_epoch, train_model
from fedtl.shared import constants as k
from fedtl.shared.backbones import fingerprint_state_dict
from fedtl.shared.cut import Cut, build_model
from fedtl.shared.deep import check_deep_run
from fedtl.shared.files import atomic_write_npz
from fedtl.shared.heads import build_head, head_arrays, personal_array_names
from fedtl.shared.mechanisms import DP_SGD
from fedtl.shared.metrics import majority_rate
from fedtl.shared.protocol import RoundSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReport:
    """A site's training round: the new tensors and its cumulative privacy spend."""

    result: TrainResult
    epsilon: float  # cumulative over every release the site ever made, at `delta`
    delta: float


def planned_steps(settings: RoundSettings, *, steps_per_epoch: int) -> int:
    """Return the DP-SGD steps a run takes at a site: every round, plus the finetune phase when there is one."""
    epochs = settings.local_epochs * settings.num_rounds
    if settings.personalization == k.FINETUNE:
        epochs += settings.finetune_epochs
    return steps_per_epoch * epochs


def round_model(site: Site, settings: RoundSettings, arrays: dict[str, np.ndarray], *, source: str) -> nn.Module:
    """Return the model above the run's cut with `arrays` loaded (checked: names, shapes, finite values).

    Raises:
        ConfigError: the run's adaptation does not fit its backbone or its other settings.
        ReplyError: `arrays` do not fit the model.
    """
    check_deep_run(settings)
    model = build_model(
        Cut.of(settings),
        head=settings.head,
        head_hidden=settings.head_hidden,
        num_classes=settings.num_classes,
        load_backbone=lambda: site.backbones.load(settings.backbone_name, settings.backbone_fingerprint),
        seed=settings.seed,
        projection_dim=settings.projection_dim,
    )
    model.load_arrays(arrays, source=source)
    return model


def train_round(
    site: Site,
    settings: RoundSettings,
    global_arrays: dict[str, np.ndarray],
    *,
    server_round: int,
    proximal_mu: float = 0.0,
) -> TrainReport:
    """Train the model above the cut for one round and return its tensors and the site's cumulative epsilon.

    The round's privacy cost is charged to the site's ledger before training starts.

    Raises:
        PrivacyBudgetError: the round would take the site past target-epsilon.
        PolicyRefusal: the round was not announced, or exceeds the policy's rounds per run or minimum noise.
        ReplyError: the global tensors do not fit the announced model.
    """
    if site.policy is not None and server_round > settings.num_rounds:
        raise PolicyRefusal(
            f"site {site.name} refuses round {server_round}: run {settings.run_id} announced "
            f"{settings.num_rounds} rounds"
        )
    replay = ReplyReplay(site, settings.run_id)
    replayed = replay.load(server_round, global_arrays)
    if replayed is not None:  # the same round of the same global model, already trained and paid for
        log.info(
            "site %s round %d: re-sending the update it already computed (nothing new released)",
            site.name,
            server_round,
        )
        epsilon = site.ledger.epsilon(delta=settings.target_delta, accountant=site_accountant(site, settings))
        return TrainReport(result=replayed, epsilon=epsilon, delta=settings.target_delta)
    inputs = load_site_inputs(site, settings)
    personal = PersonalHead(site, settings)
    start = personal.merge(global_arrays) if settings.personalization == k.FEDPER else global_arrays
    model = round_model(site, settings, start, source="the server's global model")
    noise, epsilon, result = charged_training(
        site,
        settings,
        model,
        inputs,
        server_round=server_round,
        epochs=settings.local_epochs,
        what=f"round {server_round} of run {settings.run_id}",
        global_arrays=start,
        proximal_mu=proximal_mu,
        precondition=_rounds_per_run_check(site, settings, server_round),
        # Nothing of this round was released unless its reply was kept: a charge made before a crash pays.
        unreleased_charge_pays=replay.saved_round() != server_round,
    )
    if settings.personalization == k.FEDPER:  # the personal layer stays here; only the shared ones travel
        result = personal.keep(result)
    replay.save(server_round, global_arrays, result)
    log.info(
        "site %s round %d: loss %.4f, sigma %s, cumulative epsilon %.3f",
        site.name,
        server_round,
        result.train_loss,
        noise,
        epsilon,
    )
    return TrainReport(result=result, epsilon=epsilon, delta=settings.target_delta)


def charged_training(
    site: Site,
    settings: RoundSettings,
    model: nn.Module,
    inputs: SiteInputs,
    *,
    server_round: int,
    epochs: int,
    what: str,
    global_arrays: dict[str, np.ndarray] | None = None,
    proximal_mu: float = 0.0,
    precondition=None,  # type: ignore[no-untyped-def]
    unreleased_charge_pays: bool = False,
) -> tuple[float, float, TrainResult]:
    """Charge `epochs` of DP-SGD through the release path, then train `model`; return (noise, epsilon, result)."""
    sample_rate, per_epoch = steps_per_epoch(len(inputs.train_y), settings.batch_size)
    release = charge_release(
        site,
        settings,
        ReleaseRequest(
            mechanism=DP_SGD,
            server_round=server_round,
            sample_rate=sample_rate,
            steps=per_epoch * epochs,
            what=what,
            noise_multiplier=settings.noise_multiplier,
            num_examples=len(inputs.train_y),
            planned_steps=planned_steps(settings, steps_per_epoch=per_epoch),
            precondition=precondition,
            unreleased_charge_pays=unreleased_charge_pays,
        ),
    )
    result = train_model(
        model,
        inputs.train_x,
        inputs.train_y,
        epochs=epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        max_grad_norm=None if settings.non_private else settings.max_grad_norm,
        noise_multiplier=release.noise_multiplier,
        seed=release.seed,
        global_arrays=global_arrays,
        proximal_mu=proximal_mu,
    )
    return release.noise_multiplier, release.epsilon, result


def _rounds_per_run_check(site: Site, settings: RoundSettings, server_round: int):  # type: ignore[no-untyped-def]
    """Return the check, run on the ledger inside the round's transaction, of the policy's rounds per run and day."""
    policy = site.policy
    if policy is None:
        return None

    def check(charges: list[PrivacyCharge]) -> None:
        done = {c.server_round for c in charges if c.run_id == settings.run_id and c.kind == DP_SGD.kind}
        if server_round not in done and len(done) >= policy.max_rounds_per_run:
            raise PolicyRefusal(
                f"site {site.name} refuses round {server_round}: run {settings.run_id} already trained {len(done)} "
                "rounds here, the policy's max-rounds-per-run"
            )
        # New run ids would bypass the per-run cap: the rolling day counts rounds of every run (client/quotas.py).
        check_rounds_per_day(
            policy, charges, run_id=settings.run_id, server_round=server_round, what=f"round {server_round}"
        )

    return check


def evaluate_round(
    site: Site, settings: RoundSettings, global_arrays: dict[str, np.ndarray]
) -> tuple[dict[str, float], int]:
    """Return the global model's metrics on the site's local test split, and that split's size."""
    inputs = load_site_inputs(site, settings)
    if settings.personalization == k.FEDPER:  # the site's own model: shared layers + its personal last layer
        global_arrays = PersonalHead(site, settings).merge(global_arrays)
    model = round_model(site, settings, global_arrays, source="the server's global model")
    scores = evaluate_model(model, inputs.test_x, inputs.test_y)
    scores[k.MAJORITY_RATE] = majority_rate(inputs.test_y)
    return scores, len(inputs.test_y)


@dataclass(frozen=True)
class FinetuneReport:
    """A site's finetune phase: the shared head's and its finetuned head's scores on its local test split."""

    shared: dict[str, float]
    personalized: dict[str, float]
    num_examples: int  # of the local test split
    epsilon: float  # cumulative, finetune included
    delta: float


def finetune_round(site: Site, settings: RoundSettings, global_arrays: dict[str, np.ndarray]) -> FinetuneReport:
    """Finetune the final shared head on the site's data (DP-SGD, charged) and score both on its test split.

    Fine-tuning a federated model locally is the simplest personalisation baseline (Wang et al. 2019,
    "Federated Evaluation of On-device Personalization"); the finetuned head stays at the site. Its
    steps are part of the run's noise plan (`planned_steps`), so the run still meets target-epsilon.

    Raises:
        PrivacyBudgetError: the finetune steps would take the site past its budget.
    """
    inputs = load_site_inputs(site, settings)
    model = round_model(site, settings, global_arrays, source="the server's final head")
    shared = evaluate_model(model, inputs.test_x, inputs.test_y)
    _, epsilon, result = charged_training(
        site,
        settings,
        model,
        inputs,
        server_round=settings.num_rounds + 1,  # after the run's last round
        epochs=settings.finetune_epochs,
        what=f"the finetune phase of run {settings.run_id}",
    )
    PersonalHead(site, settings).save(dict(result.arrays))
    personalized = evaluate_model(model, inputs.test_x, inputs.test_y)
    log.info(
        "site %s finetune: accuracy %.4f (shared) -> %.4f (finetuned), cumulative epsilon %.3f",
        site.name,
        shared[k.ACCURACY],
        personalized[k.ACCURACY],
        epsilon,
    )
    return FinetuneReport(shared, personalized, len(inputs.test_y), epsilon, settings.target_delta)


class PersonalHead:
    """The head layers a site keeps for itself in a run (FedPer's last layer, or its finetuned head).

    Flower starts a fresh ClientApp process per message, so they live in the site's state folder.
    """

    def __init__(self, site: Site, settings: RoundSettings) -> None:
        name = hashlib.sha256(settings.run_id.encode()).hexdigest()[:32]
        self.path = site.state_dir / "personal" / f"{name}.npz"
        self.settings = settings

    def load(self) -> dict[str, np.ndarray] | None:
        """Return the arrays kept in this run, or None before the site first trained."""
        if not self.path.is_file():
            return None
        with np.load(self.path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        """Keep `arrays` (written atomically, replacing the previous ones)."""
        atomic_write_npz(self.path, **arrays)

    def merge(self, shared: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the whole FedPer head: the server's shared layers plus this site's last layer.

        Before its first round a site starts its last layer from the run's seeded initialisation,
        the same one the server would have sent.
        """
        settings = self.settings
        names = personal_array_names(settings.head)
        kept = self.load()
        if kept is None:
            dim = next(v.shape[-1] for n, v in shared.items() if n == "layers.0.weight")
            initial = head_arrays(
                build_head(settings.head, dim, settings.num_classes, hidden=settings.head_hidden, seed=settings.seed)
            )
            kept = {name: initial[name] for name in names}
        return {**shared, **{name: kept[name] for name in names}}

    def keep(self, result: TrainResult) -> TrainResult:
        """Store the trained personal layer and return `result` with only the shared tensors."""
        names = set(personal_array_names(self.settings.head))
        self.save({name: v for name, v in result.arrays.items() if name in names})
        shared = OrderedDict((name, v) for name, v in result.arrays.items() if name not in names)
        return dataclasses.replace(result, arrays=shared)


class ReplyReplay:
    """The last update a site computed in a run, kept so that a redone round re-sends it instead of retraining.

    When a stopped run resumes, the server repeats its interrupted round with the same global model.
    Sending the update already computed for it releases nothing new, while training again would release
    a second noisy update of the same data and cost budget again. Only an identical request (same run,
    round and global tensors' bytes) is answered from here.
    """

    def __init__(self, site: Site, run_id: str) -> None:
        name = hashlib.sha256(run_id.encode()).hexdigest()[:32]
        self.path = site.state_dir / "replies" / f"{name}.npz"

    @staticmethod
    def _key(server_round: int, global_arrays: dict[str, np.ndarray]) -> str:
        tensors = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in global_arrays.items()}
        return f"round {server_round}/{fingerprint_state_dict(tensors)}"

    def saved_round(self) -> int | None:
        """Return the round whose update was kept (so was released, or was about to be), or None."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                return int(json.loads(str(data["meta"]))["key"].split("/")[0].removeprefix("round "))
        except (OSError, ValueError, KeyError):
            return None

    def load(self, server_round: int, global_arrays: dict[str, np.ndarray]) -> TrainResult | None:
        """Return the update computed for exactly this request, or None."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta["key"] != self._key(server_round, global_arrays):
                    return None
                arrays = OrderedDict((name, data[f"arrays/{name}"]) for name in meta["names"])
        except (OSError, ValueError, KeyError):
            return None
        return TrainResult(
            arrays=arrays,
            num_examples=meta["num_examples"],
            train_loss=meta["train_loss"],
            steps=meta["steps"],
            sample_rate=meta["sample_rate"],
            noise_multiplier=float(meta["noise_multiplier"] or 0.0),
        )

    def save(self, server_round: int, global_arrays: dict[str, np.ndarray], result: TrainResult) -> None:
        """Keep `result` as the answer to this request (replacing the run's previous round)."""
        meta = {
            "key": self._key(server_round, global_arrays),
            "names": list(result.arrays),
            "num_examples": result.num_examples,
            "train_loss": result.train_loss,
            "steps": result.steps,
            "sample_rate": result.sample_rate,
            "noise_multiplier": result.noise_multiplier,
        }
        atomic_write_npz(
            self.path, meta=np.array(json.dumps(meta)), **{f"arrays/{n}": v for n, v in result.arrays.items()}
        )
