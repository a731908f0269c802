"""Privacy auditing maths: membership-inference scores, ROC metrics and empirical epsilon lower bounds.

Pure numpy/scipy, no Flower and no torch: the attacks score examples from a model's logits, and the bounds
turn how well an attack separates members from non-members into an epsilon that a correct (epsilon, delta)-DP
implementation cannot fall below (with the stated confidence). A lower bound far below the accounted epsilon
is the expected outcome of a sound DP run; one above it means a bug in the training or the accounting.

Scores follow one convention everywhere: higher = "more likely a member".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from fedtl.shared.errors import ConfigError

SPLIT = "split"  # choose the threshold on one random half, bound on the other
BONFERRONI = "bonferroni"  # bound every threshold on all data at confidence corrected for their number
THRESHOLD_METHODS = (SPLIT, BONFERRONI)
LOW_FPRS = (0.01, 0.001)  # the operating points reported beside AUC (Carlini et al. 2022, Sec. III)
ONE_RUN_GUESS_FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # guesses r / canaries m tried, Bonferroni-corrected
MIN_SIGMA = 1e-6  # floor of the LiRA Gaussians' std (logit units): identical shadows must not divide by zero


# --- scores ---------------------------------------------------------------------------------------------


def loss_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return the loss-threshold attack's scores: minus the cross-entropy loss of each example (N,).

    Yeom et al. 2018, "Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting": a
    model's loss is lower on its training examples, so thresholding the loss guesses membership.
    """
    logits, labels = _check_logits(logits, labels)
    return special.log_softmax(logits, axis=1)[np.arange(len(labels)), labels]


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return phi = log(p / (1 - p)) of each example's true-class probability p, computed stably (N,).

    Carlini et al. 2022, "Membership Inference Attacks From First Principles", Sec. IV-B: the logit of the
    confidence is close to Gaussian across retrainings, which LiRA's parametric fit needs. Written as
    z_y - logsumexp_{j != y} z_j so that p near 1 keeps its resolution in float64.
    """
    logits, labels = _check_logits(logits, labels)
    rows = np.arange(len(labels))
    own = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return own - special.logsumexp(others, axis=1)


def shadow_assignments(num_shadows: int, num_examples: int, *, seed: int) -> np.ndarray:
    """Return which examples each shadow model trains on: (num_shadows, num_examples) bool.

    Every example is IN exactly num_shadows // 2 shadows (as in Carlini et al.'s reference code), so each
    shadow trains on about half the pool and every example has IN and OUT models to fit.

    Raises:
        ConfigError: fewer than 2 shadows.
    """
    if num_shadows < 2:
        raise ConfigError(f"`shadows` must be >= 2 (each example needs IN and OUT models), got {num_shadows}")
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((num_shadows, num_examples)), axis=0)  # a random rank per example and shadow
    return order < num_shadows // 2


def lira_scores(
    target: np.ndarray,
    shadow: np.ndarray,
    keep: np.ndarray,
    *,
    online: bool = True,
    global_variance: bool = True,
) -> np.ndarray:
    """Return LiRA's membership scores of the target model's confidences (N,).

    Carlini et al. 2022, "Membership Inference Attacks From First Principles", Algorithm 1: per example,
    fit Gaussians to the logit-scaled confidences (`logit_confidence`) of shadow models trained with it
    (IN) and without it (OUT), and score the target's confidence by the likelihood ratio (online,
    log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)) or, offline, by how far it lies above the OUT
    fit ((phi - mu_out) / s_out, a monotone transform of their one-sided test). With few shadows the
    paper fits one variance shared by all examples (Sec. VI-A); here it is the pooled within-example
    variance (the mean of the per-example variances), not the variance across examples.

    Args:
        target: (N,) the audited model's `logit_confidence` on each example.
        shadow: (S, N) each shadow model's `logit_confidence` on each example.
        keep: (S, N) bool, True where the shadow trained on the example (`shadow_assignments`).
        online: use IN and OUT shadows; False: OUT shadows only (offline LiRA).
        global_variance: one pooled std for IN and one for OUT instead of per-example stds.

    Raises:
        ConfigError: the shapes disagree, or an example lacks the IN/OUT shadows its fit needs.
    """
    target = np.asarray(target, dtype=np.float64)
    shadow = np.asarray(shadow, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    if shadow.ndim != 2 or shadow.shape != keep.shape or shadow.shape[1] != target.shape[0]:
        raise ConfigError(
            f"LiRA needs target (N,), shadow (S, N) and keep (S, N) alike; got {target.shape}, {shadow.shape}, "
            f"{keep.shape}"
        )
    need = 1 if global_variance else 2
    n_in, n_out = keep.sum(axis=0), (~keep).sum(axis=0)
    if n_out.min() < need or (online and n_in.min() < need):
        raise ConfigError(
            f"LiRA needs >= {need} OUT{' and IN' if online else ''} shadow(s) per example, got min {n_out.min()} OUT "
            f"and {n_in.min()} IN; train more shadows (an even number >= {2 * need})"
        )
    mu_out, sd_out = _gaussian_fit(shadow, ~keep, global_variance)
    if not online:
        return (target - mu_out) / sd_out
    mu_in, sd_in = _gaussian_fit(shadow, keep, global_variance)
    return stats.norm.logpdf(target, mu_in, sd_in) - stats.norm.logpdf(target, mu_out, sd_out)


def _gaussian_fit(values: np.ndarray, mask: np.ndarray, pooled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and std of `values` (S, N) where `mask` (S, N); the std pooled over examples if asked."""
    count = mask.sum(axis=0)
    mean = np.where(mask, values, 0.0).sum(axis=0) / count
    squares = np.where(mask, (values - mean) ** 2, 0.0).sum(axis=0)
    if pooled:
        # Pooled within-example variance: the squared deviations of all examples over their total dof.
        dof = max(int(count.sum() - count.size), 1)
        std = np.full_like(mean, math.sqrt(squares.sum() / dof))
    else:
        std = np.sqrt(squares / np.maximum(count - 1, 1))
    return mean, np.maximum(std, MIN_SIGMA)


