"""The evaluation measures the figures an attack declares (its probes and test figures) on any model, by hand-checked
counts; attacks themselves never predict."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from cleanbackdoor.attacks import Attack, Poisoning, Probe
from cleanbackdoor.data import ImageSet
from cleanbackdoor.experiment import evaluate


class Brightness(nn.Module):
    """Predicts the class whose centre (0, 0.5, 1) is nearest the image's mean brightness."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # predict() reads the device from the parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centres = torch.tensor([0.0, 0.5, 1.0])
        return -(x.mean(dim=(1, 2, 3))[:, None] - centres) ** 2 + 0 * self.anchor


def images(*values: int) -> np.ndarray:
    return np.stack([np.full((4, 4, 1), v, dtype=np.uint8) for v in values]) if values else \
        np.zeros((0, 4, 4, 1), dtype=np.uint8)


class Declaring(Attack):
    name = "declaring"

    def poison(self, train, *, seed=0, context=None):
        raise NotImplementedError

    def probes(self, test, poisoning):
        return [Probe("hits", images(255, 255, 255, 0), target=2),            # 3 of 4 predicted 2
                Probe("group/accuracy", images(0, 128, 255), labels=np.array([0, 1, 1])),  # 2 of 3 right
                Probe("group/empty", images(), target=1)]

    def test_figures(self, test, poisoning):
        return {"probe_images": 7}


def test_evaluate_measures_declared_probes_by_hand_counts():
    test = ImageSet(images(0, 128, 255, 255), np.array([0, 1, 2, 0]), ("a", "b", "c"))
    poisoning = Poisoning("declaring", test.labels, np.zeros(4, bool), None, None, None, 0)
    out = evaluate(Brightness(), test, Declaring(), poisoning)
    assert out["clean_accuracy"] == pytest.approx(3 / 4)
    assert "attack_success_rate" not in out  # no activation: no ASR
    assert out["hits"] == pytest.approx(3 / 4)
    assert out["group"]["accuracy"] == pytest.approx(2 / 3)
    assert math.isnan(out["group"]["empty"])
    assert out["probe_images"] == 7


def test_evaluate_predicts_each_distinct_image_set_once():
    class Counting(Brightness):
        images_seen = 0

        def forward(self, x):
            Counting.images_seen += len(x)
            return super().forward(x)

    class Repeating(Declaring):
        def probes(self, test, poisoning):  # the test set again, then two equal sets and one that differs
            return [Probe("again", test.images, labels=test.labels), Probe("first", images(0, 255), target=2),
                    Probe("second", images(0, 255), target=2), Probe("other", images(255, 0), target=2)]

        def test_figures(self, test, poisoning):
            return {}

    test = ImageSet(images(0, 128, 255, 255), np.array([0, 1, 2, 0]), ("a", "b", "c"))
    poisoning = Poisoning("declaring", test.labels, np.zeros(4, bool), None, None, None, 0)
    out = evaluate(Counting(), test, Repeating(), poisoning)
    assert Counting.images_seen == 4 + 2 + 2  # the test set, then each distinct pair once
    assert out["again"] == out["clean_accuracy"] == pytest.approx(3 / 4)
    assert out["first"] == out["second"] == out["other"] == pytest.approx(1 / 2)


def test_a_probe_takes_a_target_or_labels():
    with pytest.raises(ValueError, match="target or labels"):
        Probe("both", images(0), target=1, labels=np.array([1]))
    with pytest.raises(ValueError, match="target or labels"):
        Probe("neither", images(0))
    with pytest.raises(ValueError, match="1 labels for 2 images"):
        Probe("short", images(0, 1), labels=np.array([1]))
