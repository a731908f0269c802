"""The server's side of secure aggregation (SecAgg+): "securely sum these sites' vectors", for any solver.

`secure_sum` drives the four stages of one secure sum over Flower query messages, each answered by
client/client_app.QUERY_HANDLERS -> client/secagg.py, and returns only the sum of the vectors of the sites
that finished (as int64, modulo 2^64 centred), never one site's vector. `SecureSum` is the server's state
between stages, with no Flower in it, so the protocol runs in process in tests:

1. set-up: every site gets its 1-based index, n, the threshold k (shared/secure_sum.shamir_threshold) and the
   honest sites t the distributed noise assumes; it answers with two public keys (or refuses: its policy).
2. share keys: every site that answered gets the list of public keys and returns its Shamir shares of its
   self-mask seed and mask key, each encrypted to its destination; the server only routes ciphertexts.
3. masked input: every site gets the ciphertexts addressed to it and returns its release, noised and masked.
4. unmask: the sites in the sum hand shares of the self-mask seeds of the sites in the sum and of the mask
   keys of the sites that dropped after sharing keys; with k of each, the server removes those masks.

Dropouts: a site lost before stage 2 is simply not in the sum; one lost in stage 3 is removed from it with
its mask key's shares; one lost in stage 4 is still in the sum as long as k sites answer. The sum goes ahead
only with at least max(k, t) sites in it. Mirrors Flower's `SecAggPlusWorkflow` on the Message API, with every
site its own neighbour (the complete graph: at consortium sizes, 3-30 sites, SecAgg+'s sparse graph saves
nothing), masks from ChaCha20 instead of Flower's 32-bit-seeded `pseudo_rand_gen`, and integer releases
carrying their own noise instead of Flower's float quantisation.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from fedtl.server.report import failure_reason, reply_site_name
from fedtl.server.setup import ask
from fedtl.shared import constants as k
from fedtl.shared.errors import FederationError
from fedtl.shared.secure_sum import (
    expand_mask,
    from_ring,
    pairwise_sign,
    private_key_from_scalar,
    shamir_threshold,
    sum_ring,
)

log = logging.getLogger(__name__)


@dataclass
class SecureSum:
    """The server's state of one secure sum over `num_sites` sites (indices 1..n), stage by stage."""

    num_sites: int
    honest_sites: int
    release: str
    length: int  # entries of every site's vector
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # after set-up
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)  # destination -> source -> ciphertext
    shared: set[int] = field(default_factory=set)  # sites that finished stage 2
    masked: np.ndarray | None = None  # the sum of the masked vectors received (uint64)
    active: set[int] = field(default_factory=set)  # sites whose masked vectors are in `masked`

    def __post_init__(self) -> None:
        self.threshold = shamir_threshold(self.num_sites, self.honest_sites)  # raises on bad n or t

    @property
    def needed(self) -> int:
        """Return the fewest sites the sum may have: k (to rebuild secrets) and t (the noise's assumption)."""
        return max(self.threshold, self.honest_sites)

    def setup_request(self, index: int) -> dict[str, object]:
        """Return the set-up values for site `index`."""
        return {
            k.SECAGG_SESSION: self.session,
            k.SECAGG_INDEX: index,
            k.SECAGG_SITES: self.num_sites,
            k.SECAGG_THRESHOLD: self.threshold,
            k.SECAGG_HONEST: self.honest_sites,
            k.SECAGG_RELEASE: self.release,
        }

    def receive_public_keys(self, keys: dict[int, tuple[bytes, bytes]]) -> None:
        """Keep the public keys of the sites that answered set-up."""
        self.public_keys = dict(sorted(keys.items()))
        self._check_enough(set(keys), "set-up")

    def share_keys_request(self) -> dict[str, object]:
        """Return the stage-2 values every site gets: all public keys by index."""
        indices = list(self.public_keys)
        return {
            k.SECAGG_SESSION: self.session,
            k.SECAGG_INDICES: indices,
            k.SECAGG_PUBLIC_KEYS_1: [self.public_keys[i][0] for i in indices],
            k.SECAGG_PUBLIC_KEYS_2: [self.public_keys[i][1] for i in indices],
        }

    def receive_shares_to_route(self, sent: dict[int, dict[int, bytes]]) -> None:
        """Keep each site's encrypted shares by destination; the senders are the sites that shared keys."""
        self.shared = {source for source in sent if source in self.public_keys}
        self.ciphertexts = {}
        for source in sorted(self.shared):
            for destination, ciphertext in sent[source].items():
                self.ciphertexts.setdefault(destination, {})[source] = ciphertext
        self._check_enough(self.shared, "key sharing")

    def masked_input_request(self, index: int) -> dict[str, object]:
        """Return the stage-3 values of site `index`: the shares sent to it by sites that shared keys."""
        incoming = {s: c for s, c in self.ciphertexts.get(index, {}).items() if s in self.shared and s != index}
        return {
            k.SECAGG_SESSION: self.session,
            k.SECAGG_SOURCES: list(incoming),
            k.SECAGG_CIPHERTEXTS: list(incoming.values()),
        }

    def receive_masked(self, vectors: dict[int, np.ndarray]) -> None:
        """Add up the masked vectors of the sites that shared keys (uint64, `length` entries each)."""
        usable = {i: v for i, v in vectors.items() if i in self.shared}
        self.active = set(usable)
        self._check_enough(self.active, "masked input")
        self.masked = sum_ring([usable[i] for i in sorted(usable)])
        self.ciphertexts = {}  # routed: nothing more to forward

    def unmask_request(self) -> dict[str, object]:
        """Return the stage-4 values: who is in the sum, and who shared keys but sent no masked vector."""
        return {
            k.SECAGG_SESSION: self.session,
            k.SECAGG_ACTIVE: sorted(self.active),
            k.SECAGG_DROPPED: sorted(self.shared - self.active),
        }

    def finish(self, shares: dict[int, dict[int, bytes]]) -> np.ndarray:
        """Return the sum of the active sites' vectors (int64) from the unmask answers (site -> owner -> share).

        Raises:
            FederationError: fewer than k sites answered, or a secret has fewer than k shares.
        """
        if self.masked is None:
            raise FederationError(f"secure sum {self.session}: no masked vectors to unmask")
        answered = {i for i in shares if i in self.active}
        if len(answered) < self.threshold:
            raise FederationError(
                f"secure sum {self.session}: {len(answered)} sites answered the unmask request; k = {self.threshold} "
                "are needed to remove the masks, so the sum is lost (nothing about a site can be recovered either)"
            )
        by_owner: dict[int, list[bytes]] = {}
        for index in sorted(answered):
            for owner, share in shares[index].items():
                by_owner.setdefault(owner, []).append(share)
        total = self.masked.copy()
        for owner in sorted(self.active):  # their self-masks
            total -= expand_mask(self._rebuild(owner, by_owner, "self-mask seed"), self.length)
        for owner in sorted(self.shared - self.active):  # the pairwise masks the active sites share with them
            key = private_key_from_scalar(self._rebuild(owner, by_owner, "mask key"))
            for other in sorted(self.active):
                secret = generate_shared_key(key, bytes_to_public_key(self.public_keys[other][0]))
                # `other` added sign(other, owner) x the mask: take it away.
                if pairwise_sign(other, owner) > 0:
                    total -= expand_mask(secret, self.length)
                else:
                    total += expand_mask(secret, self.length)
        return from_ring(total)

    def _rebuild(self, owner: int, by_owner: dict[int, list[bytes]], what: str) -> bytes:
        found = by_owner.get(owner, [])
        if len(found) < self.threshold:
            raise FederationError(
                f"secure sum {self.session}: {len(found)} shares of site {owner}'s {what}, k = {self.threshold} needed"
            )
        return combine_shares(found[: self.threshold])

    def _check_enough(self, sites: set[int], stage: str) -> None:
        if len(sites) < self.needed:
            raise FederationError(
                f"secure sum {self.session}: {len(sites)} of {self.num_sites} sites are left after {stage}; it needs "
                f"{self.needed} (threshold {self.threshold}, honest sites assumed {self.honest_sites}); see the "
                "warnings above for each site's reason"
            )


