"""`fedrad pretrain`: a prior trained on phantoms loads through init-weights, carries its
provenance into the run's registry, and is refused for another model or when altered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import RunConfig
from common.models import ModelError, build_model, load_pretrained, prior_provenance
from fedrad.pretrain import PretrainError, pretrain
from tests.inprocess import BASELINE_POLICY, InProcessGrid, real_site, run_server, signing_keys

SMALL = {"task": "lung-seg", "image-size": 32, "batch-size": 8, "learning-rate": 0.003}


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    out = tmp_path_factory.mktemp("prior") / "prior.pt"
    provenance = pretrain(RunConfig.from_mapping(SMALL), out, data=None, patients=8,
                          epochs=3, say=lambda _: None)
    return out, provenance


def test_a_prior_loads_through_init_weights_and_says_what_it_saw(prior) -> None:
    out, provenance = prior
    config = RunConfig.from_mapping({**SMALL, "init-weights": str(out)})
    assert prior_provenance(config, out) == provenance
    assert provenance["data"]["kind"] == "fedrad phantoms"
    assert provenance["data"]["anatomy"] == "radiograph/1"  # fedrad.radiographs' films
    assert provenance["data"]["images"] == 3 * 8 * 2
    assert provenance["privacy"].startswith("no hospital data")
    assert provenance["augment"]["intensity"] == "strong"  # domain randomisation by default
    assert provenance["augment"]["rotation"] == 15.0
    assert 0 <= provenance["held_out"]["score"] <= 1
    model = build_model(config)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_pretrained(model, out)
    saved = torch.load(out, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved)  # it trained


def test_a_prior_for_another_model_or_altered_is_refused(prior, tmp_path) -> None:
    out, _ = prior
    other = RunConfig.from_mapping({**SMALL, "unet-res-units": 2, "norm": "instance"})
    with pytest.raises(ModelError, match="made for .* but this run's model is"):
        prior_provenance(other, out)
    altered = tmp_path / "prior.pt"
    altered.write_bytes(out.read_bytes() + b"x")
    (tmp_path / "prior.pt.json").write_text((out.parent / "prior.pt.json").read_text())
    with pytest.raises(ModelError, match="differs from the sha256"):
        prior_provenance(RunConfig.from_mapping(SMALL), altered)


def test_phantoms_have_no_labels_for_classification(tmp_path) -> None:
    config = RunConfig.from_mapping({"task": "cxr-classify", "model": "classifier",
                                     "image-size": 32})
    with pytest.raises(PretrainError, match="pass --data"):
        pretrain(config, tmp_path / "p.pt", data=None, patients=4, epochs=1)


@pytest.mark.usefixtures("task_identity")
def test_a_run_started_from_a_prior_records_its_provenance(prior, tmp_path, phantom_sites,
                                                           monkeypatch) -> None:
    out, provenance = prior
    private, public = signing_keys(tmp_path)
    config = {**SMALL, "init-weights": str(out), "num-rounds": 1, "min-sites": 3,
              "dp-enabled": False, "secagg-enabled": False, "round-timeout": 60.0}
    sites = {n: real_site(n, name, phantom_sites[name], tmp_path / name, public, config,
                          policy=BASELINE_POLICY)
             for n, name in enumerate(sorted(phantom_sites), start=1)}
    run_dir = run_server(InProcessGrid(sites), config, tmp_path / "server", private,
                         monkeypatch)
    registry = json.loads((run_dir / "registry.json").read_text())
    assert registry["init_weights"]["provenance"] == provenance
    assert registry["init_weights"]["file"] == "prior.pt"
    audit = (tmp_path / "server" / "audit.jsonl").read_text()
    assert '"run-prior"' in audit


def test_the_cli_writes_a_prior(tmp_path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('task = "lung-seg"\nimage-size = 32\n')
    result = subprocess.run([sys.executable, "-m", "fedrad.cli", "pretrain", str(config),
                             "--out", str(tmp_path / "w.pt"), "--patients", "4",
                             "--epochs", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set init-weights" in result.stdout
    assert json.loads((tmp_path / "w.pt.json").read_text())["epochs"] == 1
    again = subprocess.run([sys.executable, "-m", "fedrad.cli", "pretrain", str(config),
                            "--out", str(tmp_path / "w.pt")], capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr


def test_a_phantom_prior_named_in_a_config_is_made_once_and_then_reused(
        tmp_path, monkeypatch) -> None:
    """init-weights = "phantom-prior" (fedrad.runs.submit resolves it): the first run
    pretrains into the server home's priors/, the next run of the same architecture reuses
    the file, another image size gets its own."""
    from fedrad import pretrain as module

    values = {**SMALL, "init-weights": module.PHANTOM_PRIOR}
    folder = tmp_path / "priors"
    resolved = module.resolve_prior(values, folder, patients=4, epochs=1, say=lambda _: None)
    path = Path(resolved["init-weights"])
    assert path.parent == folder and path.is_file()
    config = RunConfig.from_mapping(resolved)
    assert prior_provenance(config, path)["epochs"] == 1
    assert sorted(p.name for p in folder.iterdir()) == [path.name, f"{path.name}.json"]

    def refuse(*_, **__):
        raise AssertionError("pretrained again")

    monkeypatch.setattr(module, "pretrain", refuse)
    assert module.resolve_prior(values, folder, patients=4, epochs=1) == resolved
    with pytest.raises(AssertionError, match="pretrained again"):
        module.resolve_prior({**values, "image-size": 64}, folder, patients=4, epochs=1)
    other = {**SMALL, "init-weights": "/some/file.pt"}
    assert module.resolve_prior(other, folder) == other  # anything else passes as it is
