"""A frozen extractor's features, computed once per image and kept on disk, for heads trained on them
(``train.finetune = "last"``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cleanbackdoor.cache import VERSIONS, save_atomic
from cleanbackdoor.data.transforms import Augment
from cleanbackdoor.errors import ConfigError


def freeze_all_but_head(model: nn.Module) -> None:
    """Fine-tuning of the last layer: every parameter but those of ``model.head`` stops requiring gradients."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ConfigError(f"train.finetune = 'last' needs a model with a final layer `head`; "
                          f"{type(model).__name__} has none")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)


def image_digests(data: torch.Tensor | np.ndarray) -> list[bytes]:
    """A 16-byte digest of every image's bytes (and shape): what identifies an image in the feature store."""
    arr = np.ascontiguousarray(data.cpu().numpy() if isinstance(data, torch.Tensor) else data)
    shape = f"{arr.shape[1:]}{arr.dtype}".encode()
    return [hashlib.blake2b(memoryview(row), digest_size=16, person=shape[:16].ljust(16, b"_")).digest()
            for row in arr.reshape(len(arr), -1)]


class FeatureStore:
    """One frozen extractor's features of one view (the images as they are, or mirrored), cached *per image*.

    A folder of shards, each the features of some images with the digests of those images' bytes
    (:func:`image_digests`). A set that shares most of its images with sets seen before (a training set whose
    attacker changed 1,000 images, the triggered test images of the same trigger) computes only the images it does
    not share. Shards are written atomically and never changed, so concurrent readers see whole shards."""

    _loaded: dict[str, tuple[tuple[str, ...], dict[bytes, tuple[int, int]], list[torch.Tensor]]] = {}

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _index(self) -> tuple[dict[bytes, tuple[int, int]], list[torch.Tensor]]:
        names = tuple(sorted(p.name for p in self.folder.glob("shard-*.pt"))) if self.folder.is_dir() else ()
        key = str(self.folder)
        cached = self._loaded.get(key)
        if cached is not None and cached[0] == names:
            return cached[1], cached[2]
        index: dict[bytes, tuple[int, int]] = {}
        shards = []
        for s, name in enumerate(names):
            state = torch.load(self.folder / name, map_location="cpu", weights_only=True)
            shards.append(state["features"])
            for r, digest in enumerate(state["digests"].numpy()):
                index[digest.tobytes()] = (s, r)
        self._loaded[key] = (names, index, shards)
        return index, shards

    def get(self, digests: list[bytes]) -> tuple[np.ndarray, torch.Tensor | None]:
        """(found (N,) bool, features (N, D) with the found rows filled; None when nothing is found)."""
        index, shards = self._index()
        hits = [index.get(d) for d in digests]
        found = np.array([h is not None for h in hits], dtype=bool)
        if not found.any():
            return found, None
        dim = shards[hits[int(np.flatnonzero(found)[0])][0]].shape[1]
        out = torch.zeros(len(digests), dim)
        for i, h in enumerate(hits):
            if h is not None:
                out[i] = shards[h[0]][h[1]]
        return found, out

    def put(self, digests: list[bytes], features: torch.Tensor) -> None:
        unique = dict(zip(digests, range(len(digests))))  # one row per distinct image
        rows = list(unique.values())
        raw = np.frombuffer(b"".join(unique), dtype=np.uint8).reshape(len(unique), 16)
        name = hashlib.sha256(raw.tobytes()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        save_atomic({"digests": torch.from_numpy(raw.copy()), "features": features[rows].detach().cpu().float()},
                    self.folder / f"shard-{name}.pt")

    def clear(self) -> None:
        for p in self.folder.glob("shard-*.pt"):
            p.unlink(missing_ok=True)
        self._loaded.pop(str(self.folder), None)


@dataclass
class FrozenFeatures:
    """The frozen extractor's features of a whole training set, for ``train.finetune = "last"``.

    With the backbone frozen in eval mode, the head sees the same features for an image every epoch, so they are
    computed once: for the image as it is, and for its mirror image when the recipe flips. :meth:`batch` then draws
    the flips from the training generator exactly as :class:`Augment` does, so the run is the one the full forward
    pass would give (same random stream, same features up to float rounding). Random crops move every image by a
    different shift each step and cannot be cached (:meth:`of` returns None: the loop runs the whole model).

    With a ``cache_dir`` the features are also kept on disk, per image (:class:`FeatureStore`), under a key of the
    extractor (its modules other than the head, as ``repr`` shows them, and their weights and buffers): the clean
    model and the victim of a run, every later run on the same extractor, and sets that share most of their images
    (a training set with 1,000 images changed) compute each image's features once. Before cached features are
    used, those of up to four of the images found are computed again and compared, so a key that misses some part
    of an unusual extractor costs a recomputation, never wrong features.
    """

    plain: torch.Tensor  # (N, D)
    flipped: torch.Tensor | None  # (N, D) when the recipe flips

    @classmethod
    @torch.no_grad()
    def of(cls, model: nn.Module, data: torch.Tensor, aug: Augment, batch_size: int = 512,
           cache_dir: str | Path | None = None) -> FrozenFeatures | None:
        if aug.crop_padding > 0 or not callable(getattr(model, "features", None)):
            return None
        was_training = model.training
        model.eval()

        def run(flip: bool, rows: np.ndarray | None = None) -> torch.Tensor:
            part = data if rows is None else data[torch.as_tensor(rows, device=data.device)]
            out = [model.features(x.flip(3) if flip else x).float()
                   for x in (part[i:i + batch_size].float().div_(255.0) for i in range(0, len(part), batch_size))]
            return torch.cat(out) if out else torch.zeros(0, 0)

        try:
            if cache_dir is None:
                return cls(run(False), run(True) if aug.hflip else None)
            key = cls.extractor_key(model)
            digests = image_digests(data)
            views = [cls._cached(FeatureStore(Path(cache_dir) / f"{key}-{view}"), digests, flip, run)
                     for view, flip in (("plain", False), ("flipped", True)) if flip <= aug.hflip]
            return cls(views[0].to(data.device), views[1].to(data.device) if aug.hflip else None)
        finally:
            model.train(was_training)

    @staticmethod
    def _cached(store: FeatureStore, digests: list[bytes], flip: bool, run: Callable[..., torch.Tensor],
                probe: int = 4) -> torch.Tensor:
        """One view's features: the stored ones (checked on ``probe`` images) and the missing ones computed and
        stored."""
        found, feats = store.get(digests)
        if found.any():
            check = np.flatnonzero(found)[:probe]
            fresh = run(flip, check).cpu()
            if fresh.shape[1:] != feats.shape[1:] or not torch.allclose(
                    feats[torch.as_tensor(check)], fresh, rtol=1e-3, atol=1e-4 * (1.0 + float(fresh.abs().max()))):
                print(f"{store.folder}: cached features do not match this extractor, computing them again",
                      flush=True)
                store.clear()
                found, feats = np.zeros(len(digests), dtype=bool), None
        missing = np.flatnonzero(~found)
        if len(missing):
            computed = run(flip, missing).cpu()
            if feats is None:
                feats = torch.zeros(len(digests), computed.shape[1])
            feats[torch.as_tensor(missing)] = computed
            store.put([digests[i] for i in missing], computed)
        return feats

    @staticmethod
    def extractor_key(model: nn.Module) -> str:
        """What the features depend on besides the images: the extractor's structure, weights and buffers (all
        but the head), and the version of the code that computes them (``cache.VERSIONS["features"]``)."""
        h = hashlib.sha256()
        h.update(f"features-{VERSIONS['features']}".encode())
        for name, child in model.named_children():
            if name != "head":
                h.update(f"{name}:{child!r}".encode())
        for name, value in model.state_dict().items():
            if not name.startswith("head."):
                h.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
                h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.plain)

    def select(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """The features of images ``idx``, of their mirror image where ``flip`` (bool, per row) is set."""
        x = self.plain[idx]
        if self.flipped is None or flip is None:
            return x
        return torch.where(flip.to(x.device).view(-1, 1), self.flipped[idx], x)

    def batch(self, idx: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
        """A training batch: flips drawn from ``generator`` exactly as :class:`Augment` draws them."""
        if self.flipped is None:
            return self.plain[idx]
        return self.select(idx, aug.draw(len(idx), generator).flip)

    @classmethod
    def concat(cls, parts: list[FrozenFeatures]) -> FrozenFeatures:
        """The features of several image sets, one after the other."""
        flipped = [p.flipped for p in parts]
        return cls(torch.cat([p.plain for p in parts]),
                   None if any(f is None for f in flipped) else torch.cat(flipped))
