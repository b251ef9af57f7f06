"""Secure aggregation keyed once per run (common.masking, client.secure_sum,
server.masked_sum): real consortium identities (CA, node keys, site certificates), the
site's own checks, the server's mod-2^32 sum. The message layer is covered by the real
federation tests (tests/test_secure_federation.py, tests/test_secagg_dropout.py).

Tolerance: each site's update, scaled by r = n/max_weight, is rounded to the grid
S = C/Q (C = secagg-clipping-range 8, Q = secagg-quantization-range 2^22: S = 1.9e-6), so
the masked sum is off by at most k·S/2 for k sites, and the weighted mean, multiplied by
max_weight/Σn, by k·S/2 · max_weight/Σn. The tests assert that bound against FedAvg of
the float updates, and exact equality against FedAvg of the quantised ones.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from client import secure_sum
from client.errors import SiteRefusal
from common import masking, pki
from common.config import RunConfig
from server.masked_sum import MaskedSum

SETTINGS = RunConfig.from_mapping({}).secagg
STEP = SETTINGS.clipping_range / SETTINGS.quantization_range
RUN = 2**63 + 7  # Flower run and node ids are uint64
SIZE = 2000


def _consortium(folder, count: int, first_node: int = 101):
    """`count` sites of one consortium: node id → node config (as site start writes it)."""
    pki.create_ca(folder, "masking")
    configs = {}
    for index in range(count):
        site, node = f"site-{index + 1}", first_node + index
        keys = pki.create_node_keys(folder / "sites", site)
        cert = folder / "sites" / f"{site}.pem"
        cert.write_bytes(pki.issue_site_cert(folder, site, keys.public_key.read_bytes()))
        configs[node] = {"site-id": site, "work-dir": str(folder / "work" / site),
                         "site-certificate": str(cert), "node-key": str(keys.private_key),
                         "consortium-ca": str(folder / "ca.crt")}
    return configs


def _roster(configs):
    return {node: masking.Advert(node, **{k.replace("-", "_"): v for k, v in
                                          secure_sum.advertise(c, RUN, node).items()})
            for node, c in configs.items()}


def _fields(roster, participants, attempt=0):
    return {**masking.roster_fields(roster), "participants": sorted(participants),
            "attempt": attempt}


def _updates(nodes, seed=0):
    rng = np.random.default_rng(seed)
    return ({n: rng.uniform(-0.5, 0.5, SIZE).astype(np.float32) for n in nodes},
            {n: int(rng.integers(20, 300)) for n in nodes})


def _quantised(update, weight):
    return masking.quantise(update, weight, clipping_range=SETTINGS.clipping_range,
                            quantization_range=SETTINGS.quantization_range,
                            max_weight=SETTINGS.max_weight)


def _masked_round(configs, roster, updates, weights, server_round=1, answering=None):
    """Each site plans and masks its quantised update; the server's sum of those that
    answer. Returns (sum, uploads)."""
    participants = sorted(configs)
    total, uploads = MaskedSum(SIZE + 1), {}
    for node in answering or participants:
        chosen = secure_sum.plan(configs[node], {}, run_id=RUN, node_id=node,
                                 server_round=server_round,
                                 fields=_fields(roster, participants))
        uploads[node] = secure_sum.mask(configs[node], chosen,
                                        _quantised(updates[node], weights[node]))
        total.total += uploads[node]
        total.nodes.append(node)
    return total, uploads


def _fedavg(updates, weights, nodes):
    return np.average(np.stack([updates[n] for n in nodes]), axis=0,
                      weights=[weights[n] for n in nodes])


@pytest.mark.parametrize("count", [3, 4, 10])
def test_the_masks_cancel_and_the_sum_is_fedavg_of_the_quantised_updates(tmp_path, count):
    configs = _consortium(tmp_path, count)
    roster = _roster(configs)
    updates, weights = _updates(configs, seed=count)
    total, uploads = _masked_round(configs, roster, updates, weights)
    (mean,) = total.mean(SETTINGS)
    exact = sum(_quantised(updates[n], weights[n]).view(np.int32).astype(np.int64)
                for n in configs)
    assert int(total.total[0]) == sum(weights.values())  # the weights, exactly
    assert np.array_equal(total.total[1:].view(np.int32).astype(np.int64), exact[1:])
    bound = count * STEP / 2 * SETTINGS.max_weight / sum(weights.values())
    error = float(np.max(np.abs(mean - _fedavg(updates, weights, configs))))
    assert error <= bound, (error, bound)
    for node, upload in uploads.items():  # no upload is the site's quantised update
        assert np.mean(upload == _quantised(updates[node], weights[node])) < 0.01


def test_uploads_look_uniform(tmp_path):
    """Chi-square of each upload's top byte over 256 bins (255 degrees of freedom): a
    quantised update (values near 0 or near 2^32) fails it by orders of magnitude."""
    configs = _consortium(tmp_path, 4)
    updates, weights = _updates(configs)
    _, uploads = _masked_round(configs, _roster(configs), updates, weights)
    expected = (SIZE + 1) / 256
    for upload in uploads.values():
        counts = np.bincount(upload >> 24, minlength=256)
        chi2 = float(np.sum((counts - expected) ** 2 / expected))
        assert chi2 < 400, chi2  # p ≈ 1e-8 for 255 dof
    clear = _quantised(updates[101], weights[101])
    counts = np.bincount(clear >> 24, minlength=256)
    assert float(np.sum((counts - expected) ** 2 / expected)) > 10_000


def test_a_dropped_site_is_recovered_once_from_the_survivors(tmp_path):
    configs = _consortium(tmp_path, 4)
    roster = _roster(configs)
    updates, weights = _updates(configs, seed=4)
    first, _ = _masked_round(configs, roster, updates, weights, answering=[101, 102, 103])
    survivors = [101, 102, 103]
    honest = sum(_quantised(updates[n], weights[n]) for n in survivors)
    assert np.mean(first.total == honest) < 0.01  # site-4's masks with them do not cancel
    again = MaskedSum(SIZE + 1)
    for node in survivors:
        again.total += secure_sum.recover(configs[node], {}, run_id=RUN, node_id=node,
                                          server_round=1,
                                          fields={"participants": survivors, "attempt": 1})
    (mean,) = again.mean(SETTINGS)
    bound = 3 * STEP / 2 * SETTINGS.max_weight / sum(weights[n] for n in survivors)
    assert float(np.max(np.abs(mean - _fedavg(updates, weights, survivors)))) <= bound
    audit = [json.loads(line) for line in
             (tmp_path / "work" / "site-1" / "audit.jsonl").read_text().splitlines()]
    assert [e for e in audit if e["event"] == "secagg-recovery"][0]["dropped"] == ["site-4"]


def test_a_second_recovery_request_in_one_round_is_refused_and_audited(tmp_path):
    """The attack: claim another site dropped to get a second sum over a smaller set and
    difference it from the first."""
    configs = _consortium(tmp_path, 5)
    roster = _roster(configs)
    updates, weights = _updates(configs)
    _masked_round(configs, roster, updates, weights, answering=[101, 102, 103, 104])
    secure_sum.recover(configs[101], {}, run_id=RUN, node_id=101, server_round=1,
                       fields={"participants": [101, 102, 103, 104], "attempt": 1})
    with pytest.raises(SiteRefusal, match="recovery"):
        secure_sum.recover(configs[101], {}, run_id=RUN, node_id=101, server_round=1,
                           fields={"participants": [101, 102, 103], "attempt": 1})
    audit = (tmp_path / "work" / "site-1" / "audit.jsonl").read_text()
    assert "secagg-recovery-refused" in audit


@pytest.mark.parametrize("survivors, why", [
    ([101, 102], "below this site's min-secure-aggregation-sites"),
    ([101, 102, 103, 104], "strict subset"),  # nobody dropped: the same set again
    ([101, 102, 105], "strict subset"),  # a node it never masked with
])
def test_a_recovery_that_would_weaken_the_masking_is_refused(tmp_path, survivors, why,
                                                            caplog):
    configs = _consortium(tmp_path, 4)
    roster = _roster(configs)
    updates, weights = _updates(configs)
    _masked_round(configs, roster, updates, weights, answering=[101])
    with pytest.raises(SiteRefusal):
        secure_sum.recover(configs[101], {}, run_id=RUN, node_id=101, server_round=1,
                           fields={"participants": survivors, "attempt": 1})
    assert why in caplog.text


def test_a_relayed_key_that_is_not_the_sites_certified_key_is_refused(tmp_path, caplog):
    """The attack: the server that relays the adverts swaps site-2's key for one of its
    own, so it could unmask what site-1 sends. It can sign with no certified site key:
    its own TLS certificate (also issued by the consortium CA), a CA of its own, or the
    real site certificate with a signature that is not the site's are all refused."""
    configs = _consortium(tmp_path, 3)
    roster = _roster(configs)
    mine = X25519PrivateKey.generate()
    server_tls = pki.issue_server_cert(tmp_path, ["127.0.0.1"])
    server_key = serialization.load_pem_private_key(server_tls.server_key.read_bytes(), None)
    other = tmp_path / "other"
    other.mkdir()
    rogue = _consortium(other, 2, first_node=102)
    rogue_key = serialization.load_ssh_private_key(
        open(rogue[102]["node-key"], "rb").read(), None)
    site_2_key = serialization.load_ssh_private_key(
        open(configs[102]["node-key"], "rb").read(), None)
    forgeries = {
        "server certificate": masking.make_advert(RUN, 102, mine, server_tls.server_cert
                                                  .read_bytes(), server_key),
        "another CA": masking.make_advert(RUN, 102, mine, open(
            rogue[102]["site-certificate"], "rb").read(), rogue_key),
        "real certificate, not its signature": masking.Advert(
            102, mine.public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw),
            roster[102].certificate, roster[102].signature),
        "an advert of another run": masking.make_advert(RUN + 1, 102, mine, roster[102]
                                                        .certificate, site_2_key),
    }
    for forged in forgeries.values():
        with pytest.raises(SiteRefusal):
            secure_sum.plan(configs[101], {}, run_id=RUN, node_id=101, server_round=1,
                            fields=_fields({**roster, 102: forged}, roster))
    audit = (tmp_path / "work" / "site-1" / "audit.jsonl").read_text()
    assert audit.count("secagg-refused") == len(forgeries)
    # the honest roster passes
    secure_sum.plan(configs[101], {}, run_id=RUN, node_id=101, server_round=1,
                    fields=_fields(roster, roster))


