"""What secure aggregation costs: round wall time with it vs without on the same deployment
settings (the demo's: SuperLink + 3 sites on 127.0.0.1, TLS, node auth, DP-SGD, UNet
64 px), and a site's masking time (quantise + pairwise masks) for the demo's model and
for DenseNet121, against signing and checkpoint encryption.

Usage: python bench/secagg_overhead.py [--rounds N]

Wall times are the mean of rounds 2+ (round 1 also pays start-up and the key adverts).
The plain run needs sites whose policy allows it (require-secure-aggregation = false).
The last line is `secagg_over_plain=<wall with secure aggregation / wall without>`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from fedrad.demo import CONFIGS, run_demo


def _deployment(rounds: int, secagg: bool) -> tuple[float, float]:
    """(mean round wall, mean slowest site training seconds) of rounds 2+."""
    out = Path(tempfile.mkdtemp(prefix="secagg-overhead-")) / "demo"
    result = run_demo(out, data=None, config_file=CONFIGS / "demo.toml",
                      overrides={"num-rounds": rounds, "secagg-enabled": secagg}, patients=24,
                      say=lambda line: None,
                      site_policy=None if secagg else {"require-secure-aggregation": False})
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


def _masking_seconds(size: int, settings, peers: int = 2) -> float:
    """One site's quantise + masks with `peers` others, for a model of `size` values."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from common import masking

    keys = [X25519PrivateKey.generate() for _ in range(peers + 1)]
    roster = {n: masking.Advert(n, k.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw), b"", b"")
        for n, k in enumerate(keys)}
    update = np.random.default_rng(0).uniform(-0.01, 0.01, size).astype(np.float32)

    def one() -> None:
        quantised = masking.quantise(update, 100, clipping_range=settings.clipping_range,
                                     quantization_range=settings.quantization_range,
                                     max_weight=settings.max_weight)
        masking.apply_masks(quantised, own_node=0, own=keys[0], roster=roster,
                            participants=list(roster), run_id=1, server_round=1, attempt=0)

    return _timed(one)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from common.config import RunConfig
    from common.model_signing import load_signing_key, sign_model
    from common.models import build_model
    from common.pki import create_signing_key
    from common.weights import plain_state_dict, to_arrays
    from server.checkpoints import encrypt_state

    with (CONFIGS / "demo.toml").open("rb") as handle:
        config = RunConfig.from_mapping({**tomllib.load(handle), "min-sites": 3})
    state = plain_state_dict(build_model(config))
    arrays = to_arrays(state)
    size = sum(a.size for a in arrays)
    densenet = sum(a.size for a in to_arrays(plain_state_dict(build_model(
        RunConfig.from_mapping({"task": "cxr-classify", "model": "densenet121",
                                "labels": "label_nodule", "image-size": 128})))))
    keydir = Path(tempfile.mkdtemp(prefix="secagg-keys-"))
    private, _ = create_signing_key(keydir)
    signer = load_signing_key(private)
    masking_small = _masking_seconds(size, config.secagg)
    masking_densenet = _masking_seconds(densenet, config.secagg)
    signing = _timed(lambda: sign_model(signer, arrays, 1, 1, "train"))
    encrypting = _timed(lambda: encrypt_state(state, bytes(32), "1", 1))

    plain_wall, plain_train = _deployment(args.rounds, secagg=False)
    secagg_wall, secagg_train = _deployment(args.rounds, secagg=True)

    print(f"demo model: {size} values ({size * 4 / 1e6:.2f} MB float32; the masked upload "
          f"is the same size as uint32, plus 4 bytes for the weight)")
    print(f"per site per round, 3 sites: masking {masking_small * 1e3:.1f} ms (demo UNet), "
          f"{masking_densenet * 1e3:.0f} ms (DenseNet121, {densenet} values); model "
          f"signature {signing * 1e3:.1f} ms; checkpoint AES-GCM {encrypting * 1e3:.1f} ms")
    print(f"round wall (rounds 2+): plain {plain_wall:.1f}s (training {plain_train:.1f}s), "
          f"secure {secagg_wall:.1f}s (training {secagg_train:.1f}s)")
    print(f"secagg_over_plain={secagg_wall / plain_wall:.2f}")


if __name__ == "__main__":
    main()
