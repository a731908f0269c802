"""One round at a site, as plain functions: features -> DP head training -> privacy charge."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedtl.client.deep_training import evaluate_deep_round, load_deep_round, train_deep
from fedtl.client.ledger import DP_SGD, FEATURE_SUM, PrivacyCharge, new_charge
from fedtl.client.policy import PolicyRefusal
from fedtl.client.site import Site, SiteFeatures, load_site_features
from fedtl.client.training import TrainResult, evaluate_head, steps_per_epoch, train_head
from fedtl.shared import constants as k
from fedtl.shared.backbones import fingerprint_state_dict
from fedtl.shared.deep import Adaptation
from fedtl.shared.files import atomic_write_bytes
from fedtl.shared.heads import build_head, head_arrays, load_head_arrays, normalize_features, personal_array_names
from fedtl.shared.metrics import majority_rate
from fedtl.shared.privacy import find_noise_multiplier
from fedtl.shared.protocol import RoundSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReport:
    """A site's training round: the new head tensors and its cumulative privacy spend."""

    result: TrainResult
    epsilon: float  # cumulative over every round the site ever ran, at `delta`
    delta: float


def site_accountant(site: Site, settings: RoundSettings) -> str:
    """Return the accountant the site counts with: its policy's, or the run's for a simulated site."""
    return site.policy.accountant if site.policy is not None else settings.accountant


def planned_steps(settings: RoundSettings, *, steps_per_epoch: int) -> int:
    """Return the DP-SGD steps a run takes at a site: every round, plus the finetune phase when there is one."""
    epochs = settings.local_epochs * settings.num_rounds
    if settings.personalization == k.FINETUNE:
        epochs += settings.finetune_epochs
    return steps_per_epoch * epochs


def plan_noise_multiplier(site: Site, settings: RoundSettings, *, sample_rate: float, steps_per_epoch: int) -> float:
    """Return this run's noise multiplier: the one given, or the one meeting target-epsilon over the run.

    The derived noise leaves room for every earlier run in the site's ledger and for every step the
    run plans (`planned_steps`, the finetune phase included), is never below the policy's
    `min-noise-multiplier`, and is fixed at the first round of a run (later rounds and the finetune
    phase read it back from the ledger), so all releases of a run agree.

    Raises:
        PrivacyBudgetError: earlier runs already spent the target epsilon.
    """
    if settings.noise_multiplier >= 0:
        if settings.noise_multiplier == 0:
            warnings.warn("noise-multiplier is 0: this round releases non-private updates (epsilon = inf)")
        return settings.noise_multiplier
    ledger = site.ledger
    fixed = ledger.run_noise_multiplier(settings.run_id)
    if fixed is not None:
        return fixed
    noise = find_noise_multiplier(
        target_epsilon=settings.target_epsilon,
        target_delta=settings.target_delta,
        sample_rate=sample_rate,
        steps=planned_steps(settings, steps_per_epoch=steps_per_epoch),
        history=ledger.history_outside_training(settings.run_id),
        accountant=site_accountant(site, settings),
    )
    if site.policy is not None and noise < site.policy.min_noise_multiplier:
        log.info(
            "site %s: the run's budget allows noise %.3f; the policy's minimum %.3f is used (spends less)",
            site.name,
            noise,
            site.policy.min_noise_multiplier,
        )
        noise = site.policy.min_noise_multiplier
    return noise


def round_seed(site: Site, settings: RoundSettings, server_round: int) -> int | None:
    """Return the seed of a round's sampling and noise: reproducible in simulation, None (OS entropy) at real sites."""
    if site.simulation is None:
        return None
    # Simulation only: the noise is reproducible from the run seed, which a real server would know.
    return zlib.crc32(f"{settings.seed}/{site.name}/{server_round}".encode())


