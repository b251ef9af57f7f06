"""The server's side of secure aggregation (protocol and threat model: common.masking).

The server relays keys and sums masked vectors; it never holds a key that unmasks one
site. `Roster` asks each site for its run key once (a query), and again only for a site
that has none in it (new, or asked to re-key). `masked_round` sends one training request
per site carrying the roster and the round's set, sums the masked replies mod 2^32 as
they arrive, and when some site does not answer asks the survivors once to re-mask among
themselves (`recover`), above `secagg-min-sites`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common import keys, masking
from common.config import SecAggConfig
from common.weights import numpy_views
from server.polling_grid import PollingGrid

LOG = logging.getLogger("fedrad.server")
CA_ENV = "FEDRAD_CONSORTIUM_CA"  # the server checks adverts too, to name a bad site early


@dataclass
class Roster:
    """The run's verified key adverts, by node id."""

    run_id: int
    adverts: dict[int, masking.Advert] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)

    def refresh(self, grid: PollingGrid, node_ids: Iterable[int], timeout: float
                ) -> dict[int, str]:
        """Ask the nodes without an advert for one; node id → why it has none."""
        missing = [n for n in node_ids if n not in self.adverts]
        if not missing:
            return {}
        content = RecordDict({keys.ROUND: ConfigRecord({keys.STAGE: keys.STAGE_ADVERTISE})})
        messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY,
                            group_id="keys") for n in missing]
        ca = _ca()
        problems = dict.fromkeys(missing, "no-key-advert")
        for reply in grid.stream(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in problems:
                continue
            if reply.has_error():
                problems[node] = f"error-{reply.error.code}"
                continue
            try:
                values = reply.content.config_records[keys.ADVERT]
                fields = [values[k] for k in ("public-key", "certificate", "signature")]
                if not all(isinstance(v, bytes) for v in fields):
                    raise TypeError("advert fields must be bytes")
                advert = masking.Advert(node, *fields)  # type: ignore[arg-type]
                name = (masking.verify_advert(advert, self.run_id, ca) if ca is not None
                        else str(reply.content.config_records[keys.SITE][keys.SITE_ID]))
            except (KeyError, TypeError, ValueError) as exc:
                LOG.warning("node %d: key advert refused: %s", node, exc)
                problems[node] = "rejected-key-advert"
                continue
            self.adverts[node], self.names[node] = advert, name
            del problems[node]
        if len(missing) > len(problems):
            LOG.info("secure aggregation: %d site key(s) for run %d (roster of %d)",
                     len(missing) - len(problems), self.run_id, len(self.adverts))
        return problems

    def forget(self, node: int) -> None:
        self.adverts.pop(node, None)
        self.names.pop(node, None)


def _ca() -> bytes | None:
    path = os.environ.get(CA_ENV)
    return Path(path).read_bytes() if path else None


def masking_fields(roster: Roster, participants: list[int], attempt: int
                   ) -> ConfigRecord:
    """The MASKING record of a request: the set's adverts, the set, the attempt."""
    chosen = {n: roster.adverts[n] for n in participants}
    return ConfigRecord({**masking.roster_fields(chosen), "participants": sorted(participants),
                         keys.ATTEMPT: attempt})


class MaskedSum:
    """The running mod-2^32 sum of the masked vectors of one attempt."""

    def __init__(self, length: int) -> None:
        self.total = np.zeros(length, dtype=np.uint32)
        self.nodes: list[int] = []

    def add(self, node: int, record: ArrayRecord | None) -> bool:
        """Fold a reply's masked vector in; False (nothing folded) if it is not one."""
        try:
            (vector,) = numpy_views(record) if record is not None else []
        except (ValueError, TypeError):
            return False
        if vector.dtype != np.dtype("<u4") or vector.shape != self.total.shape:
            return False
        np.add(self.total, vector, out=self.total)
        self.nodes.append(node)
        return True

    def mean(self, settings: SecAggConfig) -> list[np.ndarray]:
        mean, _ = masking.dequantise(self.total, clipping_range=settings.clipping_range,
                                     quantization_range=settings.quantization_range,
                                     max_weight=settings.max_weight)
        return [mean]


def recover(grid: PollingGrid, *, survivors: list[int], server_round: int,
            length: int, timeout: float, on_error: Callable[[int, Message], None]
            ) -> MaskedSum:
    """Ask the survivors to re-mask their cached update among themselves (attempt 1)."""
    content = RecordDict({
        keys.ROUND: ConfigRecord({keys.SERVER_ROUND: server_round,
                                  keys.STAGE: keys.STAGE_RECOVER}),
        keys.MASKING: ConfigRecord({"participants": sorted(survivors), keys.ATTEMPT: 1}),
    })
    messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY,
                        group_id=f"{server_round}-recover") for n in survivors]
    total = MaskedSum(length)
    for reply in grid.stream(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if node not in survivors:
            continue
        if reply.has_error():
            on_error(node, reply)
        elif not total.add(node, reply.content.array_records.get(keys.MASKED)):
            LOG.warning("round %d: node %d sent no masked vector in recovery", server_round,
                        node)
    LOG.warning("round %d: recovery re-masked by %d of %d survivors", server_round,
                len(total.nodes), len(survivors))
    return total
