"""Hidden trigger backdoor: correctly labelled target images, imperceptibly perturbed so that their features match
those of source images carrying a secret trigger.

Paper: A. Saha, A. Subramanya, H. Pirsiavash, "Hidden Trigger Backdoor Attacks", AAAI 2020, arXiv:1910.00033
(authors' code: github UMBCvision/Hidden-Trigger-Backdoor-Attacks).

Threat model: transfer learning. The victim fine-tunes a feature extractor f pretrained on another task (the last
layer, in the paper) on its data, to which the attacker adds K correctly labelled target-class images z_k with
||z_k - t_k||_inf <= eps. The trigger never appears in the training data; at test time a trigger patch pasted at a
random position on any source-class image makes the victim predict the target class. The attacker knows f: here
the victim's extractor pretrained by the toolkit (``model.pretrained``, :mod:`cleanbackdoor.pretrain`), or any
model passed as ``extractor``.

Algorithm (:func:`optimize_poisons`, the seed's algorithm with the authors' defaults):

1. K = ``budget`` target-class training images t_k, drawn at random (seeded); the poisons start as z_k = t_k.
2. Every iteration, for every batch of poisons (the whole set by default; ``batch_size`` splits it into
   independent batches, as the authors' code does with 100):
   a. draw as many source images s_k (without replacement when there are enough) and paste the trigger at a
      random position on each (:func:`paste_patch`), giving s~_k;
   b. match poisons to patched sources one to one in feature space (:func:`match`): the exact assignment that
      minimizes sum_k ||f(z_k) - f(s~_a(k))||^2 (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``),
      or ``matching = "greedy"``: repeatedly pair the closest remaining poison and source;
   c. one gradient step on L = sum_k ||f(z_k) - f(s~_a(k))||^2: z <- z - lr_i * dL/dz (the authors' raw
      gradient; ``step = "sign"`` uses lr_i * sign(dL/dz) instead), lr_i = lr * lr_decay^(i // decay_every)
      (authors: 0.01 halved every 1,000 iterations);
   d. project: z <- clip(z, t - eps, t + eps), then z <- clip(z, 0, 1).
   A batch stops when its largest per-sample loss ||f(z_k) - f(s~_a(k))||^2 falls below ``stop_loss`` (authors:
   10, for AlexNet's fc7), all of them after ``iterations`` (authors: 5,000).
3. The poisons are quantized to uint8 and clipped to the eps ball of their targets in grey levels, so that
   |poison - target| <= eps holds exactly for the stored images. Labels are unchanged.

Evaluation (the experiment's, plus :meth:`HiddenTrigger.probes`): clean accuracy; the paper's "Val Patched
(source only)", the accuracy on source-class test images with the trigger at a random position
(``patched_source_accuracy``); ASR, the share of those predicted as the target; accuracy on unpatched source images.

Deviations from the authors' code, all deliberate:

- the matching is exactly one to one (Hungarian) by default; the authors' greedy loop only blanks the chosen
  (source, poison) cell, so one source can be assigned to several poisons. ``matching = "greedy"`` is a strictly
  one-to-one greedy matching; its cost is >= the Hungarian one;
- the assignment cost is the squared feature distance (the loss itself); the order of pairs, hence the greedy
  matching, is the same as with the distance;
- all poisons are optimized together (one forward and backward per iteration, matching over the whole set)
  unless ``batch_size`` is set; the authors run batches of 100 one after the other;
- step 2a draws fresh patched sources every iteration, as the paper's algorithm reads; the authors' code (and
  ART) draw each batch's sources once and keep them: ``source_draw = "once"``, which saves the source forward
  pass of every later iteration; ``precision = "bfloat16"`` runs the extractor's passes in bfloat16 on
  channels-last tensors, for speed;
- images are 0..1 floats in the model's input space (the extractor normalizes internally), so eps = 16/255 is the
  authors' eps on the pixel scale; source images come from the training set's source classes (the authors keep a
  separate poison-generation split).

Budget: K, a count of target-class training images that receive a perturbation, or a fraction of the *whole*
training set (see :mod:`.base`); it cannot exceed the size of the target class.

Example::

    attack = HiddenTrigger(target="horse", sources=["dog"], budget=800, extractor=my_pretrained_model)
    poisoning = attack.poison(train_set, seed=0)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from scipy.optimize import linear_sum_assignment
from torch import nn

from cleanbackdoor.attacks.base import (Attack, AttackContext, AttackParams, Poisoning, Probe, TriggerSpec,
                                        resolve_budget)
from cleanbackdoor.cache import HIDDEN_TRIGGER, compute_once, entry_key, fingerprint, save_atomic
from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.data.transforms import to_nchw
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.pretrain import pretrain_key, pretrained_model
from cleanbackdoor.training import FrozenFeatures, resolve_device
from cleanbackdoor.triggers import PatchTrigger

Matching = Literal["hungarian", "greedy"]
SourceDraw = Literal["fresh", "once"]
Precision = Literal["float32", "bfloat16"]


class HiddenTriggerParams(AttackParams):
    budget: int | float = Field(800, ge=0, description="K poisons (target-class images perturbed): a count or a "
                                                       "fraction of the whole training set")
    trigger: TriggerSpec = Field(default_factory=lambda: TriggerSpec(name="patch", size=8, position="random",
                                                                     pattern="colors"),
                                 description="patch trigger the poisons hide, pasted at test time; default: an "
                                             "8x8 seeded grid of saturated colours (the authors' kind) at a random "
                                             'position; pattern = "random" for seeded noise')
    eps: float = Field(16 / 255, description="L_inf bound of the perturbation on the 0..1 pixel scale "
                                             "(the authors: 16/255)")
    iterations: int = Field(5000, ge=1, description="most optimization iterations (the authors: 5,000)")
    lr: float = Field(0.01, gt=0, description="initial step size, times the gradient or its sign (the authors: 0.01)")
    lr_decay: float = Field(0.5, gt=0, le=1, description="factor the step size is multiplied by every decay_every "
                                                         "iterations (the authors: 0.5)")
    decay_every: int = Field(1000, ge=1, description="iterations between step-size decays (the authors: 1,000)")
    step: Literal["gradient", "sign"] = Field("gradient", description="gradient: the raw gradient (the authors'); "
                                                                      "sign: lr times its sign")
    stop_loss: float | None = Field(10.0, ge=0, description="stop a batch once its largest per-sample squared "
                                                            "feature distance is below this (authors: 10); None: never")
    matching: Matching = Field("hungarian", description="poison-source matching in feature space: hungarian (exact "
                                                        "one to one) or greedy")
    batch_size: int | None = Field(None, ge=1, description="poisons per independent batch (the authors: 100); None: "
                                                           "all together")
    source_draw: SourceDraw = Field("fresh", description="fresh: new patched sources every iteration (the paper's "
                                                         "algorithm); once: drawn once per batch, as the authors' "
                                                         "code and ART do (one forward pass fewer per iteration)")
    precision: Precision = Field("float32", description="bfloat16: the extractor's passes under bfloat16 autocast "
                                                        "on channels-last tensors (1.5-1.8x faster on a CPU with AMX; "
                                                        "features within about 0.5%)")
    compile: bool = Field(False, description="torch.compile the extractor's passes: on 2 CPU cores 1.5x per pass "
                                             "in float32, 1.2x in bfloat16, after about 12 s of compiling; "
                                             "gradients equal up to float rounding")
    log_every: int = Field(100, ge=1, description="iterations between logged (and recorded) feature losses")

    @field_validator("eps")
    @classmethod
    def _eps_in_range(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"eps must be positive, got {value}")
        if value > 1:
            raise ValueError(f"eps is on the 0..1 pixel scale (16 grey levels = 16/255 = {16 / 255:.4f}), got {value}")
        if value * 255 < 1 - 1e-6:
            raise ValueError(f"eps = {value} is below one grey level (1/255): it cannot change a uint8 image")
        return value


@dataclass
class PoisonResult:
    """What :func:`optimize_poisons` returns: the poisons as 0..1 floats (K, C, H, W) and the optimization trace."""

    poisons: torch.Tensor
    final_loss: torch.Tensor  # (K,) per-sample loss at each batch's last iteration
    iterations: list[int]  # iterations run, per batch
    history: list[list[float]] = field(default_factory=list)  # [iteration, mean loss, max loss] every log_every
    seconds: float = 0.0


# -- the algorithm's pieces ----------------------------------------------------------------------------------
def match(cost: np.ndarray | torch.Tensor, method: Matching = "hungarian") -> np.ndarray:
    """A one-to-one assignment for a square cost matrix (rows: poisons, columns: patched sources):
    ``perm[k]`` = the source matched to poison k. ``"hungarian"`` minimizes the total cost exactly;
    ``"greedy"`` repeatedly takes the cheapest pair whose poison and source are both still free."""
    cost = cost.detach().cpu().numpy() if isinstance(cost, torch.Tensor) else np.asarray(cost)
    cost = cost.astype(np.float64, copy=False)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"matching needs a square cost matrix, got {cost.shape}")
    n = cost.shape[0]
    if method == "hungarian":
        rows, cols = linear_sum_assignment(cost)
        perm = np.empty(n, dtype=np.int64)
        perm[rows] = cols
        return perm
    if method == "greedy":
        order = np.argsort(cost, axis=None, kind="stable")
        perm = np.full(n, -1, dtype=np.int64)
        row_free, col_free = np.ones(n, dtype=bool), np.ones(n, dtype=bool)
        left = n
        for flat in order:
            r, c = divmod(int(flat), n)
            if row_free[r] and col_free[c]:
                perm[r] = c
                row_free[r] = col_free[c] = False
                left -= 1
                if left == 0:
                    break
        return perm
    raise ConfigError(f"unknown matching {method!r}; allowed: greedy, hungarian")


def paste_patch(images: torch.Tensor, patch: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``images`` (N, C, H, W) with ``patch`` (C, s, s) pasted with its top-left corner at ``positions`` (N, 2)
    (row, column), one position per image, in one vectorized operation."""
    n, _, h, w = images.shape
    s = patch.shape[-1]
    dev = images.device
    rows = torch.arange(h, device=dev).view(1, h) - positions[:, :1].to(dev)  # (N, H) row inside the patch
    cols = torch.arange(w, device=dev).view(1, w) - positions[:, 1:].to(dev)  # (N, W)
    inside = ((rows >= 0) & (rows < s)).view(n, 1, h, 1) & ((cols >= 0) & (cols < s)).view(n, 1, 1, w)
    rr = rows.clamp(0, s - 1).view(n, h, 1).expand(n, h, w)
    cc = cols.clamp(0, s - 1).view(n, 1, w).expand(n, h, w)
    values = patch.to(images)[:, rr, cc].permute(1, 0, 2, 3)  # (N, C, H, W)
    return torch.where(inside, values, images)


