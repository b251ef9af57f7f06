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


def test_composition_and_refusal_survive_a_restart(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    session = Session(run_id=1, server_round=1, noise_multiplier=1.0, sample_rate=0.1, steps=50)
    ledger = PrivacyLedger(path, "dataset-1", budget=6.0, delta=DELTA)
    one = ledger.record(session)
    two = ledger.record(Session(2, 1, 1.0, 0.1, 50))  # a second run on the same data
    assert two > one > 0
    assert two == pytest.approx(epsilon_of([session, Session(2, 1, 1.0, 0.1, 50)], DELTA))
    reopened = PrivacyLedger(path, "dataset-1", budget=6.0, delta=0.5)  # stored δ wins
    assert reopened.delta == DELTA and reopened.epsilon == pytest.approx(two)
    big = Session(3, 1, 0.5, 0.5, 400)
    with pytest.raises(BudgetExceeded, match="over this site's budget 6.000"):
        reopened.check(big)
    with pytest.raises(BudgetExceeded):
        PrivacyLedger(path, "dataset-1", budget=6.0, delta=DELTA).check(big)
    other = PrivacyLedger(path, "dataset-2", budget=6.0, delta=DELTA)
    assert other.epsilon == 0.0  # budgets are per dataset


WRITER = """
import sys
from pathlib import Path
from client.ledger import PrivacyLedger, Session
ledger = PrivacyLedger(Path(sys.argv[1]), "d", budget=1e9, delta=1e-5)
print("ready", flush=True)
i = 0
while True:
    i += 1
    ledger.record(Session(i, 1, 1.0, 0.01, 1))
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
    runs = [s["run_id"] for s in data["datasets"]["d"]["sessions"]]
    assert len(runs) > 1 and runs == list(range(1, len(runs) + 1))
