"""The pooled (centralised) baseline every federated quality figure is a ratio against.

The same model, preprocessing and augmentation as a run config's federation
(fedrad.in_memory), trained centrally on the union of the sites' training patients with
one optimiser throughout, and scored after every epoch on the sites' validation patients
(the same ones a federation of that config holds out). No DP.

Usage: python bench/pooled_baseline.py [--config configs/cxr-lung-seg.toml]
           [--data ../shared/data/cxr] [--epochs N] [--seeds 1,2] [--set KEY=VALUE ...]
           [--run-dir <server home>/runs/RUN]

--run-dir records the mean of the seeds' best scores in that run's registry.json, so its
report and `fedrad evaluate` state the run's ratio to it (a consortium can do this only
where the data may be pooled: generated or public data, a benchmark).

Prints `pooled_best=<score> best_epoch=<n> seconds=<s>` per seed (the headline metric:
Dice, or macro AUROC), then `pooled_best_range=<min>-<max>` over the seeds.
"""

from __future__ import annotations

import argparse
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import torch

from common import keys
from common.config import RunConfig
from fedrad.in_memory import load_sites, train_pooled
from fedrad.runs import load_run_config
from server.registry import RunFolder

REPO = Path(__file__).resolve().parents[1]
NO_PRIVACY = {"dp-enabled": False, "secagg-enabled": False}


def parse_sets(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs, each VALUE read as TOML (true, 1.5, "x") or else as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def bench_config(config_file: Path, seed: int, sets: dict[str, Any]) -> RunConfig:
    """The run config of `config_file` at `seed`, without DP or secure aggregation, from
    scratch unless `sets` names init-weights (a file; the recipes were measured so)."""
    return RunConfig.from_mapping(load_run_config(config_file, {
        "init-weights": "", **sets, **NO_PRIVACY, "seed": seed}))  # from scratch by default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cxr-lung-seg.toml")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr")
    parser.add_argument("--epochs", type=int, default=0,
                        help="default: the config's num-rounds x local-epochs")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--run-dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    bests = []
    with tempfile.TemporaryDirectory() as cache:
        for seed in [int(s) for s in args.seeds.split(",")]:
            config = bench_config(args.config, seed, parse_sets(args.sets))
            epochs = args.epochs or config.num_rounds * config.local_epochs
            sites = load_sites(config, args.data, Path(cache))
            curve = train_pooled(config, sites, epochs)
            bests.append(curve.best)
            print(f"seed={seed} pooled_best={curve.best:.4f} best_epoch={curve.best_round} "
                  f"epochs={epochs} metric={keys.headline_metric(config.task)} "
                  f"seconds={curve.seconds:.0f}", flush=True)
    print(f"pooled_best_range={min(bests):.4f}-{max(bests):.4f}")
    if args.run_dir is not None:
        RunFolder(args.run_dir.resolve()).record_pooled_baseline(
            keys.headline_metric(config.task), sum(bests) / len(bests),
            f"bench/pooled_baseline.py, {epochs} epochs, seeds {args.seeds}")
        print(f"recorded in {args.run_dir / 'registry.json'}")


if __name__ == "__main__":
    main()
