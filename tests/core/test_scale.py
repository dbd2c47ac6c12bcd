"""Scale-out: executors, the cache shared between processes, and sweeps on a local Ray cluster that must equal the
serial sweep bit for bit (the Ray tests skip without the `ray` extra)."""

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cleanbackdoor.cache import compute_once
from cleanbackdoor.cli import main
from cleanbackdoor.config import load_config
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.executor import Job, Serial, make_executor
from cleanbackdoor.sweep import differences, run_sweep


def _threads_and(x: int) -> tuple[int, int]:
    return torch.get_num_threads(), 2 * x


def test_serial_executor_keeps_the_order_and_sets_the_threads_per_job():
    before = torch.get_num_threads()
    out = Serial(threads=1, echo=False).map([Job(f"j{i}", _threads_and, (i,)) for i in range(3)])
    assert out == [(1, 0), (1, 2), (1, 4)]
    assert torch.get_num_threads() == before


def test_executor_choices_are_checked(capsys):
    with pytest.raises(ConfigError, match="unknown executor 'dask'"):
        make_executor("dask")
    with pytest.raises(ConfigError, match="--address names a Ray cluster"):
        make_executor("serial", address="auto")
    assert main(["sweep", "--budgets", "10", "--executor", "ray", "--cpus-per-run", "0"]) == 2
    err = capsys.readouterr().err
    assert "--cpus-per-run must be > 0" in err and err.count("\n") == 1


def _compute_entry(path: str, log: str) -> float:
    def compute() -> float:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough for the other process to find the entry missing and wait for the lock
        return 42.0

    value, _ = compute_once(Path(path), compute, lambda p: torch.load(p), lambda v, p: torch.save(v, p))
    return value


def test_compute_once_computes_a_shared_entry_once_across_processes(tmp_path):
    path, log = tmp_path / "entry.pt", tmp_path / "computed.txt"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        values = pool.starmap(_compute_entry, [(str(path), str(log))] * 2)
    assert values == [42.0, 42.0]
    assert len(log.read_text().split()) == 1  # one process computed it, the other loaded it
    assert (tmp_path / "entry.pt.lock").exists() and not list(tmp_path.glob("*.tmp"))


def _sweep_config(tmp_path: Path, name: str, cache: Path):
    return load_config(None, ["train.epochs=4", "examples=0", "attack.trigger={name = 'turner'}"],
                       recipe=True, **{"attack.name": "badnets", "out": str(tmp_path / name), "progress": False,
                                       "cache_dir": str(cache)})


def _same_runs(a: Path, b: Path) -> int:
    """Every point of sweep ``a`` equals the one of ``b`` (poisoning, victim weights, metrics); how many."""
    assert differences(a, b) == []
    return len(list(a.glob("*/metrics.json")))


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def serial_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serial")
    cfg = _sweep_config(tmp, "sweep", tmp / "cache")
    rows = run_sweep(cfg, [10, 30], ("random_flip",), seeds=[0, 1], executor=Serial(threads=1, echo=False))
    return tmp / "sweep", rows


def test_ray_sweep_equals_the_serial_sweep(ray_cluster, serial_sweep, tmp_path):
    cfg = _sweep_config(tmp_path, "sweep", tmp_path / "cache")
    rows = run_sweep(cfg, [10, 30], ("random_flip",), seeds=[0, 1], executor=make_executor("ray", threads=1))
    assert _same_runs(tmp_path / "sweep", serial_sweep[0]) == 8
    assert rows == serial_sweep[1]
    # every clean model was trained once, by whichever worker came first, and loaded by the others
    assert len(list((tmp_path / "cache" / "models").glob("clean-*.pt"))) == 2


