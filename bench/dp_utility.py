"""Utility vs ε: federated DP-SGD against the no-DP pooled baseline trained in the same
run, with and without a phantom prior, per dp-trainable choice, several seeds
(fedrad.in_memory; the sites' own DP-SGD and planned noise).

- cxr: configs/cxr-lung-seg.toml on the three real CXR sites, Dice;
- pneumonia: configs/pneumonia-classify.toml on PneumoniaMNIST written as three non-IID
  DICOM hospitals by fedrad.pneumonia_sites, macro AUROC. From scratch only: the phantom
  prior is a lung-segmentation prior, and the public data the consortium could pretrain
  on here is the task's own data.

Usage: python bench/dp_utility.py [--task cxr|pneumonia] [--epsilons 1,4,8,32]
           [--trainable all,norm-bias-head]
           [--modes local,distributed] [--starts scratch,prior] [--seeds 1,2] [--rounds 10]
           [--distributed-rounds 40] [--prior-epochs 8] [--prior-patients 60]
           [--set KEY=VALUE ...] [--distributed-set KEY=VALUE ...] [--json FILE]

One line per (seed, mode, prior, trainable, ε or "no-dp"): the best round's pooled
validation score and its ratio to the seed's pooled baseline. Local mode trains the config's
recipe for --rounds; distributed mode (client.distributed_dp: one noisy gradient per site
per round, noise shared under secure aggregation) trains DISTRIBUTED plus --distributed-set
for --distributed-rounds. Last lines: `dp8_over_pooled_<metric>=<min>-<max>` and
`dp8_<metric>=<min>-<max>` over seeds (metric dice or auroc), for the best (mode, prior,
trainable) at ε 8.
`--json FILE` writes every row (what `--record RUN_DIR` puts in a run's registry.json for
its report). The prior is made once per run by fedrad.pretrain on generated phantoms (no
hospital data).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pooled_baseline import REPO, parse_sets  # noqa: E402

from common import keys  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.models import load_pretrained  # noqa: E402
from fedrad.in_memory import load_sites, pooled_score, train_federated, train_pooled  # noqa: E402
from fedrad.pneumonia_sites import write_sites  # noqa: E402
from fedrad.pretrain import pretrain  # noqa: E402
from fedrad.runs import load_run_config  # noqa: E402
from server.registry import RunFolder  # noqa: E402

DATA = REPO.parent / "shared" / "data"
TASKS = {"cxr": REPO / "configs" / "cxr-lung-seg.toml",
         "pneumonia": REPO / "configs" / "pneumonia-classify.toml"}
# Without DP (the pooled baseline and the no-DP rows) each task trains its no-DP recipe
# (issue 18's, bench/RESULTS.md "Recipes"): the cxr config's lr 0.01 is its DP recipe.
NO_DP = {"cxr": {"learning-rate": 0.003}, "pneumonia": {}}


# The DP recipes (measured on the real CXR sites, bench/RESULTS.md "Tenth session").
# Local: the task config's own recipe (cxr: lr 0.01; 0.003, tuned without DP, trailed
# under noise).
# Distributed: one full-batch noisy gradient per site per round and FedAvg's SGD step, lr
# 0.5 for every parameter and 1.0 for the few of norm-bias-head (3.0 diverged).
LOCAL: dict[str, object] = {}
DISTRIBUTED = {"dp-mode": "distributed", "dp-sample-rate": 1.0, "local-epochs": 1,
               "optimizer-state": "fresh", "secagg-enabled": True, "early-stop-patience": 0}
DISTRIBUTED_LR = {"all": 0.5}  # any other dp-trainable: 1.0


@dataclass(frozen=True)
class Row:
    """One training of the curve."""

    seed: int
    mode: str
    start: str
    trainable: str
    epsilon: float | None  # None: no DP
    score: float  # best round's pooled validation score: Dice or macro AUROC
    pooled: float  # the seed's pooled no-DP baseline

    @property
    def ratio(self) -> float:
        return self.score / self.pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="cxr")
    parser.add_argument("--epsilons", default="1,4,8,32")
    parser.add_argument("--trainable", default="all,norm-bias-head")
    parser.add_argument("--modes", default="local,distributed")
    parser.add_argument("--starts", default=None, help="default: scratch,prior for cxr, "
                        "scratch for pneumonia")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--distributed-rounds", type=int, default=40)
    parser.add_argument("--prior-epochs", type=int, default=8)
    parser.add_argument("--prior-patients", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--distributed-set", action="append", default=[],
                        dest="distributed_sets")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--record", type=Path, default=None, metavar="RUN_DIR")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config_file = TASKS[args.task]
    starts = (args.starts or ("scratch,prior" if args.task == "cxr" else "scratch")).split(",")
    if args.task != "cxr" and "prior" in starts:
        parser.error(f"--starts prior: no privacy-free prior for --task {args.task} (the "
                     "phantom prior is a lung-segmentation prior)")
    sets = {**parse_sets(args.sets), "num-rounds": args.rounds, "secagg-enabled": False}
    recipes = {"local": LOCAL,
               "distributed": {**DISTRIBUTED, "num-rounds": args.distributed_rounds,
                               **parse_sets(args.distributed_sets)}}
    epsilons = [float(e) for e in args.epsilons.split(",")]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch:
        prior = Path(scratch) / "prior.pt"
        if "prior" in starts:
            pretrain(RunConfig.from_mapping(load_run_config(config_file, sets)), prior,
                     data=None, patients=args.prior_patients, epochs=args.prior_epochs,
                     say=lambda _: None)
        data = DATA / "cxr"
        if args.task == "pneumonia":
            data = write_sites(DATA / "pneumoniamnist" / "pneumoniamnist.npz",
                               Path(scratch) / "pneumonia")["train"]["hospital-a"].parent
        for seed in [int(s) for s in args.seeds.split(",")]:
            base = {**sets, "seed": seed, "dp-enabled": False}
            config = RunConfig.from_mapping(load_run_config(
                config_file, {**base, **NO_DP[args.task]}))
            headline = keys.headline_metric(config.task)
            metric = "dice" if headline == keys.EVAL_DICE else "auroc"
            sites = load_sites(config, data, Path(scratch) / f"cache-{seed}")
            pooled = train_pooled(config, sites, args.rounds * config.local_epochs).best
            print(f"seed={seed} pooled_no_dp={pooled:.4f}", flush=True)
            if "prior" in starts:  # where every start from the prior begins
                algo = next(iter(sites.values()))
                load_pretrained(algo.model, prior)
                alone = pooled_score(sites, algo.get_weights(), headline)
                print(f"seed={seed} prior_alone={alone:.4f} over_pooled={alone / pooled:.4f}",
                      flush=True)
            for mode in args.modes.split(","):
                for start, trainable in _starts(starts, args.trainable.split(",")):
                    for epsilon in [None, *epsilons]:
                        if epsilon is None and mode == "distributed":
                            continue  # without DP the mode is local training's row
                        values = {**base, "dp-trainable": trainable,
                                  "init-weights": str(prior) if start == "prior" else ""}
                        if epsilon is None:
                            values.update(NO_DP[args.task])
                        else:
                            values.update({"dp-enabled": True, "dp-target-epsilon": epsilon})
                            if mode == "distributed":
                                values["learning-rate"] = DISTRIBUTED_LR.get(trainable, 1.0)
                            values.update(recipes[mode])
                        run = RunConfig.from_mapping(load_run_config(config_file, values))
                        score = train_federated(run, sites).best
                        label = "no-dp" if epsilon is None else f"eps={epsilon:g}"
                        print(f"seed={seed} mode={mode} start={start} trainable={trainable} "
                              f"{label} {metric}={score:.4f} over_pooled={score / pooled:.4f}",
                              flush=True)
                        rows.append(Row(seed, mode, start, trainable, epsilon, score, pooled))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=1))
    if args.record is not None:
        RunFolder(args.record.resolve()).record_dp_curve(
            curve_points(rows), f"bench/dp_utility.py --task {args.task}, seeds {args.seeds}")
    at8: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        if row.epsilon == 8.0:
            at8.setdefault((row.mode, row.start, row.trainable), []).append(row)
    if at8:
        best = max(at8, key=lambda k: sum(r.score for r in at8[k]) / len(at8[k]))
        ratios = [r.ratio for r in at8[best]]
        scores = [r.score for r in at8[best]]
        print(f"best_at_eps8=mode:{best[0]},start:{best[1]},trainable:{best[2]}")
        print(f"dp8_over_pooled_{metric}={min(ratios):.4f}-{max(ratios):.4f}")
        print(f"dp8_{metric}={min(scores):.4f}-{max(scores):.4f}")


def curve_points(rows: list[Row]) -> list[dict[str, object]]:
    """Per (mode, start, dp-trainable, ε): the range of the ratio to pooled over seeds."""
    groups: dict[tuple[str, str, str, float | None], list[float]] = {}
    for row in rows:
        groups.setdefault((row.mode, row.start, row.trainable, row.epsilon), []).append(
            row.ratio)
    return [{"mode": mode, "start": start, "trainable": trainable, "epsilon": epsilon,
             "ratio_min": min(ratios), "ratio_max": max(ratios), "seeds": len(ratios)}
            for (mode, start, trainable, epsilon), ratios in groups.items()]


def _starts(starts: list[str], trainables: list[str]) -> list[tuple[str, str]]:
    """(start, dp-trainable) pairs: from scratch every parameter trains (a frozen random
    network learns nothing worth a row), from the prior each choice."""
    return [*((("scratch", "all"),) if "scratch" in starts else ()),
            *(("prior", t) for t in trainables if "prior" in starts)]


if __name__ == "__main__":
    main()
