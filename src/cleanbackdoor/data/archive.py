"""Tar archives and the dataset cache: safe extraction, cache keys, cached decoded arrays.

Datasets are never downloaded. An archive the user already has (``.tar.gz``, ``.tgz``, ``.tar``) is read in one of
two ways:

* :func:`extract_archive` unpacks it (``tarfile`` with ``filter="data"``: no absolute paths, no ``..``, no links
  out of the folder, no device files) into the cache, for formats made of a few files (CIFAR's pickled batches,
  MNIST's IDX files). It extracts into a temporary folder and renames that folder into place only when extraction
  has finished, so an interrupted extraction is never mistaken for a complete one.
* class-per-folder image trees are decoded straight from the archive stream (see :mod:`.folder`), and the decoded
  arrays are cached with :func:`save_arrays` / :func:`load_arrays`, so a second load reads one ``.npz``.

The cache lives in ``$CLEANBACKDOOR_CACHE`` if set, else ``~/.cache/cleanbackdoor``, under ``datasets/``. Every
entry is keyed by a hash of the archive's bytes (:func:`file_hash`, computed once per process for a given size and
modification time): replacing the archive makes a new entry, another copy of the same archive (another path, a
fresh modification time) finds the old one, and nothing is ever read from an entry that was not written
completely.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np

from cleanbackdoor.cache import DATASETS, VERSIONS, default_root
from cleanbackdoor.errors import DataError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def cache_root() -> Path:
    """Where dataset cache entries go: ``$CLEANBACKDOOR_CACHE/datasets``, else ``~/.cache/cleanbackdoor/datasets``."""
    return default_root() / DATASETS


def is_archive(path: str | Path) -> bool:
    """Whether ``path`` names a tar archive by its suffix (``.tar.gz``, ``.tgz``, ``.tar``)."""
    name = Path(path).name.lower()
    return name.endswith(ARCHIVE_SUFFIXES)


def archive_stem(path: str | Path) -> str:
    """``cifar10-jpg.tar.gz`` -> ``cifar10-jpg``."""
    name = Path(path).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def archive_key(path: str | Path) -> str:
    """The archive's cache key: a hash of its bytes (:func:`file_hash`)."""
    path = Path(path)
    try:
        return file_hash(path)
    except OSError as exc:
        raise DataError(f"cannot read archive {path}: {exc.strerror or exc}") from None


def file_hash(path: str | Path) -> str:
    """A short sha256 of a file's bytes, read once per process for a file of this path, size and modification
    time (the 19 MB CIFAR-10 JPEG archive: 0.02 s from the page cache)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _hash_bytes(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _hash_bytes(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def cache_entry(path: str | Path) -> Path:
    """The cache path (without suffix) that belongs to an archive: ``<cache>/datasets/<stem>-<key>``."""
    return cache_root() / f"{archive_stem(path)}-{archive_key(path)}"


def _tar_errors() -> tuple[type[BaseException], ...]:
    return (tarfile.TarError, EOFError, zlib.error, OSError)


def _open_tar(path: Path, mode: str = "r:*") -> tarfile.TarFile:
    if not path.is_file():
        raise DataError(f"archive {path} does not exist")
    try:
        return tarfile.open(path, mode)
    except _tar_errors() as exc:
        raise DataError(f"cannot open archive {path}: {exc}") from exc


def peek_archive(path: str | Path, limit: int = 64) -> list[str]:
    """The names of the first ``limit`` regular files in an archive, cheaply (the stream is read only that far)."""
    path = Path(path)
    names: list[str] = []
    with _open_tar(path, "r|*") as tar:
        try:
            for member in tar:
                if member.isfile():
                    names.append(member.name)
                    if len(names) >= limit:
                        break
        except _tar_errors() as exc:
            raise DataError(f"archive {path} is corrupt or truncated: {exc}") from exc
    return names


def iter_archive_files(path: str | Path):
    """Yield ``(member name, bytes)`` for every regular file of an archive, in archive order, reading it once.

    Folders come as ``("name/", None)``; links and devices are skipped. Nothing is written to disk, so a hostile
    member name cannot reach outside anything.
    """
    path = Path(path)
    with _open_tar(path, "r|*") as tar:
        try:
            for member in tar:
                if member.isfile():
                    handle = tar.extractfile(member)
                    yield member.name, (handle.read() if handle is not None else b"")
                elif member.isdir():
                    yield member.name.rstrip("/") + "/", None
        except _tar_errors() as exc:
            raise DataError(f"archive {path} is corrupt or truncated: {exc}") from exc


def extract_archive(path: str | Path) -> Path:
    """Extract an archive into the cache (once) and return the folder holding its contents.

    A second call with the same, unchanged archive returns the same folder without reading the archive.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"archive {path} does not exist")
    if not is_archive(path):
        raise DataError(f"{path} is not a .tar.gz, .tgz or .tar archive")
    final = cache_entry(path)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        with _open_tar(path) as tar:
            try:
                _safe_extractall(tar, tmp)
            except getattr(tarfile, "FilterError", ()) as exc:
                raise DataError(f"archive {path} holds an unsafe member, refused: {exc}") from exc
            except _tar_errors() as exc:
                raise DataError(f"archive {path} is corrupt or truncated: {exc}") from exc
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a concurrent extraction that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _safe_extractall(tar: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
        tar.extractall(dest, filter="data")
        return
    # Older Pythons: refuse what the "data" filter would refuse; allow plain files and folders only.
    members = tar.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if m.name.startswith(("/", "\\")) or ".." in parts or not (m.isfile() or m.isdir()):
            raise DataError(f"archive {tar.name} holds an unsafe member, refused: {m.name!r} is a link, a device or "
                            "outside the archive folder")
    tar.extractall(dest, members=members)


# -- cached decoded arrays -------------------------------------------------------------------------------------
def arrays_path(path: str | Path, **options) -> Path:
    """Where the decoded arrays of an archive go, for the given decoding options (a JSON-serializable dict)."""
    opts = json.dumps({"version": VERSIONS["datasets"], **options}, sort_keys=True, default=str)
    opt_key = hashlib.sha256(opts.encode()).hexdigest()[:12]
    entry = cache_entry(path)
    return entry.with_name(f"{entry.name}.arrays-{opt_key}.npz")


def save_arrays(target: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed ``.npz`` atomically (a temporary file renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_arrays(target: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cached ``.npz``, or None when there is none or it cannot be read (it is then rebuilt)."""
    if not target.is_file():
        return None
    try:
        with np.load(target, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
