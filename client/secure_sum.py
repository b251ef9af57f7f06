"""The site's side of secure aggregation (protocol and threat model: common.masking).

- `advertise`: the run's X25519 key (made once per run, kept in `<work-dir>/masking/`,
  mode 0600, for the KEPT_RUNS most recently keyed runs only), signed with the site's
  node key, with its consortium certificate.
- `plan`: checks a training request's roster and set *before* any training (so a refused
  round costs no ε): every advert certified, this site's own key in it, a set of at least
  `min-secure-aggregation-sites` sites that fits the quantisation range.
- `mask`: the quantised update plus the pairwise masks; the quantised update is kept for
  the round's one possible recovery.
- `recover`: re-mask that cached update for a strict subset of the set, once per round
  (client.served), recorded in the audit log; a second request is refused and recorded.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from client import distributed_dp
from client.errors import SiteRefusal, policy_refusal, rekey_refusal
from client.served import AlreadyServed, ServedLog
from client.site_config import AUDIT_FILE
from client.site_policy import SitePolicy
from common import keys, masking
from common.audit import AuditLog
from common.config import RunConfig

LOG = logging.getLogger("fedrad.client")
FOLDER = "masking"
CERTIFICATE, NODE_KEY, CONSORTIUM_CA = "site-certificate", "node-key", "consortium-ca"
NODE_CONFIG_KEYS = frozenset({CERTIFICATE, NODE_KEY, CONSORTIUM_CA})
KEPT_RUNS = 4  # runs whose key and cached update a site keeps (the most recently keyed)


@dataclass(frozen=True)
class Plan:
    """A checked masked round: whom this site masks with, and under which roster."""

    run_id: int
    node_id: int
    server_round: int
    roster: dict[int, masking.Advert]
    names: dict[int, str]
    participants: list[int]


def _work_dir(node_config: Any) -> Path:
    return Path(str(node_config.get("work-dir", ""))).expanduser()


def _audit(node_config: Any, event: str, **fields: Any) -> None:
    AuditLog(_work_dir(node_config) / AUDIT_FILE).append(event, **fields)


def _refuse(node_config: Any, run_id: int, server_round: int, problem: str) -> SiteRefusal:
    LOG.warning("round %d: secure aggregation refused: %s", server_round, problem)
    _audit(node_config, "secagg-refused", run_id=str(run_id), round=server_round,
           problem=problem)
    return policy_refusal(["secure-aggregation-parameters"])


def _file(node_config: Any, key: str) -> bytes:
    path = node_config.get(key)
    if not path or not Path(str(path)).expanduser().is_file():
        LOG.error("node config %s is not set or not a file: this site's kit has no site "
                  "certificate (site.pem); ask the coordinator for a new kit "
                  "(`fedrad consortium reissue-kit SITE`)", key)
        raise policy_refusal(["site-certificate"])
    return Path(str(path)).expanduser().read_bytes()


def run_key(work_dir: Path, run_id: int) -> X25519PrivateKey:
    """This site's X25519 key for the run, made once (os-level CSPRNG), mode 0600."""
    folder = work_dir / FOLDER
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"run-{int(run_id)}.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return X25519PrivateKey.from_private_bytes(path.read_bytes())
    key = X25519PrivateKey.generate()
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.Raw,
                                       serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption()))
    _prune(folder)
    return key


def _prune(folder: Path) -> None:
    """Remove the keys and cached updates of all but the KEPT_RUNS most recently keyed
    runs. A run still going whose key went asks this site to advertise a new one
    (refused-rekey), so nothing breaks; nothing of an ended run stays on disk for long."""
    keys_by_age = sorted(folder.glob("run-*.key"), key=lambda p: p.stat().st_mtime,
                         reverse=True)
    for old in keys_by_age[KEPT_RUNS:]:
        run = old.name.removesuffix(".key")
        for path in (old, folder / f"{run}.pending.npz"):
            path.unlink(missing_ok=True)


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def advertise(node_config: Any, run_id: int, node_id: int) -> dict[str, Any]:
    """The fields of this site's key advert for the run."""
    node_key = serialization.load_ssh_private_key(_file(node_config, NODE_KEY), None)
    if not isinstance(node_key, ec.EllipticCurvePrivateKey):
        raise policy_refusal(["site-certificate"])
    advert = masking.make_advert(run_id, node_id, run_key(_work_dir(node_config), run_id),
                                 _file(node_config, CERTIFICATE), node_key)
    _audit(node_config, "secagg-key-advertised", run_id=str(run_id),
           public_key=advert.public_key.hex())
    return {"public-key": advert.public_key, "certificate": advert.certificate,
            "signature": advert.signature}


def _node_ids(values: Any) -> list[int]:
    if not isinstance(values, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in values):
        raise masking.MaskingError("the participant set is not a list of node ids")
    if len(set(values)) != len(values):
        raise masking.MaskingError("a node appears twice in the participant set")
    return sorted(values)


