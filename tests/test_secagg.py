"""Secure aggregation's protocol in process (no Flower messages): the site's stages (client/secagg.py) driven by
the server's state (server/secagg.SecureSum), with real keys, shares, encryption and masks.

What the server sees of one site is independent of its values; unmasking needs the threshold of shares; the
sum over survivors of dropouts is exact; a server that lies about a dropout learns nothing of that site; each
stage is answered once and in order; a site's secrets are gone after the sum.
"""

import json
import stat

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from scipy import stats

from fedtl.client import secagg
from fedtl.client.policy import PolicyRefusal, SitePolicy
from fedtl.client.secagg import SessionPlan
from fedtl.client.site import Site
from fedtl.server.secagg import SecureSum
from fedtl.shared import constants as k
from fedtl.shared.errors import FederationError, ReplyError
from fedtl.shared.secure_sum import expand_mask, from_ring, private_key_from_scalar, to_ring

LENGTH = 512


def _policy(name, root, min_honest_sites):
    return SitePolicy(
        site_name=name,
        data="digits",
        label_names=(),
        max_epsilon=8.0,
        delta=1e-5,
        min_noise_multiplier=0.0,
        max_rounds_per_run=10,
        allowed_backbones=None,
        state_dir=root / name,
        cache_dir=root / "cache",
        secret_dir=root / "secrets" / name,
        min_honest_sites=min_honest_sites,
    )


def _sites(tmp_path, n, min_honest_sites=None):
    return [
        Site(
            name=f"s{i}",
            state_dir=tmp_path / f"s{i}",
            cache_dir=tmp_path / "cache",
            data="",
            policy=None if min_honest_sites is None else _policy(f"s{i}", tmp_path, min_honest_sites),
        )
        for i in range(1, n + 1)
    ]


class Run:
    """One secure sum, stage by stage; each stage's site answers can be cut short to simulate dropouts."""

    def __init__(self, sites, values, *, honest=None):
        self.sites, self.values = sites, values
        self.server = SecureSum(len(sites), honest or len(sites), "test", len(values[0]))
        self.session = self.server.session

    def plan(self, i):
        s = self.server
        return SessionPlan(s.session, "run-a", i, s.num_sites, s.threshold, s.honest_sites, "test")

    def setup(self, lost=()):
        keys = {i: secagg.setup_session(site, self.plan(i)) for i, site in self._each() if i not in lost}
        self.server.receive_public_keys(keys)

    def share(self, lost=()):
        request = self.server.share_keys_request()
        keys = dict(
            zip(request[k.SECAGG_INDICES], zip(request[k.SECAGG_PUBLIC_KEYS_1], request[k.SECAGG_PUBLIC_KEYS_2]))
        )
        sent = {i: secagg.share_keys(self.sites[i - 1], self.session, keys) for i in self.server.public_keys}
        self.server.receive_shares_to_route({i: v for i, v in sent.items() if i not in lost})

    def mask(self, lost=()):
        self.masked = {}
        for i in sorted(self.server.shared):
            if i in lost:
                continue
            request = self.server.masked_input_request(i)
            incoming = dict(zip(request[k.SECAGG_SOURCES], request[k.SECAGG_CIPHERTEXTS]))
            self.masked[i] = secagg.mask_input(
                self.sites[i - 1], self.session, incoming, lambda plan, i=i: self.values[i - 1]
            )
        self.server.receive_masked(dict(self.masked))

    def unmask(self, lost=()):
        request = self.server.unmask_request()
        shares = {
            i: secagg.unmask(
                self.sites[i - 1], self.session, active=request[k.SECAGG_ACTIVE], dropped=request[k.SECAGG_DROPPED]
            )
            for i in sorted(self.server.active)
            if i not in lost
        }
        return self.server.finish(shares)

    def all(self):
        self.setup()
        self.share()
        self.mask()
        return self.unmask()

    def _each(self):
        return enumerate(self.sites, start=1)


def _values(rng, n, length=LENGTH):
    return [rng.integers(-(2**40), 2**40, size=length) for _ in range(n)]


def test_the_server_learns_the_exact_sum_of_the_sites_vectors(tmp_path):
    values = _values(np.random.default_rng(0), 4)
    total = Run(_sites(tmp_path, 4), values).all()
    assert total.dtype == np.int64 and np.array_equal(total, sum(values))


