"""What the toolkit keeps in its cache, and removing it: ``cleanbackdoor cache``.

Everything expensive is cached (``$CLEANBACKDOOR_CACHE``, else ``~/.cache/cleanbackdoor``) under a key of exactly
its inputs and of the version of the code that computes it (:func:`entry_key`, :data:`VERSIONS`), so an entry is
used only by the inputs and the code that produced it: an entry whose inputs no run names any more, or whose
kind's version has moved on, stays unused until it is removed. Entries by kind:

==============  ====================================  ==============================================================
kind            where                                 what
==============  ====================================  ==============================================================
datasets        ``datasets/``                         extracted archives and decoded image arrays
pretrained      ``models/pretrained-*.pt``            extractors pretrained on a source task (``model.pretrained``)
clean           ``models/clean-*.pt``                 clean models of experiments (the no-attack baseline)
checkpoints     ``models/*.ckpt``, ``flip/*.work``    unfinished trainings; a rerun resumes from them
features        ``features/``                         frozen extractors' features, per image (one folder a view)
flip            ``flip/``                             FLIP's expert trajectories and label runs
hidden_trigger  ``hidden_trigger/``                   the hidden-trigger attack's optimized poisons
defenses        ``defenses/``                         defenses' trained models and scores
audit           ``audit/``                            the models ``cleanbackdoor audit`` trains
==============  ====================================  ==============================================================

Anything else under the cache folder is listed as ``other`` and never removed.

Several processes may share one cache (two runs on one machine, the Ray workers of a cluster on a shared
filesystem). Every file is written atomically (:func:`save_atomic`), and every expensive entry is computed once
(:func:`compute_once`): the first process to need it computes it under the entry's lock (``NAME.lock`` beside it)
while the others wait, then load it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from cleanbackdoor.errors import ConfigError

# The cache's kinds and the version of the code behind each, part of every key of that kind (:func:`entry_key`).
# A change to an algorithm that changes what it computes bumps its kind's number here; the entries of the old
# number are then never used again (``cleanbackdoor cache --clear KIND`` removes them). "checkpoints" versions the
# training loop's resume state; the other kinds their products.
VERSIONS: dict[str, int] = {"datasets": 1, "pretrained": 1, "clean": 1, "checkpoints": 1, "features": 1, "flip": 1,
                            "hidden_trigger": 1, "defenses": 1, "audit": 1}
KINDS = tuple(VERSIONS)
# The layout, for the modules that write to the cache (so that what they write is what this module classifies):
# a folder per kind, except models/, which holds the pretrained extractors and the clean models.
DATASETS, MODELS, FEATURES, FLIP, DEFENSES, AUDIT = "datasets", "models", "features", "flip", "defenses", "audit"
HIDDEN_TRIGGER = "hidden_trigger"
_FOLDERS = (DATASETS, FEATURES, FLIP, HIDDEN_TRIGGER, DEFENSES, AUDIT)
_MODEL_KINDS = ("pretrained", "clean")


T = TypeVar("T")


# -- keys -----------------------------------------------------------------------------------------------------
def stable_key(*parts: Any, length: int = 16) -> str:
    """A hash of JSON-serializable parts: the cache key of an expensive product."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def entry_key(kind: str, *parts: Any) -> str:
    """The cache key of an entry of ``kind``: a hash of the kind, its code's version (:data:`VERSIONS`) and
    exactly the entry's inputs (JSON-serializable ``parts``, arrays as :func:`fingerprint`)."""
    if kind not in VERSIONS:
        raise ValueError(f"unknown cache kind {kind!r}; known: {', '.join(VERSIONS)}")
    return stable_key(kind, VERSIONS[kind], *parts)


def fingerprint(*arrays: np.ndarray) -> str:
    """A hash of arrays' bytes, shapes and dtypes: the part of a cache key that stands for data."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# -- writing entries ------------------------------------------------------------------------------------------
def save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file of this process, then rename: a kill never leaves a half-written file at
    ``path``, and two processes writing the same entry never write into one file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


@contextmanager
def entry_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the cache entry ``path`` (the file ``path.lock``, kept: removing a lock file another
    process waits on would break the lock). Released when the block ends or the process dies."""
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compute_once(path: Path | None, compute: Callable[[], T], load: Callable[[Path], T],
                 save: Callable[[T, Path], None]) -> tuple[T, bool]:
    """``(value, loaded)``: the entry at ``path`` loaded when it exists, else computed, saved and returned. Between
    processes sharing the cache, under the entry's lock: one computes, the others wait and load its result.
    ``path`` None: computed without a cache. ``save`` must write atomically (:func:`save_atomic`); the entry's
    folder exists when it is called (the lock file lives there)."""
    if path is None:
        return compute(), False
    if path.exists():
        return load(path), True
    with entry_lock(path):
        if path.exists():  # computed by another process while this one waited
            return load(path), True
        value = compute()
        save(value, path)
        return value, False


