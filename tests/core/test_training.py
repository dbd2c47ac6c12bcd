import math

import numpy as np
import pytest
import torch

from cleanbackdoor.errors import ConfigError
from cleanbackdoor.models import build_model
from cleanbackdoor.training import FrozenFeatures, WeightAverage, asymmetric_loss, lr_at, predict, predict_logits, train
from cleanbackdoor.recipes import PRESETS, TrainConfig, preset


def _toy(n=200, seed=0):
    """Two classes, 8x8 grey: horizontal stripes (class 0) or vertical stripes (class 1), plus noise.
    Both survive crops and flips, so augmentation keeps the labels right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 60, (n, 8, 8, 1))
    x[y == 0, ::2] += 150
    x[y == 1, :, ::2] += 150
    return x.astype(np.uint8), y


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("convnet", (1, 8, 8), 2, width=16)


def test_schedules():
    cfg = TrainConfig(epochs=10, lr=1.0, schedule="multistep", milestones=[5, 8], gamma=0.1)
    assert lr_at(cfg, 0, 10) == 1.0 and lr_at(cfg, 49, 10) == 1.0
    assert math.isclose(lr_at(cfg, 50, 10), 0.1) and math.isclose(lr_at(cfg, 80, 10), 0.01)
    cos = TrainConfig(epochs=10, lr=1.0, schedule="cosine")
    assert lr_at(cos, 0, 10) == 1.0 and math.isclose(lr_at(cos, 50, 10), 0.5) and lr_at(cos, 100, 10) < 1e-9
    one = TrainConfig(epochs=4, lr=1.0, schedule="onecycle")
    lrs = [lr_at(one, s, 25) for s in range(100)]
    assert math.isclose(lrs[0], 1 / 25) and math.isclose(max(lrs), 1.0) and lrs[-1] < 0.01


def test_bad_recipes():
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(schedule="multistep")
    with pytest.raises(ValueError, match="nesterov"):
        TrainConfig(optimizer="adam", nesterov=True)
    with pytest.raises(ValueError):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError):
        TrainConfig(epochs=10, schedule="multistep", milestones=[12])
    with pytest.raises(ConfigError, match="unknown training preset"):
        preset("nope")
    for name in PRESETS:
        preset(name)


def test_training_learns_and_is_deterministic():
    x, y = _toy()
    cfg = TrainConfig(epochs=10, batch_size=32, lr=0.1, crop_padding=1, hflip=True)
    m1, m2 = _model(), _model()
    h = train(m1, x, y, cfg, seed=1, progress=False)
    train(m2, x, y, cfg, seed=1, progress=False)
    assert h.loss[-1] < h.loss[0]
    assert (predict(m1, x) == y).mean() > 0.95
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_soft_labels_equal_hard_labels_when_one_hot():
    x, y = _toy(64)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05)
    m1, m2 = _model(), _model()
    train(m1, x, y, cfg, seed=0, progress=False)
    train(m2, x, np.eye(2, dtype=np.float32)[y], cfg, seed=0, progress=False)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_gives_the_uninterrupted_result(tmp_path, ema):
    x, y = _toy(96)
    full = TrainConfig(epochs=4, batch_size=16, lr=0.05, crop_padding=1, ema=ema)
    m_full = _model()
    train(m_full, x, y, full, seed=2, progress=False)
    # "interrupted" run: stop after 2 epochs by running a 4-epoch recipe whose loop we cut with an exception
    ckpt = tmp_path / "run.ckpt"
    m_cut = _model()

    calls = {"n": 0}

    def stop_in_epoch_3(step, model, opt):
        calls["n"] += 1
        if step == 2 * 6 + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(m_cut, x, y, full, seed=2, progress=False, checkpoint=ckpt, on_step=stop_in_epoch_3)
    assert ckpt.exists()
    m_resumed = _model()
    h = train(m_resumed, x, y, full, seed=2, progress=False, checkpoint=ckpt)
    assert h.epoch == [1, 2, 3, 4]
    for a, b in zip(m_full.state_dict().values(), m_resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_divergence_is_reported():
    x, y = _toy(64)
    m = _model()
    with torch.no_grad():
        m.head.weight.fill_(float("nan"))
    with pytest.raises(ConfigError, match="diverged"):
        train(m, x, y, TrainConfig(epochs=1), seed=0, progress=False)


def test_bad_inputs():
    x, y = _toy(10)
    with pytest.raises(ConfigError, match="targets"):
        train(_model(), x, y[:5], TrainConfig(epochs=1), progress=False)
    with pytest.raises(ConfigError, match="multi-label"):
        train(_model(), x, y, TrainConfig(epochs=1, loss="bce"), progress=False)


def test_asl_reduces_to_bce_without_focusing():
    z = torch.randn(6, 4)
    t = (torch.rand(6, 4) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="sum") / 6
    assert torch.allclose(asymmetric_loss(z, t, gamma_neg=0, gamma_pos=0, clip=0), bce, atol=1e-5)
    # focusing down-weights easy negatives: the loss can only shrink
    assert asymmetric_loss(z, t, gamma_neg=4, clip=0.05) <= bce


def test_multilabel_training_runs():
    x, _ = _toy(64)
    t = np.random.default_rng(0).integers(0, 2, (64, 3)).astype(np.uint8)
    torch.manual_seed(0)
    m = build_model("convnet", (1, 8, 8), 3, width=8)
    h = train(m, x, t, TrainConfig(epochs=2, loss="asl", optimizer="adam", lr=1e-3), progress=False)
    assert np.isfinite(h.loss).all()
    assert predict_logits(m, x).shape == (64, 3)


def test_checkpoint_of_another_run_is_not_resumed(tmp_path, capsys):
    x, y = _toy(64)
    ckpt = tmp_path / "run.ckpt"
    train(_model(), x, y, TrainConfig(epochs=1, batch_size=16), seed=0, progress=False, checkpoint=ckpt)
    wide = build_model("convnet", (1, 8, 8), 2, width=4)  # another architecture, another recipe
    h = train(wide, x, y, TrainConfig(epochs=2, batch_size=16, lr=0.01), seed=0, progress=False, checkpoint=ckpt)
    assert h.epoch == [1, 2]
    assert "checkpoint of a different run" in capsys.readouterr().out


@pytest.mark.parametrize("hflip", [False, True])
def test_frozen_features_give_the_run_of_the_full_forward_pass(monkeypatch, hflip):
    """finetune = "last" computes the frozen extractor's features once (and of the mirror images when the recipe
    flips); the head must end where the full forward pass every step leaves it, from the same random stream."""
    x, _ = _toy(96)
    t = np.random.default_rng(1).integers(0, 2, (96, 3)).astype(np.uint8)
    cfg = TrainConfig(epochs=3, batch_size=16, optimizer="adam", lr=1e-2, loss="asl", hflip=hflip, finetune="last")

    def run(cached: bool):
        torch.manual_seed(0)
        m = build_model("convnet", (1, 8, 8), 3, width=8, head_hidden=6)
        calls = []
        if not cached:
            monkeypatch.setattr(FrozenFeatures, "of", classmethod(lambda cls, *a, **k: calls.append(1)))
        train(m, x, t, cfg, seed=3, progress=False)
        monkeypatch.undo()
        return m, calls

    fast, _ = run(True)
    slow, calls = run(False)
    assert calls == [1]  # the second run really took the full path
    for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_frozen_features_are_not_cached_with_random_crops():
    x, _ = _toy(8)
    m = build_model("convnet", (1, 8, 8), 2, width=4)
    data = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()
    assert FrozenFeatures.of(m, data, TrainConfig(crop_padding=2).augment) is None
    cached = FrozenFeatures.of(m, data, TrainConfig(hflip=True).augment)
    assert cached.plain.shape == (8, m.backbone.feature_dim) and cached.flipped is not None
    assert torch.allclose(cached.flipped[:2], m.features(data[:2].float().div(255).flip(3)), atol=1e-6)


class _Counting:
    """Counts the images a model's ``features`` sees."""

    def __init__(self, model):
        self.seen, inner = [], model.features

        def features(x):
            self.seen.append(len(x))
            return inner(x)

        model.features = features


