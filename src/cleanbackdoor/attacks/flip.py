"""FLIP: label-only backdoor by trajectory matching.

Paper: R. Jha, J. Hayase, S. Oh, "Label Poisoning is All You Need", NeurIPS 2023 (arXiv:2310.18933).

Threat model: the attacker supplies labels only (crowd-sourced annotation, or the soft labels of knowledge
distillation); the training images are untouched. At test time the attacker adds a trigger to an image of a source
class and the victim predicts the target class.

The algorithm, in four stages (each a function below, each cached under a key of exactly its inputs):

1. :func:`train_expert` trains an expert on the *poisoned* set: the clean training set plus one triggered copy of
   every source-class image, labelled target. It keeps checkpoints (parameters, SGD momentum buffers, learning
   rate: a :class:`Trajectory`) of its first ``expert_epochs`` epochs. ``expert_schedule = "authors"`` (default)
   trains at the recipe's constant learning rate and keeps the state after iterations k, 2k, ... of every epoch
   (k = ``checkpoint_every``; the authors: 50/100/150/200), never the initialization; ``"recipe"`` keeps the
   recipe's own schedule (e.g. one-cycle) and a checkpoint every k steps from step 0. With a held-out set in the
   context, the expert's clean accuracy and attack success are measured after every epoch (diagnostics only: a
   trajectory that does not carry the trigger cannot teach the labels anything).
2. :func:`optimize_labels` learns logits L (N x C), initialized to ``init_scale`` * one_hot(y), by one-step
   trajectory matching: for a minibatch of the poisoned set and a checkpoint theta_k, the *expert step* is a real
   SGD step of theta_k on the poisoned batch (-> theta_{k+1}); the *student step* is a differentiable SGD step of
   theta_k on the clean images of the same batch (same augmentation draw; appended triggered entries map back to
   their clean source image) with soft targets softmax(L); the loss is
   ||theta_hat - theta_{k+1}||^2 / ||theta_k - theta_{k+1}||^2 (+ ``l1`` * mean |softmax(L) - one_hot(y)|),
   and SGD (lr 150, momentum 0.5) steps L.
3. :func:`margin_scores` / :func:`select_flips`: score = L_max - L_y where argmax L != y, else
   (second largest - largest); over several label runs the minimum score and the mean logits; the top-``budget``
   images are flipped to argmax_{c != y} L_c.
4. The :class:`~cleanbackdoor.attacks.base.Poisoning`: flipped hard labels, or (``mode = "soft"``, the
   distillation variant) softmax(alpha * one_hot(y) + (1 - alpha) * L) for every image.

Two regimes. Against a victim that trains its whole network, the experts and the label steps run the network on
images. Against a victim that trains only its head on a frozen extractor (``train.finetune = "last"``, e.g. a
pretrained ``model.pretrained``: the authors' pretrained VGG / ViT victims), the extractor's features of the clean
set and of the triggered copies are computed once (and cached per image), the experts train the head on them, and
the label step differentiates the head's SGD step on features: the same step as the whole model's with its
backbone frozen (tested), at the cost of a few matrix products, so a step on the whole poisoned set is cheap.

How the student step is differentiated. ``method = "autograd"`` (the default) is the direct route:
``torch.func.grad`` of the soft-label loss through ``functional_call``, differentiated again by autograd (what the
authors write by hand with ``create_graph=True``). ``method = "linearized"`` computes the same gradient another
way, using that the student's parameter gradient is linear in its soft targets: with logits z = f(theta_k, x) and
p = softmax(z), the gradient of the mean soft cross-entropy is g_s = J^T (p - t) / B (J = dz/dtheta), and the SGD
update is affine in g_s (slope -lr * a, a = 1 + momentum with Nesterov, 1 without). So
dLoss/dt = -(1/B) J v with v = dLoss/dg_s = -2 lr a (theta_hat - theta_{k+1}) / D: one vector-Jacobian product and
one Jacobian-vector product (``torch.func.jvp``) replace the backward-through-backward. Both are exact and agree
on the gradient with respect to the logits L (tested). Which is faster depends on the backend: on the CPU build
here ``jvp`` through convolutions costs about two forward-backward passes, so the autograd route is faster
(``benchmarks/flip_label_step.py``: 3.8 vs 4.4 training steps per label step).

The label step's batch (``label_batch``). The residual theta_hat - theta_{k+1} comes from the batch's triggered
entries only, so on a small set a minibatch holds a handful of them and each step mostly rewards the source images
drawn with them (digits, batch 64: about six triggered nines; run-to-run rank correlation of the margins 0.06).
``label_batch = "all"`` steps on the whole poisoned set at once (one step per pass, on a random checkpoint): on
digits this took the correlation to 0.5-0.75 and FLIP from below random flips to far above them
(docs/attacks/flip_history.md). A batch above ``label_chunk`` entries (default 4096) is processed in chunks
(:func:`chunked_matching_loss_and_label_grad`): the same step in the memory of one chunk, for one more pass over
the batch; with batch norm, each chunk uses its own batch statistics.

Deviations from the authors' code (github SewoongLab/FLIP), all deliberate:
- experts are trained only for the ``expert_epochs`` whose checkpoints are used (with ``expert_schedule =
  "recipe"`` the learning-rate schedule is still the full recipe's), not for the whole recipe;
- each label step draws its checkpoint at random (the authors draw one per pass, for every batch of that pass);
- checkpoints stay in memory during label optimization (the authors reload them from disk three times a batch);
- every batch gets a fresh augmentation draw from a seeded generator (the authors cycle 8 seeds);
- the expert step is recomputed on the same batch as the student's (as the paper describes), so the loss is zero
  exactly when the soft labels reproduce the poisoned batch's effect;
- batch-norm layers use the batch's statistics in both functional steps (as in training) and their running
  statistics are left alone; the label loss matches parameters only, as in the paper;
- the authors' bugs (``n_classes`` before assignment, ``label_kwargs``/``labels_kwargs``) are not reproduced.
"""

from __future__ import annotations

import copy
import functools
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from torch import nn
from torch.func import functional_call, grad, jvp, replace_all_batch_norm_modules_, vjp
from tqdm.auto import tqdm