def _check_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ConfigError(f"scores need logits (N, C) and labels (N,), got {logits.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ConfigError(f"labels must be in [0, {logits.shape[1]}), got [{labels.min()}, {labels.max()}]")
    return logits, labels


# --- ROC metrics ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RocCurve:
    """Every operating point of "member if score >= threshold", thresholds descending (first: +inf)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_curve(member_scores: np.ndarray, non_member_scores: np.ndarray) -> RocCurve:
    """Return the ROC curve at every distinct score (sklearn's roc_curve with drop_intermediate=False)."""
    members, non_members = _check_scores(member_scores, non_member_scores)
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([members, non_members]))[::-1]])
    tp = len(members) - np.searchsorted(np.sort(members), thresholds, side="left")
    fp = len(non_members) - np.searchsorted(np.sort(non_members), thresholds, side="left")
    return RocCurve(fp / len(non_members), tp / len(members), thresholds)


def roc_auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """Return the ROC AUC: P(member score > non-member score) + P(tie) / 2 (Mann-Whitney U with mid-ranks)."""
    members, non_members = _check_scores(member_scores, non_member_scores)
    ranks = stats.rankdata(np.concatenate([members, non_members]))  # average ranks for ties
    n1, n0 = len(members), len(non_members)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(member_scores: np.ndarray, non_member_scores: np.ndarray, fpr: float) -> float:
    """Return the highest TPR among operating points with FPR <= `fpr`, exactly (no interpolation).

    With n non-members the achievable FPRs are multiples of 1/n, so below 1/n this is the TPR at zero
    false positives: a TPR at 0.1% FPR means something only with >= 1000 non-members.
    """
    if not 0 <= fpr <= 1:
        raise ConfigError(f"`fpr` must be in [0, 1], got {fpr}")
    curve = roc_curve(member_scores, non_member_scores)
    return float(curve.tpr[curve.fpr <= fpr + 1e-12].max())