def _shards(root):
    return sorted(p.relative_to(root).as_posix() for p in root.glob("*/shard-*.pt"))


def test_frozen_features_are_kept_on_disk_per_image(tmp_path, capsys):
    """The clean model and the victim of a run train on the same images with the same frozen extractor: the second
    reads the features from the cache (checking them on 4 images), whatever its head; another extractor, other
    weights or another pooling grid compute them afresh; a set that shares images with a cached one computes only
    the others; wrong cached features are recomputed."""
    x, _ = _toy(40)
    data = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()
    flips = TrainConfig(hflip=True).augment

    def model(seed=0, **options):
        torch.manual_seed(seed)
        return build_model("resnet20", (1, 8, 8), 2, width=4, **options)

    first = model()
    count = _Counting(first)
    stored = FrozenFeatures.of(first, data, flips, batch_size=16, cache_dir=tmp_path)
    key = FrozenFeatures.extractor_key(first)
    assert sum(count.seen) == 80 and [s.split("/")[0] for s in _shards(tmp_path)] == [f"{key}-flipped",
                                                                                       f"{key}-plain"]
    other_head = model(head_hidden=7)  # same extractor weights (same seed), another head: a cache hit
    count = _Counting(other_head)
    again = FrozenFeatures.of(other_head, data, flips, cache_dir=tmp_path)
    assert count.seen == [4, 4]  # the probe, plain and mirrored
    assert torch.equal(again.plain, stored.plain) and torch.equal(again.flipped, stored.flipped)
    plain_only = FrozenFeatures.of(model(), data, TrainConfig().augment, cache_dir=tmp_path)
    assert plain_only.flipped is None and torch.equal(plain_only.plain, stored.plain)
    assert FrozenFeatures.extractor_key(model(head_hidden=7)) == key
    assert FrozenFeatures.extractor_key(model(seed=1)) != key  # other weights
    assert FrozenFeatures.extractor_key(model(pool=2)) != key  # same weights, another pooling grid
    # 5 images changed, 3 appended: only those 8 are computed, and the others come from the cache
    changed = torch.cat([data, data[:3].flip(2)])
    changed[:5] = 255 - changed[:5]
    count = _Counting(first)
    mixed = FrozenFeatures.of(first, changed, TrainConfig().augment, batch_size=64, cache_dir=tmp_path)
    assert count.seen == [4, 8]
    with torch.no_grad():
        assert torch.allclose(mixed.plain, first.eval().features(changed.float() / 255), atol=1e-5)
    assert torch.equal(mixed.plain[5:40], stored.plain[5:40])
    # cached features that do not hold for this extractor are not used
    for shard in (tmp_path / f"{key}-plain").glob("shard-*.pt"):
        state = torch.load(shard, weights_only=True)
        torch.save({**state, "features": state["features"] + 1.0}, shard)
    count = _Counting(first)
    fixed = FrozenFeatures.of(first, data, TrainConfig().augment, batch_size=40, cache_dir=tmp_path)
    assert "do not match" in capsys.readouterr().out and count.seen == [4, 40]
    assert torch.allclose(fixed.plain, stored.plain)
    # a cache of plain features only gains the mirrored ones when a recipe flips
    for shard in (tmp_path / f"{key}-flipped").glob("shard-*.pt"):
        shard.unlink()
    count = _Counting(first)
    both = FrozenFeatures.of(first, data, flips, batch_size=40, cache_dir=tmp_path)
    assert count.seen == [4, 40] and torch.allclose(both.flipped, stored.flipped)


