"""A sweep of independent one-thread runs, one after another against Ray tasks on this machine, in one process.

Each run is a BadNets experiment on the embedded digits with its own seed (its victim and its clean model: two
ConvNet trainings of ``--epochs`` epochs), so the runs share nothing and a cluster of ``--cpus`` one-CPU workers
can run ``--cpus`` of them at once: expect about ``--cpus`` x, less Ray's start (a local cluster: a few seconds,
printed apart) and the workers' first import of PyTorch. Both sweeps use one PyTorch thread per run and their own
empty cache, and their results are compared: they must be bit-identical.

    PYTHONPATH=src python benchmarks/scale_out.py [--runs 4] [--epochs 60] [--cpus 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cleanbackdoor.config import load_config
from cleanbackdoor.executor import RayExecutor, Serial
from cleanbackdoor.sweep import differences, run_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=4, help="runs in the sweep (one seed each)")
    ap.add_argument("--epochs", type=int, default=60, help="epochs of each training (two per run)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = ap.parse_args()
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="scale-out-"))

    def sweep(name: str, executor) -> float:
        cfg = load_config(None, [f"train.epochs={args.epochs}", "examples=0"], recipe=True,
                          **{"attack.name": "badnets", "out": str(tmp / name), "progress": False,
                             "cache_dir": str(tmp / f"cache-{name}")})
        t0 = time.perf_counter()
        run_sweep(cfg, [30], (), seeds=list(range(args.runs)), executor=executor)
        return time.perf_counter() - t0

    serial = sweep("serial", Serial(threads=1, echo=False))
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter() - t0
    parallel = sweep("ray", RayExecutor(threads=1, echo=False))
    ray.shutdown()
    diff = differences(tmp / "serial", tmp / "ray")
    print(f"{args.runs} runs (BadNets on digits, {args.epochs} epochs per training, 1 thread each), "
          f"Ray on {args.cpus} CPUs")
    print(f"serial                 : {serial:7.1f} s")
    print(f"ray                    : {parallel:7.1f} s  (+ {start:.1f} s to start the local cluster)")
    print(f"speed-up               : {serial / parallel:.2f}x  ({serial / (parallel + start):.2f}x with the start)")
    print("results                : " + ("bit-identical" if not diff else "DIFFER: " + ", ".join(diff)))


if __name__ == "__main__":
    main()
