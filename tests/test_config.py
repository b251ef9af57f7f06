from __future__ import annotations

import tomllib

import pytest

from client.site_config import SiteConfig
from common.config import ConfigError, RunConfig, default_run_config
from tests.conftest import REPO


def test_pyproject_defaults_equal_the_schema() -> None:
    with (REPO / "pyproject.toml").open("rb") as handle:
        flwr_config = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    assert flwr_config == default_run_config()


def test_every_shipped_config_parses() -> None:
    for path in sorted((REPO / "configs").glob("*.toml")):
        with path.open("rb") as handle:
            RunConfig.from_mapping(tomllib.load(handle))


def test_round_trip() -> None:
    config = RunConfig.from_mapping({"num-rounds": 7, "dp-delta": 1e-6, "optimizer": "sgd"})
    assert config.num_rounds == 7 and config.dp.delta == 1e-6
    assert RunConfig.from_mapping(config.to_mapping()) == config


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"num-roundz": 3}, r"unknown run-config key\(s\) \['num-roundz'\]; allowed keys"),
        ({"num-rounds": 0}, "num-rounds must be >= 1"),
        ({"num-rounds": True}, "num-rounds must be an integer"),
        ({"optimizer": "lbfgs"}, r"optimizer must be one of \['adam', 'sgd'\]"),
        ({"dp-target-epsilon": 0.0}, "dp-target-epsilon must be > 0"),
        ({"dp-max-grad-norm": -1.0}, "dp-max-grad-norm must be > 0"),
        ({"dp-delta": 1.0}, r"dp-delta must be in \(0, 1\)"),
        ({"dp-enabled": "yes"}, "dp-enabled must be true or false"),
        ({"image-size": 60}, "image-size must be a multiple of 8"),
        ({"val-fraction": 1.0}, r"val-fraction must be in \(0, 1\)"),
        ({"min-sites": 2}, "secure aggregation with min-sites=2 protects nothing"),
    ],
)
def test_bad_run_config_names_the_key(override: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(override)


def test_fewer_sites_needs_explicit_acceptance() -> None:
    config = RunConfig.from_mapping({"min-sites": 2, "secagg-allow-fewer-sites": True})
    assert config.min_sites == 2
    assert RunConfig.from_mapping({"min-sites": 2, "secagg-enabled": False}).min_sites == 2


def test_site_config(tmp_path) -> None:
    ok = {"site-id": "hospital-a", "data-dir": str(tmp_path), "work-dir": str(tmp_path / "w"),
          "epsilon-budget": 5}
    site = SiteConfig.from_mapping(ok)
    assert site.epsilon_budget == 5.0 and site.device == "auto" and site.threads == 0
    with pytest.raises(ConfigError, match=r"missing \['epsilon-budget'\]"):
        SiteConfig.from_mapping({k: v for k, v in ok.items() if k != "epsilon-budget"})
    with pytest.raises(ConfigError, match="epsilon-budget must be a number > 0"):
        SiteConfig.from_mapping({**ok, "epsilon-budget": 0})
    with pytest.raises(ConfigError, match="site-id must be"):
        SiteConfig.from_mapping({**ok, "site-id": "CANARY-1 x"})
    with pytest.raises(ConfigError, match="is not a folder"):
        SiteConfig.from_mapping({**ok, "data-dir": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"unknown node-config key\(s\) \['budget'\]"):
        SiteConfig.from_mapping({**ok, "budget": 3})
