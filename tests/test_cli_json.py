"""--json on the commands that report: one JSON object on stdout (human text, if any, on
stderr), with the fields a script needs."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from common.audit import AuditLog
from fedrad.cli import app


def _json(*args: str) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # fails on any extra line


def test_consortium_commands_report_json(tmp_path: Path) -> None:
    folder = tmp_path / "consortium"
    made = _json("consortium", "init", "lungs", "--folder", str(folder))
    assert made == {"consortium": "lungs", "folder": str(folder.resolve())}
    kit = _json("consortium", "add-site", "hospital-a", "--folder", str(folder))
    assert kit["site"] == "hospital-a" and Path(kit["kit"]).is_file()
    again = _json("consortium", "reissue-kit", "hospital-a", "--folder", str(folder))
    assert again["reissued"] is True and Path(again["kit"]).is_file()
    copy = _json("consortium", "export-server", "--out", str(tmp_path / "server"),
                 "--folder", str(folder))
    assert copy["files"] == sum(1 for p in (tmp_path / "server").rglob("*") if p.is_file())
    revoked = _json("consortium", "remove-site", "hospital-a", "--folder", str(folder))
    assert revoked["revoked"] is True and "hospital-a" in Path(revoked["listing"]).read_text()


def test_audit_verify_reports_json_intact_and_altered(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    for n in range(3):
        log.append("round-completed", round=n)
    intact = _json("audit", "verify", str(log.path))
    assert intact["entries"] == 3 and intact["intact"] is True and len(intact["last_hash"]) == 64
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    altered = CliRunner().invoke(app, ["audit", "verify", str(log.path), "--json"])
    assert altered.exit_code == 1
    report = json.loads(altered.stdout)
    assert report["intact"] is False and "line" in report["error"]
