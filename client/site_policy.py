"""The hospital's own policy: what this site accepts, whatever the server asks.

The policy lives in the site's node config (never in the run config, which the
server writes), is strict by default and is enforced by `site_policy_mod` on every
message before anything runs: before key adverts, before any data is
loaded, before any training or evaluation. A run that asks for more than the policy
allows is refused with a fixed, sanitised reason naming the policy keys it broke
(`refused-site-policy` in the server's round records), and the refusal is written to
the site's audit log. The per-run ε cap is enforced again on the ledger's projection
of every training session (client.site_round), so a server that under-declares its
rounds cannot spend more than the cap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from common.audit import AuditLog
from common.config import ConfigError, RunConfig

LOG = logging.getLogger("fedrad.client")


@dataclass(frozen=True)
class SitePolicy:
    """Node-config keys (kebab-case) and their strict defaults."""

    require_dp: bool = True
    require_secure_aggregation: bool = True
    max_epsilon_per_run: float = 10.0
    max_delta: float = 1e-5
    allow_cross_site: bool = False
    max_image_size: int = 512
    min_secure_aggregation_sites: int = 3
    max_evaluations_per_round: int = 1
    share_train_loss: bool = False  # the training loss is not DP-noised
    # dp-mode=distributed: count the other sites' noise shares (client.distributed_dp)
    trust_distributed_noise: bool = False

    @classmethod
    def keys(cls) -> frozenset[str]:
        return frozenset(f.name.replace("_", "-") for f in fields(cls))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> SitePolicy:
        """The policy part of a node config; a bad value names its key."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            key = spec.name.replace("_", "-")
            if key not in raw:
                continue
            value = raw[key]
            default = spec.default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"node-config {key} must be true or false, got {value!r}")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"node-config {key} must be an integer >= 1, "
                                      f"got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"node-config {key} must be a number > 0, got {value!r}")
            values[spec.name] = float(value) if isinstance(default, float) else value
        policy = cls(**values)
        if not policy.max_delta < 1:
            raise ConfigError(f"node-config max-delta must be < 1, got {policy.max_delta}")
        if policy.min_secure_aggregation_sites < 2:
            raise ConfigError("node-config min-secure-aggregation-sites must be >= 2")
        return policy

    def violations(self, config: RunConfig) -> list[str]:
        """The policy keys `config` breaks (empty: the run is acceptable)."""
        broken = []
        if self.require_dp and not config.dp.enabled:
            broken.append("require-dp")
        if self.require_secure_aggregation and not config.secagg.enabled:
            broken.append("require-secure-aggregation")
        if config.dp.enabled and config.dp.target_epsilon > self.max_epsilon_per_run:
            broken.append("max-epsilon-per-run")
        if config.dp.enabled and config.dp.delta is not None \
                and config.dp.delta > self.max_delta:
            broken.append("max-delta")
        if config.dp.distributed and not self.trust_distributed_noise:
            broken.append("trust-distributed-noise")
        if config.faults.cross_site and not self.allow_cross_site:
            broken.append("allow-cross-site")
        if config.image_size > self.max_image_size:
            broken.append("max-image-size")
        if config.secagg.enabled and config.secagg.min_sites < self.min_secure_aggregation_sites:
            broken.append("min-secure-aggregation-sites")
        return broken

    def delta_for(self, config: RunConfig, automatic: float) -> float:
        """δ of a DP session: the run's explicit value or `automatic`, never above
        the site's max-delta."""
        return min(config.dp.delta if config.dp.delta is not None else automatic,
                   self.max_delta)

    def insecure_settings(self) -> list[str]:
        """The relaxations a site operator chose, for a loud start-up warning."""
        loud = []
        if not self.require_dp:
            loud.append("require-dp=false")
        if not self.require_secure_aggregation:
            loud.append("require-secure-aggregation=false")
        if self.allow_cross_site:
            loud.append("allow-cross-site=true")
        if self.trust_distributed_noise:
            loud.append("trust-distributed-noise=true")
        return loud


def check_run(policy: SitePolicy, run_config: Mapping[str, Any]) -> list[str]:
    """The policy keys a run config breaks; an unparsable run config breaks them all
    (fail closed: a site never guesses what a run meant)."""
    try:
        config = RunConfig.from_mapping(run_config)
    except ConfigError:
        return ["run-config"]
    return policy.violations(config)


def enforce(node_config: Mapping[str, Any], run_config: Mapping[str, Any], *,
            run_id: int, audit: AuditLog | None) -> list[str]:
    """What `site_policy_mod` checks: the policy keys this run breaks, audited at the site.
    A node config whose policy does not parse refuses everything."""
    try:
        policy = SitePolicy.from_mapping(node_config)
    except ConfigError as exc:
        LOG.error("node-config policy is invalid, refusing every run: %s", exc)
        broken = ["node-config"]
    else:
        broken = check_run(policy, run_config)
    if broken:
        LOG.warning("run %d refused by this site's policy: %s", run_id, ", ".join(broken))
        if audit is not None:
            audit.append("run-refused-by-policy", run_id=str(run_id), policy=broken)
    return broken
