"""Running independent jobs: one after another in this process (the default), or as Ray tasks on a cluster.

A sweep's points, a defense table's rows, ``reproduce``'s rows and FLIP's experts and label runs are independent
jobs: each is a function of its inputs, and the products they share (the clean model of a seed, FLIP's experts, a
frozen extractor's features) go through the cache, computed by whichever job needs them first while the others
wait for that entry's lock (:func:`cleanbackdoor.cache.compute_once`). An executor runs a list of :class:`Job`
and returns their results in the order of the list, whatever order they finished in.

- :class:`Serial`: in this process, in order. No dependency beyond the toolkit's.
- :class:`RayExecutor`: each job a Ray task (``pip install 'cleanbackdoor[ray]'``) asking for ``cpus`` CPUs and
  ``gpus`` GPUs, retried ``retries`` times when its worker dies (a killed process, a lost node). A retried job
  resumes: runs write to ``.NAME.partial`` folders, trainings checkpoint every epoch and cache entries are
  written atomically, so the retry picks up the work of the attempt that died. Every worker must see the same
  cache folder and data (on a cluster: a shared filesystem; ``docs/scale.md``).

**Determinism.** A job's result depends on its inputs and on the number of threads PyTorch uses (a reduction
split over two threads adds in another order than over one). Both executors set PyTorch's threads per job to
``threads`` when it is given (Ray's default: the job's ``cpus``), so a Ray run is bit-identical to the serial run
with the same ``threads`` on CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from cleanbackdoor.errors import CleanBackdoorError, ConfigError

EXECUTORS = ("serial", "ray")


@dataclass(frozen=True)
class Job:
    """One independent unit of work: ``fn(*args)``, named for progress lines. ``cpus`` / ``gpus``: what it asks
    of the cluster (None: the executor's default)."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    cpus: float | None = None
    gpus: float | None = None


class Executor(Protocol):
    def map(self, jobs: Sequence[Job], what: str = "runs") -> list[Any]:
        """Every job's result, in the order of ``jobs``."""
        ...


def _with_threads(threads: int | None, fn: Callable[..., Any], args: tuple) -> Any:
    """``fn(*args)`` with PyTorch's intra-op threads set to ``threads`` (unchanged when None), restored after."""
    if threads is None:
        return fn(*args)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


class Progress:
    """``what: D done, R running, L left`` lines as jobs finish (to stderr, so tables on stdout stay clean)."""

    def __init__(self, what: str, total: int, echo: bool = True) -> None:
        self.what, self.total, self.echo = what, total, echo

    def __call__(self, done: int, running: int, last: str | None = None) -> None:
        if self.echo:
            left = self.total - done - running
            tail = f" ({last} finished)" if last else ""
            print(f"{self.what}: {done} done, {running} running, {left} left{tail}", file=sys.stderr, flush=True)


@dataclass
class Serial:
    """The jobs one after another, in this process."""

    threads: int | None = None
    echo: bool = True

    def map(self, jobs: Sequence[Job], what: str = "runs") -> list[Any]:
        progress = Progress(what, len(jobs), self.echo and len(jobs) > 1)
        results = []
        for i, job in enumerate(jobs):
            progress(i, 1)
            results.append(_with_threads(self.threads, job.fn, job.args))
        progress(len(jobs), 0, jobs[-1].name if jobs else None)
        return results


@dataclass
class RayExecutor:
    """Each job a Ray task. ``address``: a running cluster (``ray start --head`` printed it; ``auto`` finds the one
    this machine belongs to); None starts a local one with this machine's CPUs, or joins the one Ray is already
    connected to. ``cpus`` / ``gpus``: per task unless the job says otherwise. ``retries``: how many times a task
    whose worker died is started again (exceptions raised by the job itself are not retried: they are errors of the
    run, and the same inputs would raise them again)."""

    address: str | None = None
    cpus: float = 1
    gpus: float = 0
    retries: int = 3
    threads: int | None = None  # PyTorch threads per task; None: max(1, int(cpus))
    echo: bool = True
    init_options: dict[str, Any] = field(default_factory=dict)

    def _ray(self) -> Any:
        try:
            import ray  # noqa: PLC0415 - optional dependency
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'cleanbackdoor[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=self.address, **{"include_dashboard": False, "log_to_driver": False,
                                               **self.init_options})
        return ray

    def map(self, jobs: Sequence[Job], what: str = "runs") -> list[Any]:
        if not jobs:
            return []
        ray = self._ray()
        threads = self.threads if self.threads is not None else max(1, int(self.cpus))
        remote = ray.remote(_with_threads)
        refs = []
        for job in jobs:
            options = {"num_cpus": self.cpus if job.cpus is None else job.cpus,
                       "num_gpus": self.gpus if job.gpus is None else job.gpus,
                       "max_retries": self.retries, "name": job.name}
            refs.append(remote.options(**options).remote(threads, job.fn, job.args))
        index = {ref: i for i, ref in enumerate(refs)}
        capacity = max(1, int(ray.cluster_resources().get("CPU", 1) // max(self.cpus, 1e-9)))
        progress = Progress(what, len(jobs), self.echo)
        pending, done = list(refs), 0
        progress(0, min(len(pending), capacity))
        results: list[Any] = [None] * len(jobs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                i = index[ref]
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the job's own error, raised as the serial run raises it
                    if isinstance(e.cause, CleanBackdoorError):  # a user's error: one line, exit 2
                        raise e.cause from None
                    raise
                done += 1
                progress(done, min(len(pending), capacity), jobs[i].name)
        return results


def make_executor(name: str | None = "serial", *, address: str | None = None, cpus: float | None = None,
                  gpus: float | None = None, threads: int | None = None, echo: bool = True) -> Executor:
    """An executor by name (``serial`` or ``ray``) and the command line's options."""
    if name in (None, "serial"):
        if address is not None:
            raise ConfigError("--address names a Ray cluster: it needs --executor ray")
        return Serial(threads=threads, echo=echo)
    if name == "ray":
        if cpus is not None and cpus <= 0 or gpus is not None and gpus < 0 or threads is not None and threads < 1:
            raise ConfigError("--cpus-per-run must be > 0, --gpus-per-run >= 0 and --threads >= 1")
        return RayExecutor(address=address, cpus=1 if cpus is None else cpus, gpus=gpus or 0, threads=threads,
                           echo=echo)
    raise ConfigError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")

