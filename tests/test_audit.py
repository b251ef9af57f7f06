"""The audit log detects every kind of tampering, and `fedrad audit verify` says so."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from common.audit import AuditError, AuditLog, digest, verify
from fedrad.cli import app


def _log(tmp_path, n=4) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("run-started", run_id=7)
    for rnd in range(1, n):
        log.append("round-sent", run_id=7, round=rnd, bytes=1000 + rnd,
                   sha256=digest(str(rnd).encode()))
    return log


def test_a_clean_log_verifies_and_is_private(tmp_path) -> None:
    log = _log(tmp_path)
    head = verify(log.path)
    assert head.entries == 4 and len(head.last_hash) == 64
    assert oct(log.path.stat().st_mode & 0o777) == "0o600"
    assert verify(log.path, expected=head) == head
    with pytest.raises(ValueError, match="may not be named"):
        log.append("x", hash="forged")


def _lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines()


def _write(log: AuditLog, lines: list[bytes]) -> None:
    log.path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("tamper, match", [
    ("edit", "line 3: entry was edited"),
    ("delete", "line 2: chain broken"),
    ("reorder", "line 2: chain broken"),
    ("insert", "line 3: chain broken"),
    ("garbage", "line 4: not a JSON entry"),
])
def test_tampering_is_detected(tmp_path, tamper, match) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    if tamper == "edit":
        entry = json.loads(lines[2])
        entry["bytes"] = 1
        lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    elif tamper == "delete":
        del lines[1]
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "insert":
        lines.insert(1, lines[1])
    else:
        lines[3] = b"{not json"
    _write(log, lines)
    with pytest.raises(AuditError, match=match):
        verify(log.path)


def test_a_cut_tail_is_detected_against_the_recorded_head(tmp_path) -> None:
    log = _log(tmp_path)
    head = verify(log.path)
    _write(log, _lines(log)[:-1])
    assert verify(log.path).entries == 3  # a shorter chain is still a chain...
    with pytest.raises(AuditError, match="cut off the end"):
        verify(log.path, expected=head)  # ...but not the one recorded elsewhere


def test_cli_audit_verify(tmp_path) -> None:
    log = _log(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "verify", str(log.path)])
    assert ok.exit_code == 0 and "4 entries" in ok.output
    lines = _lines(log)
    del lines[2]
    _write(log, lines)
    bad = runner.invoke(app, ["audit", "verify", str(log.path)])
    assert bad.exit_code == 1 and "chain broken" in bad.output


def test_appends_notice_a_log_altered_behind_their_back(tmp_path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    del lines[1]
    _write(log, lines)  # another hand edits the file between two appends
    with pytest.raises(AuditError, match="chain broken"):
        log.append("round-sent", run_id=7, round=9)
