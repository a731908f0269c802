"""The site's side of secure aggregation (SecAgg+): four stages, state on the site's disk. No Flower messages here.

The server drives one secure sum as four query actions (server/secagg.py); each stage here is a plain function
of the site and what the server sent, following Flower's `secaggplus_mod` (Bell et al. 2020, SecAgg+; Bonawitz
et al. 2017) over Flower's Message API, with every primitive from a maintained library:

1. `setup_session`: two fresh key pairs (Flower's EC P-384 helpers over `cryptography`): one agrees the pairwise
   mask secrets, one the keys that encrypt secret shares.
2. `share_keys`: a fresh self-mask seed; Shamir shares (Flower's `create_shares`, pycryptodome) of the seed and
   of the mask key's private scalar, one per site, each encrypted (Fernet, keys from ECDH + HKDF: Flower's
   helpers) to its site.
3. `mask_input`: after the checks, the release is paid for and computed (its Skellam noise share included),
   then masked in Z_(2^64) (shared/secure_sum.py): + self-mask, +/- one pairwise mask per site that shared keys.
4. `unmask`: once, for each site the server names, a share of its self-mask seed (it is in the sum) or of its
   mask key (it dropped): never both kinds for one site, and only when at least max(k, t) sites are in the sum.
   Then the session's secrets are deleted.

Flower starts a fresh ClientApp process per message in deployment, so a session's state lives in one 0600 JSON
file under the site's state folder (`secagg/<session>.json`) between stages; it holds private keys and seeds,
is replaced atomically at each stage, and is reduced to a tombstone (no secrets) when the site has answered the
unmask request. Sessions abandoned by the server are wiped by the next setup after STALE_SECONDS. Deleting a
file does not scrub the disk blocks (journaling, SSD wear levelling): the secrets are fresh per secure sum, and
a disk image taken during a session could help unmask only that sum.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedtl.client.site import Site
from fedtl.shared.errors import ReplyError
from fedtl.shared.secure_sum import mask_vector, pairwise_sign, private_scalar, shamir_threshold

log = logging.getLogger(__name__)

STALE_SECONDS = 24 * 3600  # a session unfinished for this long is abandoned: its secrets are wiped
SETUP, SHARED, MASKED, DONE = "setup", "shared", "masked", "done"
SESSION_CHARS = set("0123456789abcdef")


@dataclass(frozen=True)
class SessionPlan:
    """What the server announced at set-up: this site's place in the sum and the sum's trust assumption."""

    session: str
    run_id: str
    index: int  # 1-based; the Shamir x-coordinate of the shares this site holds
    num_sites: int  # n
    threshold: int  # k
    honest_sites: int  # t
    release: str  # what is summed


def session_dir(site: Site) -> Path:
    """Return the folder of the site's secure-aggregation sessions (0700)."""
    return site.state_dir / "secagg"


def setup_session(site: Site, plan: SessionPlan) -> tuple[bytes, bytes]:
    """Stage 1: check the plan, make two key pairs, store them; return the public keys (masks, encryption).

    Raises:
        PolicyRefusal: the plan counts on more honest sites than the site's policy (`min-honest-sites`).
        ReplyError: the plan is inconsistent (threshold, index, session id) or the session exists already.
    """
    _check_plan(plan)
    if site.policy is not None:
        site.policy.check_honest_sites(plan.honest_sites, what=f"secure aggregation session {plan.session}")
    _wipe_stale(site)
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state = {
        "session": plan.session,
        "run_id": plan.run_id,
        "stage": SETUP,
        "index": plan.index,
        "num_sites": plan.num_sites,
        "threshold": plan.threshold,
        "honest_sites": plan.honest_sites,
        "release": plan.release,
        "sk1": _b64(private_key_to_bytes(sk1)),
        "pk1": _b64(public_key_to_bytes(pk1)),
        "sk2": _b64(private_key_to_bytes(sk2)),
        "pk2": _b64(public_key_to_bytes(pk2)),
        "created": time.time(),
    }
    path = _path(site, plan.session)
    if path.exists():
        raise ReplyError(f"secure aggregation session {plan.session} was already set up at site {site.name}")
    _write(path, state)
    return public_key_to_bytes(pk1), public_key_to_bytes(pk2)


