"""The site's privacy ledger: every DP training session, per patient, across rounds and runs.

The budget covers the people, whatever the preprocessing. Each session is recorded with
its cohort: the site-local patient keys (one-way hashes, client.dicom_scan.patient_key)
of the training set and each patient's number of training images k. Changing the image
size, the windowing, the labels or the task, or adding a file, starts no fresh budget:
a patient's ε is the composition of every session whose cohort held them.

A cohort maps each patient to the records of them a session could sample, k. fedrad's
DP-SGD samples and clips whole patients (client.patient_sampling), so its sessions record
k = 1 and the accounting is Opacus' record-level RDP exactly. A session that sampled
images would record a patient's k images: the ledger then applies the subsampled-
Gaussian group bound (a step reaches the patient with probability q_k = 1 - (1 - q)^k
and moves the clipped sum by at most k·C, dominated by the subsampled Gaussian of rate
q_k and noise multiplier σ/k). The site's spend is the largest ε of any patient.

RDP composes additively and is linear in the steps of a (σ, q) pair: sessions are summed
per pair and each pair's one-step RDP is cached, so the cost does not grow with history.
δ is the site's (fixed at its first session). `reserve` checks and records a session in
one step under an exclusive file lock, before training starts: two ClientApps of one site
cannot both pass the check (a session that then fails stays counted: fail closed).
Writes are atomic (temp file, fsync, rename), so a kill -9 mid-write leaves the previous
ledger intact. A version-1 ledger (per dataset, no patients) is read with every one of
its sessions charged to every patient.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

LEDGER_VERSION = 2
EVERYONE = "*"  # the cohort of a version-1 session: charged to every patient, k = 1


class BudgetExceeded(RuntimeError):
    """The next session would spend more ε than the site allows."""


class RunCapExceeded(BudgetExceeded):
    """The next session would bring this run's ε over the site's per-run cap."""


@dataclass(frozen=True)
class Session:
    """One DP training session (record-level: Opacus' σ, q and steps).

    `floor_noise_multiplier`: in distributed DP (client.distributed_dp), σ of this site's
    own noise share alone; `noise_multiplier` is then the σ of the secure sum, which holds
    while the other sites of the sum add their shares. None: local DP, the same σ."""

    run_id: int
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    floor_noise_multiplier: float | None = None

    def sigma(self, *, floor: bool = False) -> float:
        if floor and self.floor_noise_multiplier is not None:
            return self.floor_noise_multiplier
        return self.noise_multiplier


Cohort = Mapping[str, int]  # patient key -> training images of that patient
ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


def cohort_id(cohort: Cohort) -> str:
    return hashlib.sha256(json.dumps(sorted(cohort.items())).encode()).hexdigest()[:32]


def group_rate(sample_rate: float, k: int) -> float:
    """Probability that a step samples at least one of a patient's k images."""
    return 1.0 - (1.0 - sample_rate) ** k


@functools.lru_cache(maxsize=1024)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus' RDP of one step of the subsampled Gaussian, at every order (read-only)."""
    rdp = np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                              steps=1, orders=list(ORDERS)), dtype=np.float64)
    rdp.setflags(write=False)
    return rdp


def _epsilon(steps: Counter[tuple[float, float]], delta: float) -> float:
    if not steps:
        return 0.0
    rdp = sum(_rdp_of_one_step(sigma, q) * n for (sigma, q), n in steps.items())
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def epsilon_of(sessions: Iterable[Session], delta: float, k: int = 1, *,
               floor: bool = False) -> float:
    """ε of the composition of `sessions` at `delta` for a group of k records (k = 1:
    Opacus' RDP accountant's result); `floor`: of each site's own noise share alone."""
    steps: Counter[tuple[float, float]] = Counter()
    for s in sessions:
        steps[(s.sigma(floor=floor) / k, group_rate(s.sample_rate, k))] += s.steps
    return _epsilon(steps, delta)


