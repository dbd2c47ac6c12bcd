"""Hidden trigger backdoor (Saha et al., AAAI 2020): the algorithm's pieces, the poisoning contract, failure modes,
and a small real run on CIFAR-10."""

import copy
import itertools

import numpy as np
import pytest
import torch

from cleanbackdoor.attacks import AttackContext, build_attack
from cleanbackdoor.attacks.hidden_trigger import (
    HiddenTrigger,
    feature_fn,
    match,
    optimize_poisons,
    paste_patch,
    patch_pixels,
    quantize,
)
from cleanbackdoor.config import load_config
from cleanbackdoor.data import ImageSet, load_dataset, stratified_subset
from cleanbackdoor.errors import BudgetError, ConfigError
from cleanbackdoor.experiment import load_data
from cleanbackdoor.metrics import attack_success_rate
from cleanbackdoor.models import build_model
from cleanbackdoor.pretrain import pretrained_model, select_classes, victim_from_pretrained
from cleanbackdoor.training import predict, train
from cleanbackdoor.recipes import TrainConfig
from cleanbackdoor.triggers import build_trigger


@pytest.fixture(scope="module")
def data() -> ImageSet:
    """Three classes of smooth random 16x16 images (40 each): enough for the contracts."""
    rng = np.random.default_rng(0)
    base = rng.integers(40, 216, (3, 1, 4, 4, 3))
    images = np.repeat(np.repeat(base, 4, axis=2), 4, axis=3) + rng.integers(-30, 31, (3, 40, 16, 16, 3))
    return ImageSet(np.clip(images, 0, 255).reshape(120, 16, 16, 3).astype(np.uint8), np.repeat(np.arange(3), 40),
                    ("a", "b", "c"))


@pytest.fixture(scope="module")
def extractor() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("convnet", (3, 16, 16), 3, width=8).eval()


def _attack(extractor, **params):
    base = {"target": "b", "sources": ["a"], "budget": 12, "iterations": 15, "lr": 0.05, "stop_loss": None,
            "trigger": {"name": "patch", "size": 4, "position": "random", "pattern": "random"}}
    return HiddenTrigger({**base, **params}, extractor=extractor)


# -- matching ------------------------------------------------------------------------------------------------
def test_matching_is_a_permutation_and_hungarian_is_optimal():
    rng = np.random.default_rng(1)
    for _ in range(5):
        cost = rng.random((6, 6))
        brute = min(sum(cost[i, p[i]] for i in range(6)) for p in itertools.permutations(range(6)))
        for method in ("hungarian", "greedy"):
            perm = match(cost, method)
            assert sorted(perm.tolist()) == list(range(6))
        hungarian = cost[np.arange(6), match(cost, "hungarian")].sum()
        greedy = cost[np.arange(6), match(cost, "greedy")].sum()
        assert hungarian == pytest.approx(brute)
        assert hungarian <= greedy + 1e-12


def test_greedy_matching_is_worse_on_a_hand_case():
    # greedy takes the cheapest pair (0, 0) first and is left with (1, 1) = 100; the exact matching pays 2 + 2
    cost = np.array([[1.0, 2.0], [2.0, 100.0]])
    assert match(cost, "greedy").tolist() == [0, 1]
    assert match(cost, "hungarian").tolist() == [1, 0]
    with pytest.raises(ValueError, match="square"):
        match(np.zeros((2, 3)))


# -- trigger pasting and quantization ------------------------------------------------------------------------
def test_paste_patch_matches_the_patch_trigger():
    trigger = build_trigger("patch", (3, 16, 16), seed=3, size=4, position="random", pattern="random")
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    positions = np.array([[0, 0], [12, 5], [7, 12]])
    pasted = paste_patch(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255,
                         torch.from_numpy(patch_pixels(trigger)).permute(2, 0, 1).float() / 255,
                         torch.from_numpy(positions))
    for img, out, (r, c) in zip(images, pasted, positions):
        fixed = build_trigger("patch", (3, 16, 16), seed=3, size=4, position=(int(r), int(c)), pattern="random")
        expected = fixed(img[None])[0]
        assert np.array_equal(np.rint(out.permute(1, 2, 0).numpy() * 255).astype(np.uint8), expected)


