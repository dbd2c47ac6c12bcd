import pytest
import torch

from cleanbackdoor.errors import ConfigError
from cleanbackdoor.models import MODELS, build_model

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", SHAPES)
def test_every_model_fits_every_image_size(name, shape):
    if name in ("resnet18", "vgg19") and shape != (3, 32, 32):
        pytest.skip("large models: one shape is enough")
    model = build_model(name, shape, 7)
    x = torch.rand(3, *shape)
    assert model(x).shape == (3, 7)
    assert model.features(x).shape == (3, model.head.in_features)


def test_model_normalizes_inside():
    m = build_model("convnet", (3, 8, 8), 2, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(m.normalize(x)[:, 1], (x[:, 1] - 0.4) / 0.2)


def test_resnet_depths_have_the_papers_layer_counts():
    m = build_model("resnet32", (3, 32, 32), 10)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3)]
    assert len(convs) == 31  # 6n + 1 conv layers (+ the final linear layer = 32)


def test_unknown_model_and_bad_option():
    with pytest.raises(ConfigError, match="unknown model 'resnet99'.*allowed: .*convnet"):
        build_model("resnet99", (3, 32, 32), 10)
    with pytest.raises(ConfigError, match="convnet"):
        build_model("convnet", (3, 32, 32), 10, colour="blue")
    with pytest.raises(ConfigError, match="6n \\+ 2"):
        from cleanbackdoor.models.resnet import CifarResNet

        CifarResNet(3, (32, 32), depth=21)


def test_convnet_hidden_layer_feeds_the_head():
    m = build_model("convnet", (3, 32, 32), 10, width=8, hidden=24)
    x = torch.rand(5, 3, 32, 32)
    assert m.features(x).shape == (5, 24)
    assert m.head.in_features == 24 and m(x).shape == (5, 10)
    assert (m.features(x) >= 0).all()  # the hidden layer ends with the activation (relu)
    assert build_model("convnet", (3, 32, 32), 10, width=8).head.in_features == 8 * 4 * 4
    with pytest.raises(ConfigError, match="hidden must be >= 0"):
        build_model("convnet", (3, 32, 32), 10, hidden=-1)


def test_head_hidden_makes_an_mlp_head():
    m = build_model("convnet", (3, 16, 16), 4, width=8, head_hidden=12)
    x = torch.rand(3, 3, 16, 16)
    assert isinstance(m.head, torch.nn.Sequential)
    assert [type(layer).__name__ for layer in m.head] == ["Linear", "ReLU", "Linear"]
    assert m.head[0].in_features == m.backbone.feature_dim and m.head[0].out_features == 12
    assert m(x).shape == (3, 4)
    assert torch.allclose(m(x), m.head(m.features(x)))
    assert isinstance(build_model("convnet", (3, 16, 16), 4, width=8).head, torch.nn.Linear)
    with pytest.raises(ConfigError, match="head_hidden must be >= 0"):
        build_model("convnet", (3, 16, 16), 4, head_hidden=-2)
