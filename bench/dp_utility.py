"""Utility vs ε: federated DP-SGD on the three CXR sites against the no-DP pooled
baseline trained in the same run, with and without a phantom prior, per dp-trainable
choice, several seeds (fedrad.in_memory; the sites' own DP-SGD and planned noise).

Usage: python bench/dp_utility.py [--epsilons 1,4,8,32] [--trainable all,norm-bias-head]
           [--seeds 1,2] [--rounds 10] [--prior-epochs 8] [--prior-patients 60]
           [--set KEY=VALUE ...]

One line per (seed, prior, trainable, ε or "no-dp"): the best round's pooled validation
Dice and its ratio to the seed's pooled baseline. Last lines: `dp8_over_pooled_dice=<min>-
<max>` and `dp8_dice=<min>-<max>` over seeds, for the best (prior, trainable) at ε 8.
The prior is made once per run by fedrad.pretrain on generated phantoms (no hospital data).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pooled_baseline import REPO, parse_sets  # noqa: E402

from common.config import RunConfig  # noqa: E402
from fedrad.in_memory import load_sites, train_federated, train_pooled  # noqa: E402
from fedrad.pretrain import pretrain  # noqa: E402
from fedrad.runs import load_run_config  # noqa: E402

CONFIG = REPO / "configs" / "cxr-lung-seg.toml"
DATA = REPO.parent / "shared" / "data" / "cxr"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,4,8,32")
    parser.add_argument("--trainable", default="all,norm-bias-head")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--prior-epochs", type=int, default=8)
    parser.add_argument("--prior-patients", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], dest="sets")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sets = {**parse_sets(args.sets), "num-rounds": args.rounds, "secagg-enabled": False}
    epsilons = [float(e) for e in args.epsilons.split(",")]
    at8: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        prior = Path(scratch) / "prior.pt"
        pretrain(RunConfig.from_mapping(load_run_config(CONFIG, sets)), prior, data=None,
                 patients=args.prior_patients, epochs=args.prior_epochs, say=lambda _: None)
        for seed in [int(s) for s in args.seeds.split(",")]:
            base = {**sets, "seed": seed, "dp-enabled": False}
            config = RunConfig.from_mapping(load_run_config(CONFIG, base))
            sites = load_sites(config, DATA, Path(scratch) / f"cache-{seed}")
            pooled = train_pooled(config, sites, args.rounds * config.local_epochs).best
            print(f"seed={seed} pooled_no_dp={pooled:.4f}", flush=True)
            for start in ("scratch", "prior"):
                for trainable in args.trainable.split(","):
                    if start == "scratch" and trainable != "all":
                        continue  # a frozen random network learns nothing worth a row
                    for epsilon in [None, *epsilons]:
                        values = {**base, "dp-trainable": trainable,
                                  "init-weights": str(prior) if start == "prior" else ""}
                        if epsilon is not None:
                            values.update({"dp-enabled": True, "dp-target-epsilon": epsilon})
                        run = RunConfig.from_mapping(load_run_config(CONFIG, values))
                        dice = train_federated(run, sites).best
                        label = "no-dp" if epsilon is None else f"eps={epsilon:g}"
                        print(f"seed={seed} start={start} trainable={trainable} {label} "
                              f"dice={dice:.4f} over_pooled={dice / pooled:.4f}", flush=True)
                        if epsilon == 8.0:
                            at8.setdefault((start, trainable), []).append((dice, pooled))
    if at8:
        best = max(at8, key=lambda k: sum(d for d, _ in at8[k]) / len(at8[k]))
        ratios = [d / p for d, p in at8[best]]
        dices = [d for d, _ in at8[best]]
        print(f"best_at_eps8=start:{best[0]},trainable:{best[1]}")
        print(f"dp8_over_pooled_dice={min(ratios):.4f}-{max(ratios):.4f}")
        print(f"dp8_dice={min(dices):.4f}-{max(dices):.4f}")


if __name__ == "__main__":
    main()
