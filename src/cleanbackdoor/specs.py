"""The parts of an experiment's config that the layers below it read: the data (:class:`DataConfig`), the victim's
architecture (:class:`ModelConfig`) and the source task a victim's extractor is pretrained on
(:class:`PretrainConfig`). :mod:`cleanbackdoor.config` assembles them into an experiment."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_serializer, model_validator

from cleanbackdoor.recipes import TrainConfig, expand_preset, preset


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "digits"
    root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    # a seeded class-balanced subset, for fast runs; or a count per class, e.g. {dog = 1900, horse = 2700}: the
    # hidden trigger's poisons then come on top of 1,900 clean horses (the paper's composition), not out of them
    train_per_class: PositiveInt | dict[int | str, PositiveInt] | None = None
    test_per_class: int | None = Field(None, ge=1)
    # the task's classes, by name or index, relabelled 0..k-1 in this order (None: all classes of the dataset)
    classes: list[int | str] | None = Field(None, min_length=2)

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        return _without_defaults(self, handler(self), ("classes",))


class PretrainConfig(BaseModel):
    """A feature extractor the toolkit pretrains itself on a *source task* (see :mod:`cleanbackdoor.pretrain`):
    the victim's architecture trained on ``classes`` of ``dataset`` with recipe ``train``, cached under a key of
    exactly these inputs. The victim then starts from its weights with a fresh head (``train.finetune``)."""

    model_config = ConfigDict(extra="forbid")
    dataset: str | None = None  # None: the experiment's dataset (name, root and options)
    root: str | None = None  # None: the experiment's data root
    options: dict[str, Any] = Field(default_factory=dict)
    classes: list[int | str] | None = Field(None, min_length=2)  # the source task (None: every class)
    per_class: int | None = Field(None, ge=1)  # a seeded class-balanced subset of the source task
    train: TrainConfig = Field(default_factory=lambda: preset("cifar-fast"))
    seed: int = Field(0, ge=0)

    @field_validator("train", mode="before")
    @classmethod
    def _expand_preset(cls, value: Any) -> Any:
        return expand_preset(value)

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.train.finetune != "all":
            raise ValueError("the pretraining recipe trains the whole network (train.finetune = 'all')")
        return self


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "convnet"
    options: dict[str, Any] = Field(default_factory=dict)
    pretrained: PretrainConfig | None = None  # start from a feature extractor pretrained on a source task

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        return _without_defaults(self, handler(self), ("pretrained",))


def _without_defaults(model: BaseModel, data: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """Leave optional fields added later out of dumps while they hold their default, so the cache keys of
    configs that do not use them (clean models, FLIP experts) stay what they were."""
    for name in fields:
        if getattr(model, name) == type(model).model_fields[name].default:
            data.pop(name, None)
    return data
