"""Secure aggregation keyed once per run: pairwise masks, one exchange per round.

The protocol (in the style of Fed-BioMed's LOM and of Flamingo, Ma et al. 2023), built on
`cryptography`'s primitives only:

1. **Keys, once per run.** Each site makes an X25519 key pair for the run (its work
   folder, mode 0600) and *advertises* the public half, signed with its node key, whose
   certificate the consortium CA issued to that site name (`common.pki.site_identity`).
   The server relays every advert in each training request (the *roster*). A site joins
   a round only when every advert in it verifies and names a distinct site, and its own
   entry is its own key: a server that substitutes a key of its own is refused by the
   peers it tried to fool.
2. **Masks, every round.** A pair of sites shares `HKDF(X25519(a, B))` for the run; the
   round's pairwise key is `HKDF(pair, round, attempt, digest of the participant set)`,
   and the mask is the ChaCha20 keystream under it, read as uint32. The site with the
   lower node id adds it, the other subtracts it, so the masks cancel in the sum of the
   set and nowhere else. The participant digest means a site told a different set than
   its peers produces masks that never cancel. No seed is ever reused: a new round or
   attempt gives a new key.
3. **Quantisation.** A site's update, scaled by weight/max-weight, must lie within
   ±secagg-clipping-range (refused otherwise, never clipped) and is rounded to integers
   q = round(v / C · Q) in [−Q, Q]; its weight goes first, as an integer. Sums are taken
   mod 2^32 and read back as signed: exact while n·Q < 2^31.
4. **Dropout.** With every site answering there is nothing to unmask. When some do not,
   the server may ask the survivors once per round to re-mask their cached update among
   themselves (attempt 1, a new set, new keys); each site serves one recovery per round,
   only for a strict subset of the set it masked for, of at least its
   `min-secure-aggregation-sites`, and records it in its audit log.

Threat model. An honest-but-curious server learns the sum of the updates of a set of at
least `min-secure-aggregation-sites` sites, and each site's weight only inside the total.
A malicious server may (a) relay a key of its own: peers refuse the roster; (b) tell sites
different sets: masks do not cancel, the sum is noise; (c) claim a live site dropped, so
that the full sum minus the recovered one is that site's update: each site serves at most
one recovery per round and logs whom the server called dropped, so the attack costs a
round's worth of one site's update, at most once per round, and is on record at every
survivor. Each site's own DP-SGD (clipping and noise added before masking) bounds what
even that reveals. The sites' TLS links keep third parties out; the consortium CA (kept
offline) is trusted to issue site certificates only to sites.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.pki import IdentityError, site_identity

DOMAIN = b"fedrad-masking-v1"
SIGNED_INT_LIMIT = 2**31  # |sum of quantised values| must stay below it


class MaskingError(ValueError):
    """A roster, set or request a site must not mask for (the reason says why)."""


class RangeError(ValueError):
    """An update that does not fit the quantisation range (it is never clipped)."""


@dataclass(frozen=True)
class Advert:
    """One site's key-agreement public key for a run, bound to its consortium identity."""

    node_id: int
    public_key: bytes  # X25519, 32 raw bytes
    certificate: bytes  # the site identity certificate (PEM), issued by the consortium CA
    signature: bytes  # ECDSA (SHA-384) by the certificate's key over `statement`

    def statement(self, run_id: int) -> bytes:
        return json.dumps(["advert", DOMAIN.decode(), run_id, self.node_id,
                           self.public_key.hex()]).encode()


def make_advert(run_id: int, node_id: int, private: X25519PrivateKey, certificate: bytes,
                node_key: ec.EllipticCurvePrivateKey) -> Advert:
    """This site's advert: its run key's public half, signed with its node key."""
    public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    unsigned = Advert(node_id, public, certificate, b"")
    signature = node_key.sign(unsigned.statement(run_id), ec.ECDSA(hashes.SHA384()))
    return Advert(node_id, public, certificate, signature)


def verify_advert(advert: Advert, run_id: int, ca_pem: bytes) -> str:
    """The site name an advert is bound to; MaskingError if the CA did not issue its
    certificate to a site or its key did not sign this (run, node, public key)."""
    try:
        site, public = site_identity(advert.certificate, ca_pem)
        public.verify(advert.signature, advert.statement(run_id), ec.ECDSA(hashes.SHA384()))
    except IdentityError as exc:
        raise MaskingError(f"node {advert.node_id}: certificate refused: {exc}") from exc
    except InvalidSignature as exc:
        raise MaskingError(f"node {advert.node_id}: its key advert is not signed by the "
                           "certified site key (a substituted key)") from exc
    if len(advert.public_key) != 32:
        raise MaskingError(f"node {advert.node_id}: key-agreement key is not 32 bytes")
    return site


def verify_roster(roster: Mapping[int, Advert], run_id: int, ca_pem: bytes, *,
                  own_node: int, own_public: bytes) -> dict[int, str]:
    """Node id → site name for a roster every peer can trust: each advert verifies, no
    site appears twice, and this site's own entry is its own key."""
    names: dict[int, str] = {}
    for node, advert in roster.items():
        if advert.node_id != node:
            raise MaskingError(f"roster entry {node} holds node {advert.node_id}'s advert")
        names[node] = verify_advert(advert, run_id, ca_pem)
    if len(set(names.values())) != len(names):
        raise MaskingError("one site appears under two node ids in the roster")
    mine = roster.get(own_node)
    if mine is None or mine.public_key != own_public:
        raise MaskingError("the roster does not hold this site's own key")
    return names


