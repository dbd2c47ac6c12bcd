"""The training and evaluation loops (single- and multi-label) that run a recipe (:mod:`cleanbackdoor.recipes`).

The loop keeps the whole training set on the device as uint8, draws one permutation and one
augmentation per batch from a seeded generator, and never synchronizes with the device inside an epoch, so it
runs at the speed of a bare PyTorch loop (``benchmarks/training_throughput.py`` measures that).

Targets can be hard labels (int64, (N,)), soft labels (float, (N, C): distillation, FLIP's soft variant), or
0/1 label sets (N, K) for multi-label training with BCE or ASL (Ridnik et al. 2021).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cleanbackdoor.cache import save_atomic
from cleanbackdoor.data.transforms import Augment, to_nchw, to_tensor
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.recipes import TrainConfig


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; otherwise the device named, checked to exist here."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: this PyTorch has no CUDA device (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available here")
    return dev


# -- schedule ------------------------------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of the whole run."""
    total = cfg.epochs * steps_per_epoch
    epoch = step / steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch
    if warm and step < warm and cfg.schedule != "onecycle":
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    # one-cycle: 25% cosine warm-up from lr/25, then cosine annealing to lr/1e4 (Smith & Topin)
    up = max(1, int(0.25 * total))
    if step < up:
        return cfg.lr / 25 + (cfg.lr - cfg.lr / 25) * 0.5 * (1 - math.cos(math.pi * step / up))
    t = (step - up) / max(1, total - up)
    return cfg.lr / 1e4 + (cfg.lr - cfg.lr / 1e4) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer steps, in the model's order (with ``finetune = "last"``: the head's)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = trainable_parameters(model)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# -- losses --------------------------------------------------------------------------------------------------
