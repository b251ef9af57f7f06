"""Do the shipped recipes reach pooled training? Federated vs pooled vs each site alone,
in one run, on the same validation patients, several seeds (fedrad.in_memory; no DP).

- cxr: configs/cxr-lung-seg.toml on the three real CXR sites (../shared/data/cxr), Dice;
- pneumonia: configs/pneumonia-classify.toml on PneumoniaMNIST written as three non-IID
  DICOM hospitals by fedrad.pneumonia_sites (here, into a temporary folder), AUROC.

The pooled baseline and each single site train for the federation's rounds x local
epochs (the same passes over their data). Scores are each training's best round/epoch
(the model `RUN:best` exports). Prints per seed, then the ranges:
`fed_over_pooled_<metric>=<min>-<max>` (goal >= 0.995 for Dice, 0.99 for AUROC) and
`fed_over_best_single=<min>-<max>` (goal >= 1.0), rounds and wall time.

Usage: python bench/recipe_quality.py [--task cxr|pneumonia] [--seeds 1,2]
                                      [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pooled_baseline import REPO, bench_config, parse_sets  # noqa: E402

from common import keys  # noqa: E402
from fedrad.in_memory import load_sites, train_federated, train_pooled, train_single  # noqa: E402
from fedrad.pneumonia_sites import write_sites  # noqa: E402

DATA = REPO.parent / "shared" / "data"
TASKS = {"cxr": REPO / "configs" / "cxr-lung-seg.toml",
         "pneumonia": REPO / "configs" / "pneumonia-classify.toml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="cxr")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--no-single", action="store_true", help="skip the single sites")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    ratios, single_ratios = [], []
    with tempfile.TemporaryDirectory() as scratch:
        data = DATA / "cxr"
        if args.task == "pneumonia":
            data = write_sites(DATA / "pneumoniamnist" / "pneumoniamnist.npz",
                               Path(scratch) / "pneumonia")["train"]["hospital-a"].parent
        for seed in [int(s) for s in args.seeds.split(",")]:
            config = bench_config(TASKS[args.task], seed, parse_sets(args.sets))
            metric = keys.headline_metric(config.task)
            epochs = config.num_rounds * config.local_epochs
            sites = load_sites(config, data, Path(scratch) / f"cache-{seed}")
            fed = train_federated(config, sites)
            pooled = train_pooled(config, sites, epochs)
            ratios.append(fed.best / pooled.best)
            line = (f"seed={seed} fed_best={fed.best:.4f} (round {fed.best_round}/"
                    f"{config.num_rounds}, {fed.seconds:.0f}s) pooled_best={pooled.best:.4f} "
                    f"(epoch {pooled.best_round}/{epochs}, {pooled.seconds:.0f}s)")
            if not args.no_single:
                singles = {site: train_single(config, sites, site, epochs).best
                           for site in sites}
                single_ratios.append(fed.best / max(singles.values()))
                line += " single_best=" + ",".join(f"{s}:{v:.4f}" for s, v in singles.items())
            print(line, flush=True)
    short = "dice" if metric == keys.EVAL_DICE else "auroc"
    print(f"fed_over_pooled_{short}={min(ratios):.4f}-{max(ratios):.4f}")
    if single_ratios:
        print(f"fed_over_best_single={min(single_ratios):.4f}-{max(single_ratios):.4f}")
    print(f"rounds={config.num_rounds} local_epochs={config.local_epochs} "
          f"wall_seconds={time.perf_counter() - start:.0f}")


if __name__ == "__main__":
    main()