def default_root() -> Path:
    """The cache folder: ``$CLEANBACKDOOR_CACHE`` if set, else ``~/.cache/cleanbackdoor`` (a config's
    ``cache_dir`` overrides it for the runs of that config)."""
    env = os.environ.get("CLEANBACKDOOR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cleanbackdoor"


def seed_folders() -> list[Path]:
    """Folders of cache files computed elsewhere (long CPU products kept in a source checkout's ``artifacts/``):
    ``$CLEANBACKDOOR_SEEDS`` (paths separated like PATH), else the ``artifacts`` folder of the checkout this
    package runs from, when it is one."""
    env = os.environ.get("CLEANBACKDOOR_SEEDS")
    if env is not None:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    checkout = Path(__file__).resolve().parents[2] / "artifacts"
    return [checkout] if checkout.is_dir() else []


def seeded(path: Path) -> Path | None:
    """A cache file's seed: a file of the same name in one of :func:`seed_folders`, or None."""
    for folder in seed_folders():
        if (folder / path.name).is_file():
            return folder / path.name
    return None


@dataclass(frozen=True)
class Entry:
    """One cache entry: a file or a folder directly inside one of the cache's folders."""

    kind: str
    path: Path
    size: int  # bytes, a folder's summed over its files
    mtime: float  # the last modification, a folder's over its files


def classify(folder: str, name: str) -> str:
    """The kind of the entry ``name`` in the cache's folder ``folder``, ``other`` for what the toolkit did not
    write."""
    if name.endswith(".ckpt") and folder == MODELS or name.endswith(".work") and folder == FLIP:
        return "checkpoints"
    if folder == MODELS:
        for kind in _MODEL_KINDS:
            if name.startswith(f"{kind}-"):
                return kind
        return "other"
    return folder if folder in _FOLDERS else "other"


def model_file(root: str | Path, kind: str, key: str) -> Path:
    """Where a model of ``kind`` (``pretrained`` or ``clean``) with cache key ``key`` is kept; its unfinished
    training's checkpoint is the same path with ``.ckpt``."""
    if kind not in _MODEL_KINDS:
        raise ValueError(f"models in the cache are {' or '.join(_MODEL_KINDS)}, not {kind!r}")
    return Path(root) / MODELS / f"{kind}-{key}.pt"


def entries(root: str | Path) -> list[Entry]:
    """Every entry of the cache at ``root``, oldest first (none when the folder does not exist)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        found += [e for e in (_entry(p, classify(folder.name, p.name)) for p in sorted(folder.iterdir())) if e]
    found += [e for e in (_entry(path, "other") for path in sorted(root.iterdir()) if not path.is_dir()) if e]
    return sorted(found, key=lambda e: e.mtime)


def _entry(path: Path, kind: str) -> Entry | None:
    """The entry at ``path``; None if it vanished meanwhile (a run renaming its temporary file into place)."""
    try:
        files = [path] if not path.is_dir() else [f for f in path.rglob("*") if f.is_file()]
        stats = [f.stat() for f in files]
        mtime = max((s.st_mtime for s in stats), default=path.stat().st_mtime)
    except FileNotFoundError:
        return None
    return Entry(kind, path, sum(s.st_size for s in stats), mtime)


def select(found: Iterable[Entry], kinds: Iterable[str], older_than_days: float | None = None) -> list[Entry]:
    """The entries of the given kinds (``all``: every kind the toolkit writes), last modified more than
    ``older_than_days`` ago if given. ``other`` is never selected."""
    kinds = list(kinds)
    for kind in kinds:
        if kind != "all" and kind not in KINDS:
            raise ConfigError(f"unknown cache kind {kind!r}; known: all, {', '.join(KINDS)}")
    if older_than_days is not None and older_than_days < 0:
        raise ConfigError(f"--older-than takes a number of days >= 0, got {older_than_days}")
    wanted = set(KINDS) if "all" in kinds else set(kinds)
    cutoff = time.time() - 86400 * (older_than_days or 0)
    return [e for e in found if e.kind in wanted and (older_than_days is None or e.mtime < cutoff)]


def remove(chosen: Iterable[Entry]) -> None:
    """Delete the entries."""
    for e in chosen:
        if e.path.is_dir():
            shutil.rmtree(e.path)
        else:
            e.path.unlink(missing_ok=True)


def human(size: float) -> str:
    """``1536`` -> ``1.5 KB``."""
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KB", "MB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GB"


def summary(found: list[Entry]) -> str:
    """A table of the kinds: the version of their code in this installation (:data:`VERSIONS`), entries, size,
    newest."""
    lines = [f"{'kind':<14} {'code':>4} {'entries':>7} {'size':>10}  newest"]
    for kind in (*KINDS, "other"):
        of = [e for e in found if e.kind == kind]
        if of:
            newest = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(e.mtime for e in of)))
            version = f"v{VERSIONS[kind]}" if kind in VERSIONS else "-"
            lines.append(f"{kind:<14} {version:>4} {len(of):>7} {human(sum(e.size for e in of)):>10}  {newest}")
    lines.append(f"{'total':<14} {'-':>4} {len(found):>7} {human(sum(e.size for e in found)):>10}")
    return "\n".join(lines)


def listing(found: list[Entry]) -> str:
    """One line an entry: kind, size, last modified, path."""
    return "\n".join(f"{e.kind:<12} {human(e.size):>10}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(e.mtime))}"
                     f"  {e.path}" for e in found)
