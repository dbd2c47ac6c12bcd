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
    deep = build_model("convnet", (3, 16, 16), 4, width=8, head_hidden=[12, 6])
    assert [layer.out_features for layer in deep.head if isinstance(layer, torch.nn.Linear)] == [12, 6, 4]
    for bad in (-2, [12, 0], [12, -1]):
        with pytest.raises(ConfigError, match="head_hidden must be >= 0"):
            build_model("convnet", (3, 16, 16), 4, head_hidden=bad)


def test_resnet_pooling_grid_keeps_where_things_are():
    torch.manual_seed(0)
    glob = build_model("resnet20", (3, 16, 16), 4, width=4)
    grid = build_model("resnet20", (3, 16, 16), 4, width=4, pool=2)
    grid.backbone.load_state_dict(glob.backbone.state_dict())  # pooling has no weights
    glob.eval(), grid.eval()
    x = torch.rand(2, 3, 16, 16)
    cells = grid.features(x).view(2, 16, 2, 2)  # (channels, rows, columns) of the 2x2 grid
    assert grid.backbone.feature_dim == 16 * 4 and grid.head.in_features == 64
    assert torch.allclose(cells.mean((2, 3)), glob.features(x), atol=1e-6)  # the grid averages to the global pool
    with pytest.raises(ConfigError, match="pool must be >= 1"):
        build_model("resnet20", (3, 16, 16), 4, pool=0)
    with pytest.raises(ConfigError, match="pool"):
        build_model("convnet", (3, 16, 16), 4, pool=2)  # the ConvNet keeps its whole map already


def test_resnet_global_max_pooling():
    """``pool = "max"``: the feature of a channel is its largest response anywhere in the last feature map."""
    model = build_model("resnet20", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, pool="max", width=8).eval()
    assert model.backbone.feature_dim == 32 and model.head.in_features == 32
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        backbone = model.backbone
        maps = backbone.final(backbone.stages(backbone.stem_act(backbone.stem_bn(backbone.stem(model.normalize(x))))))
        assert torch.equal(model.features(x), maps.amax(dim=(2, 3)))
    for bad in ("min", 0, True):
        with pytest.raises(ConfigError, match="pool must be"):
            build_model("resnet20", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, pool=bad)


def test_alexnet_reads_fc7_after_three_max_pools():
    """The hidden-trigger paper's extractor shape: five convolutions (three 2x2 max pools at 32x32), fc6 and fc7 of
    ``fc`` ReLU units; the backbone's output (the features the victim's head reads) is fc7."""
    model = build_model("alexnet", (3, 32, 32), 10, width=8, fc=48).eval()
    backbone = model.backbone
    convs = [m for m in backbone.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 24, 48, 32, 32]
    assert [c.kernel_size for c in convs] == [(5, 5), (5, 5), (3, 3), (3, 3), (3, 3)]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in backbone.features) == 3
    assert backbone.fc6[2].in_features == 32 * 4 * 4  # 32x32 -> 4x4 after three pools
    assert model.head.in_features == 48 and model.head.out_features == 10
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        fc7 = backbone.fc7(backbone.fc6(backbone.features(model.normalize(x))))
        assert torch.equal(model.features(x), fc7)
        assert (fc7 >= 0).all()  # after the ReLU, as the paper's fc7
        assert torch.equal(model(x), model.head(fc7))
    default = build_model("alexnet", (3, 32, 32), 10).backbone
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in default.modules()) == 5
    plain = build_model("alexnet", (3, 32, 32), 10, norm="none").backbone
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    with pytest.raises(ConfigError, match="norm must be"):
        build_model("alexnet", (3, 32, 32), 10, norm="layer")
