"""The training loop (single- and multi-label) that runs a recipe (:mod:`cleanbackdoor.recipes`).

The loop keeps the whole training set on the device as uint8, draws one permutation and one
augmentation per batch from a seeded generator, and never synchronizes with the device inside an epoch, so it
runs at the speed of a bare PyTorch loop (``benchmarks/training_throughput.py`` measures that).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cleanbackdoor.cache import VERSIONS, save_atomic
from cleanbackdoor.data.transforms import to_nchw
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.recipes import TrainConfig
from cleanbackdoor.training.device import resolve_device
from cleanbackdoor.training.features import FrozenFeatures, freeze_all_but_head
from cleanbackdoor.training.losses import make_loss, targets_tensor


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


# -- the loop ------------------------------------------------------------------------------------------------
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
    key = f"{VERSIONS['checkpoints']}|{checkpoint_key}|{cfg.model_dump_json()}|{seed}|{n}"
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
    # without a terminal (a log file, a job on another machine) the bar is off: a plain line every tenth of the run
    plain_every = max(1, cfg.epochs // 10) if progress and bar.disable else 0
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
        if plain_every and (epoch == start_epoch or (epoch + 1) % plain_every == 0 or epoch + 1 == last_epoch):
            print(f"{desc}: epoch {epoch + 1}/{cfg.epochs}, loss {epoch_loss:.4f}, {history.seconds[-1]:.1f} s",
                  file=sys.stderr, flush=True)
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
