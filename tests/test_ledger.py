from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from client import ledger as ledger_module
from client.ledger import BudgetExceeded, PrivacyLedger, Session, epsilon_of

DELTA = 1e-5


def test_ledger_epsilon_equals_opacus_accountant() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.1, max_grad_norm=1.0,
    )
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    sessions = [Session(1, 1, s, q, n) for s, q, n in engine.accountant.history]
    assert epsilon_of(sessions, DELTA) == pytest.approx(engine.get_epsilon(DELTA), rel=1e-9)
    assert epsilon_of(sessions, DELTA) > 0


def test_a_long_mixed_history_equals_opacus_and_costs_one_rdp_per_sigma_and_q() -> None:
    """Sessions of the same (σ, q) are summed before the RDP: the result is Opacus'
    accountant's over the whole history, and a history of 60 sessions of 3 runs needs 3
    RDP computations, not 60 (nor 180 for the check/record/report of a round)."""
    runs = [(1.1, 1 / 3), (0.8, 0.25), (1.1, 0.125)]
    sessions = [Session(run, r, sigma, q, 3 + r % 4)
                for run, (sigma, q) in enumerate(runs, start=1) for r in range(1, 21)]
    accountant = RDPAccountant()
    accountant.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in sessions]
    expected = accountant.get_epsilon(delta=DELTA)
    ledger_module._rdp_of_one_step.cache_clear()
    assert epsilon_of(sessions, DELTA) == pytest.approx(expected, rel=1e-12)
    assert epsilon_of(sessions[:-1], DELTA) < expected  # one step fewer spends less
    assert ledger_module._rdp_of_one_step.cache_info().misses == len(runs)
    for end in range(1, len(sessions)):
        epsilon_of(sessions[:end], DELTA)
    assert ledger_module._rdp_of_one_step.cache_info().misses == len(runs)


COHORT = {"p1": 1, "p2": 1}