def participants_digest(roster: Mapping[int, Advert], participants: Iterable[int]) -> bytes:
    """What binds a round's masks to its set: its node ids and their keys."""
    chosen = sorted(participants)
    return hashlib.sha256(json.dumps(
        [[n, roster[n].public_key.hex()] for n in chosen]).encode()).digest()


def pair_secret(own: X25519PrivateKey, peer_public: bytes, run_id: int) -> bytes:
    """The secret two sites share for a run (the same at both ends)."""
    mine = own.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    low, high = sorted([mine, peer_public])
    info = DOMAIN + b"|pair|" + run_id.to_bytes(8, "big") + low + high
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(shared)


def round_key(pair: bytes, server_round: int, attempt: int, digest: bytes) -> bytes:
    """The pairwise key of one (round, attempt, set): never the same twice."""
    info = (DOMAIN + b"|round|" + server_round.to_bytes(8, "big") + attempt.to_bytes(4, "big")
            + digest)
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(pair)


def mask_stream(key: bytes, length: int) -> np.ndarray:
    """`length` uint32 words of ChaCha20 keystream under `key`."""
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * length)), dtype="<u4")


def apply_masks(vector: np.ndarray, *, own_node: int, own: X25519PrivateKey,
                roster: Mapping[int, Advert], participants: Iterable[int], run_id: int,
                server_round: int, attempt: int) -> np.ndarray:
    """`vector` (uint32) plus this site's pairwise masks with every other participant."""
    chosen = sorted(set(participants))
    digest = participants_digest(roster, chosen)
    out = np.array(vector, dtype=np.uint32, copy=True)
    for peer in chosen:
        if peer == own_node:
            continue
        key = round_key(pair_secret(own, roster[peer].public_key, run_id), server_round,
                        attempt, digest)
        stream = mask_stream(key, out.size)
        if own_node < peer:
            np.add(out, stream, out=out)
        else:
            np.subtract(out, stream, out=out)
    return out


def check_set_size(sites: int, quantization_range: int, max_weight: float) -> None:
    """Refuse a set whose sums (values, weights) could overflow their range."""
    if sites * quantization_range >= SIGNED_INT_LIMIT:
        raise MaskingError(f"{sites} sites x secagg-quantization-range {quantization_range} "
                           f"reaches 2^31; lower secagg-quantization-range")
    if sites * max_weight >= 2 * SIGNED_INT_LIMIT:
        raise MaskingError(f"{sites} sites x secagg-max-weight {max_weight:g} reaches 2^32")


def quantise(update: np.ndarray, weight: int, *, clipping_range: float,
             quantization_range: int, max_weight: float) -> np.ndarray:
    """[weight, round(update · weight/max_weight / C · Q)...] as uint32 (two's complement);
    RangeError when the weight or a value is out of range."""
    if isinstance(weight, bool) or int(weight) != weight or not 0 <= weight <= max_weight:
        raise RangeError(f"weight {weight} must be an integer in [0, secagg-max-weight "
                         f"{max_weight:g}]; raise secagg-max-weight in the run config")
    scaled = np.asarray(update, dtype=np.float64).ravel() * (weight / max_weight)
    peak = float(np.max(np.abs(scaled))) if scaled.size else 0.0
    if not peak <= clipping_range:
        raise RangeError(f"weighted update peak {peak:.3g} exceeds secagg-clipping-range "
                         f"{clipping_range:g}; raise it or lower the learning rate")
    q = np.rint(scaled / clipping_range * quantization_range).astype(np.int64)
    vector = np.concatenate([np.array([int(weight)], dtype=np.int64), q])
    return (vector & 0xFFFFFFFF).astype(np.uint32)  # two's complement, mod 2^32


def dequantise(total: np.ndarray, *, clipping_range: float, quantization_range: int,
               max_weight: float) -> tuple[np.ndarray, int]:
    """The weighted mean update (float32) and the total weight, from the mod-2^32 sum."""
    weight = int(total[0])
    if weight <= 0:
        raise RangeError("the aggregate weight is 0: no site contributed examples")
    signed = np.asarray(total[1:], dtype=np.uint32).view(np.int32).astype(np.float64)
    mean = signed * (clipping_range / quantization_range) * (max_weight / weight)
    return mean.astype(np.float32), weight


def roster_fields(roster: Mapping[int, Advert]) -> dict[str, list[int] | list[bytes]]:
    """A roster as the lists a Flower ConfigRecord holds (node order)."""
    nodes = sorted(roster)
    return {"roster-nodes": nodes,
            "roster-keys": [roster[n].public_key for n in nodes],
            "roster-certificates": [roster[n].certificate for n in nodes],
            "roster-signatures": [roster[n].signature for n in nodes]}


def roster_from_fields(values: Mapping[str, object]) -> dict[int, Advert]:
    """The inverse of `roster_fields`; MaskingError on anything else."""
    try:
        nodes, publics, certs, signatures = (list(values[k]) for k in (  # type: ignore[call-overload]
            "roster-nodes", "roster-keys", "roster-certificates", "roster-signatures"))
    except (KeyError, TypeError) as exc:
        raise MaskingError("the request holds no roster") from exc
    if not len(nodes) == len(publics) == len(certs) == len(signatures):
        raise MaskingError("roster lists of different lengths")
    if len(set(nodes)) != len(nodes):
        raise MaskingError("a node appears twice in the roster")
    roster = {}
    for node, public, cert, signature in zip(nodes, publics, certs, signatures, strict=True):
        if isinstance(node, bool) or not isinstance(node, int) or not all(
                isinstance(v, bytes) for v in (public, cert, signature)):
            raise MaskingError("roster entries must be a node id and three byte strings")
        roster[node] = Advert(node, public, cert, signature)
    return roster
