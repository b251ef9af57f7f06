"""What SecAgg+ costs: round wall time with it vs without on the same deployment settings
(the demo's: SuperLink + 3 sites on 127.0.0.1, TLS, node auth, DP-SGD, UNet 64 px), bytes on
the wire per site per round, and the time spent masking, signing and encrypting vs training.

Usage: python bench/secagg_overhead.py [--rounds N]

Wall times are the mean of rounds 2+ (round 1 also pays start-up). Bytes are Flower's
serialised message contents for the demo's model (TLS adds its framing on top); masking
time is SecAgg+'s four stages for 3 sites in one process (tests/secagg_loopback.py), per
site. The last line is `secagg_over_plain=<wall with SecAgg+ / wall without>`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from fedrad.demo import CONFIGS, run_demo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/secagg_loopback.py


def _deployment(rounds: int, secagg: bool) -> tuple[float, float]:
    """(mean round wall, mean slowest site training seconds) of rounds 2+."""
    out = Path(tempfile.mkdtemp(prefix="secagg-overhead-")) / "demo"
    result = run_demo(out, data=None, config_file=CONFIGS / "demo.toml",
                      overrides={"num-rounds": rounds, "secagg-enabled": secagg}, patients=24,
                      say=lambda line: None)
    rows = [r for r in result.rounds if r["server_round"] > 1] or result.rounds
    wall = sum(r["wall_seconds"] for r in rows) / len(rows)
    train = sum(max(s["train"].get("train-seconds", 0.0) for s in r["sites"].values())
                for r in rows) / len(rows)
    return wall, train


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from common import keys
    from common.config import RunConfig
    from common.model_signing import load_signing_key, load_verify_key, sign_model, verify_model
    from common.models import build_model
    from common.pki import create_signing_key
    from common.secagg import run_secagg_round
    from common.weights import plain_state_dict, to_arrays
    from server.checkpoints import encrypt_state
    from server.rounds import _request
    from tests.secagg_loopback import LoopbackGrid, site, wire_bytes

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    with (CONFIGS / "demo.toml").open("rb") as handle:
        config = RunConfig.from_mapping({**tomllib.load(handle), "min-sites": 3})
    state = plain_state_dict(build_model(config))
    arrays = to_arrays(state)
    model_bytes = sum(a.nbytes for a in arrays)
    keydir = Path(tempfile.mkdtemp(prefix="secagg-keys-"))
    private, public = create_signing_key(keydir)
    signer, verifier = load_signing_key(private), load_verify_key(public)
    signature = sign_model(signer, arrays, 1, 1, "train")

    # Plain FedAvg: the global model out, the update back.
    request = Message(_request(arrays, 1, signature), dst_node_id=2, message_type="train")
    reply = Message(RecordDict({keys.UPDATE: ArrayRecord(arrays)}), reply_to=request)
    plain_bytes = wire_bytes(request) + wire_bytes(reply)

    # SecAgg+: every stage, 3 sites, updates of the model's shapes.
    rng = np.random.default_rng(0)
    updates = {n: [rng.uniform(-0.01, 0.01, a.shape).astype(np.float32) for a in arrays]
               for n in (11, 12, 13)}

    def secagg_round() -> LoopbackGrid:
        grid = LoopbackGrid({n: site(n, updates[n], 100, None) for n in updates})
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                          run_config={})
        run_secagg_round(grid, context, server_round=1, global_arrays=arrays,
                         node_ids=sorted(updates), fit_config={}, settings=config.secagg,
                         timeout=5.0)
        return grid

    grid = secagg_round()
    secagg_bytes = (grid.bytes_to[11] + grid.bytes_from[11])
    masking = _timed(secagg_round) / len(updates)
    signing = _timed(lambda: sign_model(signer, arrays, 1, 1, "train"))
    verifying = _timed(lambda: verify_model(verifier, arrays, 1, 1, "train", signature))
    encrypting = _timed(lambda: encrypt_state(state, bytes(32), "1", 1))

    plain_wall, plain_train = _deployment(args.rounds, secagg=False)
    secagg_wall, secagg_train = _deployment(args.rounds, secagg=True)

    print(f"model: {len(arrays)} arrays, {model_bytes / 1e6:.2f} MB float32")
    print(f"bytes per site per round (train exchange): plain {plain_bytes / 1e6:.2f} MB, "
          f"SecAgg+ {secagg_bytes / 1e6:.2f} MB ({secagg_bytes / plain_bytes:.2f}x)")
    print(f"per site per round: SecAgg+ protocol (masking, shares, unmasking) "
          f"{masking:.3f}s, model signature {signing * 1e3:.1f} ms sign + "
          f"{verifying * 1e3:.1f} ms verify, checkpoint AES-GCM {encrypting * 1e3:.1f} ms; "
          f"training {secagg_train:.1f}s (slowest site)")
    print(f"round wall (rounds 2+): plain {plain_wall:.1f}s (training {plain_train:.1f}s), "
          f"SecAgg+ {secagg_wall:.1f}s (training {secagg_train:.1f}s)")
    print(f"secagg_over_plain={secagg_wall / plain_wall:.2f}")


if __name__ == "__main__":
    main()