def test_a_roster_without_this_sites_own_key_asks_it_to_advertise_again(tmp_path):
    configs = _consortium(tmp_path, 3)
    roster = _roster(configs)
    fresh = X25519PrivateKey.generate()
    node_key = serialization.load_ssh_private_key(open(configs[101]["node-key"], "rb")
                                                  .read(), None)
    stale = masking.make_advert(RUN, 101, fresh, roster[101].certificate, node_key)
    with pytest.raises(SiteRefusal) as refused:
        secure_sum.plan(configs[101], {}, run_id=RUN, node_id=101, server_round=1,
                        fields=_fields({**roster, 101: stale}, roster))
    assert refused.value.code == 1005


@pytest.mark.parametrize("change", ["too few", "not in roster", "attempt 1", "same site twice"])
def test_a_set_that_would_weaken_the_masking_is_refused_before_training(tmp_path, change):
    configs = _consortium(tmp_path, 4)
    roster = _roster(configs)
    fields = _fields(roster, roster)
    if change == "too few":
        fields = _fields({n: roster[n] for n in (101, 102)}, [101, 102])
    elif change == "not in roster":
        fields["participants"] = [101, 102, 103, 104, 999]
    elif change == "attempt 1":
        fields["attempt"] = 1
    else:  # site-2's genuine advert replayed under a second node id
        fields = _fields({**roster, 105: roster[102]}, [*roster, 105])
    with pytest.raises(SiteRefusal):
        secure_sum.plan(configs[101], {}, run_id=RUN, node_id=101, server_round=1,
                        fields=fields)