def plan(node_config: Any, run_config: Any, *, run_id: int, node_id: int,
         server_round: int, fields: Any) -> Plan:
    """Check a training request's masking fields; a refusal before any compute."""
    policy = SitePolicy.from_mapping(node_config)
    config = RunConfig.from_mapping(run_config)
    settings = config.secagg
    try:
        if fields.get(keys.ATTEMPT) != 0:
            raise masking.MaskingError("a training request must be attempt 0")
        roster = masking.roster_from_fields(fields)
        participants = _node_ids(fields.get("participants"))
        if node_id not in participants or not set(participants) <= set(roster):
            raise masking.MaskingError("the set names this site or a node not in the roster "
                                       "wrongly")
        _check_sum_size(len(participants), "sites", policy, config)
        masking.check_set_size(len(participants), settings.quantization_range,
                               settings.max_weight)
        own = _public(run_key(_work_dir(node_config), run_id))
        try:
            names = masking.verify_roster({n: roster[n] for n in participants}, run_id,
                                          _file(node_config, CONSORTIUM_CA),
                                          own_node=node_id, own_public=own)
        except masking.MaskingError as exc:
            if "own key" in str(exc):  # e.g. a new work folder: advertise again
                raise rekey_refusal() from exc
            raise
    except masking.MaskingError as exc:
        raise _refuse(node_config, run_id, server_round, str(exc)) from exc
    return Plan(run_id, node_id, server_round, {n: roster[n] for n in participants}, names,
                participants)


def _check_sum_size(count: int, what: str, policy: SitePolicy, config: RunConfig) -> None:
    """A masked sum this site joins holds at least its policy's minimum of sites and, in
    distributed DP, the K sites whose noise shares make σ (client.distributed_dp): in a
    smaller sum this site's update would carry less noise than its ledger records."""
    if count < policy.min_secure_aggregation_sites:
        raise masking.MaskingError(
            f"{count} {what}, below this site's min-secure-aggregation-sites "
            f"{policy.min_secure_aggregation_sites}")
    needed = distributed_dp.sites_sharing(config)
    if config.dp.distributed and count < needed:
        raise masking.MaskingError(
            f"{count} {what}, fewer than the {needed} sites whose noise shares make up "
            "σ in dp-mode=distributed (secagg-min-sites)")


def _pending(node_config: Any, run_id: int) -> Path:
    return _work_dir(node_config) / FOLDER / f"run-{int(run_id)}.pending.npz"


def mask(node_config: Any, chosen: Plan, quantised: np.ndarray) -> np.ndarray:
    """The masked vector to send; the quantised one is kept for a recovery."""
    key = run_key(_work_dir(node_config), chosen.run_id)
    path = _pending(node_config, chosen.run_id)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    publics = b"".join(chosen.roster[n].public_key for n in chosen.participants)
    with os.fdopen(fd, "wb") as handle:
        # keys as raw uint8 rows: numpy's bytes dtype would drop a key's trailing zeros
        np.savez(handle, quantised=quantised, round=np.array([chosen.server_round]),
                 nodes=np.array(chosen.participants, dtype=np.uint64),
                 publics=np.frombuffer(publics, dtype=np.uint8).reshape(-1, 32),
                 names=np.array(json.dumps(chosen.names)))
    os.replace(tmp, path)
    masked = masking.apply_masks(quantised, own_node=chosen.node_id, own=key,
                                 roster=chosen.roster, participants=chosen.participants,
                                 run_id=chosen.run_id, server_round=chosen.server_round,
                                 attempt=0)
    _audit(node_config, "masked-update-sent", run_id=str(chosen.run_id),
           round=chosen.server_round, sites=len(chosen.participants))
    return masked


def recover(node_config: Any, run_config: Any, *, run_id: int, node_id: int,
            server_round: int, fields: Any) -> np.ndarray:
    """Re-mask the round's cached update for the survivors: once per round, for a strict
    subset of the set masked for, of at least min-secure-aggregation-sites (and, in
    distributed DP, of at least the K sites whose noise shares make up σ)."""
    policy = SitePolicy.from_mapping(node_config)
    path = _pending(node_config, run_id)
    try:
        ServedLog(_work_dir(node_config)).claim(run_id, server_round, "recover", 1)
    except AlreadyServed as exc:
        LOG.warning("round %d: a second recovery refused", server_round)
        _audit(node_config, "secagg-recovery-refused", run_id=str(run_id),
               round=server_round, problem="a second recovery in one round")
        raise policy_refusal(["secure-aggregation-recovery"]) from exc
    try:
        if fields.get(keys.ATTEMPT) != 1:
            raise masking.MaskingError("a recovery must be attempt 1")
        if not path.is_file():
            raise masking.MaskingError("no masked update of this run to recover")
        with np.load(path) as cached:
            if int(cached["round"][0]) != server_round:
                raise masking.MaskingError(f"the cached update is of round "
                                           f"{int(cached['round'][0])}")
            quantised = np.array(cached["quantised"], dtype=np.uint32)
            before = [int(n) for n in cached["nodes"]]
            publics = [bytes(row) for row in np.asarray(cached["publics"], dtype=np.uint8)]
            names = {int(k): v for k, v in json.loads(str(cached["names"])).items()}
        survivors = _node_ids(fields.get("participants"))
        if node_id not in survivors or not set(survivors) < set(before):
            raise masking.MaskingError("the survivors are not a strict subset of the set "
                                       "this site masked for, with this site in it")
        _check_sum_size(len(survivors), "survivors", policy, RunConfig.from_mapping(run_config))
    except masking.MaskingError as exc:
        raise _refuse(node_config, run_id, server_round, str(exc)) from exc
    roster = {n: masking.Advert(n, p, b"", b"") for n, p in zip(before, publics, strict=True)}
    dropped = sorted(names.get(n, f"node-{n}") for n in set(before) - set(survivors))
    _audit(node_config, "secagg-recovery", run_id=str(run_id), round=server_round,
           dropped=dropped, survivors=len(survivors))
    LOG.warning("round %d: re-masking for %d survivors; the server says %s dropped",
                server_round, len(survivors), dropped)
    return masking.apply_masks(quantised, own_node=node_id, own=run_key(
        _work_dir(node_config), run_id), roster=roster, participants=survivors,
        run_id=run_id, server_round=server_round, attempt=1)