def test_composition_and_refusal_survive_a_restart(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    session = Session(run_id=1, server_round=1, noise_multiplier=1.0, sample_rate=0.1, steps=50)
    ledger = PrivacyLedger(path, budget=10.0, delta=DELTA)
    one = ledger.reserve(session, COHORT)
    two = ledger.reserve(Session(2, 1, 1.0, 0.1, 50), COHORT)  # a second run, same patients
    assert two > one > 0
    assert two == pytest.approx(epsilon_of([session, Session(2, 1, 1.0, 0.1, 50)], DELTA))
    reopened = PrivacyLedger(path, budget=10.0, delta=0.5)  # the site's stored δ wins
    assert reopened.delta == DELTA and reopened.epsilon(COHORT) == pytest.approx(two)
    big = Session(3, 1, 0.5, 0.5, 400)
    with pytest.raises(BudgetExceeded, match="over this site's budget 10.000"):
        reopened.check(big, COHORT)
    assert reopened.epsilon({"p3": 1}) == 0.0  # a new patient has spent nothing


def test_the_budget_covers_the_patients_whatever_the_preprocessing(tmp_path) -> None:
    """Another image size, window, task or one more file made a fresh budget when the
    ledger was keyed by the tensors' hash. Keyed by patients, the same patients (plus a
    new one) carry their spend into the next dataset."""
    one = epsilon_of([Session(1, 1, 1.0, 0.1, 200)], DELTA)
    ledger = PrivacyLedger(tmp_path / "ledger.json", budget=1.1 * one, delta=DELTA)
    spent = ledger.reserve(Session(1, 1, 1.0, 0.1, 200), COHORT)
    assert spent == pytest.approx(one)
    grown = {**COHORT, "p3": 1}  # one file added, say, and a new image size
    with pytest.raises(BudgetExceeded):
        ledger.reserve(Session(2, 1, 1.0, 0.1, 200), grown)
    assert ledger.epsilon(grown) == pytest.approx(spent)


def test_a_patient_with_k_images_is_accounted_as_a_group_of_k(tmp_path) -> None:
    """k images: the step reaches the patient with probability 1-(1-q)^k and moves the sum
    by up to k·C, so their ε is that of rate 1-(1-q)^k and multiplier σ/k; k = 1 is
    Opacus' accountant."""
    ledger = PrivacyLedger(tmp_path / "ledger.json", budget=1e9, delta=DELTA)
    session = Session(1, 1, 2.0, 0.1, 100)
    ledger.reserve(session, {"single": 1, "triple": 3})
    single = ledger.epsilon({"single": 1})
    triple = ledger.epsilon({"triple": 3})
    accountant = RDPAccountant()
    accountant.history = [(2.0 / 3, 1 - 0.9 ** 3, 100)]
    assert triple == pytest.approx(accountant.get_epsilon(delta=DELTA), rel=1e-9)
    assert single == pytest.approx(epsilon_of([session], DELTA), rel=1e-12)
    assert triple > 3 * single  # far more than one image's ε
    assert ledger.epsilon({"single": 1, "triple": 3}) == pytest.approx(triple)


def test_a_version_1_ledger_is_charged_to_every_patient(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    old = {"version": 1, "datasets": {"hash-a": {"delta": DELTA, "sessions": [
        {"run_id": 1, "server_round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1,
         "steps": 50}]}}}
    path.write_text(json.dumps(old))
    ledger = PrivacyLedger(path, budget=10.0, delta=1e-6)
    assert ledger.delta == DELTA
    expected = epsilon_of([Session(1, 1, 1.0, 0.1, 50)], DELTA)
    assert ledger.epsilon({"anyone": 2}) == pytest.approx(expected)


RACER = """
import sys
from pathlib import Path
from client.ledger import BudgetExceeded, PrivacyLedger, Session
ledger = PrivacyLedger(Path(sys.argv[1]), budget=float(sys.argv[2]), delta=1e-5)
print("ready", flush=True)
sys.stdin.readline()  # both loaded the ledger before either records
try:
    ledger.reserve(Session(int(sys.argv[3]), 1, 1.0, 0.1, 200), {"p1": 1})
    print("trained", flush=True)
except BudgetExceeded:
    print("refused", flush=True)
"""


def test_two_concurrent_clientapps_cannot_both_pass_the_budget_check(tmp_path) -> None:
    """Check-then-record let two processes that both loaded the ledger both train. The
    reservation re-reads the ledger under an exclusive lock: one trains, one is refused."""
    path = tmp_path / "ledger.json"
    one = epsilon_of([Session(1, 1, 1.0, 0.1, 200)], DELTA)
    budget = str(1.1 * one)  # room for one session, not two
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(path), budget, str(run)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=os.getcwd())
              for run in (1, 2)]
    for racer in racers:
        assert racer.stdout is not None and racer.stdout.readline().strip() == b"ready"
    for racer in racers:
        assert racer.stdin is not None
        racer.stdin.write(b"go\n")
        racer.stdin.flush()
    outcomes = sorted(racer.communicate(timeout=60)[0].decode().strip() for racer in racers)
    assert outcomes == ["refused", "trained"]
    assert len(json.loads(path.read_text())["sessions"]) == 1


WRITER = """
import sys
from pathlib import Path
from client.ledger import PrivacyLedger, Session
ledger = PrivacyLedger(Path(sys.argv[1]), budget=1e9, delta=1e-5)
print("ready", flush=True)
i = 0
while True:
    i += 1
    ledger.reserve(Session(i, 1, 1.0, 0.01, 1), {"p": 1})
"""


def test_kill_9_mid_write_loses_nothing(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                               cwd=os.getcwd())
    assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    data = json.loads(path.read_text())  # never a half-written file
    runs = [s["run_id"] for s in data["sessions"]]
    assert len(runs) > 1 and runs == list(range(1, len(runs) + 1))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