def test_quantize_stays_inside_the_ball_and_the_pixel_range():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    wild = torch.rand(5, 3, 8, 8) * 1.4 - 0.2  # far outside the ball and the range
    out = quantize(wild, targets, 16 / 255)
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - targets.astype(int)).max() <= 16


# -- the optimization --------------------------------------------------------------------------------------
def test_feature_loss_decreases_and_poisons_stay_in_the_ball(data, extractor):
    targets = torch.from_numpy(data.images[data.labels == 1][:10]).permute(0, 3, 1, 2).float() / 255
    sources = torch.from_numpy(data.images[data.labels == 0]).permute(0, 3, 1, 2).contiguous()
    patch = torch.rand(3, 4, 4)
    eps = 8 / 255
    res = optimize_poisons(feature_fn(extractor), targets, sources, patch, eps=eps, iterations=40, lr=0.05,
                           stop_loss=None, log_every=10)
    first, last = res.history[0], res.history[-1]
    assert last[0] == 40 and last[1] < 0.8 * first[1]
    assert (res.poisons - targets).abs().max() <= eps + 1e-6
    assert res.poisons.min() >= 0 and res.poisons.max() <= 1
    # the learning rate decays: with sign steps of lr * 0.5^i the total move is below 2 * lr
    res = optimize_poisons(feature_fn(extractor), targets, sources, patch, eps=0.5, iterations=30, lr=0.01,
                           lr_decay=0.5, decay_every=1, step="sign", stop_loss=None)
    moved = (res.poisons - targets).abs().max()
    assert 0.01 < moved <= 0.02 + 1e-6


def test_early_stopping_and_independent_batches(data, extractor):
    targets = torch.from_numpy(data.images[data.labels == 1][:7]).permute(0, 3, 1, 2).float() / 255
    sources = torch.from_numpy(data.images[data.labels == 0]).permute(0, 3, 1, 2).contiguous()
    res = optimize_poisons(feature_fn(extractor), targets, sources, torch.rand(3, 4, 4), iterations=50,
                           stop_loss=1e9)
    assert res.iterations == [1]  # every per-sample loss is below the threshold at once
    res = optimize_poisons(feature_fn(extractor), targets, sources, torch.rand(3, 4, 4), iterations=3,
                           stop_loss=None, batch_size=3)
    assert res.iterations == [3, 3, 3] and res.poisons.shape == targets.shape


def test_sources_drawn_once_per_batch_run_the_extractor_on_them_once(data, extractor):
    """source_draw "once" (the authors' code, ART): each batch's patched sources are drawn and embedded at its first
    iteration and kept; "fresh" (the paper's algorithm) embeds new ones every iteration. Counted in images fed to f."""
    targets = torch.from_numpy(data.images[data.labels == 1][:6]).permute(0, 3, 1, 2).float() / 255
    sources = torch.from_numpy(data.images[data.labels == 0]).permute(0, 3, 1, 2).contiguous()
    f = feature_fn(extractor)
    patch = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []

    def counting(x):
        seen.append(len(x))
        return f(x)

    fresh = optimize_poisons(counting, targets, sources, patch, iterations=5, stop_loss=None,
                             batch_size=3, source_draw="fresh", seed=1)
    assert sum(seen) == 2 * 5 * 6  # every iteration: 6 sources and 6 poisons
    seen.clear()
    once = optimize_poisons(counting, targets, sources, patch, iterations=5, stop_loss=None,
                            batch_size=3, source_draw="once", seed=1)
    assert sum(seen) == 6 + 5 * 6  # the sources once per batch, the poisons every iteration
    assert once.iterations == fresh.iterations == [5, 5]
    again = optimize_poisons(f, targets, sources, patch, iterations=5, stop_loss=None, batch_size=3,
                             source_draw="once", seed=1)
    assert torch.equal(again.poisons, once.poisons)  # deterministic under the seed
    assert not torch.equal(fresh.poisons, once.poisons)  # later iterations matched other sources
    assert (once.poisons - targets).abs().max() <= 16 / 255 + 1e-6


