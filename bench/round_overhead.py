"""Round overhead of a real deployment: SuperLink + 3 SuperNodes (+ site workers) on
127.0.0.1, TLS, node authentication, secure aggregation and DP-SGD, as `fedrad demo` runs
them.

Usage: python bench/round_overhead.py [--workload small|densenet] [--rounds N]
                                      [--no-workers] [--no-launchers] [--out DIR]

- small: the demo's own workload (UNet 64 px, 24 generated patients x 2 images per site,
  2 local epochs);
- densenet: issue 7's workload (DenseNet121 at 128 px, 150 patients x 2 images = 300 images
  per site, cxr-classify on the phantoms' nodule label, 1 local epoch).

Round overhead = round wall time - the slowest site's (data loading + training +
evaluation) time, from the run's metrics.jsonl. The last lines are
`overhead_seconds=<mean overhead>`, `exchanges_per_round=<mean exchanges>` and
`overhead_fraction=<mean overhead / mean round wall time>` over the steady rounds: after
the first (which also pays process start-up, the first decode and the key adverts) and
before the last (which adds its evaluation-only exchange), or all rounds after the first
when there are fewer than 3.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fedrad.demo import CONFIGS, run_demo

WORKLOADS = {
    "small": ({}, 24),
    "densenet": ({"task": "cxr-classify", "model": "densenet121", "labels": "label_nodule",
                  "image-size": 128, "local-epochs": 1, "batch-size": 16,
                  "learning-rate": 0.001}, 150),
}


def _site_seconds(site: dict) -> float:
    train, evaluation = site.get("train", {}), site.get("evaluation", {})
    return (train.get("load-seconds", 0.0) + train.get("train-seconds", 0.0)
            + evaluation.get("load-seconds", 0.0) + evaluation.get("eval-seconds", 0.0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-workers", action="store_true",
                        help="no site workers: every message imports the training stack")
    parser.add_argument("--no-launchers", action="store_true",
                        help="Flower's flower-superexec: a fresh flwr-clientapp per message")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    overrides, patients = WORKLOADS[args.workload]
    out = args.out or Path(tempfile.mkdtemp(prefix="round-overhead-")) / "demo"
    start = time.monotonic()
    result = run_demo(out, data=None, config_file=CONFIGS / "demo.toml",
                      overrides={**overrides, "num-rounds": args.rounds}, patients=patients,
                      say=lambda line: None, workers=not args.no_workers,
                      launchers=not args.no_launchers)
    print(f"workload={args.workload} rounds={args.rounds} workers={not args.no_workers} "
          f"launchers={not args.no_launchers} "
          f"total {time.monotonic() - start:.0f}s, run folder {result.run_dir}")
    walls, overheads, exchanges = [], [], []
    last = len(result.rounds)
    for row in result.rounds:
        slowest = max((_site_seconds(s) for s in row["sites"].values()), default=0.0)
        overhead = row["wall_seconds"] - slowest
        print(f"round {row['server_round']}: wall {row['wall_seconds']:.1f}s, slowest site "
              f"{slowest:.1f}s (load+train+eval), overhead {overhead:.1f}s, "
              f"{row.get('exchanges', 1)} exchange(s)")
        steady = 1 < row["server_round"] < last or (last < 3 and row["server_round"] > 1)
        if steady or last == 1:
            walls.append(row["wall_seconds"])
            overheads.append(overhead)
            exchanges.append(row.get("exchanges", 1))
    mean_overhead = sum(overheads) / len(overheads)
    print(f"overhead_seconds={mean_overhead:.2f}")
    print(f"exchanges_per_round={sum(exchanges) / len(exchanges):.2f}")
    print(f"overhead_fraction={mean_overhead / (sum(walls) / len(walls)):.3f}")


if __name__ == "__main__":
    main()
