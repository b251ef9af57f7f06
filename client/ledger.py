"""The site's privacy ledger: every DP training session, composed across rounds and runs.

One JSON file in the site's work folder holds, per dataset (content hash), the
sessions trained on it: (noise multiplier, sample rate, steps). The total ε is
Opacus' RDP accountant over that whole history. RDP composes additively and is linear in
the steps of a (σ, q) pair, so sessions of the same σ and q are summed first and each
pair's one-step RDP is computed once per process: the ledger's cost no longer grows with
its history (it was three full passes over every past session per round). The
hospital's budget comes from its node config only; a session that would exceed it is
refused before it starts. Writes are atomic (temp file, fsync, rename), so a kill -9
mid-write leaves the previous ledger intact.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

LEDGER_VERSION = 1


class BudgetExceeded(RuntimeError):
    """The next session would spend more ε than the site allows."""


@dataclass(frozen=True)
class Session:
    """One DP training session on one dataset."""

    run_id: int
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=1024)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus' RDP of one step of the subsampled Gaussian, at every order (read-only)."""
    rdp = np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                              steps=1, orders=list(ORDERS)), dtype=np.float64)
    rdp.setflags(write=False)
    return rdp


def epsilon_of(sessions: list[Session], delta: float) -> float:
    """ε of the composition of `sessions` at `delta` (Opacus' RDP accountant's result)."""
    steps: Counter[tuple[float, float]] = Counter()
    for session in sessions:
        steps[(session.noise_multiplier, session.sample_rate)] += session.steps
    if not steps:
        return 0.0
    rdp = sum(_rdp_of_one_step(sigma, q) * n for (sigma, q), n in steps.items())
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


class PrivacyLedger:
    """Sessions per dataset, persisted in `path`."""

    def __init__(self, path: Path, dataset_hash: str, *, budget: float, delta: float) -> None:
        if not budget > 0:
            raise ValueError(f"privacy budget must be > 0, got {budget}")
        self.path = path
        self.dataset_hash = dataset_hash
        self.budget = budget
        data = self._read()
        entry = data["datasets"].get(dataset_hash)
        self.delta = float(entry["delta"]) if entry else delta
        self.sessions = [Session(**s) for s in entry["sessions"]] if entry else []

    def _read(self) -> dict:
        if not self.path.exists():
            return {"version": LEDGER_VERSION, "datasets": {}}
        data = json.loads(self.path.read_text())
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(f"{self.path}: unknown ledger version {data.get('version')!r}")
        return data

    @property
    def epsilon(self) -> float:
        """ε spent so far on this dataset."""
        return epsilon_of(self.sessions, self.delta)

    def run_noise_multiplier(self, run_id: int) -> float | None:
        """σ this run already used here (σ is fixed once per run)."""
        for session in self.sessions:
            if session.run_id == run_id:
                return session.noise_multiplier
        return None

    def check(self, planned: Session) -> float:
        """ε after `planned`; raise BudgetExceeded if that is over the budget."""
        projected = epsilon_of([*self.sessions, planned], self.delta)
        if projected > self.budget:
            raise BudgetExceeded(
                f"training would bring ε to {projected:.3f}, over this site's budget "
                f"{self.budget:.3f} (spent {self.epsilon:.3f})"
            )
        return projected

    def record(self, session: Session) -> float:
        """Append `session` durably; return the new total ε."""
        data = self._read()
        entry = data["datasets"].setdefault(
            self.dataset_hash, {"delta": self.delta, "sessions": []}
        )
        entry["sessions"].append(asdict(session))
        self._write(data)
        self.sessions.append(session)
        return self.epsilon

    def _write(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("w") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