def train_round(
    site: Site,
    settings: RoundSettings,
    global_arrays: dict[str, np.ndarray],
    *,
    server_round: int,
    proximal_mu: float = 0.0,
) -> TrainReport:
    """Train the site's head for one round and return its tensors and cumulative epsilon.

    The round's privacy cost is charged to the site's history before training starts.

    Raises:
        PrivacyBudgetError: the round would take the site past target-epsilon.
        ReplyError: the global head tensors do not fit the announced head.
    """
    policy = site.policy
    if policy is not None:
        check_round(site, settings, server_round)
    replay = ReplyReplay(site, settings.run_id)
    replayed = replay.load(server_round, global_arrays)
    if replayed is not None:  # the same round of the same global head, already trained and paid for
        log.info(
            "site %s round %d: re-sending the update it already computed (nothing new released)",
            site.name,
            server_round,
        )
        epsilon = site.ledger.epsilon(delta=settings.target_delta, accountant=site_accountant(site, settings))
        return TrainReport(result=replayed, epsilon=epsilon, delta=settings.target_delta)
    deep = Adaptation.of(settings).enabled
    if deep:  # the last blocks (or their LoRA adapters) train with the head, on activations cached at the cut
        head, feats = load_deep_round(site, settings, global_arrays)
        start = global_arrays
    else:
        feats = load_site_features(site, settings)
        personal = PersonalHead(site, settings)
        start = personal.merge(global_arrays) if settings.personalization == k.FEDPER else global_arrays
        head = build_head(
            settings.head, feats.train_features.shape[1], settings.num_classes, hidden=settings.head_hidden
        )
        load_head_arrays(head, start, source="the server's global head")
    noise, epsilon, result = charged_training(
        site,
        settings,
        head,
        feats,
        server_round=server_round,
        epochs=settings.local_epochs,
        what=f"round {server_round} of run {settings.run_id}",
        global_arrays=start,
        proximal_mu=proximal_mu,
        train=train_deep if deep else train_head,
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
    head: torch.nn.Module,
    feats: SiteFeatures,
    *,
    server_round: int,
    epochs: int,
    what: str,
    global_arrays: dict[str, np.ndarray] | None = None,
    proximal_mu: float = 0.0,
    train: Callable[..., TrainResult] = train_head,  # or train_deep: same signature, same accounting
) -> tuple[float | None, float, TrainResult]:
    """Plan the noise, charge `epochs` of DP-SGD to the ledger, then train `head`; return (noise, epsilon, result).

    Write-ahead: the release is paid for before it runs. Non-private training is recorded with noise 0,
    so the site's epsilon honestly becomes infinite.
    """
    sample_rate, per_epoch = steps_per_epoch(len(feats.train_labels), settings.batch_size)
    noise = _round_noise(site, settings, sample_rate=sample_rate, per_epoch=per_epoch, what=what)
    epsilon = charge(
        site,
        settings,
        new_charge(
            run_id=settings.run_id,
            server_round=server_round,
            noise_multiplier=noise or 0.0,
            sample_rate=sample_rate,
            steps=per_epoch * epochs,
            delta=settings.target_delta,
        ),
        what=what,
    )
    result = train(
        head,
        feats.train_features,
        feats.train_labels,
        epochs=epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        max_grad_norm=settings.max_grad_norm,
        noise_multiplier=noise,
        seed=round_seed(site, settings, server_round),
        global_arrays=global_arrays,
        proximal_mu=proximal_mu,
    )
    return noise, epsilon, result


def _round_noise(site: Site, settings: RoundSettings, *, sample_rate: float, per_epoch: int, what: str) -> float | None:
    """Return the noise of a DP-SGD release of this run (None in the non-private baseline), checked by the policy."""
    if settings.non_private:
        log.warning("site %s: NON-PRIVATE %s (baseline mode): no clipping, no noise", site.name, what)
        return None
    noise = plan_noise_multiplier(site, settings, sample_rate=sample_rate, steps_per_epoch=per_epoch)
    if site.policy is not None:  # also a noise fixed by an earlier round, before the policy was tightened
        site.policy.check_noise(noise, what=what)
    return noise


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
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(self.path, buffer.getvalue())

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
    feats = load_site_features(site, settings)
    head = build_head(settings.head, feats.train_features.shape[1], settings.num_classes, hidden=settings.head_hidden)
    load_head_arrays(head, global_arrays, source="the server's final head")
    shared = evaluate_head(head, feats.test_features, feats.test_labels)
    _, epsilon, result = charged_training(
        site,
        settings,
        head,
        feats,
        server_round=settings.num_rounds + 1,  # after the run's last round
        epochs=settings.finetune_epochs,
        what=f"the finetune phase of run {settings.run_id}",
    )
    PersonalHead(site, settings).save(dict(result.arrays))
    personalized = evaluate_head(head, feats.test_features, feats.test_labels)
    log.info(
        "site %s finetune: accuracy %.4f (shared) -> %.4f (finetuned), cumulative epsilon %.3f",
        site.name,
        shared[k.ACCURACY],
        personalized[k.ACCURACY],
        epsilon,
    )
    return FinetuneReport(shared, personalized, len(feats.test_labels), epsilon, settings.target_delta)


def check_round(site: Site, settings: RoundSettings, server_round: int) -> None:
    """Refuse a round the run did not announce, or one past the policy's rounds per run.

    Raises:
        PolicyRefusal: `server_round` exceeds the run's `num-rounds`, or the run already trained the policy's
            `max-rounds-per-run` rounds at this site.
    """
    assert site.policy is not None
    if server_round > settings.num_rounds:
        raise PolicyRefusal(
            f"site {site.name} refuses round {server_round}: run {settings.run_id} announced "
            f"{settings.num_rounds} rounds"
        )
    done = {c.server_round for c in site.ledger.charges() if c.run_id == settings.run_id and c.kind == DP_SGD}
    if server_round not in done and len(done) >= site.policy.max_rounds_per_run:
        raise PolicyRefusal(
            f"site {site.name} refuses round {server_round}: run {settings.run_id} already trained {len(done)} rounds "
            f"here, the policy's max-rounds-per-run"
        )