class PrivacyLedger:
    """Sessions and their cohorts, persisted in `path` (one file per site)."""

    def __init__(self, path: Path, *, budget: float, delta: float) -> None:
        if not budget > 0:
            raise ValueError(f"privacy budget must be > 0, got {budget}")
        self.path = path
        self.budget = budget
        self._delta = delta
        self._load(self._read())

    # ------------------------------------------------------------ file
    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": LEDGER_VERSION, "delta": None, "cohorts": {}, "sessions": []}
        data = json.loads(self.path.read_text())
        if data.get("version") == 1:
            return _from_version_1(data)
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(f"{self.path}: unknown ledger version {data.get('version')!r}")
        return data

    def _load(self, data: dict[str, Any]) -> None:
        self.delta = float(data["delta"]) if data["delta"] is not None else self._delta
        self.cohorts: dict[str, dict[str, int]] = data["cohorts"]
        self.entries: list[tuple[Session, str]] = [
            (Session(**{k: v for k, v in s.items() if k != "cohort"}), s["cohort"])
            for s in data["sessions"]]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(f".{self.path.name}.lock"),
                     os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._load(self._read())  # what other processes recorded before we got the lock
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------ accounting
    @property
    def sessions(self) -> list[Session]:
        return [session for session, _ in self.entries]

    def _per_patient(self, cohort: Cohort, planned: Session | None,
                     run_id: int | None, floor: bool = False) -> float:
        """The largest ε of any patient of `cohort` over the history (plus `planned`,
        a session on `cohort`); `floor`: counting only this site's own noise."""
        planned_id = cohort_id(cohort)
        cohorts = {**self.cohorts, planned_id: dict(cohort)}
        history = [*self.entries, *([(planned, planned_id)] if planned is not None else [])]
        worst, seen = 0.0, set()
        for patient in cohort:
            steps: Counter[tuple[float, float]] = Counter()
            for session, cid in history:
                if run_id is not None and session.run_id != run_id:
                    continue
                k = 1 if cid == EVERYONE else cohorts.get(cid, {}).get(patient, 0)
                if k:
                    steps[(session.sigma(floor=floor) / k,
                           group_rate(session.sample_rate, k))] += session.steps
            signature = frozenset(steps.items())
            if signature not in seen:
                seen.add(signature)
                worst = max(worst, _epsilon(steps, self.delta))
        return worst

    def epsilon(self, cohort: Cohort, run_id: int | None = None) -> float:
        """ε spent so far by the most exposed patient of `cohort` (in one run, or all):
        what the budget is charged."""
        return self._per_patient(cohort, None, run_id)

    def floor_epsilon(self, cohort: Cohort, run_id: int | None = None) -> float:
        """ε of the same patient counting only the noise this site added itself: the
        guarantee of distributed-DP sessions if every other site of their sums colluded
        (equal to `epsilon` for a ledger of local-DP sessions)."""
        return self._per_patient(cohort, None, run_id, floor=True)

    def projected(self, planned: Session, cohort: Cohort, run_id: int | None = None) -> float:
        """ε of the most exposed patient of `cohort` once `planned` has run."""
        return self._per_patient(cohort, planned, run_id)

    def run_noise_multiplier(self, run_id: int) -> float | None:
        """σ this run already used here (σ is fixed once per run)."""
        for session in self.sessions:
            if session.run_id == run_id:
                return session.noise_multiplier
        return None

    def check(self, planned: Session, cohort: Cohort) -> float:
        """ε after `planned`; raise BudgetExceeded if that is over the budget."""
        projected = self.projected(planned, cohort)
        if projected > self.budget:
            raise BudgetExceeded(
                f"training would bring the most exposed patient's ε to {projected:.3f}, over "
                f"this site's budget {self.budget:.3f} (spent {self.epsilon(cohort):.3f})")
        return projected

    def reserve(self, planned: Session, cohort: Cohort, *,
                run_cap: float = float("inf")) -> float:
        """Check `planned` against the run's cap and the budget and record it, atomically
        across processes; return the new ε of the most exposed patient. Raises
        RunCapExceeded or BudgetExceeded."""
        with self._locked():
            in_run = self.projected(planned, cohort, planned.run_id)
            if in_run > run_cap:
                raise RunCapExceeded(f"the run's ε would reach {in_run:.3f}, over this "
                                     f"site's max-epsilon-per-run {run_cap:.3f}")
            spent = self.check(planned, cohort)
            cid = cohort_id(cohort)
            self.cohorts[cid] = dict(cohort)
            self.entries.append((planned, cid))
            self._write()
        return spent

    def _write(self) -> None:
        data = {"version": LEDGER_VERSION, "delta": self.delta, "cohorts": self.cohorts,
                "sessions": [{**asdict(s), "cohort": cid} for s, cid in self.entries]}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A per-dataset ledger: every session it holds is charged to every patient."""
    sessions, deltas = [], []
    for entry in data.get("datasets", {}).values():
        deltas.append(float(entry["delta"]))
        sessions += [{**s, "cohort": EVERYONE} for s in entry["sessions"]]
    return {"version": LEDGER_VERSION, "delta": min(deltas) if deltas else None,
            "cohorts": {}, "sessions": sessions}