def test_weight_average_by_hand():
    """d_t = min(decay, (1 + t) / (10 + t)): 0.1, 2/11, 0.25 for the first three updates (decay 0.5), so weights
    1, 2, 3 after a start at 0 average to 0.9, then 2/11 * 0.9 + 9/11 * 2 = 1.8, then 0.25 * 1.8 + 0.75 * 3 = 2.7."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    average = WeightAverage(model, decay=0.5)
    for w, expected in [(1.0, 0.9), (2.0, 1.8), (3.0, 2.7)]:
        model.weight.data.fill_(w)
        average.update(model)
        assert average.state["weight"].item() == pytest.approx(expected)
    model.weight.data.fill_(5.0)
    average.copy_to(model)
    assert model.weight.item() == pytest.approx(2.7)


def test_a_weight_average_of_the_head_leaves_a_frozen_extractor_bit_identical():
    """Averaging a constant is not exact in floating point: over many updates a frozen weight would drift by a few
    ulps, and the extractor's cached features (keyed on its bytes) would no longer be found. With only the head
    training, the average covers the head alone."""
    x, y = _toy(64)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, x, y, TrainConfig(epochs=30, batch_size=8, ema=0.9997, finetune="last"), seed=0, progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("head."))
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("head."))
    # the drift the prefix avoids: averaging every entry while the same weights stay put
    drifting = WeightAverage(model, decay=0.9997)
    for _ in range(300):
        drifting.update(model)
    assert any(not torch.equal(v, after[k]) for k, v in drifting.state.items() if v.is_floating_point())
    with pytest.raises(ConfigError, match="no state named"):
        WeightAverage(model, decay=0.9, prefix="nothing.")


def test_training_with_a_weight_average_ends_with_the_average():
    x, y = _toy(64)
    plain, averaged = _model(), _model()
    train(plain, x, y, TrainConfig(epochs=3, batch_size=16), seed=0, progress=False)
    seen = []
    train(averaged, x, y, TrainConfig(epochs=3, batch_size=16, ema=0.99), seed=0, progress=False,
          on_epoch_end=lambda epoch, m, opt: seen.append({k: v.clone() for k, v in m.state_dict().items()}))
    last = seen[-1]  # the raw weights after the last epoch are those of the plain run (same seed, same steps)
    assert all(torch.allclose(v, plain.state_dict()[k]) for k, v in last.items())
    moved = [k for k, v in averaged.state_dict().items() if v.is_floating_point() and not torch.equal(v, last[k])]
    assert moved  # the model ends with the average, not the last weights
    assert "ema" not in TrainConfig().model_dump() and TrainConfig(ema=0.5).model_dump()["ema"] == 0.5
    with pytest.raises(ValueError):
        TrainConfig(ema=1.0)


def test_speed_switches_stay_out_of_cache_keys_at_their_defaults():
    assert "compile" not in TrainConfig().model_dump() and "channels_last" not in TrainConfig().model_dump()
    assert TrainConfig(compile=True).model_dump()["compile"] is True
    assert TrainConfig(channels_last=True).model_dump_json() != TrainConfig().model_dump_json()


def test_channels_last_training_learns_the_same_function_and_returns_a_usual_layout():
    x, y = _toy()
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05)
    eager, last = _model(), _model()
    train(eager, x, y, cfg, seed=1, progress=False)
    train(last, x, y, cfg.model_copy(update={"channels_last": True}), seed=1, progress=False)
    assert all(p.is_contiguous() for p in last.parameters())  # saved and evaluated as usual
    for a, b in zip(eager.state_dict().values(), last.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-3)  # another convolution algorithm: rounding only
    assert (predict(eager, x) == predict(last, x)).mean() > 0.97


def test_compiled_training_equals_eager_training_up_to_rounding(monkeypatch):
    compiled_modules = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled_modules.append(m) or real(m, **kw))
    x, y = _toy()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    eager, compiled = build_model("linear", (1, 8, 8), 3), build_model("linear", (1, 8, 8), 3)
    compiled.load_state_dict(eager.state_dict())
    train(eager, x, y, cfg, seed=1, progress=False)
    train(compiled, x, y, cfg.model_copy(update={"compile": True}), seed=1, progress=False)
    assert compiled_modules == [compiled]
    assert not hasattr(compiled, "_orig_mod")  # the model itself trained, not a wrapper
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