def test_bfloat16_passes_stay_close_to_float32_and_give_float32_gradients(data, extractor):
    """precision "bfloat16": the extractor's passes under bfloat16 autocast on channels-last tensors, a speed option;
    the features stay within a few per cent of float32's and the image gradient keeps its dtype and direction."""
    model = copy.deepcopy(extractor)
    x = torch.from_numpy(data.images[:20]).permute(0, 3, 1, 2).float().div(255).requires_grad_(True)
    f32 = feature_fn(extractor)(x)
    (g32,) = torch.autograd.grad(f32.square().sum(), x)
    fast = feature_fn(model, "bfloat16")
    assert model.backbone.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    f16 = fast(x)
    (g16,) = torch.autograd.grad(f16.square().sum(), x)
    assert f16.dtype == torch.float32 and g16.dtype == torch.float32 and f16.shape == f32.shape
    assert float((f16 - f32).detach().norm() / f32.detach().norm()) < 0.03
    assert float(torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), 0)) > 0.95
    res = _attack(extractor, precision="bfloat16").poison(data, seed=0)
    assert res.metadata["precision"] == "bfloat16" and res.poisoned_examples == 12


# -- the poisoning contract ------------------------------------------------------------------------------
def test_poisoning_contract(data, extractor):
    attack = _attack(extractor)
    p = attack.poison(data, seed=0)
    assert np.array_equal(p.labels, data.labels)  # clean labels
    assert p.mask.sum() == 12 == p.budget == len(p.images)
    assert np.array_equal(np.flatnonzero(p.mask), p.image_indices)
    assert np.all(data.labels[p.image_indices] == 1)  # poisons are target-class images
    diff = np.abs(p.images.astype(int) - data.images[p.image_indices].astype(int))
    assert diff.max() <= 16 and diff.max() > 0
    images, _ = p.apply(data)
    assert np.array_equal(images[p.image_indices], p.images)
    assert np.array_equal(np.delete(images, p.image_indices, 0), np.delete(data.images, p.image_indices, 0))
    assert p.metadata["final_feature_loss_mean"] < p.metadata["initial_feature_loss_mean"]
    assert p.target == 1 and p.sources == (0,)
    triggered = p.activation(data.images[:4])
    assert (triggered != data.images[:4]).any(axis=(1, 2, 3)).all()  # the test-time trigger is the patch


def test_deterministic_under_a_seed(data, extractor):
    a = _attack(extractor, iterations=5).poison(data, seed=1)
    b = _attack(extractor, iterations=5).poison(data, seed=1)
    c = _attack(extractor, iterations=5).poison(data, seed=2)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.image_indices, b.image_indices)
    assert not np.array_equal(a.images, c.images)


def test_multi_source_draws_from_every_other_class(data, extractor):
    p = _attack(extractor, sources="all", iterations=2).poison(data, seed=0)
    assert p.sources is None and p.metadata["source_names"] == "all"


# -- failure modes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, error, message", [
    ({"eps": 0}, ConfigError, "eps must be positive"),
    ({"eps": 16}, ConfigError, "0..1 pixel scale"),
    ({"eps": 0.001}, ConfigError, "below one grey level"),
    ({"matching": "optimal"}, ConfigError, "matching"),
    ({"iterations": 0}, ConfigError, "iterations"),
    ({"trigger": {"name": "blend"}}, ConfigError, "patch trigger"),
    ({"colour": 3}, ConfigError, "unknown key"),
])
def test_bad_parameters_are_clear_errors(params, error, message):
    with pytest.raises(error, match=message):
        build_attack("hidden_trigger", params)