def feature_fn(extractor: nn.Module, precision: Precision = "float32",
               compile: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The representation f the attack matches: ``extractor.features`` (the penultimate layer of the toolkit's
    models) when it has one, else the module's output; flattened to (N, D), float32.

    ``precision = "bfloat16"``: the passes run under bfloat16 autocast on channels-last tensors (the extractor is
    converted to channels-last in place), gradients with respect to the float32 images as before. ``compile``:
    the function through ``torch.compile``."""
    if compile:
        return torch.compile(feature_fn(extractor, precision))
    fn = extractor.features if callable(getattr(extractor, "features", None)) else extractor
    if precision == "float32":
        return lambda x: fn(x).flatten(1)
    extractor.to(memory_format=torch.channels_last)

    def reduced(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = fn(x.contiguous(memory_format=torch.channels_last))
        return out.flatten(1).float()

    return reduced


def optimize_poisons(features: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                     sources: torch.Tensor, patch: torch.Tensor, *, random_position: bool = True,
                     fixed_position: tuple[int, int] = (0, 0), eps: float = 16 / 255, iterations: int = 5000,
                     lr: float = 0.01, lr_decay: float = 0.5, decay_every: int = 1000,
                     step: Literal["gradient", "sign"] = "gradient", stop_loss: float | None = 10.0,
                     matching: Matching = "hungarian", batch_size: int | None = None,
                     source_draw: SourceDraw = "fresh", seed: int = 0,
                     log: Callable[[str], None] | None = None, log_every: int = 100,
                     callback: Callable[[int, torch.Tensor], None] | None = None) -> PoisonResult:
    """The hidden-trigger optimization (module docstring, step 2) on tensors.

    Args:
        features: f, a differentiable map from 0..1 images (N, C, H, W) to features (N, D), in eval mode.
        targets: the target images t (K, C, H, W), 0..1 floats, on the device the optimization runs on.
        sources: the source-class images to draw from, uint8 (M, C, H, W) on the same device.
        patch: the trigger (C, s, s), 0..1 floats.
        random_position: paste the trigger at a random position per image (else at ``fixed_position``).
        source_draw: "fresh" draws (and runs the extractor on) new patched sources every iteration; "once" draws
            each batch's sources and trigger positions at its first iteration and keeps their features.
        seed: seeds the source draws and trigger positions (a CPU generator, so runs are reproducible).
        callback: called as ``callback(iterations_done, poisons)`` whenever the loss is logged (every
            ``log_every`` iterations and at the end), e.g. to measure the poisons on held-out data.
    """
    k, _, h, w = targets.shape
    m = sources.shape[0]
    s = patch.shape[-1]
    dev = targets.device
    gen = torch.Generator().manual_seed(seed)
    patch = patch.to(dev, torch.float32)
    bs = k if batch_size is None else min(batch_size, k)
    batches = [slice(i, min(i + bs, k)) for i in range(0, k, bs)]
    poisons = targets.clone()
    final_loss = torch.zeros(k)
    done = [False] * len(batches)
    ran = [0] * len(batches)
    history: list[list[float]] = []
    kept: dict[int, torch.Tensor] = {}  # source_draw "once": each batch's source features
    t0 = time.perf_counter()
    for it in range(iterations):
        rate = lr * lr_decay ** (it // decay_every)
        it_losses = []
        for b, sl in enumerate(batches):
            if done[b]:
                continue
            n = sl.stop - sl.start
            # (a) n source images, patched at random positions
            if b in kept:
                f_src = kept[b]
            else:
                idx = torch.randperm(m, generator=gen)[:n] if m >= n else torch.randint(m, (n,), generator=gen)
                if random_position:
                    pos = torch.stack([torch.randint(h - s + 1, (n,), generator=gen),
                                       torch.randint(w - s + 1, (n,), generator=gen)], 1)
                else:
                    pos = torch.tensor([fixed_position]).expand(n, 2)
                patched = paste_patch(sources[idx.to(dev)].float().div_(255), patch, pos)
                with torch.no_grad():
                    f_src = features(patched)
                if source_draw == "once":
                    kept[b] = f_src
            # (b) one-to-one matching in feature space
            z = poisons[sl].clone().requires_grad_(True)
            f_z = features(z)
            perm = match(torch.cdist(f_z.detach(), f_src).square_(), matching)
            # (c) a gradient step on the summed squared feature distance
            per_sample = (f_z - f_src[torch.from_numpy(perm).to(dev)]).square().sum(1)
            (grad,) = torch.autograd.grad(per_sample.sum(), z)
            with torch.no_grad():
                z = z - rate * (grad.sign() if step == "sign" else grad)
                # (d) projection onto the eps ball around the targets and the valid pixel range
                t = targets[sl]
                poisons[sl] = torch.minimum(torch.maximum(z, t - eps), t + eps).clamp_(0, 1)
            loss = per_sample.detach().cpu()
            if not torch.isfinite(loss).all():
                raise ConfigError(f"hidden-trigger optimization diverged at iteration {it + 1}; lower lr")
            final_loss[sl] = loss
            ran[b] = it + 1
            it_losses.append(loss)
            if stop_loss is not None and float(loss.max()) < stop_loss:
                done[b] = True
        if it_losses and (it == 0 or (it + 1) % log_every == 0 or it == iterations - 1 or all(done)):
            cur = torch.cat(it_losses)
            history.append([it + 1, float(cur.mean()), float(cur.max())])
            if log is not None:
                log(f"hidden trigger: iteration {it + 1}/{iterations}, lr {rate:.2e}, feature loss mean "
                    f"{float(cur.mean()):.3f}, max {float(cur.max()):.3f}")
            if callback is not None:
                callback(it + 1, poisons)
        if all(done):
            break
    return PoisonResult(poisons.detach(), final_loss, ran, history, time.perf_counter() - t0)


def quantize(poisons: torch.Tensor, targets_uint8: np.ndarray, eps: float) -> np.ndarray:
    """0..1 poisons (K, C, H, W) -> uint8 (K, H, W, C), rounded, then clipped to the eps ball of the uint8 targets
    in whole grey levels (floor(eps * 255)), so |poison - target| <= eps holds exactly."""
    levels = math.floor(eps * 255 + 1e-6)
    p = poisons.detach().cpu().permute(0, 2, 3, 1).mul(255).round().numpy().astype(np.int16)
    t = targets_uint8.astype(np.int16)
    return np.clip(p, t - levels, t + levels).clip(0, 255).astype(np.uint8)


def patch_pixels(trigger: PatchTrigger) -> np.ndarray:
    """The trigger's pattern as uint8 (s, s, C): the trigger applied at (0, 0) to a black image."""
    c, h, w = trigger.image_shape
    corner = dataclasses.replace(trigger, position=(0, 0))
    return corner(np.zeros((1, h, w, c), dtype=np.uint8))[0, :trigger.size, :trigger.size]


# -- the attack ----------------------------------------------------------------------------------------------
# Where the attack fires (docs/attacks/hidden_trigger.md). Digits, a transfer-learning run: a ConvNet pretrained
# by the toolkit on digits 0-4 (cached), its last layer fine-tuned on 6 vs 9; 120 nines perturbed within 64 grey
# levels (the 8x8 digits have 17 grey levels, 16 apart: 16/255 cannot move a feature) to collide with sixes that
# carry a 3x3 random patch at a random position (seeds 0/1/2: ASR 53.7/33.3/38.9% against the clean victim's
# 14.8/5.6/3.7%; seconds on 2 cores). CIFAR-10, a pair of classes (dog -> horse here; 1,900 training images per
# class, 800 of the target's perturbed within 16/255): the 60-epoch ResNet-20 of artifacts/ (pretrained on all
# ten classes, as the paper's ImageNet extractor knows the attacked ones) read through a global max pool (a patch
# anywhere keeps its response), an MLP head of 1,024 ReLU units trained by the victim (standing in for AlexNet's
# fc7 and fc8), and the authors' kind of trigger: an 8x8 smooth grid of saturated colours at a random position.
HIDDEN_TRIGGER_RECIPES: dict[str, dict[str, Any]] = {
    "digits": {
        "data": {"classes": [6, 9]},
        "model": {"name": "convnet", "options": {"width": 32},
                  "pretrained": {"classes": [0, 1, 2, 3, 4], "train": {"preset": "digits"}}},
        "train": {"finetune": "last", "epochs": 30, "batch_size": 64, "optimizer": "sgd", "lr": 0.1,
                  "momentum": 0.9, "weight_decay": 0.0, "schedule": "cosine"},
        "attack": {"target": "9", "sources": ["6"], "budget": 120, "eps": 0.25,
                   "trigger": {"name": "patch", "size": 3, "position": "random", "pattern": "random"},
                   "iterations": 150, "step": "sign", "lr": 2 / 255, "decay_every": 50, "stop_loss": 0.0},
    },
    "cifar10": {
        "data": {"classes": ["dog", "horse"], "train_per_class": 1900},
        "model": {"name": "resnet20", "options": {"pool": "max", "head_hidden": 1024},
                  "pretrained": {"train": {"preset": "cifar-fast", "epochs": 60}}},
        "train": {"finetune": "last", "epochs": 100, "batch_size": 128, "optimizer": "sgd", "lr": 0.05,
                  "momentum": 0.9, "weight_decay": 0.0, "schedule": "cosine"},
        "attack": {"target": "horse", "sources": ["dog"], "budget": 800, "eps": 16 / 255,
                   "trigger": {"name": "patch", "size": 8, "position": "random", "pattern": "colors"},
                   "iterations": 150, "step": "sign", "lr": 2 / 255, "decay_every": 50, "stop_loss": 0.0},
    },
}


class HiddenTrigger(Attack):
    """Hidden trigger backdoor (Saha et al., AAAI 2020): correctly labelled poisons that collide with triggered sources.

    Arguments: ``target``, ``sources`` (a list, or "all" for every other class: the multi-source attack), ``budget``
    (K), ``trigger`` (a patch; position "random" by default), ``eps``, ``iterations``, ``lr``, ``lr_decay``,
    ``decay_every``, ``step``, ``stop_loss``, ``matching``, ``batch_size``. ``extractor`` (keyword, optional): the
    feature extractor f; by default the victim's pretrained extractor (``model.pretrained`` in the config).

    Shapes: training images uint8 (N, H, W, C); the poisoning carries K uint8 images and their indices; labels are
    returned unchanged.
    """

    name = "hidden_trigger"
    Params = HiddenTriggerParams
    recipes = HIDDEN_TRIGGER_RECIPES

    def __init__(self, params: AttackParams | dict | None = None, *, extractor: nn.Module | None = None,
                 **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.extractor = extractor

    def _check_params(self) -> None:
        if self.params.trigger.name != "patch":
            raise ConfigError(f"attack {self.name!r} pastes a patch trigger; got trigger {self.params.trigger.name!r}")

    def _extractor(self, ctx: AttackContext, seed: int) -> nn.Module:
        """The feature map the poisons match: ``extractor`` if given, else the victim's own: its pretrained backbone
        as the victim reads it (with the victim's options, e.g. ``pool``), built by the experiment's victim
        builder; without one, the pretrained source-task model."""
        if self.extractor is not None:
            return self.extractor
        model_cfg = ctx.model
        if model_cfg is None or getattr(model_cfg, "pretrained", None) is None:
            raise ConfigError(f"attack {self.name!r} attacks a transfer-learning victim: configure the feature "
                              "extractor it fine-tunes (model.pretrained, a source task) or pass extractor=...")
        if ctx.victim is not None:  # its head is fresh and unused: only ``features`` is read
            victim = ctx.victim(seed)
            victim.source_task = {"key": pretrain_key(model_cfg)}
            return victim
        return pretrained_model(model_cfg, cache_dir=ctx.cache_dir, device=ctx.device, progress=ctx.progress,
                                log=ctx.log)

    def poison(self, train: ImageSet, *, seed: int = 0, context: AttackContext | None = None) -> Poisoning:
        target, sources = self.prologue(train)
        ctx = context or AttackContext()
        p = self.params
        trigger = p.trigger.build(train.image_shape, seed)
        target_pool = np.flatnonzero(train.labels == target)
        source_pool = np.flatnonzero(self.eligible(train, target, sources))
        if len(source_pool) == 0:
            raise ConfigError(f"attack {self.name!r}: the training set has no source-class images")
        k = resolve_budget(p.budget, len(train), len(target_pool),
                           f"poisons (target class {train.class_names[target]!r} has {len(target_pool)} images)")
        chosen = np.sort(np.random.default_rng(seed).choice(target_pool, size=k, replace=False))
        meta: dict[str, Any] = {"seed": seed, "target_name": train.class_names[target],
                                "source_names": [train.class_names[s] for s in (sources or ())] or "all",
                                "eps": p.eps, "eps_grey_levels": math.floor(p.eps * 255 + 1e-6)}
        if k == 0:
            return Poisoning(self.name, train.labels.copy(), np.zeros(len(train), dtype=bool), trigger, target,
                             sources, 0, chosen, train.images[chosen], metadata=meta)

        device = resolve_device(ctx.device)
        extractor = copy.deepcopy(self._extractor(ctx, seed)).to(device).eval()
        for param in extractor.parameters():
            param.requires_grad_(False)
        targets01 = to_nchw(train.images[chosen], device).float().div_(255)
        source_images = to_nchw(train.images[source_pool], device)
        patch = torch.from_numpy(patch_pixels(trigger)).permute(2, 0, 1).float().div_(255)
        fixed = (0, 0) if trigger.position == "random" else tuple(int(v) for v in trigger.positions(1)[0])
        targets_u8 = train.images[chosen]

        def optimize() -> dict[str, Any]:
            ctx.log(f"hidden trigger: {k} poisons from {len(target_pool)} target-class images, sources drawn from "
                    f"{len(source_pool)} images, eps {p.eps:.4f}, up to {p.iterations} iterations on {device}")
            result = optimize_poisons(
                feature_fn(extractor, p.precision, p.compile), targets01, source_images, patch,
                random_position=trigger.position == "random", fixed_position=fixed, eps=p.eps,
                iterations=p.iterations, lr=p.lr, lr_decay=p.lr_decay, decay_every=p.decay_every, step=p.step,
                stop_loss=p.stop_loss, matching=p.matching, batch_size=p.batch_size, source_draw=p.source_draw,
                seed=seed, log=ctx.log if ctx.progress else None, log_every=p.log_every)
            return {"images": torch.from_numpy(quantize(result.poisons, targets_u8, p.eps)),
                    "iterations_run": max(result.iterations), "stopped_early": max(result.iterations) < p.iterations,
                    "final_feature_loss_mean": float(result.final_loss.mean()),
                    "final_feature_loss_max": float(result.final_loss.max()),
                    "initial_feature_loss_mean": result.history[0][1] if result.history else None,
                    "seconds": round(result.seconds, 3), "history": result.history}

        # the poisons are cached under their inputs (the optimization takes minutes on a CPU): the training set, the
        # chosen targets, the trigger, the extractor's structure and weights, and every parameter but log_every
        key = entry_key("hidden_trigger", fingerprint(train.images, train.labels),
                        chosen.tolist(), trigger.params(), target, list(sources or []), seed,
                        FrozenFeatures.extractor_key(extractor), p.model_dump(mode="json", exclude={"log_every"}))
        path = Path(ctx.cache_dir) / HIDDEN_TRIGGER / f"poisons-{key}.pt" if ctx.cache_dir else None

        found, loaded = compute_once(path, optimize, lambda path: torch.load(path, weights_only=True), save_atomic)
        images = found["images"].numpy()
        diff = np.abs(images.astype(np.int16) - targets_u8.astype(np.int16))
        mask = np.zeros(len(train), dtype=bool)
        mask[chosen] = True
        meta.update({"iterations": p.iterations, **{name: v for name, v in found.items() if name != "images"},
                     "linf_grey_levels": int(diff.max()), "mean_abs_grey_levels": float(diff.mean()),
                     "matching": p.matching, "source_draw": p.source_draw, "precision": p.precision,
                     "compiled": p.compile, "extractor": getattr(extractor, "source_task", {}).get("key"),
                     "from_cache": loaded})
        if loaded:
            ctx.log(f"hidden trigger: poisons loaded from cache {path}")
        ctx.log(f"hidden trigger: {meta['iterations_run']} iterations in {meta['seconds']:.1f}s, feature loss "
                f"mean {meta['final_feature_loss_mean']:.3f} (from {meta['initial_feature_loss_mean']:.3f}), "
                f"L_inf {meta['linf_grey_levels']} grey levels")
        return Poisoning(self.name, train.labels.copy(), mask, trigger, target, sources, k, chosen, images,
                         metadata=meta)

    def probes(self, test: ImageSet, poisoning: Poisoning) -> list[Probe]:
        """The paper's figures besides CTA and ASR: accuracy on patched source images ("Val Patched (source
        only)", ``patched_source_accuracy``) and on the same images unpatched (``source_accuracy``)."""
        eligible = self.asr_mask(test, poisoning)
        if not eligible.any() or poisoning.activation is None:
            return []
        images, labels = test.images[eligible], test.labels[eligible]
        return [Probe("patched_source_accuracy", poisoning.activation(images), labels=labels),
                Probe("source_accuracy", images, labels=labels)]
