"""Server memory with 10, 30 and 100 simulated sites (Flower's simulation engine, Ray).

Usage: python bench/sim_scale.py [--sites 10 30 100] [--rounds 3] [--model densenet121]
(needs Flower's simulation extra: pip install "flwr[simulation]==1.42.0")

fedrad's own ServerApp (server/app.py: strategy, screening, k-of-n, checkpoints) runs in
this process under `flwr.simulation.run_simulation`; each simulated site is a ClientApp
that replies at once with a small random update of the right layout (no training: what is
measured is the server). A sampler thread reads this process's resident memory every
10 ms from the end of round 1 to the end of the last round; the figure is the peak growth
over the resident size at the end of round 1, divided by the model's size in bytes.
It also prints the absolute sizes and the peak over the lowest resident size after round 1
(what a round adds to what the process keeps between rounds): freeing more by the end of
round 1 lowers the base the first figure is taken from, so compare absolute peaks too.
FedAvg folds updates into one running sum as they are pulled (server/aggregation.py
UpdatePool), and with --in-flight W the server sends W requests at a time
(`max-sites-in-flight`), the next as a reply comes in; FedMedian, a robust rule, must
keep every update, and is measured beside it (up to --keep-all-up-to sites) as the
contrast. Last line:
`server_mem_over_model_at_100=<FedAvg's peak growth ÷ model bytes at the largest count>`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _status(field: str = "VmRSS") -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def _rss() -> int:
    return _status("VmRSS")


class Sampler:
    """Peak resident memory of this process over the steady rounds: from the end of
    round 1 (imports, first checkpoint, TensorBoard writer all paid) to the end of the
    last round (before the report is drawn)."""

    def __init__(self, metrics: Path, rounds: int) -> None:
        self.metrics, self.rounds = metrics, rounds
        self.base = self.peak = self.floor = 0
        self.anon_base = self.anon_peak = self.shmem_base = self.shmem_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _done(self) -> int:
        files = list(self.metrics.glob("*/metrics.jsonl"))
        return len(files[0].read_text().splitlines()) if files else 0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while self._done() < 1 and not self._stop.wait(0.005):
            pass
        self.base = self.peak = self.floor = _rss()
        self.anon_base = self.anon_peak = _status("RssAnon")
        self.shmem_base = self.shmem_peak = _status("RssShmem")
        while self._done() < self.rounds and not self._stop.wait(0.01):
            rss = _rss()
            self.peak, self.floor = max(self.peak, rss), min(self.floor, rss)
            self.anon_peak = max(self.anon_peak, _status("RssAnon"))
            self.shmem_peak = max(self.shmem_peak, _status("RssShmem"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.base


def _client_app():  # noqa: ANN202 - Flower types, built inside the Ray workers too
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from common import keys

    app = ClientApp()

    def _reply(msg: Message, context: Context, update: bool) -> Message:
        content = RecordDict({
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10.0, keys.EVAL_LOSS: 0.5}),
            keys.SITE: ConfigRecord({keys.SITE_ID: f"site-{context.node_id % 100000}",
                                     keys.STATUS: keys.STATUS_OK}),
        })
        if update:
            weights = msg.content.array_records[keys.WEIGHTS].to_numpy_ndarrays()
            rng = np.random.default_rng(context.node_id % 2**32)
            content[keys.UPDATE] = ArrayRecord(
                [rng.normal(0, 1e-3, a.shape).astype(np.float32) for a in weights])
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _reply(msg, context, update=True)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _reply(msg, context, update=False)

    return app


def _server_app(config: dict, sampler: Sampler, model_bytes: list[int]):  # noqa: ANN202
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from common.config import RunConfig
    from common.models import build_model
    from server import app as fedrad_server

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        model = build_model(RunConfig.from_mapping(config))
        model_bytes.append(sum(p.numel() * 4 for p in model.state_dict().values()))
        del model
        ours = Context(run_id=context.run_id, node_id=context.node_id,
                       node_config=context.node_config, state=context.state,
                       run_config=config)
        sampler.start()
        fedrad_server.main(grid, ours)

    return app


def measure(sites: int, strategy: str, rounds: int, model: str,
            in_flight: int = 0) -> tuple[float, float, int, tuple[float, float]]:
    """(peak RSS growth in bytes, seconds, model bytes, (peak growth of the private
    anonymous memory, of the shared memory)) of one simulated run."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from flwr.simulation import run_simulation

    home = Path(tempfile.mkdtemp(prefix=f"sim-{sites}-{strategy}-"))
    key = home / "signing.key"
    key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.environ["FEDRAD_SERVER_HOME"] = str(home)
    os.environ["FEDRAD_MODEL_SIGNING_KEY"] = str(key)
    task = "cxr-classify" if model == "densenet121" else "lung-seg"
    config = {"task": task, "model": model, "num-rounds": rounds, "min-sites": sites,
              "min-train-sites": max(2, sites // 2), "secagg-enabled": False,
              "strategy": strategy, "round-timeout": 600.0, "max-sites-in-flight": in_flight}
    sampler, model_bytes = Sampler(home / "runs", rounds), []
    start = time.perf_counter()
    run_simulation(server_app=_server_app(config, sampler, model_bytes),
                   client_app=_client_app(), num_supernodes=sites,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False,
                                                 "logging_level": "ERROR"}})
    seconds = time.perf_counter() - start
    growth = sampler.stop()
    print(f"  {sites} sites {strategy}: resident at the end of round 1 "
          f"{sampler.base / 1e6:.0f} MB, lowest after it {sampler.floor / 1e6:.0f} MB, peak "
          f"{sampler.peak / 1e6:.0f} MB (peak over the lowest: "
          f"{(sampler.peak - sampler.floor) / model_bytes[0]:.2f} x model)", flush=True)
    rows = [json.loads(x) for x in (home / "runs").glob("*/metrics.jsonl").__next__()
            .read_text().splitlines()]
    if len(rows) != rounds or rows[-1]["sites_trained"] != sites:
        raise RuntimeError(f"{sites} sites, {strategy}: run incomplete ({rows[-1:]})")
    parts = (float(sampler.anon_peak - sampler.anon_base),
             float(sampler.shmem_peak - sampler.shmem_base))
    return float(growth), seconds, model_bytes[0], parts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--in-flight", type=int, default=0,
                        help="max-sites-in-flight for FedAvg (0: every site at once)")
    parser.add_argument("--keep-all-up-to", type=int, default=30,
                        help="measure FedMedian (keeps every update) up to this many sites")
    args = parser.parse_args()
    ratio = float("nan")
    for sites in args.sites:
        for strategy in ("fedavg", "fedmedian") if sites <= args.keep_all_up_to \
                else ("fedavg",):
            window = args.in_flight if strategy == "fedavg" else 0
            growth, seconds, model_bytes, (anon, shmem) = measure(
                sites, strategy, args.rounds, args.model, window)
            print(f"{sites:>4} sites {strategy:<10} in flight {window or sites:>3}: "
                  f"peak RSS growth {growth / 1e6:8.1f} MB "
                  f"= {growth / model_bytes:6.2f} x model ({model_bytes / 1e6:.2f} MB), "
                  f"{seconds:.1f} s for {args.rounds} rounds; of which private "
                  f"{anon / model_bytes:.2f} x, shared memory (Ray's object store) "
                  f"{shmem / model_bytes:.2f} x", flush=True)
            if strategy == "fedavg":
                ratio = growth / model_bytes
    print(f"server_mem_over_model_at_{args.sites[-1]}={ratio:.2f}")


if __name__ == "__main__":
    main()