def test_the_masked_vector_the_server_sees_is_independent_of_the_sites_values(tmp_path):
    # Site 1 holds either zeros or large structured values; over fresh sums, the top byte of each masked entry
    # is uniform, and the same in both cases. The unmasked integers fail the same test (the test can fail).
    seen = {}
    for case, first in (("zeros", np.zeros(LENGTH, dtype=np.int64)), ("values", np.arange(LENGTH) * 2**50)):
        tops = []
        for rep in range(12):
            run = Run(_sites(tmp_path / f"{case}{rep}", 3), [first, *_values(np.random.default_rng(rep), 2)])
            run.setup()
            run.share()
            run.mask()
            tops.append((run.masked[1] >> np.uint64(56)).astype(np.int64))
        seen[case] = np.concatenate(tops)
        assert stats.chisquare(np.bincount(seen[case], minlength=256)).pvalue > 1e-4
    table = np.vstack([np.bincount(seen["zeros"], minlength=256), np.bincount(seen["values"], minlength=256)])
    assert stats.chi2_contingency(table).pvalue > 1e-4
    unmasked_top = (to_ring(np.arange(LENGTH) * 2**50) >> np.uint64(56)).astype(np.int64)
    assert stats.chisquare(np.bincount(np.tile(unmasked_top, 12), minlength=256)).pvalue < 1e-10


def test_a_secret_needs_the_threshold_of_shares(tmp_path):
    run = Run(_sites(tmp_path, 5), _values(np.random.default_rng(1), 5))
    run.setup()
    run.share()
    run.mask()
    assert run.server.threshold == 3
    state = json.loads((tmp_path / "s2" / "secagg" / f"{run.session}.json").read_text())
    seed = secagg._unb64(json.loads((tmp_path / "s1" / "secagg" / f"{run.session}.json").read_text())["seed"])
    held = [
        secagg._unb64(
            json.loads((tmp_path / f"s{i}" / "secagg" / f"{run.session}.json").read_text())["seed_shares"]["1"]
        )
        for i in range(1, 6)
    ]
    assert "1" in state["seed_shares"]
    assert combine_shares(held[:3]) == seed and combine_shares(held[2:]) == seed
    try:
        below = combine_shares(held[:2])
    except ValueError:
        below = None
    assert below != seed
    # The server cannot finish the sum with fewer than k unmask answers.
    request = run.server.unmask_request()
    answers = {
        i: secagg.unmask(
            run.sites[i - 1], run.session, active=request[k.SECAGG_ACTIVE], dropped=request[k.SECAGG_DROPPED]
        )
        for i in (1, 2)
    }
    with pytest.raises(FederationError, match="2 sites answered the unmask request; k = 3"):
        run.server.finish(answers)


def test_the_sum_over_survivors_is_exact_whatever_stage_sites_drop_out_in(tmp_path):
    # Distrust costs robustness: k = n - ceil(t / 2) + 1 shares, so n - k dropouts at most.
    assert SecureSum(7, 4, "test", 1).threshold == 6 and SecureSum(7, 2, "test", 1).threshold == 7
    values = _values(np.random.default_rng(3), 12)
    run = Run(_sites(tmp_path / "a", 12), values, honest=8)  # k = 9: up to 3 sites lost before the sum
    run.setup(lost=(12,))  # lost before sharing keys: never in the sum
    run.share(lost=(11,))  # lost while sharing keys: nobody masks with it
    run.mask(lost=(10,))  # lost after sharing keys, before masking: its pairwise masks are removed
    assert np.array_equal(run.unmask(), sum(values[:9]))
    values = _values(np.random.default_rng(4), 6)
    run = Run(_sites(tmp_path / "b", 6), values, honest=4)  # k = 5
    run.setup()
    run.share()
    run.mask()
    assert np.array_equal(run.unmask(lost=(6,)), sum(values))  # lost after masking: its vector is in the sum


def test_too_few_survivors_for_the_assumed_honest_sites_stop_the_sum(tmp_path):
    run = Run(_sites(tmp_path, 5), _values(np.random.default_rng(4), 5), honest=5)
    run.setup()
    run.share()
    with pytest.raises(FederationError, match="4 of 5 sites are left after masked input; it needs 5"):
        run.mask(lost=(5,))
    # And every site refuses to unmask a sum with fewer sites than its noise assumes, whatever the server says.
    request = {k.SECAGG_ACTIVE: [1, 2, 3, 4], k.SECAGG_DROPPED: [5]}
    with pytest.raises(ReplyError, match="only 4 sites are in the sum; it needs 5"):
        secagg.unmask(run.sites[0], run.session, active=request[k.SECAGG_ACTIVE], dropped=request[k.SECAGG_DROPPED])