@dataclass(frozen=True)
class SecureSumResult:
    """The sum of the vectors of the sites in it, and who they were; never one site's vector."""

    total: np.ndarray  # (length,) int64
    replies: dict[int, Message]  # node id -> its stage-3 reply (release metrics; its `secagg` vector is cleared)
    num_sites: int  # n: sites the sum was set up with
    honest_sites: int  # t
    threshold: int  # k
    dropped: dict[str, str]  # site -> the stage it was lost in, and why


def secure_sum(
    grid: Grid,
    node_ids: list[int],
    config: ConfigRecord,
    *,
    release: str,
    length: int,
    honest_sites: int,
    noise_multiplier: float,
    arrays: ArrayRecord | None = None,
    values: dict[str, int | float] | None = None,
    timeout: float,
) -> SecureSumResult:
    """Securely sum the integer release `release` (`length` entries) of the sites `node_ids`.

    Args:
        grid: Flower's Grid.
        node_ids: the sites asked (indices 1..n in this order).
        config: the run's round config every site receives.
        release: what each site puts in (client/secure_releases.RELEASES).
        length: the entries of every site's vector.
        honest_sites: t, the honest sites the distributed noise assumes (0: all n).
        noise_multiplier: the central noise multiplier of the release (the sum's noise; each site adds 1 / t).
        arrays: tensors every site needs for its release (e.g. the feature centre), sent with stage 3.
        values: scalars every site needs for its release (e.g. a DP-SGD step's number), sent with stage 3.
        timeout: seconds to wait for each stage's replies.

    Returns:
        The sum over the sites that finished, their stage-3 replies and the sum's n, t, k.

    Raises:
        FederationError: fewer than max(k, t) sites are left at some stage, or too few answered the unmask.
    """
    num_sites = len(node_ids)
    if num_sites < 2:
        raise FederationError(f"secure aggregation needs at least 2 sites; {num_sites} accepted the run")
    honest = honest_sites or num_sites
    if honest > num_sites:
        raise FederationError(
            f"secagg-honest-sites = {honest_sites} but only {num_sites} sites accepted the run; the distributed noise "
            "would never reach its level. Lower secagg-honest-sites (0: all sites)"
        )
    state = SecureSum(num_sites, honest, release, length)
    index = {node: i for i, node in enumerate(node_ids, start=1)}
    names: dict[int, str] = {}
    dropped: dict[str, str] = {}
    log.info(
        "secure sum %s of %s over %d sites: threshold %d, honest sites assumed %d",
        state.session,
        release,
        num_sites,
        state.threshold,
        honest,
    )

    def ask_each(action: str, targets: list[int], values, extra: ArrayRecord | None = None) -> dict[int, Message]:
        """Send each target its stage values; return the usable replies by index (the others are logged)."""
        messages = []
        for node in targets:
            content = RecordDict({k.CONFIG: ask(config, action, **values(index[node]))})
            if extra is not None:
                content[k.ARRAYS] = extra
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.QUERY))
        replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=timeout)}
        usable = {}
        for node in targets:
            reply = replies.get(node)
            reason = "no reply in time" if reply is None else failure_reason(reply) or _reply_problem(reply, action)
            name = names.get(node) or (reply_site_name(reply) if reply is not None else f"node-{node}")
            if reason:
                log.warning("secure sum %s: site %s left at %s: %s", state.session, name, action, reason)
                dropped[name] = f"{action}: {reason}"
            else:
                names[node] = name
                usable[index[node]] = reply
        return usable

    nodes = {i: node for node, i in index.items()}
    replies = ask_each(k.ACTION_SECAGG_SETUP, node_ids, state.setup_request)
    state.receive_public_keys(
        {i: (_record(r)[k.PUBLIC_KEY_1], _record(r)[k.PUBLIC_KEY_2]) for i, r in replies.items()}  # type: ignore[misc]
    )
    request = state.share_keys_request()
    replies = ask_each(k.ACTION_SECAGG_SHARE_KEYS, [nodes[i] for i in state.public_keys], lambda _: request)
    state.receive_shares_to_route(
        {
            i: dict(zip(_record(r)[k.SECAGG_DESTINATIONS], _record(r)[k.SECAGG_CIPHERTEXTS], strict=True))
            for i, r in replies.items()
        }
    )
    extra = ConfigRecord({**(values or {}), k.SECAGG_NOISE_MULTIPLIER: float(noise_multiplier)})
    masked_replies = ask_each(
        k.ACTION_SECAGG_MASKED_INPUT,
        [nodes[i] for i in sorted(state.shared)],
        lambda i: {**state.masked_input_request(i), **dict(extra)},
        arrays,
    )
    vectors = {}
    for i, r in list(masked_replies.items()):
        vector = r.content.array_records[k.SECAGG][k.MASKED].numpy()
        if vector.dtype != np.uint64 or vector.shape != (length,):
            log.warning(
                "secure sum %s: site %s sent a masked vector %s %s, expected (%d,) uint64; left out",
                state.session,
                names[nodes[i]],
                vector.dtype,
                vector.shape,
                length,
            )
            dropped[names[nodes[i]]] = "masked input: wrong shape or type"
            del masked_replies[i]
            continue
        vectors[i] = vector
        r.content.array_records[k.SECAGG].clear()  # only the sum is kept
    state.receive_masked(vectors)
    request = state.unmask_request()
    replies = ask_each(k.ACTION_SECAGG_UNMASK, [nodes[i] for i in sorted(state.active)], lambda _: request)
    shares = {
        i: dict(zip(_record(r)[k.SECAGG_OWNERS], _record(r)[k.SECAGG_SHARES], strict=True)) for i, r in replies.items()
    }
    total = state.finish(shares)
    log.info(
        "secure sum %s: %d of %d sites in the sum (%d dropped after sharing keys)",
        state.session,
        len(state.active),
        num_sites,
        len(state.shared - state.active),
    )
    return SecureSumResult(
        total=total,
        replies={nodes[i]: r for i, r in masked_replies.items() if i in state.active},
        num_sites=num_sites,
        honest_sites=honest,
        threshold=state.threshold,
        dropped=dropped,
    )


