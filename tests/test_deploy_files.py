"""deploy/ stays honest without a container engine: the compose file and the chart parse,
every fedrad or Flower command they run exists with every flag they pass (checked against
the command's own --help), every path they mount is one the command reads, and the
systemd units pass `systemd-analyze verify`."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent


def _help(command: list[str]) -> str:
    """`command --help`, for a fedrad subcommand or a Flower executable."""
    if command[0] == "fedrad":
        words = [w for w in command[1:] if not w.startswith("-")][:2]
        argv = [sys.executable, "-m", "fedrad.cli", *words, "--help"]
    else:
        argv = [str(BIN / command[0]), "--help"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                            env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 0, f"{command[:3]}: {result.stdout}{result.stderr}"
    return result.stdout


def _check_command(command: list[str], where: str) -> dict[str, str]:
    """Every --flag of `command` appears in its --help; returns flag → value."""
    assert command[0] in {"fedrad", "flower-superlink", "flower-supernode", "flwr"}, where
    text = _help(command)
    values = {}
    for i, word in enumerate(command):
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            assert re.search(rf"{re.escape(flag)}\b", text), f"{where}: {flag} unknown"
            if i + 1 < len(command) and not command[i + 1].startswith("--"):
                values[flag] = command[i + 1]
    return values


def test_dockerfiles_run_real_commands_as_a_non_root_user() -> None:
    for name in ("Dockerfile.server", "Dockerfile.site"):
        text = (DEPLOY / "docker" / name).read_text()
        assert re.search(r"^USER fedrad$", text, re.M), name
        assert "torch==2.13.0" in text  # the pin of pyproject.toml, from the chosen index
        entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
        values = _check_command(entrypoint, name)
        if name == "Dockerfile.site":
            assert {"--kit", "--config", "--data", "--work-dir"} <= set(values)
        else:
            assert values["--state-dir"] == "/var/lib/fedrad-server"


def test_compose_services_mount_what_their_commands_read() -> None:
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    assert set(compose["services"]) == {"server", "hospital-a", "hospital-b"}
    for name, service in compose["services"].items():
        values = _check_command(service["command"], f"compose {name}")
        mounts = {}
        for volume in service["volumes"]:
            source, target, *mode = volume.split(":")
            mounts[target] = mode
        for secret in service.get("secrets", []):
            mounts[f"/run/secrets/{secret['target']}"] = ["ro"]
            assert secret["source"] in compose["secrets"]
        read = set(values.values())
        for target in mounts:
            assert target in read, f"compose {name} mounts {target}, which nothing reads"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        if name != "server":
            assert mounts["/data"] == ["ro"]  # the hospital's images, never written
            assert values["--superlink"] == "server:9092"
    assert "9092:9092" in compose["services"]["server"]["ports"]


def _render(template: str, values: dict) -> str:
    """The subset of Helm's template language the chart uses (values, release name,
    toJson, and control lines)."""
    def lookup(path: str):
        node = {"Values": values, "Release": {"Name": "fedrad"}}
        for part in path.strip(".").split("."):
            node = node[part]
        return node

    lines = [line for line in template.splitlines()
             if not re.fullmatch(r"\s*\{\{-? (if|end|with|else|fail)\b.*\}\}\s*", line)]
    text = "\n".join(lines)
    text = re.sub(r"\{\{ toJson (\S+) \}\}", lambda m: json.dumps(lookup(m.group(1))), text)
    return re.sub(r"\{\{ (\.\S+) \}\}", lambda m: str(lookup(m.group(1))), text)


def test_the_helm_chart_renders_to_valid_objects_that_run_fedrad() -> None:
    chart = DEPLOY / "helm" / "fedrad-server"
    assert yaml.safe_load((chart / "Chart.yaml").read_text())["name"] == "fedrad-server"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    objects = {}
    for template in sorted((chart / "templates").glob("*.yaml")):
        rendered = yaml.safe_load(_render(template.read_text(), values))
        objects[rendered["kind"]] = rendered
    assert set(objects) == {"StatefulSet", "Service"}
    pod = objects["StatefulSet"]["spec"]["template"]["spec"]
    server = pod["containers"][0]
    flags = _check_command(server["command"], "helm server")
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    assert {flags["--consortium"], flags["--state-dir"]} <= mounts
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    claims = objects["StatefulSet"]["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["state"]
    assert objects["Service"]["spec"]["ports"][0]["port"] == values["superlink"]["port"]
    assert int(flags["--port"]) == values["superlink"]["port"]
    service = (chart / "templates" / "service.yaml").read_text()
    assert values["service"]["loadBalancerSourceRanges"] == []  # the operator must fill it:
    assert service.startswith("{{- if not .Values.service.loadBalancerSourceRanges }}\n"
                              "{{- fail ")  # Helm refuses to render an open port


@pytest.mark.parametrize("unit", ["fedrad-site.service", "fedrad-server.service"])
def test_systemd_units_are_hardened_and_verify(unit, tmp_path) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    for setting in ("NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectSystem=strict",
                    "Restart=on-failure", "User=fedrad"):
        assert setting in text, f"{unit}: {setting}"
    exec_start = shlex.split(re.search(r"^ExecStart=(.*)$", text, re.M).group(1))
    assert exec_start[0] == "/opt/fedrad/venv/bin/fedrad"
    values = _check_command(["fedrad", *exec_start[1:]], unit)
    state = re.search(r"^ReadWritePaths=(.*)$", text, re.M).group(1)
    assert state in {values.get("--work-dir"), values.get("--state-dir")}
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here; flags were checked above")
    local = tmp_path / unit  # the same unit, pointing at this installation's fedrad
    local.write_text(text.replace("/opt/fedrad/venv/bin/fedrad", str(BIN / "fedrad")))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(local)],
                            capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if unit in line or "Unknown" in line or "Invalid" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_the_trial_configs_pass_the_products_own_parsers(tmp_path) -> None:
    import tomllib

    from client.site_config import SiteConfig
    from fedrad.demo import load_run_config

    run = load_run_config(DEPLOY / "docker" / "trial-run.toml", {})
    assert run["min-sites"] == 2 and run["secagg-allow-fewer-sites"] is True
    site = tomllib.loads((DEPLOY / "docker" / "site.toml.example").read_text())
    parsed = SiteConfig.from_mapping({**site, "site-id": "hospital-a",
                                      "data-dir": str(tmp_path), "work-dir": str(tmp_path)})
    assert parsed.epsilon_budget == site["epsilon-budget"]