from cleanbackdoor.attacks.base import Attack, AttackContext, AttackParams, Poisoning, TriggerSpec, resolve_budget
from cleanbackdoor.cache import FLIP, compute_once, entry_key, fingerprint, save_atomic, stable_key
from cleanbackdoor.components import format_validation_error
from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.data.transforms import Augment, AugmentDraw, channel_stats, to_nchw
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.executor import Job, Serial
from cleanbackdoor.metrics import accuracy, asr_eligible, attack_success_rate
from cleanbackdoor.models import build_model
from cleanbackdoor.training import FrozenFeatures, predict, resolve_device, train, trainable_parameters
from cleanbackdoor.recipes import PRESETS, TrainConfig
from cleanbackdoor.triggers import Trigger


class FlipParams(AttackParams):
    target: int | str = Field(4, description="class the flipped labels are set to, by index or name; the paper's "
                                             "CIFAR-10 pair: truck (9) -> deer (4)")
    sources: list[int | str] | Literal["all"] = Field(
        [9], description='classes whose labels may be flipped and that the trigger acts on; "all": every other class')
    budget: int | float = Field(0.02, ge=0, description="labels flipped (hard mode): a count (int) or a fraction of "
                                                        "the whole training set (float in (0, 1))")
    trigger: TriggerSpec = Field(default_factory=lambda: TriggerSpec(name="sinusoidal"),
                                 description="trigger the experts learn and the test adds, as {name, ...its "
                                             "parameters}; default: sinusoidal")
    mode: Literal["hard", "soft"] = Field("hard", description="hard: flip the top-budget labels; soft: distillation "
                                                              "labels for every image (see alpha)")
    alpha: float = Field(0.2, ge=0, le=1, description="soft mode: labels softmax(alpha * one_hot + (1 - alpha) * L)")
    # stage 1: experts
    n_experts: int = Field(1, ge=1, le=100, description="experts trained on the poisoned set (the paper's recipe: 5)")
    expert_epochs: int = Field(10, ge=1, description="epochs each expert trains and keeps checkpoints of "
                                                     "(the paper's recipe: 15)")
    checkpoint_every: int = Field(50, ge=1, description="iterations between an expert's stored checkpoints "
                                                        "(the authors: 50)")
    expert_schedule: Literal["authors", "recipe"] = Field(
        "authors", description="authors: constant lr, checkpoints within each epoch; recipe: the recipe's own "
                               "schedule, checkpoints from step 0")
    expert_model: dict[str, Any] | None = Field(None, description="experts' architecture {name, options}; "
                                                                  "None: the victim's")
    expert_train: dict[str, Any] | None = Field(None, description="overrides of the experts' recipe (or {preset = "
                                                                  "...}); None: the victim's recipe")
    # stage 2: label optimization
    label_runs: int = Field(1, ge=1, le=50, description="independent label-optimization runs (minimum score and "
                                                        "mean logits over them)")
    label_passes: int = Field(5, ge=1, description="passes over the poisoned set per label run "
                                                   "(the paper's recipe: 15)")
    label_lr: float = Field(150.0, gt=0, description="SGD learning rate of the label logits L (the paper: 150)")
    label_momentum: float = Field(0.5, ge=0, lt=1, description="SGD momentum of the label logits L (the paper: 0.5)")
    label_batch: Annotated[int, Field(ge=2)] | Literal["all"] | None = Field(
        None, description="batch of the poisoned set per label step; None: the expert recipe's batch size; 'all': "
                          "the whole set (one step per pass)")
    label_chunk: int = Field(4096, ge=2, description="most entries one differentiable pass holds: a larger label "
                                                     "batch runs in chunks of this size (whole-network victims)")
    init_scale: float = Field(5.0, gt=0, description="the label logits start at init_scale * one_hot(y)")
    l1: float = Field(0.0, ge=0, description="weight of the penalty mean |softmax(L) - one_hot(y)| in the label loss "
                                             "(0: none)")
    method: Literal["autograd", "linearized"] = Field(
        "autograd", description="how the student step is differentiated: autograd or linearized (same gradient)")
    compile: bool = Field(False, description="torch.compile the label step (autograd route, batches of one piece): "
                                             "1.5x per step on 2 CPU cores after 4-28 s of compiling; the "
                                             "labels equal the eager ones up to float rounding")


# -- stage 1: experts ---------------------------------------------------------------------------------------
def poisoned_training_set(images: np.ndarray, labels: np.ndarray, trigger: Trigger,
                          sources: tuple[int, ...] | None, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The experts' training set: every clean image, then a triggered copy of every source image labelled target
    (``sources`` None: every image not of the target class).

    Returns (images, labels, origin): ``origin[i]`` is the clean training image entry i comes from (i itself for
    the first N entries), which is how the student maps an appended entry back to a clean image.
    """
    src = np.flatnonzero(labels != target if sources is None else np.isin(labels, sources))
    ext_images = np.concatenate([images, trigger(images[src])])
    ext_labels = np.concatenate([labels, np.full(len(src), target, dtype=labels.dtype)])
    origin = np.concatenate([np.arange(len(images)), src])
    return ext_images, ext_labels, origin


@dataclass
class Trajectory:
    """An expert's stored checkpoints: flat trainable parameters, their flat SGD momentum buffers and the lr of
    each (with ``finetune = "last"`` the head's parameters only: the frozen extractor never moves)."""

    params: torch.Tensor  # (K, P)
    momentum: torch.Tensor  # (K, P)
    lr: torch.Tensor  # (K,)
    steps: torch.Tensor  # (K,) the training step each checkpoint was taken before

    def __len__(self) -> int:
        return len(self.lr)

    def to(self, device: torch.device) -> Trajectory:
        return Trajectory(self.params.to(device), self.momentum.to(device), self.lr.to(device), self.steps.to(device))

    def state(self) -> dict[str, torch.Tensor]:
        return {"params": self.params, "momentum": self.momentum, "lr": self.lr, "steps": self.steps}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Trajectory:
        return cls(state["params"], state["momentum"], state["lr"], state["steps"])


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainable_parameters(model)])