_REPLY_KEYS = {
    k.ACTION_SECAGG_SETUP: (k.PUBLIC_KEY_1, k.PUBLIC_KEY_2),
    k.ACTION_SECAGG_SHARE_KEYS: (k.SECAGG_DESTINATIONS, k.SECAGG_CIPHERTEXTS),
    k.ACTION_SECAGG_MASKED_INPUT: (),
    k.ACTION_SECAGG_UNMASK: (k.SECAGG_OWNERS, k.SECAGG_SHARES),
}


def _record(reply: Message) -> ConfigRecord:
    return reply.content.config_records[k.SECAGG]


def _reply_problem(reply: Message, action: str) -> str | None:
    """Return what is missing from a stage reply, or None."""
    if action == k.ACTION_SECAGG_MASKED_INPUT:
        arrays = reply.content.array_records.get(k.SECAGG)
        if arrays is None or k.MASKED not in arrays or k.METRICS not in reply.content.metric_records:
            return f"the reply needs the ArrayRecord `{k.SECAGG}`/`{k.MASKED}` and the MetricRecord `{k.METRICS}`"
        return None
    record = reply.content.config_records.get(k.SECAGG)
    if record is None or any(key not in record for key in _REPLY_KEYS[action]):
        return f"the reply needs a `{k.SECAGG}` ConfigRecord with {', '.join(_REPLY_KEYS[action])}"
    return None