def test_a_killed_ray_task_is_retried_and_ends_as_the_serial_run(ray_cluster, serial_sweep, tmp_path):
    cfg = _sweep_config(tmp_path, "sweep", tmp_path / "cache")
    killed: list[int] = []

    def kill_one_running_task() -> None:  # as a node failing: SIGKILL the worker process in the middle of a run
        deadline = time.time() + 120
        while not killed and time.time() < deadline:
            if list((tmp_path / "sweep").glob(".*.partial/poisoning.npz")):  # a run past its attack stage
                for proc in Path("/proc").glob("[0-9]*"):
                    try:
                        title = (proc / "cmdline").read_bytes().decode(errors="replace")
                    except OSError:
                        continue
                    if title.startswith("ray::badnets at budget") or title.startswith("ray::random_flip at budget"):
                        os.kill(int(proc.name), signal.SIGKILL)
                        killed.append(int(proc.name))
                        return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_running_task)
    killer.start()
    rows = run_sweep(cfg, [10, 30], ("random_flip",), seeds=[0, 1], executor=make_executor("ray", threads=1))
    killer.join()
    assert killed, "no running task was found to kill"
    assert _same_runs(tmp_path / "sweep", serial_sweep[0]) == 8
    assert rows == serial_sweep[1]


def test_an_interrupted_sweep_reads_back_its_finished_points(serial_sweep, tmp_path):
    cfg = _sweep_config(tmp_path, "sweep", tmp_path / "cache")
    first = run_sweep(cfg, [10], ("random_flip",), executor=Serial(threads=1, echo=False))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").glob("*/metrics.json")}
    again = run_sweep(cfg, [10], ("random_flip",), executor=Serial(threads=1, echo=False))
    assert again == first and len(stamps) == 2
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").glob("*/metrics.json")} == stamps


def test_differences_names_what_differs(serial_sweep, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(serial_sweep[0], copy)
    assert differences(serial_sweep[0], copy) == []
    metrics = copy / "badnets-10-seed0" / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"seed": 0', '"seed": 7'))
    weights = torch.load(copy / "random_flip-30-seed1" / "model.pt", weights_only=True)
    first = next(iter(weights))
    weights[first] = weights[first] + 1e-7
    torch.save(weights, copy / "random_flip-30-seed1" / "model.pt")
    assert differences(serial_sweep[0], copy) == ["badnets-10-seed0: metrics.json", "random_flip-30-seed1: model.pt"]


def _flip_config(tmp_path: Path, name: str):
    overrides = ["attack.n_experts=2", "attack.label_runs=2", "attack.expert_epochs=2", "attack.label_passes=3",
                 "train.epochs=3", "examples=0", "clean_baseline=false", "dirty_label_control=false"]
    return load_config(None, overrides, recipe=True,
                       **{"out": str(tmp_path / name), "progress": False, "cache_dir": str(tmp_path / f"cache-{name}")})


def test_flip_experts_and_label_runs_as_ray_tasks_equal_the_serial_run(ray_cluster, tmp_path):
    from cleanbackdoor.experiment import run_experiment

    serial = run_experiment(_flip_config(tmp_path, "serial"), echo=False, executor=Serial(threads=1, echo=False))
    spread = run_experiment(_flip_config(tmp_path, "ray"), echo=False, executor=make_executor("ray", threads=1))
    assert np.array_equal(serial.poisoning.labels, spread.poisoning.labels)
    assert np.array_equal(serial.poisoning.mask, spread.poisoning.mask) and serial.poisoning.mask.sum() == 40
    for kind in ("expert", "labels"):  # each job wrote its own cache entry
        assert len(list((tmp_path / "cache-ray" / "flip").glob(f"{kind}-*.pt"))) == 2
    log = (tmp_path / "ray" / "log.txt").read_text()
    assert "flip: expert 2/2 trained" in log


def test_a_users_error_inside_a_ray_task_ends_with_one_line(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    code = main(["sweep", "--attack", "badnets", "--out", str(tmp_path / "s"), "--quiet", "--budgets", "5000",
                 "--no-baseline", "--set", "train.epochs=1", "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and "RayTaskError" not in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("cleanbackdoor: error: ")
