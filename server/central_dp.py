"""Central (site-level) differential privacy on the aggregate, secure aggregation compatible.

Flower's `DifferentialPrivacyClientSideFixedClipping` wraps a Message-API Strategy
and pairs with `fixedclipping_mod`, which clips (reply weights - received weights).
fedrad's rounds do not run through a Strategy's loop (secure aggregation is fedrad's own,
common/masking.py) and its sites reply with the update itself, so
the wrapper and the mod cannot be dropped in. The same mechanism is built here from
Flower's own DP primitives (`flwr.supercore.differential_privacy`): each site clips
its update with `compute_clip_model_update` (client/site_round.py), the server
averages the clipped updates with uniform weights (secure aggregation sees only their sum) and
adds `add_gaussian_noise_inplace` with std `compute_stdv(sigma, C, sites)`.

Accounting: Flower's RDP accountant needs the optional dp-accounting package, so ε
is computed by Opacus' RDP accountant (already a dependency) for the Gaussian
mechanism without sampling (every site in every round): sample rate 1, one step
per round.
"""

from __future__ import annotations

import numpy as np
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv
from opacus.accountants import RDPAccountant

from common.config import CentralDPConfig


class CentralDP:
    """Noise on the mean of clipped site updates, and the ε it has spent so far."""

    def __init__(self, settings: CentralDPConfig) -> None:
        if not settings.enabled:
            raise ValueError("central DP is not enabled in this run's config")
        self.settings = settings
        self.rounds = 0

    def noise_std(self, contributors: int) -> float:
        if contributors < 1:
            raise ValueError("central DP needs at least one contributing site")
        return compute_stdv(self.settings.noise_multiplier, self.settings.clipping_norm,
                            contributors)

    def privatise(self, mean_update: list[np.ndarray], contributors: int) -> list[np.ndarray]:
        """Add the Gaussian noise to the aggregate (in place) and count the release."""
        add_gaussian_noise_inplace(mean_update, self.noise_std(contributors))
        self.rounds += 1
        return mean_update

    def epsilon(self) -> float:
        """ε at the run's central-dp-delta after the releases so far."""
        if self.rounds == 0:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(self.settings.noise_multiplier, 1.0, self.rounds)]
        return float(accountant.get_epsilon(delta=self.settings.delta))