def test_bad_inputs_are_clear_errors(data, extractor):
    with pytest.raises(BudgetError, match="target class 'b' has 40 images"):
        _attack(extractor, budget=41).poison(data)
    with pytest.raises(ConfigError, match="no class 'zebra'"):
        _attack(extractor, target="zebra").poison(data)
    with pytest.raises(ConfigError, match="no class 7"):
        _attack(extractor, sources=[7]).poison(data)
    with pytest.raises(ConfigError, match="model.pretrained"):
        _attack(None).poison(data)


# -- a small real run --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_attack_works_on_cifar10(shared_data, session_cache, tmp_path, monkeypatch):
    """Extractor pretrained on 5 CIFAR-10 classes; the victim fine-tunes its last layer on dog vs horse (300 images
    each); 200 poisons raise the share of patched dogs classified as horses well above the clean victim's (about
    0.33 -> 0.45 on 2 cores, 45 s)."""
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(session_cache))  # decoded images shared with other tests
    root = shared_data / "cifar10-jpg.tar.gz"
    source_task = 'model.pretrained={classes=[0, 1, 2, 3, 4], per_class=300, train={preset="cifar-fast", epochs=4}}'
    cfg = load_config(None, ['data.name="cifar10"', f'data.root="{root}"', "model.options={width=16}", source_task,
                             f'cache_dir="{tmp_path}"'])
    extractor = pretrained_model(cfg.model, cache_dir=cfg.cache_path(), device="cpu", progress=False,
                                 log=lambda _: None)
    splits = load_dataset("cifar10", root=root)
    task = stratified_subset(select_classes(splits.train, ["dog", "horse"]), per_class=300, seed=0)
    test = select_classes(splits.test, ["dog", "horse"])
    p = HiddenTrigger(target="horse", sources=["dog"], budget=200, iterations=60, lr=0.01, decay_every=30,
                      stop_loss=None, extractor=extractor).poison(task, seed=0)
    recipe = TrainConfig(epochs=15, batch_size=64, lr=0.01, schedule="cosine", finetune="last")
    patched_dogs = p.activation(test.images[test.labels == 0])
    asr = {}
    for name, images in (("clean", task.images), ("poisoned", p.apply(task)[0])):
        victim = victim_from_pretrained(extractor, task.image_shape, 2, seed=0)
        train(victim, images, task.labels, recipe, progress=False)
        asr[name] = attack_success_rate(predict(victim, patched_dogs), 1)
    assert asr["poisoned"] >= asr["clean"] + 0.08, asr


def test_the_attacker_matches_the_feature_map_the_victim_reads(tmp_path):
    """With a victim option that changes the feature map (``pool = "max"``), the poisons must match the victim's
    features, not those of the source-task model the extractor was pretrained as."""
    from cleanbackdoor.attacks import AttackContext
    from cleanbackdoor.pretrain import build_victim

    cfg = load_config(None, [
        'model={name="resnet20", options={width=4, pool="max"}, pretrained={classes=[0, 1, 2, 3, 4], '
        'train={preset="digits", epochs=1}}}', "data.classes=[6, 9]"])
    images = load_dataset("digits").train.images[:50]
    victim = build_victim(cfg.model, images, 2, 0, cache_dir=tmp_path)
    context = AttackContext(cache_dir=tmp_path, device="cpu", model=cfg.model,
                            victim=lambda s: build_victim(cfg.model, images, 2, s, cache_dir=tmp_path))
    attacker = HiddenTrigger()._extractor(context, seed=0)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(feature_fn(attacker.eval())(x), feature_fn(victim.eval())(x))
        source_model = pretrained_model(cfg.model, cache_dir=tmp_path, device="cpu", progress=False,
                                        log=lambda _: None)
        assert not torch.allclose(feature_fn(source_model)(x), feature_fn(victim)(x))  # average vs max pooling