def test_seeds_differ_for_every_run_round_attempt_and_set(tmp_path):
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    b_public = b.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    digests = [bytes(32), b"\x01" * 32]
    seen = set()
    for run, server_round, attempt, digest in itertools.product(
            [1, 2], [1, 2, 3], [0, 1], digests):
        key = masking.round_key(masking.pair_secret(a, b_public, run), server_round,
                                attempt, digest)
        seen.add(key)
    assert len(seen) == 2 * 3 * 2 * 2
    a_public = a.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    assert masking.pair_secret(a, b_public, 1) == masking.pair_secret(b, a_public, 1)


def test_sites_told_different_sets_produce_a_sum_that_does_not_unmask(tmp_path):
    """The server tells site-1 the set is {1,2,3} and the others {1,2,3,4}: the set's
    digest enters every pairwise key, so no mask cancels and the sum is noise."""
    configs = _consortium(tmp_path, 4)
    roster = _roster(configs)
    updates, weights = _updates(configs)
    total = MaskedSum(SIZE + 1)
    for node in (101, 102, 103):
        view = [101, 102, 103] if node == 101 else list(roster)
        chosen = secure_sum.plan(configs[node], {}, run_id=RUN, node_id=node,
                                 server_round=1, fields=_fields(roster, view))
        total.total += secure_sum.mask(configs[node], chosen,
                                       _quantised(updates[node], weights[node]))
    honest = sum(_quantised(updates[n], weights[n]) for n in (101, 102, 103))
    assert np.mean(total.total == honest.astype(np.uint32)) < 0.01