def _check_scores(member_scores: np.ndarray, non_member_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    non_members = np.asarray(non_member_scores, dtype=np.float64).ravel()
    if len(members) == 0 or len(non_members) == 0:
        raise ConfigError(
            f"an attack needs members and non-members, got {len(members)} and {len(non_members)}; "
            "give both sets at least one example"
        )
    if not (np.all(np.isfinite(members)) and np.all(np.isfinite(non_members))):
        raise ConfigError("attack scores must be finite; a NaN or inf score means the model's logits are broken")
    return members, non_members


# --- epsilon lower bound from one attack's TPR/FPR ------------------------------------------------------


def clopper_pearson(successes: np.ndarray | int, trials: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Return one-sided Clopper-Pearson bounds (lower, upper) of a binomial rate, each failing w.p. <= alpha."""
    k = np.asarray(successes, dtype=np.float64)
    lower = np.where(k > 0, stats.beta.ppf(alpha, k, trials - k + 1), 0.0)
    upper = np.where(k < trials, stats.beta.ppf(1 - alpha, k + 1, trials - k), 1.0)
    return lower, upper


@dataclass(frozen=True)
class EpsilonBound:
    """An empirical epsilon lower bound and the test that gave it."""

    epsilon: float  # >= 0; 0 when the attack refutes no epsilon > 0
    confidence: float
    delta: float
    method: str  # SPLIT or BONFERRONI
    threshold: float  # the chosen score threshold ("member if score >= threshold")
    direction: str  # "tpr/fpr" or "tnr/fnr": which side of the threshold gave the bound
    tests: int  # hypotheses tested on the data the bound was computed from (1 for SPLIT)


def threshold_epsilons(
    member_scores: np.ndarray,
    non_member_scores: np.ndarray,
    thresholds: np.ndarray,
    *,
    delta: float,
    alpha: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the epsilon lower bound of each threshold's test (T,) in both directions (tpr/fpr, tnr/fnr).

    (epsilon, delta)-DP bounds every test of membership: TPR <= e^eps FPR + delta, and by symmetry
    TNR <= e^eps FNR + delta (Kairouz et al. 2015; used for auditing by Jagielski et al. 2020, "Auditing
    Differentially Private Machine Learning: How Private is Private SGD?", and Nasr et al. 2021,
    "Adversary Instantiation"). So eps >= log((TPR_lo - delta) / FPR_hi), with Clopper-Pearson bounds
    TPR_lo, FPR_hi each failing w.p. <= alpha / 2 (the pair holds w.p. >= 1 - alpha).
    """
    members, non_members = _check_scores(member_scores, non_member_scores)
    n1, n0 = len(members), len(non_members)
    tp = n1 - np.searchsorted(np.sort(members), thresholds, side="left")
    fp = n0 - np.searchsorted(np.sort(non_members), thresholds, side="left")
    tpr_lo, fnr_hi = clopper_pearson(tp, n1, alpha / 2)[0], clopper_pearson(n1 - tp, n1, alpha / 2)[1]
    fpr_hi, tnr_lo = clopper_pearson(fp, n0, alpha / 2)[1], clopper_pearson(n0 - fp, n0, alpha / 2)[0]
    return _log_ratio(tpr_lo - delta, fpr_hi), _log_ratio(tnr_lo - delta, fnr_hi)


def _log_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(np.maximum(numerator, 0.0)) - np.log(denominator)
    return np.maximum(np.nan_to_num(out, nan=0.0, neginf=0.0), 0.0)


def epsilon_lower_bound(
    member_scores: np.ndarray,
    non_member_scores: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    method: str = SPLIT,
    seed: int = 0,
) -> EpsilonBound:
    """Return an empirical epsilon lower bound from one attack's scores, honest about choosing the threshold.

    Picking the best of many thresholds on the same data would overstate the bound, so either
    SPLIT: members and non-members are halved at random (seeded); the threshold and direction are chosen
    on one half and the bound is computed once on the other (one test, full confidence); or
    BONFERRONI: every distinct threshold in both directions is tested on all the data, each at
    (1 - confidence) / tests, and the largest bound is kept.

    The Clopper-Pearson intervals treat every example's guess as an independent trial, the usual reading
    of membership inference when members and non-members were assigned at random (as the run's seeded
    splits were); it is not a single-run guarantee in the sense of `one_run_audit`, whose canaries are
    independent by construction.

    Raises:
        ConfigError: bad confidence, delta or method, or a set too small to halve.
    """
    _check_confidence(confidence, delta)
    members, non_members = _check_scores(member_scores, non_member_scores)
    alpha = 1 - confidence
    if method == BONFERRONI:
        thresholds = np.unique(np.concatenate([members, non_members]))
        tests = 2 * len(thresholds)
        forward, backward = threshold_epsilons(members, non_members, thresholds, delta=delta, alpha=alpha / tests)
        return _best(forward, backward, thresholds, confidence, delta, method, tests)
    if method != SPLIT:
        raise ConfigError(f"`method` must be one of {', '.join(THRESHOLD_METHODS)}, got {method!r}")
    if len(members) < 2 or len(non_members) < 2:
        raise ConfigError(
            f"the split method halves members and non-members, so each needs >= 2 examples; got {len(members)} and "
            f"{len(non_members)}; use method={BONFERRONI!r} or more examples"
        )
    rng = np.random.default_rng(seed)
    pick_m, eval_m = _halves(members, rng)
    pick_n, eval_n = _halves(non_members, rng)
    thresholds = np.unique(np.concatenate([pick_m, pick_n]))
    forward, backward = threshold_epsilons(pick_m, pick_n, thresholds, delta=delta, alpha=alpha)
    chosen = _best(forward, backward, thresholds, confidence, delta, method, 1)
    f_eval, b_eval = threshold_epsilons(eval_m, eval_n, np.array([chosen.threshold]), delta=delta, alpha=alpha)
    epsilon = float((f_eval if chosen.direction == "tpr/fpr" else b_eval)[0])
    return EpsilonBound(epsilon, confidence, delta, method, chosen.threshold, chosen.direction, 1)


def _halves(scores: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(len(scores))
    half = len(scores) // 2
    return scores[order[:half]], scores[order[half:]]


def _best(
    forward: np.ndarray,
    backward: np.ndarray,
    thresholds: np.ndarray,
    confidence: float,
    delta: float,
    method: str,
    tests: int,
) -> EpsilonBound:
    i, j = int(np.argmax(forward)), int(np.argmax(backward))
    if forward[i] >= backward[j]:
        return EpsilonBound(float(forward[i]), confidence, delta, method, float(thresholds[i]), "tpr/fpr", tests)
    return EpsilonBound(float(backward[j]), confidence, delta, method, float(thresholds[j]), "tnr/fnr", tests)


def _check_confidence(confidence: float, delta: float) -> None:
    if not 0 < confidence < 1:
        raise ConfigError(f"`confidence` must be in (0, 1), e.g. 0.95; got {confidence}")
    if not 0 <= delta < 1:
        raise ConfigError(f"`delta` must be in [0, 1), got {delta}")


# --- one attack, summarised -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackResult:
    """How well one membership-inference attack separates members from non-members."""

    attack: str
    num_members: int
    num_non_members: int
    auc: float
    tpr_at_low_fpr: dict[float, float]  # FPR -> exact TPR at FPR <= it (`tpr_at_fpr`)
    fpr_resolution: float  # 1 / non-members: the smallest FPR above zero the data can show
    bound: EpsilonBound  # SPLIT: threshold chosen on one half, bound on the other
    bound_bonferroni: EpsilonBound  # every threshold on all data, Bonferroni-corrected

    @property
    def low_fpr_resolved(self) -> dict[float, bool]:
        """Whether each reported FPR is above the data's resolution (>= 1 / non-members)."""
        return {fpr: fpr >= self.fpr_resolution for fpr in self.tpr_at_low_fpr}


def summarize_attack(
    attack: str,
    member_scores: np.ndarray,
    non_member_scores: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    seed: int = 0,
) -> AttackResult:
    """Return AUC, TPR at 1% and 0.1% FPR, and both epsilon lower bounds of one attack's scores."""
    members, non_members = _check_scores(member_scores, non_member_scores)
    settings = {"delta": delta, "confidence": confidence}
    return AttackResult(
        attack=attack,
        num_members=len(members),
        num_non_members=len(non_members),
        auc=roc_auc(members, non_members),
        tpr_at_low_fpr={fpr: tpr_at_fpr(members, non_members, fpr) for fpr in LOW_FPRS},
        fpr_resolution=1.0 / len(non_members),
        bound=epsilon_lower_bound(members, non_members, method=SPLIT, seed=seed, **settings),
        bound_bonferroni=epsilon_lower_bound(members, non_members, method=BONFERRONI, **settings),
    )


# --- one-run audit with canaries ------------------------------------------------------------------------


def one_run_p_value(canaries: int, guesses: int, correct: int, *, epsilon: float, delta: float) -> float:
    """Return the probability of >= `correct` right guesses out of `guesses` if the algorithm were (eps, delta)-DP.

    Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run" (NeurIPS), Theorem 3 (the
    main result, (eps, delta)-DP case): with m canaries each included independently w.p. 1/2 and r guesses,
    P[W >= v] <= f(v) + 2 m delta max_{i=1..v} (f(v - i) - f(v)) / i, where
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]. Computed as their Appendix D code does (capped at 1).
    """
    _check_counts(canaries, guesses, correct)
    q = special.expit(epsilon)  # e^eps / (1 + e^eps): the accuracy of eps-DP randomized response
    tail = stats.binom.sf(correct - 1, guesses, q)  # f(v)
    if delta == 0 or correct == 0:
        return float(min(tail, 1.0))
    below = np.cumsum(stats.binom.pmf(correct - 1 - np.arange(correct), guesses, q))  # f(v - i) - f(v), i = 1..v
    worst = float(np.max(below / np.arange(1, correct + 1)))
    return float(min(tail + 2 * canaries * delta * worst, 1.0))


def one_run_epsilon(canaries: int, guesses: int, correct: int, *, delta: float, confidence: float = 0.95) -> float:
    """Return the largest epsilon that `correct` of `guesses` right guesses refute at `confidence` (0: none).

    The p-value of `one_run_p_value` grows with epsilon, so the bound is where it crosses 1 - confidence.
    """
    _check_confidence(confidence, delta)
    _check_counts(canaries, guesses, correct)
    beta = 1 - confidence

    def gap(eps: float) -> float:
        return one_run_p_value(canaries, guesses, correct, epsilon=eps, delta=delta) - beta

    if gap(0.0) >= 0:
        return 0.0
    high = 1.0
    while gap(high) < 0:
        high *= 2
        if high > 1e4:  # only reachable with delta = 0 and every guess right: no finite epsilon explains it
            return math.inf
    return float(optimize.brentq(gap, 0.0, high, xtol=1e-9))


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise ConfigError(
            f"need 0 <= correct <= guesses <= canaries, got correct={correct}, guesses={guesses}, canaries={canaries}"
        )


@dataclass(frozen=True)
class OneRunAudit:
    """The one-run canary audit: the guesses that gave the best bound and the bound itself."""

    canaries: int  # m
    included: int  # canaries actually inserted (about m / 2)
    guesses_in: int  # k+: top-scored canaries guessed "in"
    guesses_out: int  # k-: bottom-scored canaries guessed "out"
    correct: int  # v, out of guesses_in + guesses_out
    auc: float  # ROC AUC of included vs excluded canaries' scores (a diagnostic; nan when all coins agree)
    epsilon: float  # lower bound at `confidence`, corrected for the `tests` guess counts tried
    confidence: float
    delta: float
    tests: int


def one_run_audit(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    guesses: tuple[int, int] | None = None,
) -> OneRunAudit:
    """Return the one-run epsilon lower bound from the canaries' scores and their inclusion bits.

    Steinke, Nasr & Jagielski 2023 (Algorithm 1 with the bound of `one_run_p_value`): guess "in" for the
    k+ highest and "out" for the k- lowest scores, abstain on the rest, count the right guesses. With
    `guesses` = (k+, k-) given in advance, that one test is made. Otherwise k+ = k- = r / 2 for r in
    ONE_RUN_GUESS_FRACTIONS of m, each tested at (1 - confidence) / tries (Bonferroni), and the largest
    bound is kept, so trying several guess counts does not inflate it.

    Raises:
        ConfigError: scores and bits differ in length, or the guesses exceed the canaries.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or len(scores) == 0:
        raise ConfigError(f"need one score per canary, got scores {scores.shape} and inclusion bits {included.shape}")
    m = len(scores)
    order = np.argsort(-scores, kind="stable")  # highest score first
    if guesses is not None:
        options = [guesses]
    else:
        options = sorted({(max(1, round(f * m / 2)), max(1, round(f * m / 2))) for f in ONE_RUN_GUESS_FRACTIONS})
        options = [(k_in, k_out) for k_in, k_out in options if k_in + k_out <= m]
    if any(k_in < 0 or k_out < 0 or k_in + k_out > m for k_in, k_out in options):
        raise ConfigError(f"guesses (k+, k-) must be >= 0 with k+ + k- <= {m} canaries, got {guesses}")
    tests = len(options)
    corrected = 1 - (1 - confidence) / tests
    auc = roc_auc(scores[included], scores[~included]) if 0 < included.sum() < m else math.nan
    best: OneRunAudit | None = None
    for k_in, k_out in options:
        right = int(included[order[:k_in]].sum()) + int((~included[order[m - k_out :]]).sum())
        eps = one_run_epsilon(m, k_in + k_out, right, delta=delta, confidence=corrected)
        if best is None or eps > best.epsilon:
            best = OneRunAudit(m, int(included.sum()), k_in, k_out, right, auc, eps, confidence, delta, tests)
    assert best is not None
    return best