def _flat_momentum(model: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    parts = []
    for p in trainable_parameters(model):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        parts.append(torch.zeros_like(p).reshape(-1) if buf is None else buf.detach().reshape(-1))
    return torch.cat(parts)


def expert_recipe(recipe: TrainConfig, schedule: str) -> TrainConfig:
    """The recipe the experts train with: the authors' constant learning rate, or the recipe as it is."""
    if schedule == "recipe":
        return recipe
    return recipe.model_copy(update={"schedule": "constant", "warmup_epochs": 0.0, "milestones": []})


def is_checkpoint(step: int, steps_per_epoch: int, every: int, schedule: str) -> bool:
    """Whether the expert keeps the state before optimizer step ``step`` (0-based, counted over the whole run).

    ``"authors"``: after iterations ``every``, 2 ``every``, ... of each epoch (the authors save after iterations
    50/100/150/200 of every epoch), so never the initialization; ``"recipe"``: every ``every`` steps from step 0."""
    if schedule == "recipe":
        return step % every == 0
    within = step % steps_per_epoch
    return within > 0 and within % every == 0


Evaluate = Callable[[nn.Module], dict[str, float]]


def train_expert(model: nn.Module, images: np.ndarray | None, labels: np.ndarray, recipe: TrainConfig, *,
                 expert_epochs: int, checkpoint_every: int, seed: int, device: torch.device,
                 schedule: str = "recipe", features: FrozenFeatures | None = None, evaluate: Evaluate | None = None,
                 work_dir: Path | None = None, progress: bool = True,
                 desc: str = "expert") -> tuple[Trajectory, list[dict[str, float]]]:
    """Train one expert on the poisoned set for its first ``expert_epochs`` epochs and keep its checkpoints
    (:func:`is_checkpoint`; ``recipe`` is used as given: :func:`expert_recipe` makes the authors' one).

    ``features``: with ``recipe.finetune = "last"``, the frozen extractor's features of the poisoned set; the
    expert is then a head trained on them. ``evaluate(model)``, called after every epoch, returns figures of the
    expert (its clean accuracy and attack success on held-out images), returned per epoch. With ``work_dir``, an
    interrupted run resumes where it stopped."""
    snaps: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []
    curve: list[dict[str, float]] = []
    n = len(labels)
    spe = math.ceil(n / min(recipe.batch_size, n))
    partial = work_dir / "trajectory.partial.pt" if work_dir else None
    ckpt = work_dir / "train.ckpt" if work_dir else None
    if partial is not None and partial.exists() and ckpt is not None and ckpt.exists():
        done_epochs = int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])
        saved = torch.load(partial, map_location="cpu", weights_only=True)
        snaps = [(int(s), float(lr), p, m) for s, lr, p, m in
                 zip(saved["steps"], saved["lr"], saved["params"], saved["momentum"]) if s < done_epochs * spe]
        curve = [dict(c) for c in saved.get("curve", [])][:done_epochs]

    def on_step(step: int, m: nn.Module, opt: torch.optim.Optimizer) -> None:
        if is_checkpoint(step, spe, checkpoint_every, schedule):
            snaps.append((step, opt.param_groups[0]["lr"], _flat_params(m).cpu(), _flat_momentum(m, opt).cpu()))

    def on_epoch_end(epoch: int, m: nn.Module, opt: torch.optim.Optimizer) -> None:
        if evaluate is not None:
            curve.append({"epoch": epoch, **evaluate(m)})
        if partial is not None and snaps:
            save_atomic({**_stack(snaps).state(), "curve": curve}, partial)

    train(model, images, labels, recipe, seed=seed, device=device, progress=progress, desc=desc, on_step=on_step,
          on_epoch_end=on_epoch_end, checkpoint=ckpt, stop_epoch=expert_epochs, features=features)
    if not snaps:
        raise ConfigError(f"expert stored no checkpoint: an epoch has {spe} steps; lower checkpoint_every or raise "
                          "expert_epochs")
    return _stack(snaps), curve


def _stack(snaps: list[tuple[int, float, torch.Tensor, torch.Tensor]]) -> Trajectory:
    return Trajectory(torch.stack([s[2] for s in snaps]), torch.stack([s[3] for s in snaps]),
                      torch.tensor([s[1] for s in snaps], dtype=torch.float32),
                      torch.tensor([s[0] for s in snaps], dtype=torch.int64))