def test_a_server_that_claims_a_site_dropped_cannot_recover_its_values(tmp_path):
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    values = _values(np.random.default_rng(5), 5)
    run = Run(_sites(tmp_path, 5), values, honest=3)  # k = 4; a sum needs 4 sites
    run.setup()
    run.share()
    run.mask()
    seen = run.masked[1]  # site 1 sent its masked vector ...
    # ... but the server tells the others that site 1 dropped, to get its mask key and strip the pairwise masks.
    shares = {i: secagg.unmask(run.sites[i - 1], run.session, active=[2, 3, 4, 5], dropped=[1]) for i in (2, 3, 4, 5)}
    key = private_key_from_scalar(combine_shares([shares[i][1] for i in (2, 3, 4, 5)]))
    stripped = seen.copy()
    for other in (2, 3, 4, 5):
        secret = generate_shared_key(key, bytes_to_public_key(run.server.public_keys[other][0]))
        stripped += expand_mask(secret, LENGTH)  # site 1 (below `other`) subtracted this mask
    # What is left is site 1's values under its self-mask: uniform, nothing like them.
    assert not np.array_equal(from_ring(stripped), values[0])
    top = (stripped >> np.uint64(56)).astype(np.int64)
    assert stats.chisquare(np.bincount(top, minlength=256)).pvalue > 1e-4
    # The self-mask seed's shares are out of reach: every site answered once and refuses a second request ...
    for i in (2, 3, 4, 5):
        with pytest.raises(ReplyError, match="stage 'done'"):
            secagg.unmask(run.sites[i - 1], run.session, active=[1, 2, 3, 4, 5], dropped=[])
    # ... and site 1 itself never hands its own seed share while named dropped.
    with pytest.raises(ReplyError, match="this site is not named active"):
        secagg.unmask(run.sites[0], run.session, active=[2, 3, 4, 5], dropped=[1])


def test_each_stage_is_answered_once_in_order_and_the_secrets_go_at_the_end(tmp_path):
    sites = _sites(tmp_path, 3)
    run = Run(sites, _values(np.random.default_rng(6), 3))
    run.setup()
    path = tmp_path / "s1" / "secagg" / f"{run.session}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with pytest.raises(ReplyError, match="was already set up"):
        secagg.setup_session(sites[0], run.plan(1))
    with pytest.raises(ReplyError, match="the request needs 'shared'"):
        secagg.mask_input(sites[0], run.session, {}, lambda plan: np.zeros(LENGTH, dtype=np.int64))
    run.share()
    run.mask()
    assert "sk1" in json.loads(path.read_text())
    run.unmask()
    state = json.loads(path.read_text())
    assert state["stage"] == "done" and not {"sk1", "sk2", "seed", "seed_shares", "key_shares"} & set(state)


def test_a_site_checks_the_plan_and_the_keys_it_is_given(tmp_path):
    sites = _sites(tmp_path, 3)
    run = Run(sites, _values(np.random.default_rng(7), 3))
    bad = SessionPlan(run.session, "run-a", 1, 3, 3, 3, "test")
    with pytest.raises(ReplyError, match="threshold 3 for 3 sites assuming 3 honest; it must be 2"):
        secagg.setup_session(sites[0], bad)
    run.setup()
    request = run.server.share_keys_request()
    keys = dict(zip(request[k.SECAGG_INDICES], zip(request[k.SECAGG_PUBLIC_KEYS_1], request[k.SECAGG_PUBLIC_KEYS_2])))
    swapped = {**keys, 1: keys[2]}
    with pytest.raises(ReplyError, match="misses or alters this site's own public keys"):
        secagg.share_keys(sites[0], run.session, swapped)
    sent = {i: secagg.share_keys(sites[i - 1], run.session, keys) for i in (1, 2, 3)}
    # A share routed to the wrong site does not decrypt there.
    with pytest.raises(ReplyError, match="does not decrypt"):
        secagg.mask_input(sites[0], run.session, {2: sent[2][3]}, lambda plan: np.zeros(LENGTH, dtype=np.int64))


def test_a_site_refuses_to_assume_more_honest_sites_than_its_policy_counts_on(tmp_path):
    sites = _sites(tmp_path, 3, min_honest_sites=2)
    run = Run(sites, _values(np.random.default_rng(8), 3))  # t = 3
    with pytest.raises(PolicyRefusal, match="assumes 3 honest sites in the sum, but the policy counts on at most"):
        secagg.setup_session(sites[0], run.plan(1))
    assert not (tmp_path / "s1" / "secagg").exists() or not list((tmp_path / "s1" / "secagg").glob("*.json"))
    ok = Run(sites, _values(np.random.default_rng(8), 3), honest=2)
    assert np.array_equal(ok.all(), sum(ok.values))
