"""Training recipes: :class:`TrainConfig` (optimizer, learning-rate schedule, epochs, batch, weight decay,
augmentation, loss, speed switches) and the named presets of the papers.

A config's ``train`` table is a :class:`TrainConfig`, or ``preset = NAME`` plus the values that differ
(:func:`expand_preset`): a preset shortened with ``epochs`` keeps its learning-rate milestones at the same
fractions of the run (:func:`scale_milestones`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from cleanbackdoor.data.transforms import Augment
from cleanbackdoor.errors import unknown_name


class TrainConfig(BaseModel):
    """One training recipe. Epoch-valued fields (milestones) count epochs; the schedule is applied per step."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["constant", "multistep", "cosine", "onecycle"] = "cosine"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    crop_padding: int = Field(0, ge=0, le=16)
    hflip: bool = False
    loss: Literal["ce", "bce", "asl"] = "ce"
    asl_gamma_neg: float = Field(4.0, ge=0)
    asl_gamma_pos: float = Field(0.0, ge=0)
    asl_clip: float = Field(0.05, ge=0, lt=1)
    amp: bool = False  # bf16 autocast on CUDA; ignored on CPU
    # speed switches that leave the algorithm as it is (docs/performance.md): torch.compile of the network in the
    # training loop, and the channels-last memory format for convolutions. Both off by default on every device: on
    # these 2-core CPUs compile costs about 40 s and gives 1.5x on a ConvNet epoch, and changes the results in the
    # last bits (eager runs are bit-reproducible); neither has been measured on a GPU here.
    compile: bool = False
    channels_last: bool = False
    # which weights are trained: "all", or "last": only the final linear layer (``model.head``), the rest frozen
    # in eval mode (a victim that fine-tunes the last layer of a pretrained feature extractor)
    finetune: Literal["all", "last"] = "all"
    # exponential moving average of the weights (decay per step, 0: off), the model ends with the average; as the
    # multi-label authors' ModelEma (decay 0.9997), with the decay warmed up as min(ema, (1 + t) / (10 + t))
    ema: float = Field(0.0, ge=0, lt=1)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        for name, default in (("finetune", "all"), ("ema", 0.0), ("compile", False),  # left out at their defaults,
                              ("channels_last", False)):                          # so existing
            if getattr(self, name) == default:                                   # cache keys stay valid
                data.pop(name, None)
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0")
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs milestones (epochs)")
        if any(not 0 < m < self.epochs for m in self.milestones):
            raise ValueError(f"milestones must lie strictly between 0 and epochs={self.epochs}: {self.milestones}")
        return self

    @property
    def augment(self) -> Augment:
        return Augment(self.crop_padding, self.hflip)


# Named recipes from the papers (and fast ones for the embedded default).
PRESETS: dict[str, dict] = {
    # FLIP (Jha et al. 2023): experts and users on CIFAR-10.
    "flip-cifar": dict(epochs=200, batch_size=256, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
                       weight_decay=2e-4, schedule="multistep", milestones=[75, 125], gamma=0.1,
                       crop_padding=4, hflip=True),
    # Clean-image backdoor (Rong et al.): the authors' code.
    "clean-image": dict(epochs=100, batch_size=128, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4,
                        schedule="multistep", milestones=[80], gamma=0.1),
    # Multi-label clean-image backdoor (Chen et al.; authors' coco_train_backdoored_model.py): ASL (gamma- = 4,
    # gamma+ = 0, clip 0.05, focusing weights detached), Adam lr 1e-4, weight decay 1e-4, one-cycle, 20 epochs,
    # batch 64. Their EMA of the weights (decay 0.9997) is `train.ema = 0.9997`, left out of the preset so that the
    # runs measured without it keep their recipe. Not reproduced: one-cycle warm-up 20% (25% here), no weight decay
    # on biases and norm parameters, and the pretrained TResNet/ML-Decoder this lr is meant for.
    "multilabel-asl": dict(epochs=20, batch_size=64, optimizer="adam", lr=1e-4, weight_decay=1e-4,
                           momentum=0.0, schedule="onecycle", loss="asl"),
    # Hidden trigger (Saha et al.): the victim's new last layer on the frozen extractor. The authors' (ImageNet,
    # fc8 on AlexNet's fc7): SGD lr 0.001, momentum 0.9, batch 1,024, 10 epochs (their x0.1 every 10 epochs never
    # applies); their dropout on the frozen fc6/fc7 is not reproduced (the features are cached). ART's notebook:
    # lr 0.5, momentum 0.9, weight decay 2e-4, batch 128, 40 epochs, x0.1 after 10, 20 and 30.
    "hidden-trigger-authors": dict(epochs=10, batch_size=1024, optimizer="sgd", lr=0.001, momentum=0.9,
                                   weight_decay=0.0, schedule="constant", finetune="last"),
    "hidden-trigger-art": dict(epochs=40, batch_size=128, optimizer="sgd", lr=0.5, momentum=0.9, weight_decay=2e-4,
                               schedule="multistep", milestones=[10, 20, 30], gamma=0.1, finetune="last"),
    # Fast recipes for this toolkit's small-scale runs.
    "digits": dict(epochs=30, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                   schedule="cosine"),
    "cifar-fast": dict(epochs=12, batch_size=256, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True,
                       weight_decay=5e-4, schedule="onecycle", crop_padding=4, hflip=True),
}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise unknown_name("training preset", name, PRESETS)
    return TrainConfig(**{**PRESETS[name], **overrides})


def scale_milestones(milestones: list[int], epochs: int, new_epochs: int) -> list[int]:
    """A preset's lr milestones moved to the same fractions of a shorter (or longer) run."""
    scaled = sorted({round(m * new_epochs / epochs) for m in milestones})
    return [m for m in scaled if 0 < m < new_epochs]


def expand_preset(value: Any) -> Any:
    """A ``train`` table as given in a config: ``{preset = NAME, ...}`` becomes the preset's fields with the given
    ones on top (its milestones moved to a changed ``epochs``, a constant schedule when none is left); anything
    else is returned as it is, for :class:`TrainConfig` to validate."""
    if not (isinstance(value, dict) and "preset" in value):
        return value
    value = dict(value)
    name = value.pop("preset")
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r}; allowed: {', '.join(sorted(PRESETS))}")
    base = PRESETS[name]
    merged = {**base, **value}
    if "epochs" in value and "milestones" not in value and base.get("milestones"):
        merged["milestones"] = scale_milestones(base["milestones"], base["epochs"], value["epochs"])
        if not merged["milestones"]:
            merged["schedule"] = "constant"
    return merged
