"""The run report and the dashboard in headless Chromium: they load without console
errors, every image is present, and they show the run's real numbers."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from fedrad import processes as proc
from tests.browser import ARTIFACTS, load
from tests.inprocess import InProcessGrid, real_site, run_server, signing_keys

FEDRAD = [sys.executable, "-m", "fedrad.cli"]
CONFIG = {"task": "cxr-classify", "model": "densenet121", "labels": "label_nodule",
          "image-size": 32, "num-rounds": 2, "min-sites": 3, "min-train-sites": 2,
          "local-epochs": 1, "batch-size": 4, "dp-enabled": True, "dp-target-epsilon": 8.0,
          "secagg-enabled": False, "augment": False, "cross-site-validation": True}
HOSPITALS = {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}


@pytest.fixture(scope="module")
def consortium(tmp_path_factory, phantom_sites):
    """A consortium folder whose server home holds one finished DP run of 3 sites."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    folder = tmp_path_factory.mktemp("pages") / "consortium"
    folder.mkdir()
    private, public = signing_keys(folder)
    home = folder / "server"
    home.mkdir()
    (home / "nodes.json").write_text(json.dumps(
        {f"site-{n}": {"node_id": n, "status": "registered"} for n in HOSPITALS}))
    sites = {n: real_site(n, f"site-{n}", phantom_sites[h], folder.parent / f"s{n}", public,
                          CONFIG, run_id=7, policy={"require-secure-aggregation": False,
                                                    "allow-cross-site": True,
                                                    "share-train-loss": True})
             for n, h in HOSPITALS.items()}
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_server(InProcessGrid(sites), CONFIG, home, private, monkeypatch, run_id=7)
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
    return folder


def test_the_report_loads_with_every_image_and_no_console_error(consortium, phantom_sites,
                                                                tmp_path) -> None:
    out = tmp_path / "report.html"
    made = subprocess.run([*FEDRAD, "report", "7", "--consortium", str(consortium), "--data",
                           str(phantom_sites["hospital-a"]), "--data",
                           str(phantom_sites["hospital-c"]), "--out", str(out)],
                          capture_output=True, text=True, check=False, env=proc.child_env({}))
    assert made.returncode == 0, made.stderr
    page = load(out.as_uri(), "report.png")
    assert page.errors == []
    alts = [alt for alt, _, _ in page.images]
    assert all(complete and width > 0 for _, complete, width in page.images), page.images
    for chart in ("per site per round", "training loss", "participation", "privacy spent",
                  "ROC curves", "reliability plot"):
        assert any(chart in alt for alt in alts), (chart, alts)
    gradcams = [alt for alt in alts if alt.startswith("Grad-CAM")]
    assert any("label_nodule = 1" in a for a in gradcams)
    assert any("label_nodule = 0" in a for a in gradcams)
    epsilon = json.loads((consortium / "server" / "runs" / "7" / "epsilon.json").read_text())
    assert f"{epsilon['site-1']:.3f}" in page.text  # the ledger's own number is shown
    assert "24 images" in page.text  # 12 per hospital, both folders read
    html = out.read_text()
    assert "ZZCANARY" not in html and "CANARY-" not in html
    assert "http-equiv='Content-Security-Policy' content=\"default-src 'none'" in html
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
    assert "Cross-site validation" in page.text


def test_cross_site_validation_evaluates_every_local_model_at_every_site(consortium) -> None:
    run = consortium / "server" / "runs" / "7"
    table = json.loads((run / "cross-site.json").read_text())
    sites = {f"site-{n}" for n in HOSPITALS}
    assert set(table) == {"global"} | {f"local:{s}" for s in sites}
    assert all(set(row) == sites for row in table.values())
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    for site in sites:  # the global row is the last round's evaluation, number for number
        evaluated = last["sites"][site]["evaluation"]
        assert {k: v for k, v in table["global"][site].items() if not k.endswith("-seconds")} == \
            {k: v for k, v in evaluated.items() if not k.endswith("-seconds")}
        assert table["global"][site]["num-examples"] == 4.0  # the held-out patients' images
    assert any(table[f"local:{s}"][t]["eval-loss"] != table["global"][t]["eval-loss"]
               for s in sites for t in sites)  # local models are not the global one


def test_the_dashboard_shows_runs_sites_and_privacy_read_only(consortium, tmp_path) -> None:
    port = proc.free_port()
    with proc.ProcessGroup() as group:
        group.start("dashboard", [*FEDRAD, "server", "dashboard", "--consortium",
                                  str(consortium), "--port", str(port)],
                    log=tmp_path / "dashboard.log", cwd=tmp_path, env={})
        proc.wait_for_port(port, 60)
        index = load(f"http://127.0.0.1:{port}/", "dashboard.png")
        run = load(f"http://127.0.0.1:{port}/runs/7", "dashboard-run.png")
        missing = load(f"http://127.0.0.1:{port}/runs/999", "dashboard-404.png")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/runs/7", data=b"x",
                                         method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        rebound = urllib.request.Request(f"http://127.0.0.1:{port}/",
                                         headers={"Host": f"attacker.example:{port}"})
        with pytest.raises(urllib.error.HTTPError) as misdirected:  # DNS rebinding
            urllib.request.urlopen(rebound, timeout=10)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            headers = response.headers
    assert refused.value.code == 405
    assert misdirected.value.code == 421
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert index.errors == [] and run.errors == []
    assert index.status == 200 and run.status == 200 and missing.status == 404
    for site in ("site-1", "site-2", "site-3"):
        assert site in index.text
    assert "SuperLink does not answer" in index.text  # no SuperLink in this test: said so
    epsilon = json.loads((consortium / "server" / "runs" / "7" / "epsilon.json").read_text())
    assert f"{max(epsilon.values()):.3f}" in index.text
    assert "completed" in index.text and "2/2" in index.text
    assert len(run.images) >= 4
    assert all(complete and width > 0 for _, complete, width in run.images), run.images
    rows = [json.loads(x) for x in
            (consortium / "server" / "runs" / "7" / "metrics.jsonl").read_text().splitlines()]
    assert f"{rows[-1]['pooled_score']:.3f}" in run.text