def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
                    clip: float = 0.05, eps: float = 1e-8, detach_focal: bool = True) -> torch.Tensor:
    """ASL (Ridnik et al., ICCV 2021): focusing on positives/negatives and probability shifting of negatives.

    With p = sigmoid(z) and p_m = max(p - clip, 0): -[y (1 - p)^gamma_pos log p + (1 - y) p_m^gamma_neg log(1 - p_m)].
    ``detach_focal``: the focusing weights (1 - p)^gamma_pos and p_m^gamma_neg carry no gradient, as in the
    multi-label backdoor authors' recipe (``AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05,
    disable_torch_grad_focal_loss=True)``). Returns the sum over labels averaged over the batch (the authors sum
    over the batch too: a constant factor, which Adam does not see)."""
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    loss_pos = targets * torch.log(p.clamp(min=eps))
    loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=eps))
    if gamma_pos > 0:
        w_pos = (1 - p).pow(gamma_pos)
        loss_pos = loss_pos * (w_pos.detach() if detach_focal else w_pos)
    if gamma_neg > 0:
        w_neg = p_neg.pow(gamma_neg)
        loss_neg = loss_neg * (w_neg.detach() if detach_focal else w_neg)
    return -(loss_pos + loss_neg).sum(dim=1).mean()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def make_loss(cfg: TrainConfig, targets: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss for these targets: hard or soft cross-entropy for 'ce'; BCE or ASL for 0/1 label sets."""
    if cfg.loss == "ce":
        if targets.dtype == torch.int64:
            return F.cross_entropy
        return soft_cross_entropy
    if targets.dtype == torch.int64:
        raise ConfigError(f"loss {cfg.loss!r} is for multi-label targets (N, classes), got hard labels")
    if cfg.loss == "bce":
        return lambda z, t: F.binary_cross_entropy_with_logits(z, t, reduction="sum") / z.shape[0]
    return lambda z, t: asymmetric_loss(z, t, cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip)


def targets_tensor(targets: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Hard labels as int64, soft labels and 0/1 label sets as float32."""
    t = torch.as_tensor(targets)
    if t.ndim == 1:
        return t.long()
    return t.float()


# -- training loop -------------------------------------------------------------------------------------------
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
        but the head)."""
        h = hashlib.sha256()
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


class WeightAverage:
    """An exponential moving average of a model's floating-point state (weights and batch-norm statistics; other
    buffers are copied), updated after every optimizer step: ``avg = d * avg + (1 - d) * current`` with
    ``d = min(decay, (1 + t) / (10 + t))`` at update ``t`` (0-based), so the first steps do not leave the
    initialization in the average of a short run.

    ``prefix``: average only the entries whose name starts with it (``"head."`` when only the head trains). The
    rest of the model is left exactly as it is: averaging a constant is not exact in floating point (a frozen
    weight drifts by a few units in the last place over thousands of updates), and a frozen extractor must stay
    bit-identical, which its cached features rely on (:class:`FrozenFeatures`)."""

    def __init__(self, model: nn.Module, decay: float, prefix: str = "") -> None:
        self.decay, self.updates = decay, 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}
        if not self.state:
            raise ConfigError(f"the model has no state named {prefix}* to average")

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        for k, avg in self.state.items():
            v = current[k]
            if v.is_floating_point():
                avg.mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                avg.copy_(v)
        self.updates += 1

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({**model.state_dict(), **self.state})

    def state_dict(self) -> dict:
        return {"state": self.state, "updates": self.updates}

    def load_state_dict(self, saved: dict) -> None:
        self.state = {k: saved["state"][k].to(v.device) for k, v in self.state.items()}
        self.updates = int(saved["updates"])


@dataclass
class History:
    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "loss": self.loss, "lr": self.lr, "seconds": self.seconds}


StepHook = Callable[[int, nn.Module, torch.optim.Optimizer], None]


def train(model: nn.Module, images: np.ndarray | None, targets: np.ndarray | torch.Tensor, cfg: TrainConfig, *,
          seed: int = 0, device: str | torch.device | None = "auto", progress: bool = True,
          desc: str = "train", on_step: StepHook | None = None, on_epoch_end: StepHook | None = None,
          checkpoint: str | Path | None = None, checkpoint_key: str = "", stop_epoch: int | None = None,
          feature_cache: str | Path | None = None, features: FrozenFeatures | None = None) -> History:
    """Train ``model`` in place on uint8 ``images`` (N, H, W, C) with ``targets`` under recipe ``cfg``.

    ``on_step(step, model, optimizer)`` is called before every optimizer step (FLIP's experts save their
    trajectory from it), ``on_epoch_end(epoch, model, optimizer)`` after each epoch (before the checkpoint is
    written). ``checkpoint``: a file where the state is saved after every epoch; when it exists, the run resumes
    from it and finishes exactly as an uninterrupted run with the same seed would. ``checkpoint_key`` names the
    run's inputs: a checkpoint written under another key (another recipe, model or data) is ignored and replaced.
    ``stop_epoch``: stop after this many epochs, with the learning-rate schedule still that of the whole recipe.
    ``feature_cache``: a folder where ``finetune = "last"`` keeps the frozen extractor's features
    (:class:`FrozenFeatures`), for the next model trained on the same images with the same extractor.
    ``features``: with ``finetune = "last"``, the frozen extractor's features of ``images``, computed by the caller
    (``images`` may then be None): the head trains on them directly.
    """
    dev = resolve_device(device)
    if features is not None and cfg.finetune != "last":
        raise ConfigError("precomputed features train the head alone: they need train.finetune = 'last'")
    if images is None and features is None:
        raise ConfigError("train() needs images or, for a head on a frozen extractor, their features")
    n = len(images) if images is not None else len(features)
    if n == 0:
        raise ConfigError("cannot train on an empty training set")
    if len(targets) != n:
        raise ConfigError(f"{n} images but {len(targets)} targets")
    if cfg.loss == "ce" and np.ndim(targets) == 2 and not torch.is_floating_point(torch.as_tensor(targets[:1])):
        raise ConfigError("0/1 label sets (multi-label targets) need train.loss = 'bce' or 'asl' (e.g. preset "
                          "'multilabel-asl'), not 'ce'")
    model.to(dev)
    if cfg.finetune == "last":
        freeze_all_but_head(model)
    layout = torch.channels_last if cfg.channels_last and cfg.finetune == "all" else torch.contiguous_format
    model.to(memory_format=layout)
    data = to_nchw(images, dev) if features is None else None  # the whole set on the device, as uint8
    y = targets_tensor(targets).to(dev)
    loss_fn = make_loss(cfg, y)
    opt = make_optimizer(model, cfg)
    aug = cfg.augment
    bs = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    history = History()
    start_epoch = 0
    ckpt_path = Path(checkpoint) if checkpoint else None
    key = f"{checkpoint_key}|{cfg.model_dump_json()}|{seed}|{n}"
    state = None
    if ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if state.get("key") != key:
            print(f"{ckpt_path}: checkpoint of a different run, starting afresh", flush=True)
            state = None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"].cpu())
        start_epoch = int(state["epoch"])
        hist = state["history"]
        history = History(list(hist["epoch"]), list(hist["loss"]), list(hist["lr"]), list(hist["seconds"]))
    average = WeightAverage(model, cfg.ema, "head." if cfg.finetune == "last" else "") if cfg.ema > 0 else None
    if average is not None and state is not None:
        average.load_state_dict(state["average"])
    # fine-tuning the head of a frozen extractor: its features are computed once (per flip) instead of every step
    frozen = features
    if frozen is None and cfg.finetune == "last":
        frozen = FrozenFeatures.of(model, data, aug, cache_dir=feature_cache)
    if frozen is not None:
        frozen = FrozenFeatures(frozen.plain.to(dev), None if frozen.flipped is None else frozen.flipped.to(dev))
    use_amp = cfg.amp and dev.type == "cuda"
    # the network as the loop calls it: compiled when asked (the head alone on cached features is one matrix
    # product, left eager); the compiled module shares the model's parameters
    net = torch.compile(model) if cfg.compile and frozen is None else model
    last_epoch = cfg.epochs if stop_epoch is None else min(cfg.epochs, stop_epoch)
    bar = tqdm(range(start_epoch, last_epoch), desc=desc, disable=None if progress else True, leave=False,
               dynamic_ncols=True)  # None: only on a terminal
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        if cfg.finetune == "last":  # the frozen layers keep their eval behaviour (batch-norm statistics)
            model.eval()
            model.head.train()
        perm = torch.randperm(n, generator=gen, device=dev)
        total = torch.zeros((), device=dev)
        for b in range(steps_per_epoch):
            step = epoch * steps_per_epoch + b
            idx = perm[b * bs:(b + 1) * bs]
            if frozen is None:
                x = data[idx].float().div_(255.0)
                if not aug.identity:
                    x = aug(x, gen)
                x = x.contiguous(memory_format=layout)
            lr = lr_at(cfg, step, steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                out = net(x) if frozen is None else model.head(frozen.batch(idx, aug, gen))
            loss = loss_fn(out.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if on_step is not None:
                on_step(step, model, opt)
            opt.step()
            if average is not None:
                average.update(model)
            total += loss.detach() * len(idx)
        epoch_loss = float(total) / n
        if not math.isfinite(epoch_loss):
            raise ConfigError(f"training diverged at epoch {epoch + 1} (loss {epoch_loss}); lower the learning rate")
        history.epoch.append(epoch + 1)
        history.loss.append(epoch_loss)
        history.lr.append(lr)
        history.seconds.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{epoch_loss:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model, opt)
        if ckpt_path is not None:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                        "epoch": epoch + 1, "history": history.as_dict(), "key": key,
                        **({"average": average.state_dict()} if average is not None else {})}, ckpt_path)
    if average is not None:
        average.copy_to(model)
    model.to(memory_format=torch.contiguous_format)  # what is saved and evaluated is laid out as usual
    model.eval()
    return history


# -- evaluation ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 512,
                   device: str | torch.device | None = None,
                   feature_cache: str | Path | None = None) -> torch.Tensor:
    """Logits (N, classes) on the CPU for uint8 images (N, H, W, C), in eval mode.

    ``feature_cache``: for a model whose extractor stayed frozen while its head trained (``train.finetune =
    "last"``), the folder of :class:`FrozenFeatures`: the extractor's features of ``images`` are computed once and
    kept there, so the clean model, the victim and every later model on the same extractor score a set through
    their heads alone (the logits of the whole model up to float rounding)."""
    dev = next(model.parameters()).device if device is None else resolve_device(device)
    model.eval()
    if feature_cache is not None and len(images) and callable(getattr(model, "features", None)) \
            and isinstance(getattr(model, "head", None), nn.Module):
        with torch.inference_mode(False):
            feats = FrozenFeatures.of(model, to_nchw(images, dev), Augment(), batch_size, cache_dir=feature_cache)
        return torch.cat([model.head(feats.plain[i:i + batch_size]).float().cpu()
                          for i in range(0, len(feats), batch_size)])
    outs = []
    for i in range(0, len(images), batch_size):
        outs.append(model(to_tensor(images[i:i + batch_size], dev)).float().cpu())
    if not outs:
        return torch.empty(0, 0)
    return torch.cat(outs)


def predict(model: nn.Module, images: np.ndarray, batch_size: int = 512,
            feature_cache: str | Path | None = None) -> np.ndarray:
    """Predicted classes (N,) of a single-label model (``feature_cache``: see :func:`predict_logits`)."""
    if len(images) == 0:
        return np.zeros(0, dtype=np.int64)
    return predict_logits(model, images, batch_size, feature_cache=feature_cache).argmax(1).numpy()
