"""Distributed DP (`dp-mode = "distributed"`): the noise of DP-SGD shared across sites.

In local mode each site adds noise of std σ·C to its own clipped gradients, so the
average of K sites' updates carries K times the noise a single site would need. Under
secure aggregation the server sees only the sum of the sites' updates; if each of K
sites adds σ/√K, that sum carries σ (Kairouz, Liu & Steinke, ICML 2021), and every
patient is protected by the whole σ while each site adds √K times less.

What fedrad does, and why it is sound:
- Every round each site takes ONE DP-SGD step *at the round's global weights*: it draws
  each training patient with probability `dp-sample-rate` (q, the same at every site),
  clips each drawn patient's gradient to C, adds N(0, (σ·C)²/K), and sends
  -lr · (noisy sum) / (q·P) with FedAvg weight P (its number of training patients). The
  weighted mean is then -lr · Σ_sites (noisy sum) / (q·ΣP): the secure sum of the K
  sites' noisy sums, scaled by public numbers. Its noise has std σ·C.
- Because the gradient is taken at public weights (the global model everyone received),
  round r's release is a subsampled Gaussian mechanism with noise σ on each site's
  patients, and the rounds compose as Opacus' RDP accountant counts them (steps = rounds,
  rate q). Several local steps would not be: a site's later steps would be taken at
  weights that depend on its own, smaller, noise share, which the others' noise cannot
  cover. Hence one gradient per round (local-epochs = 1), and the server's strategy
  (FedAvg's step, FedAdam's moments) does the optimisation, as post-processing.
- σ is planned from the run config alone (ε, δ, q, num-rounds), so every site adds the
  same share. K is the run's `secagg-min-sites`; a site refuses a masked set or a
  recovery with fewer sites than that (client.secure_sum), and refuses to send a
  distributed-mode update unmasked (client.site_round): with fewer sites, or in the
  clear, its update would carry only its own share.

The guarantee then rests on the other sites of each sum adding their share. A site
accepts that only if its policy says so (`trust-distributed-noise = true`; otherwise it
refuses distributed runs). Its ledger charges the distributed σ to the budget and records
beside it the floor: the ε of its own share alone (σ/√K), what holds if every other site
in the sum colluded with the server. Reports show both.
"""

from __future__ import annotations

import math

from common.config import RunConfig

PLAN_DELTA = 1e-5  # δ that σ is planned for when the run leaves dp-delta on "auto"


def sites_sharing(config: RunConfig) -> int:
    """K: the sites whose noise shares make up σ (the smallest masked set allowed)."""
    return config.secagg.min_sites


def share(config: RunConfig) -> float:
    """The fraction of σ one site adds: 1/√K in distributed mode, the whole of it in local."""
    return 1.0 / math.sqrt(sites_sharing(config)) if config.dp.distributed else 1.0


def plan_delta(config: RunConfig) -> float:
    """δ of the common plan: the run's dp-delta, or PLAN_DELTA (every site must plan σ
    alike, so a site's own δ cannot enter it; each site accounts at its own δ)."""
    return config.dp.delta if config.dp.delta is not None else PLAN_DELTA


def fedavg_weight(config: RunConfig, *, examples: int, patients: int) -> int:
    """A site's FedAvg weight: its training examples, or in distributed mode its training
    patients P (so the weighted mean is the secure sum over q·ΣP, as above)."""
    return patients if config.dp.distributed else examples