# -- stage 2: label optimization ----------------------------------------------------------------------------
class FunctionalSGD:
    """A model as a pure function of a flat vector of its trained parameters, and the SGD update of
    ``torch.optim.SGD``.

    With ``recipe.finetune = "last"`` only the head's parameters are variables: the rest of the model is a fixed
    function in eval mode (its batch-norm layers use their running statistics, as the frozen extractor does in
    training). Otherwise every parameter is, and batch-norm layers use the batch's statistics (as in training)
    without touching their running statistics. A head alone (the route on cached features) is the first case's
    function of the features."""

    def __init__(self, model: nn.Module, recipe: TrainConfig) -> None:
        if recipe.optimizer != "sgd":
            raise ConfigError(f"FLIP matches SGD trajectories; the expert recipe uses {recipe.optimizer!r}")
        self.module = copy.deepcopy(model)
        head_only = recipe.finetune == "last" and isinstance(getattr(self.module, "head", None), nn.Module)
        if head_only:
            self.module.eval()
            self.module.head.train()
            trained = [(f"head.{n}", p) for n, p in self.module.head.named_parameters()]
        else:
            replace_all_batch_norm_modules_(self.module)  # batch statistics, no running-stat side effects
            self.module.train()
            trained = list(self.module.named_parameters())
        self.names = [n for n, _ in trained]
        self.shapes = [p.shape for _, p in trained]
        self.sizes = [p.numel() for _, p in trained]
        self.momentum, self.nesterov, self.wd = recipe.momentum, recipe.nesterov, recipe.weight_decay
        # slope of the update with respect to the gradient: theta' = ... - lr * slope * g
        self.slope = (1 + self.momentum) if self.nesterov else 1.0

    def to(self, device: torch.device) -> FunctionalSGD:
        """The fixed part of the function (buffers such as the input normalization, frozen layers) on ``device``,
        the device of the parameters and data it is called with."""
        self.module.to(device)
        return self

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, params, (x,))

    def loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy with hard (int) or soft (float) targets."""
        z = self.logits(params, x)
        if targets.dtype == torch.int64:
            return F.cross_entropy(z, targets)
        return -(targets * F.log_softmax(z, dim=1)).sum(1).mean()

    def grad(self, theta: torch.Tensor, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.flatten(grad(self.loss)(self.unflatten(theta), x, targets))

    def step(self, theta: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """One step of torch.optim.SGD (dampening 0) from parameters ``theta`` with momentum buffer ``buf``."""
        d = g + self.wd * theta if self.wd else g
        if self.momentum:
            new_buf = self.momentum * buf + d
            d = d + self.momentum * new_buf if self.nesterov else new_buf
        return theta - lr * d


def matching_loss_and_label_grad(fs: FunctionalSGD, theta: torch.Tensor, buf: torch.Tensor, lr: torch.Tensor,
                                 x_expert: torch.Tensor, y_expert: torch.Tensor, x_student: torch.Tensor,
                                 soft: torch.Tensor, method: str = "autograd") -> tuple[torch.Tensor, torch.Tensor]:
    """One trajectory-matching evaluation: the normalized parameter distance and its gradient w.r.t. ``soft``
    (the student's soft targets, (B, C)). ``soft`` is a plain tensor; the caller chains the gradient on."""
    with torch.no_grad():
        theta_next = fs.step(theta, fs.grad(theta, x_expert, y_expert), buf, lr)
        denom = (theta - theta_next).pow(2).sum().clamp_min(1e-30)
    if method == "autograd":
        t = soft.detach().requires_grad_(True)
        theta_hat = fs.step(theta, fs.grad(theta, x_student, t), buf, lr)
        loss = (theta_hat - theta_next).pow(2).sum() / denom
        (g_t,) = torch.autograd.grad(loss, t)
        return loss.detach(), g_t
    params = fs.unflatten(theta)
    z, vjp_fn = vjp(lambda p: fs.logits(p, x_student), params)
    b = x_student.shape[0]
    with torch.no_grad():
        g_s = fs.flatten(vjp_fn((F.softmax(z, dim=1) - soft) / b)[0])
        resid = fs.step(theta, g_s, buf, lr) - theta_next
        loss = resid.pow(2).sum() / denom
        v = resid * (-2.0 * lr * fs.slope / denom)  # dLoss / dg_s
    _, jv = jvp(lambda p: fs.logits(p, x_student), (params,), (fs.unflatten(v),))
    return loss, -jv.detach() / b


def chunked_matching_loss_and_label_grad(fs: FunctionalSGD, theta: torch.Tensor, buf: torch.Tensor,
                                         lr: torch.Tensor, chunks: list[tuple[slice, Callable[[], tuple]]],
                                         soft: torch.Tensor, method: str = "autograd"
                                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`matching_loss_and_label_grad` for a batch too large for one differentiable pass.

    ``chunks`` are (rows of ``soft``, loader of (x_expert, y_expert, x_student) for those rows). Both steps use the
    batch gradient as the size-weighted mean of the chunk gradients (batch-norm statistics are per chunk, as in
    training with batches of the chunk size). The update is affine in the student's gradient g_s, so
    dLoss/dsoft = v . dg_s/dsoft with v = dLoss/dg_s = -2 lr a (theta_hat - theta_{k+1}) / D, and each chunk's share
    is one more pass through it: a double backward of v . g_s^c (``autograd``), or -J_c v / B (``linearized``).
    Three passes over the batch instead of two, memory of one chunk."""
    n = soft.shape[0]
    with torch.no_grad():
        g_e = torch.zeros_like(theta)
        g_s = torch.zeros_like(theta)
        for rows, load in chunks:
            x_e, y_e, x_s = load()
            w = (rows.stop - rows.start) / n
            g_e += w * fs.grad(theta, x_e, y_e)
            g_s += w * fs.grad(theta, x_s, soft[rows])
        theta_next = fs.step(theta, g_e, buf, lr)
        denom = (theta - theta_next).pow(2).sum().clamp_min(1e-30)
        resid = fs.step(theta, g_s, buf, lr) - theta_next
        loss = resid.pow(2).sum() / denom
        v = resid * (-2.0 * lr * fs.slope / denom)  # dLoss / dg_s
    g_soft = torch.zeros_like(soft)
    for rows, load in chunks:
        _, _, x_s = load()
        w = (rows.stop - rows.start) / n
        if method == "autograd":
            t = soft[rows].detach().requires_grad_(True)
            (g,) = torch.autograd.grad((fs.grad(theta, x_s, t) * v).sum(), t)
            g_soft[rows] = w * g
        else:
            _, jv = jvp(lambda p: fs.logits(p, x_s), (fs.unflatten(theta),), (fs.unflatten(v),))
            g_soft[rows] = -jv.detach() / n
    return loss, g_soft


class ImageInputs:
    """Images (uint8 NCHW, on the device) as the label step reads them: scaled to [0, 1] and augmented."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def take(self, idx: torch.Tensor, draw: AugmentDraw, augment: Augment) -> torch.Tensor:
        return augment.apply(self.images[idx].float().div_(255), draw)


class FeatureInputs:
    """A frozen extractor's features (:class:`~cleanbackdoor.training.FrozenFeatures`) as the label step reads
    them: the features of the image, or of its mirror image where the augmentation draw flips it."""

    def __init__(self, features: FrozenFeatures) -> None:
        self.features = features

    def take(self, idx: torch.Tensor, draw: AugmentDraw, augment: Augment) -> torch.Tensor:
        return self.features.select(idx, draw.flip if augment.hflip else None)


@dataclass
class LabelData:
    """What label optimization reads, on the device: the inputs of the poisoned set (clean entries, then the
    triggered source copies) and of the clean set, as images or as a frozen extractor's features."""

    clean: ImageInputs | FeatureInputs  # (N, ...)
    expert: ImageInputs | FeatureInputs  # (N + S, ...)
    expert_labels: torch.Tensor  # int64 (N + S,)
    origin: torch.Tensor  # int64 (N + S,): the clean image each entry comes from
    labels: torch.Tensor  # int64 (N,) true labels

    @classmethod
    def build(cls, images: np.ndarray, labels: np.ndarray, ext_images: np.ndarray, ext_labels: np.ndarray,
              origin: np.ndarray, device: torch.device) -> LabelData:
        """From images: the clean set and the poisoned set (clean, then triggered copies)."""
        return cls(ImageInputs(to_nchw(images, device)), ImageInputs(to_nchw(ext_images, device)),
                   *_label_tensors(ext_labels, origin, labels, device))

    @classmethod
    def from_features(cls, clean: FrozenFeatures, triggered: FrozenFeatures, labels: np.ndarray,
                      ext_labels: np.ndarray, origin: np.ndarray, device: torch.device) -> LabelData:
        """From a frozen extractor's features of the clean set and of the triggered source copies."""
        clean = FrozenFeatures(clean.plain.to(device), None if clean.flipped is None else clean.flipped.to(device))
        triggered = FrozenFeatures(triggered.plain.to(device),
                                   None if triggered.flipped is None else triggered.flipped.to(device))
        return cls(FeatureInputs(clean), FeatureInputs(FrozenFeatures.concat([clean, triggered])),
                   *_label_tensors(ext_labels, origin, labels, device))

    @property
    def device(self) -> torch.device:
        return self.labels.device


def _label_tensors(ext_labels: np.ndarray, origin: np.ndarray, labels: np.ndarray,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(ext_labels).long().to(device), torch.from_numpy(origin).long().to(device),
            torch.from_numpy(labels).long().to(device))


def optimize_labels(fs: FunctionalSGD, trajectories: list[Trajectory], data: LabelData, num_classes: int,
                    augment: Augment, *, passes: int, batch_size: int, lr: float, momentum: float,
                    init_scale: float, l1: float, seed: int, method: str = "autograd", chunk: int | None = None,
                    work_dir: Path | None = None, progress: bool = True, desc: str = "labels",
                    log=None, compile: bool = False) -> tuple[torch.Tensor, list[float]]:
    """Learn the attacker's label logits (N, C) by one-step trajectory matching; returns them and the mean loss
    of each pass. A batch larger than ``chunk`` is processed in chunks (:func:`chunked_matching_loss_and_label_grad`).
    With ``work_dir``, the state is saved after every pass and an interrupted run resumes. ``compile``: the
    whole-batch matching step through ``torch.compile`` (the chunked one stays eager)."""
    dev = data.device
    logits = (init_scale * F.one_hot(data.labels, num_classes).float()).requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=lr, momentum=momentum)
    gen = torch.Generator(device=dev).manual_seed(seed)
    start, losses = 0, []
    ckpt = work_dir / "labels.ckpt" if work_dir else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=True)
        with torch.no_grad():
            logits.copy_(state["logits"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"].cpu())
        start, losses = int(state["pass"]), list(state["losses"])
    trajs = [t.to(dev) for t in trajectories]
    fs.to(dev)  # the student's fixed tensors where its parameters and data are (a model built on the CPU)
    if compile and method != "autograd":
        raise ConfigError("compile covers the autograd label step, not the linearized one")
    matching = torch.compile(matching_loss_and_label_grad) if compile else matching_loss_and_label_grad
    one_hot = F.one_hot(data.labels, num_classes).float()
    entries = data.expert_labels.shape[0]
    n_batches = max(1, entries // batch_size)  # drop the ragged last batch, as the authors do
    for p in range(start, passes):
        perm = torch.randperm(entries, generator=gen, device=dev)
        choice = torch.randint(0, 2**31 - 1, (n_batches, 2), generator=gen, device=dev).cpu()
        total = 0.0
        bar = tqdm(range(n_batches), desc=f"{desc} pass {p + 1}/{passes}", leave=False,
                   disable=None if progress else True)  # None: only on a terminal
        for b in bar:
            idx = perm[b * batch_size:(b + 1) * batch_size]
            traj = trajs[int(choice[b, 0]) % len(trajs)]
            k = int(choice[b, 1]) % len(traj)
            draw = augment.draw(len(idx), gen)
            src = data.origin[idx]
            soft = F.softmax(logits[src], dim=1)

            def load(rows: slice = slice(None), idx=idx, src=src, draw=draw) -> tuple:
                # the expert reads the poisoned entries; the student the *clean* origin of each, same draw
                part = AugmentDraw(draw.dy[rows], draw.dx[rows], draw.flip[rows])
                return (data.expert.take(idx[rows], part, augment), data.expert_labels[idx[rows]],
                        data.clean.take(src[rows], part, augment))

            if chunk is None or len(idx) <= chunk:
                x_e, y_e, x_s = load()
                loss, g_soft = matching(fs, traj.params[k], traj.momentum[k], traj.lr[k], x_e, y_e, x_s,
                                        soft.detach(), method)
            else:
                parts = [slice(a, min(a + chunk, len(idx))) for a in range(0, len(idx), chunk)]
                loss, g_soft = chunked_matching_loss_and_label_grad(
                    fs, traj.params[k], traj.momentum[k], traj.lr[k],
                    [(rows, functools.partial(load, rows)) for rows in parts], soft.detach(), method)
            if not torch.isfinite(loss):
                raise ConfigError(f"label optimization diverged in pass {p + 1} (loss {float(loss)}); "
                                  "lower label_lr")
            opt.zero_grad(set_to_none=True)
            surrogate = (soft * g_soft).sum()
            if l1:
                surrogate = surrogate + l1 * (soft - one_hot[src]).abs().sum(1).mean()
            surrogate.backward()
            opt.step()
            total += float(loss)
        losses.append(total / n_batches)
        every = max(1, passes // 10)  # about ten log lines per run, each the mean over the passes since the last
        if log is not None and ((p + 1) % every == 0 or p + 1 == passes):
            since = losses[-((p % every) + 1):]
            span = f"pass {p + 1}" if len(since) == 1 else f"passes {p + 2 - len(since)}-{p + 1}"
            log(f"{desc}: {span}/{passes}, mean matching loss {sum(since) / len(since):.4f}")
        if ckpt is not None:
            save_atomic({"logits": logits.detach(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                         "pass": p + 1, "losses": losses}, ckpt)
    return logits.detach().cpu(), losses


# -- stage 3: scoring and flip selection --------------------------------------------------------------------
def margin_scores(logits: torch.Tensor | np.ndarray, labels: np.ndarray) -> np.ndarray:
    """FLIP's margin: L_max - L_y where the argmax is not the true label, else (second largest - largest)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.int64)
    top2 = z.topk(2, dim=1).values
    flipped = z.argmax(1) != y
    score = torch.where(flipped, top2[:, 0] - z.gather(1, y[:, None])[:, 0], top2[:, 1] - top2[:, 0])
    return score.numpy()


def combine_runs(runs: list[torch.Tensor], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Several label-optimization runs -> (minimum score over runs, mean logits)."""
    scores = np.min(np.stack([margin_scores(r, labels) for r in runs]), axis=0)
    return scores, torch.stack([torch.as_tensor(r) for r in runs]).mean(0).numpy()


def select_flips(scores: np.ndarray, logits: np.ndarray, labels: np.ndarray,
                 budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip the ``budget`` highest-scored images to argmax_{c != y} L_c; the rest keep their label.
    Ties are broken by the lower index, so the selection is deterministic."""
    order = np.lexsort((np.arange(len(scores)), -scores))[:budget]
    masked = np.asarray(logits, dtype=np.float64).copy()
    masked[np.arange(len(labels)), labels] = -np.inf
    new = labels.copy()
    new[order] = masked[order].argmax(1)
    mask = np.zeros(len(labels), dtype=bool)
    mask[order] = True
    return new, mask


def distillation_labels(logits: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """The soft variant: softmax(alpha * one_hot(y) + (1 - alpha) * L) for every image."""
    z = alpha * np.eye(logits.shape[1])[labels] + (1 - alpha) * np.asarray(logits, dtype=np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


# Where FLIP fires (docs/attacks/flip.md). Digits: 40 flipped nines -> four, whole-network ConvNet, label steps on
# the whole set (about a minute on 2 cores from an empty cache; seed 0: ASR 70.4%, 29.6% without the trigger,
# clean model 0.0%). CIFAR-10: a linear head on the frozen 60-epoch ResNet-20 (artifacts/), 1,000 trucks -> deer
# at amplitude 20/255, the trigger the dirty-label control chose (ASR 76.0 +- 0.4% over 3 seeds, noT 9.9%).
# "cifar10-paper": the paper's recipe (pre-activation ResNet-32, 5 experts), for a GPU.
FLIP_RECIPES: dict[str, dict[str, Any]] = {
    "digits": {
        "attack": {"target": 4, "sources": [9], "trigger": {"name": "sinusoidal", "amplitude": 40.0, "periods": 2.0},
                   "budget": 40, "n_experts": 10, "expert_epochs": 10, "checkpoint_every": 5, "label_batch": "all",
                   "label_passes": 100, "label_lr": 600.0},
    },
    "cifar10": {
        "model": {"name": "resnet20", "pretrained": {"train": {"preset": "cifar-fast", "epochs": 60}}},
        "train": {"finetune": "last", "epochs": 30, "batch_size": 256, "optimizer": "sgd", "lr": 0.01,
                  "momentum": 0.9, "nesterov": True, "weight_decay": 2e-4, "schedule": "cosine"},
        "attack": {"target": 4, "sources": [9], "budget": 1000,
                   "trigger": {"name": "sinusoidal", "amplitude": 20.0, "periods": 8.0},
                   "n_experts": 1, "expert_epochs": 20, "checkpoint_every": 50, "label_batch": "all",
                   "label_passes": 600, "label_lr": 150.0, "label_momentum": 0.5},
    },
    "cifar10-paper": {
        "data": {"name": "cifar10"},
        "model": {"name": "preact-resnet32"},
        "train": {"preset": "flip-cifar"},
        "attack": {"target": 4, "sources": [9], "budget": 1000, "trigger": {"name": "sinusoidal"}, "n_experts": 5,
                   "expert_epochs": 15, "checkpoint_every": 50, "label_passes": 15, "label_lr": 150.0,
                   "label_momentum": 0.5},
    },
}


def _resumable_entry(path: Path | None, work: Path | None,
                     fit: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """A cached stage (an expert, a label run): loaded from ``path`` when it exists, else ``fit`` (which resumes from
    its snapshots in the folder ``work``), saved atomically, and ``work`` removed once the entry is written."""

    def save(state: dict[str, Any], path: Path) -> None:
        save_atomic(state, path)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

    return compute_once(path, fit, lambda path: torch.load(path, map_location="cpu", weights_only=True), save)


# -- the attack ---------------------------------------------------------------------------------------------
class Flip(Attack):
    """FLIP (Jha, Hayase, Oh, NeurIPS 2023): flip the labels that make a victim follow experts trained with the trigger.

    The algorithm, its deviations from the authors' code and the head-only regime: see the module docstring.

    Arguments (``FlipParams``): target / sources / trigger as for every attack (default truck -> deer with the
    sinusoidal trigger); ``budget`` = number of flipped labels (count, or fraction of the whole training set);
    ``mode`` hard flips or soft distillation labels (``alpha``); expert and label-optimization settings.
    Shapes: returns labels (N,) int64 (hard) or (N, C) float32 (soft) and the mask (N,) of changed labels.
    Example::

        attack = Flip(budget=1000, n_experts=1, expert_epochs=15, label_passes=5)
        poisoning = attack.poison(train_set, seed=0, context=AttackContext(cache_dir=Path("cache")))
    """

    name = "flip"
    Params = FlipParams
    label_only = True
    recipes = FLIP_RECIPES

    def _check_params(self) -> None:
        self._expert_setup(AttackContext())  # an unknown expert_train preset or value is an error before any work
        if self.params.compile and self.params.method != "autograd":
            raise ConfigError("attack 'flip': compile covers the autograd label step; the linearized one's JVP "
                              "trips PyTorch's compiler on some models (set method = 'autograd' or compile = false)")

    def _expert_setup(self, context: AttackContext) -> tuple[dict[str, Any], TrainConfig]:
        """The experts' architecture and recipe: the victim's (the attacker's guess of it) unless overridden."""
        victim_model = context.model.model_dump() if context.model is not None else {"name": "convnet", "options": {}}
        model_cfg = {"options": {}, **(self.params.expert_model or victim_model)}
        recipe = context.train if context.train is not None else TrainConfig()
        overrides = dict(self.params.expert_train or {})
        if overrides:
            name = overrides.pop("preset", None)
            if name is not None and name not in PRESETS:
                raise ConfigError(f"attack 'flip': unknown expert_train preset {name!r}; allowed: "
                                  f"{', '.join(sorted(PRESETS))}")
            base = PRESETS[name] if name is not None else recipe.model_dump()
            try:
                recipe = TrainConfig(**{**base, **overrides})
            except ValidationError as e:
                raise ConfigError(f"attack 'flip': expert_train.{format_validation_error(e)}") from None
        if recipe.optimizer != "sgd":
            raise ConfigError(f"attack 'flip': experts must train with SGD (got {recipe.optimizer!r}); "
                              "set attack.expert_train = {optimizer = 'sgd'}")
        return model_cfg, recipe

    def poison(self, train: ImageSet, *, seed: int = 0, context: AttackContext | None = None) -> Poisoning:
        target, sources = self.prologue(train)
        ctx = context or AttackContext()
        p = self.params
        # hard mode flips `budget` labels, checked before the experts train; soft mode changes every label's
        # distribution and reports how many argmaxes moved, so it has no budget to check
        m = resolve_budget(p.budget, len(train), len(train), "labels") if p.mode == "hard" else None
        trigger = p.trigger.build(train.image_shape, seed)
        model_cfg, recipe = self._expert_setup(ctx)
        head_only = recipe.finetune == "last"
        if head_only and recipe.crop_padding:
            raise ConfigError("attack 'flip': a head on a frozen extractor trains on the extractor's features, "
                              "computed once; random crops would change them every step (set crop_padding = 0)")
        recipe = expert_recipe(recipe, p.expert_schedule)
        device = resolve_device(ctx.device)
        log = ctx.log
        ext_images, ext_labels, origin = poisoned_training_set(train.images, train.labels, trigger, sources, target)
        stats: list[tuple] = []  # the channel statistics, computed when a model first needs them (a plain closure:
                                 # the expert jobs are pickled for Ray, and functools.cache objects are not)

        def normalization() -> tuple:
            if not stats:
                stats.append(channel_stats(train.images))
            return stats[0]

        def fresh_model(s: int) -> nn.Module:
            if p.expert_model is None and ctx.victim is not None:  # the victim's architecture, as the experiment
                return ctx.victim(s)                              # builds it (pretrained extractor included)
            torch.manual_seed(s)
            return build_model(model_cfg["name"], train.image_shape, train.num_classes, *normalization(),
                               **model_cfg.get("options", {}))

        # a head on a frozen extractor: everything below runs on the extractor's features, computed once
        features = extractor = None
        if head_only:
            extractor = fresh_model(0).to(device)
            features = self._features(extractor, train.images, ext_images[len(train):], recipe, ctx, device)
            model_key = ["head-on-features", FrozenFeatures.extractor_key(extractor),
                         model_cfg.get("options", {})]
        else:
            model_key = model_cfg
        evaluate, heldout_key = self._expert_evaluation(ctx.heldout, trigger, target, sources, head_only,
                                                        extractor, ctx, device)
        base_key = [fingerprint(train.images, train.labels), trigger.params(), target, list(sources or []), model_key,
                    recipe.model_dump(mode="json"), *([p.expert_schedule] if p.expert_schedule != "recipe" else [])]
        cache = Path(ctx.cache_dir) / FLIP if ctx.cache_dir else None
        executor = ctx.executor or Serial(echo=False)

        # stage 1: experts (cached per expert; independent jobs: Ray tasks under `--executor ray`)
        def expert(e: int) -> tuple[dict[str, Any], bool]:
            key = entry_key("flip", "expert", base_key, p.expert_epochs, p.checkpoint_every, seed, e)
            path = cache / f"expert-{key}.pt" if cache else None
            work = cache / f"expert-{key}.work" if cache else None

            def fit() -> dict[str, Any]:
                if work is not None:
                    work.mkdir(parents=True, exist_ok=True)
                model = fresh_model(seed * 1000 + e)
                if head_only:
                    _check_same_extractor(model, extractor)
                traj, curve = train_expert(
                    model, None if head_only else ext_images, ext_labels, recipe, expert_epochs=p.expert_epochs,
                    checkpoint_every=p.checkpoint_every, seed=seed * 1000 + e, device=device,
                    schedule=p.expert_schedule, features=features.expert if head_only else None, evaluate=evaluate,
                    work_dir=work, progress=ctx.progress, desc=f"expert {e + 1}/{p.n_experts}")
                return {**traj.state(), "curve": curve, "heldout": heldout_key}

            return _resumable_entry(path, work, fit)

        trajectories, curves = [], []
        jobs = [Job(f"flip expert {e + 1}", expert, (e,)) for e in range(p.n_experts)]
        for e, (state, loaded) in enumerate(executor.map(jobs, "flip experts")):
            trajectories.append(Trajectory.from_state(state))
            curves.append([dict(c) for c in state.get("curve", [])] if state.get("heldout") == heldout_key else [])
            log(f"flip: expert {e + 1}/{p.n_experts} " + ("loaded from cache" if loaded else
                                                          f"trained, {len(trajectories[-1])} checkpoints"))
        for e, curve in enumerate(curves):
            if curve:  # does the trajectory carry the trigger? (the authors print this every epoch)
                first, last = curve[0], curve[-1]
                log(f"flip: expert {e + 1} on held-out images, epoch {first['epoch']} -> {last['epoch']}: CTA "
                    f"{100 * first['clean_accuracy']:.1f}% -> {100 * last['clean_accuracy']:.1f}%, ASR "
                    f"{100 * first['attack_success_rate']:.1f}% -> {100 * last['attack_success_rate']:.1f}% "
                    "(every epoch in metrics.json, attack_diagnostics.experts)")

        # stage 2: label optimization (cached per run)
        if head_only:
            fs = FunctionalSGD(extractor.head, recipe.model_copy(update={"finetune": "all"}))
            data = LabelData.from_features(features.clean, features.triggered, train.labels, ext_labels, origin,
                                           device)
        else:
            fs = FunctionalSGD(fresh_model(0), recipe)
            data = LabelData.build(train.images, train.labels, ext_images, ext_labels, origin, device)
        batch = len(ext_labels) if p.label_batch == "all" else (p.label_batch or recipe.batch_size)
        chunk = p.label_chunk if batch > p.label_chunk and not head_only else None  # features: one piece

        def label_run(r: int) -> tuple[dict[str, torch.Tensor], bool]:
            key = entry_key("flip", "labels", base_key, p.expert_epochs, p.checkpoint_every, p.n_experts, seed, r,
                            p.label_passes, p.label_lr, p.label_momentum, batch, p.init_scale, p.l1,
                            *([chunk] if chunk else []), *(["compiled"] if p.compile else []))
            path = cache / f"labels-{key}.pt" if cache else None
            work = cache / f"labels-{key}.work" if cache else None

            def fit() -> dict[str, torch.Tensor]:
                if work is not None:
                    work.mkdir(parents=True, exist_ok=True)
                logits, run_losses = optimize_labels(
                    fs, trajectories, data, train.num_classes, recipe.augment, passes=p.label_passes,
                    batch_size=batch, lr=p.label_lr, momentum=p.label_momentum, init_scale=p.init_scale, l1=p.l1,
                    seed=seed * 1000 + 500 + r, method=p.method, chunk=chunk, work_dir=work, progress=ctx.progress,
                    desc=f"label run {r + 1}/{p.label_runs}", log=log, compile=p.compile)
                return {"logits": logits, "losses": torch.tensor(run_losses)}

            return _resumable_entry(path, work, fit)

        runs, losses = [], []
        jobs = [Job(f"flip label run {r + 1}", label_run, (r,)) for r in range(p.label_runs)]
        for r, (state, loaded) in enumerate(executor.map(jobs, "flip label runs")):
            runs.append(state["logits"])
            losses.append(state["losses"].tolist())
            if loaded:
                log(f"flip: label run {r + 1}/{p.label_runs} loaded from cache")

        # stage 3 + 4: selection and the poisoning
        scores, mean_logits = combine_runs(runs, train.labels)
        if p.mode == "soft":
            labels = distillation_labels(mean_logits, train.labels, p.alpha)
            mask = labels.argmax(1) != train.labels
            budget = int(mask.sum())
        else:
            labels, mask = select_flips(scores, mean_logits, train.labels, m)
            budget = m
        new_hard = labels.argmax(1) if labels.ndim == 2 else labels
        meta = {"seed": seed, "mode": p.mode, "regime": "head on frozen features" if head_only else "whole network",
                "expert_schedule": p.expert_schedule, "n_checkpoints": [len(t) for t in trajectories],
                "expert_model": model_cfg,
                "flipped_from": np.bincount(train.labels[mask], minlength=train.num_classes).tolist(),
                "flipped_to": np.bincount(new_hard[mask], minlength=train.num_classes).tolist()}
        diagnostics = {"experts": curves, "label_losses": losses,
                       "scores": scores, "logits": mean_logits, "label_runs": np.stack([r.numpy() for r in runs])}
        return Poisoning(self.name, labels, mask, trigger, target, sources, budget, metadata=meta,
                         diagnostics=diagnostics)

    @staticmethod
    def _features(extractor: nn.Module, images: np.ndarray, triggered: np.ndarray, recipe: TrainConfig,
                  ctx: AttackContext, device: torch.device) -> _Features:
        """The frozen extractor's features of the clean training set and of the triggered source copies (cached in
        ``ctx.features_dir``: the clean set's are the ones the victim's training reads)."""
        aug = Augment(0, recipe.hflip)
        clean = FrozenFeatures.of(extractor, to_nchw(images, device), aug, cache_dir=ctx.features_dir)
        trig = FrozenFeatures.of(extractor, to_nchw(triggered, device), aug, cache_dir=ctx.features_dir)
        if clean is None or trig is None:
            raise ConfigError("attack 'flip': train.finetune = 'last' needs a model with `features` and `head`")
        ctx.log(f"flip: the head-only victim's frozen features ({clean.plain.shape[1]} per image) of "
                f"{len(clean)} clean and {len(trig)} triggered images")
        return _Features(clean, trig, FrozenFeatures.concat([clean, trig]))

    @staticmethod
    def _expert_evaluation(heldout: ImageSet | None, trigger: Trigger, target: int, sources: tuple[int, ...] | None,
                           head_only: bool, extractor: nn.Module | None, ctx: AttackContext,
                           device: torch.device) -> tuple[Evaluate | None, str | None]:
        """An expert's clean accuracy and attack success on the held-out set (diagnostics only), and a key of that
        set; (None, None) without one."""
        if heldout is None or heldout.multilabel:
            return None, None
        eligible = asr_eligible(heldout.labels, target, sources)
        triggered = trigger(heldout.images[eligible])
        key = stable_key(fingerprint(heldout.images, heldout.labels), trigger.params(), target, list(sources or []))
        if head_only:
            clean_x = FrozenFeatures.of(extractor, to_nchw(heldout.images, device), Augment(),
                                        cache_dir=ctx.features_dir).plain
            trig_x = FrozenFeatures.of(extractor, to_nchw(triggered, device), Augment(),
                                       cache_dir=ctx.features_dir).plain

            @torch.no_grad()
            def predictions(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
                model.eval()
                return model.head(clean_x).argmax(1).cpu().numpy(), model.head(trig_x).argmax(1).cpu().numpy()
        else:
            def predictions(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
                return predict(model, heldout.images), predict(model, triggered)

        def evaluate(model: nn.Module) -> dict[str, float]:
            was_training = model.training
            clean_pred, trig_pred = predictions(model)
            model.train(was_training)
            return {"clean_accuracy": accuracy(clean_pred, heldout.labels),
                    "attack_success_rate": attack_success_rate(trig_pred, target)}

        return evaluate, key


@dataclass
class _Features:
    clean: FrozenFeatures  # (N, D): the clean training set
    triggered: FrozenFeatures  # (S, D): the triggered source copies
    expert: FrozenFeatures  # (N + S, D): the poisoned set the experts train on


def _check_same_extractor(model: nn.Module, extractor: nn.Module) -> None:
    """Head-only experts read one set of cached features: every expert must share the frozen extractor."""
    a = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    b = {k: v for k, v in extractor.state_dict().items() if not k.startswith("head.")}
    if a.keys() != b.keys() or any(not torch.equal(a[k].cpu(), b[k].cpu()) for k in a):
        raise ConfigError("attack 'flip': with train.finetune = 'last' every expert must share the frozen "
                          "extractor (a pretrained one: model.pretrained); this model's changes with the seed")