class ReplyReplay:
    """The last update a site computed in a run, kept so that a redone round re-sends it instead of retraining.

    When a stopped run resumes, the server repeats its interrupted round with the same global head.
    Sending the update already computed for it releases nothing new, while training again would release
    a second noisy update of the same data and cost budget again. Only an identical request (same run,
    round and global head bytes) is answered from here.
    """

    def __init__(self, site: Site, run_id: str) -> None:
        name = hashlib.sha256(run_id.encode()).hexdigest()[:32]
        self.path = site.state_dir / "replies" / f"{name}.npz"

    @staticmethod
    def _key(server_round: int, global_arrays: dict[str, np.ndarray]) -> str:
        tensors = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in global_arrays.items()}
        return f"round {server_round}/{fingerprint_state_dict(tensors)}"

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
            noise_multiplier=meta["noise_multiplier"],
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
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **{f"arrays/{n}": v for n, v in result.arrays.items()})
        atomic_write_bytes(self.path, buffer.getvalue())


def feature_sum_round(site: Site, settings: RoundSettings, *, noise_multiplier: float) -> tuple[np.ndarray, int]:
    """Return the Gaussian-noised sum of the site's L2-normalised training features, and their count.

    Each normalised feature has norm 1, so adding or removing one example moves the sum by at most 1
    (L2 sensitivity 1); noise N(0, sigma^2 I) makes the release one Gaussian mechanism, which the
    accountant composes as one DP-SGD step at sample rate 1. It is charged before it is computed.
    With `non-private` the exact sum is released (labelled like every non-private result).

    Raises:
        PrivacyBudgetError: the release would take the site past target-epsilon.
    """
    feats = load_site_features(site, settings)
    noise = 0.0 if settings.non_private else noise_multiplier
    if site.policy is not None and not settings.non_private:
        site.policy.check_noise(noise, what="the feature-mean release")
    charge(
        site,
        settings,
        new_charge(
            run_id=settings.run_id,
            server_round=0,
            noise_multiplier=noise,
            sample_rate=1.0,
            steps=1,
            delta=settings.target_delta,
            kind=FEATURE_SUM,
        ),
        what=f"the feature-mean release of run {settings.run_id}",
    )
    z = normalize_features(feats.train_features)  # (N, D), every row norm 1
    seed = round_seed(site, settings, 0)
    rng = np.random.default_rng(seed)  # seed None: OS entropy
    total = z.astype(np.float64).sum(axis=0) + rng.normal(0.0, noise, size=z.shape[1])
    return total.astype(np.float32), len(z)


def evaluate_round(
    site: Site, settings: RoundSettings, global_arrays: dict[str, np.ndarray]
) -> tuple[dict[str, float], int]:
    """Return the global head's metrics on the site's local test split, and that split's size."""
    if Adaptation.of(settings).enabled:  # deeper fine-tuning: the global model runs from the cached activations
        return evaluate_deep_round(site, settings, global_arrays)
    feats = load_site_features(site, settings)
    if settings.personalization == k.FEDPER:  # the site's own model: shared layers + its personal last layer
        global_arrays = PersonalHead(site, settings).merge(global_arrays)
    head = build_head(settings.head, feats.test_features.shape[1], settings.num_classes, hidden=settings.head_hidden)
    load_head_arrays(head, global_arrays, source="the server's global head")
    scores = evaluate_head(head, feats.test_features, feats.test_labels)
    scores[k.MAJORITY_RATE] = majority_rate(feats.test_labels)
    return scores, len(feats.test_labels)


def charge(site: Site, settings: RoundSettings, release: PrivacyCharge, *, what: str) -> float:
    """Charge `release` to the site's ledger before it happens, within the run's and the policy's budget.

    The run's target-epsilon is at most the policy's max-epsilon (larger requests are refused by
    `SitePolicy.check_settings`) and its delta at most the policy's, so staying within the run's
    target at its delta keeps the site within its lifetime budget too (epsilon only falls as delta
    grows). A release without noise is charged only where the policy allows non-private work.

    Returns:
        The site's cumulative epsilon including `release`, as computed for the budget check.

    Raises:
        PrivacyBudgetError: the release would take the site past its budget (the message has the numbers).
        PolicyRefusal: a release without noise at a site whose policy forbids it.
    """
    policy = site.policy
    if release.noise_multiplier == 0:
        if policy is not None and not policy.allow_non_private:  # a last guard; check_settings refuses first
            raise PolicyRefusal(f"site {site.name} refuses {what}: no noise, and allow-non-private = false")
        budget, budget_name = math.inf, ""
    elif policy is not None and policy.max_epsilon < settings.target_epsilon:  # refused earlier; belt and braces
        budget, budget_name = policy.max_epsilon, "the policy's max-epsilon"
    else:
        budget, budget_name = settings.target_epsilon, "the run's target-epsilon"
    projected = site.ledger.charge(
        release,
        max_epsilon=budget,
        delta=settings.target_delta,
        accountant=site_accountant(site, settings),
        what=f"{what} at site {site.name}",
        budget_name=budget_name,
    )
    if math.isfinite(budget) and projected >= 0.9 * budget:
        log.warning(
            "site %s: %s brings epsilon to %.3f of %.3g (budget nearly spent)", site.name, what, projected, budget
        )
    # With no budget to check the ledger computes nothing; a release without noise makes epsilon infinite.
    return projected if math.isfinite(budget) else math.inf