def test_colour_grid_patch_is_seeded_saturated_and_smooth():
    a = build_trigger("patch", (3, 32, 32), seed=3, size=8, position="random", pattern="colors")
    b = build_trigger("patch", (3, 32, 32), seed=3, size=8, position="random", pattern="colors")
    c = build_trigger("patch", (3, 32, 32), seed=4, size=8, position="random", pattern="colors")
    pa = patch_pixels(a).astype(float)
    assert np.array_equal(pa, patch_pixels(b)) and not np.array_equal(pa, patch_pixels(c))
    # the corners hold grid cells' colours exactly: every channel at 0 or 255
    for r, col in [(0, 0), (0, 7), (7, 0), (7, 7)]:
        assert set(pa[r, col]) <= {0.0, 255.0}
    # smooth: neighbouring pixels differ by at most the jump between adjacent cells over the cell width
    assert np.abs(np.diff(pa, axis=0)).max() <= 255 * 5 / 8 + 1e-3
    grey = build_trigger("patch", (1, 8, 8), seed=3, size=3, pattern="colors", grid=4)
    assert patch_pixels(grey).shape == (3, 3, 1)
    with pytest.raises(ConfigError, match="grid"):
        build_trigger("patch", (3, 32, 32), size=8, pattern="colors", grid=1)


def test_poisons_added_to_the_clean_target_images_or_replacing_them():
    """The composition: with one count for every class the poisons replace target images (1,100 clean horses and
    800 poisons in the recipe); with more target images than the others (the paper's composition) they come on top
    of as many clean ones as the other class has. Digits 6 vs 9 here, 20 poisons."""
    base = ['data.classes=[6, 9]', 'attack.name="hidden_trigger"', 'attack.target=1', 'attack.sources=[0]',
            'attack.budget=20', 'attack.iterations=2', 'attack.stop_loss=0.0',
            'attack.trigger={name="patch", size=3, position="random", pattern="random"}']
    torch.manual_seed(0)
    extractor = build_model("convnet", (1, 8, 8), 2, width=8).eval()
    for per_class, clean_nines in (("60", 40), ('{6 = 60, 9 = 80}', 60)):
        cfg = load_config(None, [*base, f"data.train_per_class={per_class}"])
        train = load_data(cfg).train
        attack = build_attack("hidden_trigger", {k: v for k, v in cfg.attack.items() if k != "name"})
        attack.extractor = extractor
        p = attack.poison(train, seed=0)
        nines = train.labels == 1
        assert (train.labels == 0).sum() == 60 and p.mask.sum() == 20 and p.mask[nines].sum() == 20
        assert (nines & ~p.mask).sum() == clean_nines


def test_poisons_are_cached_under_their_inputs(data, extractor, tmp_path):
    notes: list[str] = []
    context = AttackContext(cache_dir=tmp_path, log=notes.append, progress=False)
    first = _attack(extractor, iterations=5).poison(data, seed=1, context=context)
    again = _attack(extractor, iterations=5).poison(data, seed=1, context=context)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.image_indices, again.image_indices)
    assert not first.metadata["from_cache"] and again.metadata["from_cache"]
    assert again.metadata["final_feature_loss_mean"] == first.metadata["final_feature_loss_mean"]
    assert sum("poisons loaded from cache" in n for n in notes) == 1
    assert len(list((tmp_path / "hidden_trigger").glob("poisons-*.pt"))) == 1
    # another eps, another extractor or a logging change: recomputed only for what changes the poisons
    _attack(extractor, iterations=5, log_every=1).poison(data, seed=1, context=context)
    assert len(list((tmp_path / "hidden_trigger").glob("poisons-*.pt"))) == 1
    _attack(extractor, iterations=5, eps=8 / 255).poison(data, seed=1, context=context)
    other = copy.deepcopy(extractor)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    _attack(other, iterations=5).poison(data, seed=1, context=context)
    assert len(list((tmp_path / "hidden_trigger").glob("poisons-*.pt"))) == 3
