"""Update size: float16 vs float32 updates on the demo's settings with SecAgg+ off (with
SecAgg+ the masked vectors are integers and `update-dtype` is refused).

Usage: python bench/update_dtype.py [--rounds N]

Two real deployments back to back (SuperLink + 3 sites on 127.0.0.1, TLS, node auth,
DP-SGD, UNet 64 px, same seed), differing only in `update-dtype`. Bytes are what each site
recorded in its audit log as sent (`update-sent`), per site per round; the metric is the
last round's pooled Dice. The last line is `float16_bytes_over_float32=<ratio>`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fedrad.demo import CONFIGS, run_demo


def _run(rounds: int, dtype: str) -> tuple[float, float]:
    """(mean update bytes per site per round, final pooled Dice)."""
    out = Path(tempfile.mkdtemp(prefix=f"update-{dtype}-")) / "demo"
    result = run_demo(out, data=None, config_file=CONFIGS / "demo.toml",
                      overrides={"num-rounds": rounds, "secagg-enabled": False,
                                 "update-dtype": dtype},
                      patients=24, say=lambda line: None)
    sent = []
    for audit in sorted((out / "sites").glob("*/work/audit.jsonl")):
        sent += [e["bytes"] for e in map(json.loads, audit.read_text().splitlines())
                 if e["event"] == "update-sent"]
    return sum(sent) / len(sent), float(result.rounds[-1]["pooled_score"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    full_bytes, full_dice = _run(args.rounds, "float32")
    half_bytes, half_dice = _run(args.rounds, "float16")
    print(f"float32: {full_bytes / 1e6:.3f} MB per site per round, final pooled Dice "
          f"{full_dice:.3f}")
    print(f"float16: {half_bytes / 1e6:.3f} MB per site per round, final pooled Dice "
          f"{half_dice:.3f} (difference {half_dice - full_dice:+.3f})")
    print(f"float16_bytes_over_float32={half_bytes / full_bytes:.2f}")


if __name__ == "__main__":
    main()