def share_keys(site: Site, session: str, public_keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
    """Stage 2: secret-share a fresh self-mask seed and the mask key; return each other site's encrypted shares.

    `public_keys` maps every site index that finished set-up (this one included) to its two public keys.

    Raises:
        ReplyError: the stage is out of order, this site's keys are missing or altered, keys repeat, or fewer
            sites than the threshold are left.
    """
    state = _load(site, session, expected=SETUP)
    me, threshold = state["index"], state["threshold"]
    own = (_unb64(state["pk1"]), _unb64(state["pk2"]))
    if public_keys.get(me) != own:
        raise ReplyError(f"session {session}: the server's key list misses or alters this site's own public keys")
    flat = [key for pair in public_keys.values() for key in pair]
    if len(set(flat)) != len(flat):
        raise ReplyError(f"session {session}: some public keys repeat; refusing to share secrets")
    if len(public_keys) < threshold or not all(1 <= i <= state["num_sites"] for i in public_keys):
        raise ReplyError(
            f"session {session}: {len(public_keys)} sites with indices {sorted(public_keys)} left after set-up; "
            f"the sum needs {threshold} of 1..{state['num_sites']}"
        )
    seed = os.urandom(32)
    # One share per index 1..n, so share i is the Shamir point x = i (Flower's shares carry their index).
    seed_shares = create_shares(seed, threshold, state["num_sites"])
    key_shares = create_shares(private_scalar(_unb64(state["sk1"])), threshold, state["num_sites"])
    sk2 = bytes_to_private_key(_unb64(state["sk2"]))
    out: dict[int, bytes] = {}
    channels: dict[str, str] = {}  # the same ECDH key decrypts the shares coming back in stage 3
    for index, (_, pk2) in sorted(public_keys.items()):
        if index == me:
            continue
        secret = generate_shared_key(sk2, bytes_to_public_key(pk2))
        channels[str(index)] = _b64(secret)
        plaintext = share_keys_plaintext_concat(me, index, seed_shares[index - 1], key_shares[index - 1])
        out[index] = encrypt(secret, plaintext)
    state.update(
        stage=SHARED,
        seed=_b64(seed),
        channels=channels,
        peers={str(i): [_b64(a), _b64(b)] for i, (a, b) in public_keys.items()},
        seed_shares={str(me): _b64(seed_shares[me - 1])},
        key_shares={str(me): _b64(key_shares[me - 1])},
    )
    _write(_path(site, session), state)
    return out


def mask_input(
    site: Site, session: str, ciphertexts: dict[int, bytes], release: Callable[[SessionPlan], np.ndarray]
) -> np.ndarray:
    """Stage 3: store the shares other sites sent, pay for and compute the release, return it masked (uint64).

    `release(plan)` is called only once the shares check out; it charges the site's ledger and returns the
    integer vector with this site's noise share in it. Pairwise masks go with exactly the sites whose shares
    arrived (they finished stage 2): for any other, the server could not remove them.

    Raises:
        ReplyError: the stage is out of order, a share does not decrypt or is not meant for this site, or fewer
            sites than max(threshold, honest sites) are left.
        PolicyRefusal, PrivacyBudgetError: from `release`, which refuses before anything is computed.
    """
    state = _load(site, session, expected=SHARED)
    me, peers = state["index"], {int(i): v for i, v in state["peers"].items()}
    seed_shares, key_shares = dict(state["seed_shares"]), dict(state["key_shares"])
    for source, ciphertext in sorted(ciphertexts.items()):
        if source not in peers or source == me:
            raise ReplyError(f"session {session}: a share from site index {source}, which did not share keys")
        secret = _unb64(state["channels"][str(source)])
        try:
            src, dst, seed_share, key_share = share_keys_plaintext_separate(decrypt(secret, ciphertext))
        except Exception as exc:  # cryptography's InvalidToken: altered or misrouted
            raise ReplyError(f"session {session}: the share from site index {source} does not decrypt") from exc
        if (src, dst) != (source, me):
            raise ReplyError(f"session {session}: a share sent as {source} -> {me} says {src} -> {dst}")
        seed_shares[str(source)] = _b64(seed_share)
        key_shares[str(source)] = _b64(key_share)
    survivors = sorted({me, *ciphertexts})
    needed = max(state["threshold"], state["honest_sites"])
    if len(survivors) < needed:
        raise ReplyError(
            f"session {session}: only {len(survivors)} sites shared keys with this one; the sum needs {needed} "
            f"(threshold {state['threshold']}, honest sites assumed {state['honest_sites']})"
        )
    try:
        values = np.asarray(release(_plan(state)), dtype=np.int64)
    except BaseException:
        _write(_path(site, session), _tombstone(state))  # the site drops out: its secrets are no longer needed
        raise
    sk1 = bytes_to_private_key(_unb64(state["sk1"]))
    pairwise = [
        (generate_shared_key(sk1, bytes_to_public_key(_unb64(peers[other][0]))), pairwise_sign(me, other))
        for other in survivors
        if other != me
    ]
    masked = mask_vector(values, self_secret=_unb64(state["seed"]), pairwise=pairwise)
    state.update(stage=MASKED, seed_shares=seed_shares, key_shares=key_shares, masked_with=survivors)
    _write(_path(site, session), state)
    return masked


def unmask(site: Site, session: str, *, active: list[int], dropped: list[int]) -> dict[int, bytes]:
    """Stage 4, answered once: the seed shares of the `active` sites and the key shares of the `dropped` ones.

    Then the session's secrets are deleted (a tombstone stays, so a second request is refused, not answered).

    Raises:
        ReplyError: the stage is out of order or already answered, the lists overlap or name sites this one did
            not mask with, this site is not in `active`, or fewer than max(threshold, honest sites) are active
            (the sum would carry less noise than the run's epsilon assumes).
    """
    state = _load(site, session, expected=MASKED)
    me, masked_with = state["index"], set(state["masked_with"])
    active_set, dropped_set = set(active), set(dropped)
    problems = []
    if len(active_set) != len(active) or len(dropped_set) != len(dropped):
        problems.append("an index repeats")
    if active_set & dropped_set:
        problems.append(f"sites {sorted(active_set & dropped_set)} are named both active and dropped")
    if me not in active_set:
        problems.append("this site is not named active")
    if not (active_set | dropped_set) <= masked_with:
        problems.append(f"sites {sorted((active_set | dropped_set) - masked_with)} never shared keys with this site")
    needed = max(state["threshold"], state["honest_sites"])
    if len(active_set) < needed:
        problems.append(
            f"only {len(active_set)} sites are in the sum; it needs {needed} (threshold {state['threshold']}, "
            f"honest sites assumed {state['honest_sites']}): fewer would carry less noise than epsilon assumes"
        )
    if problems:
        raise ReplyError(f"session {session}: refusing to unmask: " + "; ".join(problems))
    shares = {i: _unb64(state["seed_shares"][str(i)]) for i in sorted(active_set)}
    shares.update({i: _unb64(state["key_shares"][str(i)]) for i in sorted(dropped_set)})
    # Durable before the shares leave: even a power loss cannot make the site answer twice.
    _write(_path(site, session), _tombstone(state), durable=True)
    return shares


def wipe_sessions(site: Site, *, run_id: str | None = None) -> int:
    """Delete the site's unfinished sessions (of `run_id`, or all); return how many held secrets."""
    wiped = 0
    for path in sorted(session_dir(site).glob("*.json")):
        state = json.loads(path.read_text())
        if state.get("stage") != DONE and (run_id is None or state.get("run_id") == run_id):
            _write(path, _tombstone(state))
            wiped += 1
    return wiped


def _check_plan(plan: SessionPlan) -> None:
    if not plan.session or not set(plan.session) <= SESSION_CHARS or len(plan.session) > 64:
        raise ReplyError(f"secure aggregation session id must be up to 64 hex digits, got {plan.session!r}")
    expected = shamir_threshold(plan.num_sites, plan.honest_sites)  # raises on bad n or t
    if plan.threshold != expected:
        raise ReplyError(
            f"session {plan.session}: threshold {plan.threshold} for {plan.num_sites} sites assuming "
            f"{plan.honest_sites} honest; it must be {expected} (shared/secure_sum.shamir_threshold)"
        )
    if not 1 <= plan.index <= plan.num_sites:
        raise ReplyError(f"session {plan.session}: index {plan.index} outside 1..{plan.num_sites}")


def _plan(state: dict[str, Any]) -> SessionPlan:
    return SessionPlan(
        state["session"],
        state["run_id"],
        state["index"],
        state["num_sites"],
        state["threshold"],
        state["honest_sites"],
        state["release"],
    )


def _tombstone(state: dict[str, Any]) -> dict[str, Any]:
    keep = ("session", "run_id", "index", "num_sites", "threshold", "honest_sites", "release", "created")
    return {**{key: state[key] for key in keep if key in state}, "stage": DONE, "finished": time.time()}


def _wipe_stale(site: Site) -> None:
    now = time.time()
    for path in session_dir(site).glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if state.get("stage") != DONE and now - float(state.get("created", now)) > STALE_SECONDS:
            log.warning(
                "site %s: secure aggregation session %s was abandoned; its secrets are wiped", site.name, path.stem
            )
            _write(path, _tombstone(state))


def _path(site: Site, session: str) -> Path:
    if not session or not set(session) <= SESSION_CHARS or len(session) > 64:
        raise ReplyError(f"secure aggregation session id must be up to 64 hex digits, got {session!r}")
    return session_dir(site) / f"{session}.json"


def _load(site: Site, session: str, *, expected: str) -> dict[str, Any]:
    path = _path(site, session)
    if not path.is_file():
        raise ReplyError(f"site {site.name} has no secure aggregation session {session} (it was never set up here)")
    state = json.loads(path.read_text())
    if state.get("stage") != expected:
        raise ReplyError(
            f"session {session}: the site is at stage {state.get('stage')!r}, the request needs {expected!r}; each "
            "stage is answered once and in order"
        )
    return state


def _write(path: Path, state: dict[str, Any], *, durable: bool = False) -> None:
    """Replace `path` with `state` atomically, readable by the site's user only (0600, folder 0700).

    Only the tombstone must survive a power loss (`durable`): losing an earlier stage's state makes the site
    drop out of the sum, which is safe (its release, if any, is already in its fsynced ledger).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:  # the rename itself
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))