def test_an_update_outside_the_clipping_range_is_refused_not_clipped():
    big = np.full(10, SETTINGS.clipping_range * 2, dtype=np.float32)
    with pytest.raises(masking.RangeError, match="secagg-clipping-range"):
        masking.quantise(big, int(SETTINGS.max_weight), clipping_range=SETTINGS.clipping_range,
                         quantization_range=SETTINGS.quantization_range,
                         max_weight=SETTINGS.max_weight)
    with pytest.raises(masking.RangeError, match="secagg-max-weight"):
        _quantised(np.zeros(3, dtype=np.float32), int(SETTINGS.max_weight) + 1)
    with pytest.raises(masking.MaskingError, match="2\\^31"):
        masking.check_set_size(600, SETTINGS.quantization_range, SETTINGS.max_weight)


def test_only_the_most_recent_runs_keys_and_cached_updates_stay_on_disk(tmp_path):
    """A site cannot tell when a run ended: it keeps the keys (and cached updates) of the
    KEPT_RUNS most recently keyed runs, mode 0600, and removes the rest."""
    import stat
    import time

    folder = tmp_path / secure_sum.FOLDER
    for run in range(1, secure_sum.KEPT_RUNS + 3):
        secure_sum.run_key(tmp_path, run)
        (folder / f"run-{run}.pending.npz").write_bytes(b"cached")
        time.sleep(0.02)  # distinct modification times, whatever the filesystem's clock
    secure_sum.run_key(tmp_path, 99)  # a new run prunes
    kept = sorted(p.name for p in folder.glob("run-*.key"))
    assert len(kept) == secure_sum.KEPT_RUNS
    assert kept == sorted(["run-99.key", *(f"run-{r}.key" for r in range(
        secure_sum.KEPT_RUNS, secure_sum.KEPT_RUNS + 3))])  # the newest, by when keyed
    assert not (folder / "run-1.pending.npz").exists()
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.glob("run-*.key"))
    again = secure_sum.run_key(tmp_path, 99)  # the same run: the same key, nothing made
    assert again.private_bytes_raw() == secure_sum.run_key(tmp_path, 99).private_bytes_raw()


def test_a_recovery_works_for_keys_that_end_in_a_zero_byte(tmp_path):
    """One X25519 public key in 256 ends in 0x00. The cached roster once went through
    numpy's bytes dtype, which drops trailing zeros: such a peer's key came back 31 bytes
    long and the site failed the recovery (seen in tests/test_multihost.py)."""
    from client.secure_sum import Plan

    configs = _consortium(tmp_path, 3)
    roster = _roster(configs)
    while True:  # a peer key ending in a zero byte
        zero = X25519PrivateKey.generate()
        public = zero.public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw)
        if public.endswith(b"\x00"):
            break
    roster[103] = masking.Advert(103, public, roster[103].certificate, b"")
    chosen = Plan(RUN, 101, 1, roster, {101: "site-1", 102: "site-2", 103: "site-3"},
                  [101, 102, 103])
    secure_sum.mask(configs[101], chosen, _quantised(np.zeros(SIZE, np.float32), 10))
    configs[101]["min-secure-aggregation-sites"] = 2
    again = secure_sum.recover(configs[101], {}, run_id=RUN, node_id=101, server_round=1,
                               fields={"participants": [101, 103], "attempt": 1})
    assert again.shape == (SIZE + 1,)
