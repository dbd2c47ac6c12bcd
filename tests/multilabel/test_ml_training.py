"""Multi-label victim training: the ASL loss as the authors use it, BCE, and the guard against 'ce' on label sets."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cleanbackdoor.errors import ConfigError
from cleanbackdoor.models import build_model
from cleanbackdoor.training import asymmetric_loss, make_loss, train
from cleanbackdoor.recipes import PRESETS, TrainConfig, preset


def asl_by_hand(z, y, gamma_neg=4.0, gamma_pos=0.0, clip=0.05):
    total = 0.0
    for zi, yi in zip(z, y):
        p = 1 / (1 + np.exp(-zi))
        if yi:
            total += -((1 - p) ** gamma_pos) * np.log(p)
        else:
            pm = max(p - clip, 0.0)
            total += -(pm ** gamma_neg) * np.log(1 - pm)
    return total


def test_asl_value_by_hand():
    z = torch.tensor([[2.0, -1.0, 0.5, -3.0], [0.0, 1.5, -0.2, 4.0]])
    y = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    expected = np.mean([asl_by_hand(z[i].numpy(), y[i].numpy()) for i in range(2)])
    assert asymmetric_loss(z, y).item() == pytest.approx(expected, rel=1e-5)
    expected = np.mean([asl_by_hand(z[i].numpy(), y[i].numpy(), 2.0, 1.0, 0.0) for i in range(2)])
    assert asymmetric_loss(z, y, 2.0, 1.0, 0.0).item() == pytest.approx(expected, rel=1e-5)
    # with no focusing and no clip, ASL is BCE (summed over labels, averaged over the batch)
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="sum") / 2
    assert asymmetric_loss(z, y, 0.0, 0.0, 0.0).item() == pytest.approx(bce.item(), rel=1e-5)


def test_asl_detached_focusing_weights_change_the_gradient_not_the_value():
    z = torch.tensor([[0.3, 1.2, -0.4]], requires_grad=True)
    y = torch.tensor([[0.0, 0.0, 1.0]])
    a = asymmetric_loss(z, y, 4.0, 1.0, 0.05, detach_focal=True)
    (ga,) = torch.autograd.grad(a, z)
    b = asymmetric_loss(z, y, 4.0, 1.0, 0.05, detach_focal=False)
    (gb,) = torch.autograd.grad(b, z)
    assert a.item() == pytest.approx(b.item())
    assert not torch.allclose(ga, gb)
    # detached: the negative's gradient is the focusing weight times d/dz of -log(1 - p_m)
    p = torch.sigmoid(z[0, 0]).item()
    pm = p - 0.05
    assert ga[0, 0].item() == pytest.approx(pm ** 4 * p * (1 - p) / (1 - pm), rel=1e-5)


def test_multilabel_preset_is_the_authors_recipe():
    cfg = preset("multilabel-asl")
    assert (cfg.loss, cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip) == ("asl", 4.0, 0.0, 0.05)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.schedule, cfg.epochs) == ("adam", 1e-4, 1e-4, "onecycle", 20)
    assert PRESETS["multilabel-asl"]["batch_size"] == 64


def test_label_sets_train_with_bce_and_asl_and_refuse_ce():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 8, 8, 1), dtype=np.uint8)
    labels = (rng.random((32, 3)) < 0.4).astype(np.uint8)
    for loss in ("bce", "asl"):
        model = build_model("linear", (1, 8, 8), 3)
        hist = train(model, images, labels, TrainConfig(epochs=2, batch_size=8, loss=loss, lr=0.01),
                     device="cpu", progress=False)
        assert len(hist.loss) == 2 and np.isfinite(hist.loss).all()
    with pytest.raises(ConfigError, match="bce"):
        train(build_model("linear", (1, 8, 8), 3), images, labels, TrainConfig(epochs=1), device="cpu",
              progress=False)
    with pytest.raises(ConfigError, match="multi-label"):
        make_loss(TrainConfig(loss="asl"), torch.zeros(4, dtype=torch.int64))
