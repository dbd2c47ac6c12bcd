import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cleanbackdoor.attacks import AttackContext, build_attack
from cleanbackdoor.attacks import flip as flip_module
from cleanbackdoor.attacks.flip import (FunctionalSGD, LabelData, chunked_matching_loss_and_label_grad, combine_runs,
                                        distillation_labels, expert_recipe, is_checkpoint, margin_scores,
                                        matching_loss_and_label_grad, optimize_labels, poisoned_training_set,
                                        select_flips, train_expert)
from cleanbackdoor.config import load_config
from cleanbackdoor.specs import ModelConfig
from cleanbackdoor.data import ImageSet
from cleanbackdoor.data.transforms import Augment
from cleanbackdoor.errors import BudgetError, ConfigError
from cleanbackdoor.models import build_model
from cleanbackdoor.sweep import run_sweep
from cleanbackdoor.training import FrozenFeatures, freeze_all_but_head
from cleanbackdoor.recipes import TrainConfig
from cleanbackdoor.triggers import build_trigger


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _model(name="convnet", seed=0, classes=3):
    torch.manual_seed(seed)
    opts = {"width": 8} if name == "convnet" else {}
    return build_model(name, (1, 8, 8), classes, **opts)


def _flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


# -- hand-checked scoring ----------------------------------------------------------------------------------------
def test_margin_scores_by_hand():
    logits = np.array([[5.0, 1.0, 0.0],   # correct, margin 1 - 5 = -4
                       [1.0, 3.0, 0.5],   # y=0, flipped to 1: 3 - 1 = 2
                       [2.0, 2.5, 0.0]])  # y=2, flipped to 1: 2.5 - 0 = 2.5
    labels = np.array([0, 0, 2])
    assert margin_scores(logits, labels).tolist() == [-4.0, 2.0, 2.5]
    new, mask = select_flips(margin_scores(logits, labels), logits, labels, 1)
    assert mask.tolist() == [False, False, True] and new.tolist() == [0, 0, 1]
    new, mask = select_flips(margin_scores(logits, labels), logits, labels, 2)
    assert mask.tolist() == [False, True, True] and new.tolist() == [0, 1, 1]


def test_flip_target_is_best_other_class_even_when_unflipped():
    logits = np.array([[5.0, 1.0, 4.0]])
    new, _ = select_flips(margin_scores(logits, np.array([0])), logits, np.array([0]), 1)
    assert new.tolist() == [2]


def test_combining_runs_takes_min_score_and_mean_logits():
    labels = np.array([0, 1])
    r1 = torch.tensor([[1.0, 3.0], [0.0, 5.0]])
    r2 = torch.tensor([[2.0, 2.5], [0.0, 1.0]])
    scores, mean = combine_runs([r1, r2], labels)
    assert scores.tolist() == [0.5, -5.0]  # min(2, 0.5); min(-5, -1)
    assert np.allclose(mean, [[1.5, 2.75], [0.0, 3.0]])


def test_distillation_labels():
    soft = distillation_labels(np.array([[0.0, 5.0]]), np.array([0]), alpha=1.0)
    assert np.allclose(soft, [[np.e / (1 + np.e), 1 / (1 + np.e)]])
    assert np.allclose(distillation_labels(np.random.randn(4, 3), np.array([0, 1, 2, 0]), 0.2).sum(1), 1)


# -- the differentiable step -----------------------------------------------------------------------------------
@pytest.mark.parametrize("nesterov, wd", [(True, 5e-4), (False, 0.0)])
@pytest.mark.parametrize("arch", ["convnet", "resnet20"])
def test_functional_step_equals_a_real_optimizer_step(nesterov, wd, arch):
    recipe = TrainConfig(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=wd)
    model = _model(arch)
    model.train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=wd)
    # one step to fill the momentum buffers, then compare the second step
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    fs = FunctionalSGD(model, recipe)
    theta = _flat(model)
    buf = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    soft_one_hot = torch.nn.functional.one_hot(y, 3).float()
    ours = fs.step(theta, fs.grad(theta, x, soft_one_hot), buf, torch.tensor(0.1))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.allclose(ours, _flat(model), atol=1e-6)


def test_loss_is_zero_for_identical_data_and_labels():
    fs = FunctionalSGD(_model(), TrainConfig(lr=0.1, momentum=0.9, nesterov=True))
    theta = _flat(_model())
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    for method in ("linearized", "autograd"):
        loss, g = matching_loss_and_label_grad(fs, theta, torch.zeros_like(theta), torch.tensor(0.1), x, y, x,
                                               torch.nn.functional.one_hot(y, 3).float(), method)
        assert float(loss) < 1e-10 and g.abs().max() < 1e-6


@pytest.mark.parametrize("arch", ["convnet", "resnet20"])
def test_linearized_gradient_equals_autograd(arch):
    fs = FunctionalSGD(_model(arch), TrainConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4))
    theta = _flat(_model(arch, seed=1))
    buf = torch.randn_like(theta) * 0.01
    xe, xs = torch.rand(12, 1, 8, 8), torch.rand(12, 1, 8, 8)
    ye = torch.randint(0, 3, (12,))
    soft = torch.softmax(torch.randn(12, 3), 1)
    l1, g1 = matching_loss_and_label_grad(fs, theta, buf, torch.tensor(0.05), xe, ye, xs, soft, "linearized")
    l2, g2 = matching_loss_and_label_grad(fs, theta, buf, torch.tensor(0.05), xe, ye, xs, soft, "autograd")
    assert torch.allclose(l1, l2, rtol=1e-4)
    # The routes may differ by a constant per row (the autograd loss also differentiates the sum of the targets,
    # which is 1 on the simplex); softmax removes exactly that direction, so the gradients on L must agree.
    def through_softmax(g):
        return g - g.mean(1, keepdim=True)

    assert torch.allclose(through_softmax(g1), through_softmax(g2), atol=1e-4 * float(g2.abs().max()))


@pytest.mark.parametrize("method", ["autograd", "linearized"])
def test_chunked_step_equals_the_whole_batch_step(method):
    """The ConvNet's instance norm has no statistics across samples, so a step computed in chunks is the same step;
    chunks of unequal size check the size weighting."""
    fs = FunctionalSGD(_model(), TrainConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4))
    theta = _flat(_model(seed=1))
    buf = torch.randn_like(theta) * 0.01
    xe, xs = torch.rand(10, 1, 8, 8), torch.rand(10, 1, 8, 8)
    ye = torch.randint(0, 3, (10,))
    soft = torch.softmax(torch.randn(10, 3), 1)
    lr = torch.tensor(0.05)
    whole_loss, whole = matching_loss_and_label_grad(fs, theta, buf, lr, xe, ye, xs, soft, method)
    chunks = [(r, lambda r=r: (xe[r], ye[r], xs[r])) for r in (slice(0, 4), slice(4, 8), slice(8, 10))]
    loss, g = chunked_matching_loss_and_label_grad(fs, theta, buf, lr, chunks, soft, method)
    assert torch.allclose(loss, whole_loss, rtol=1e-5)
    assert torch.allclose(g, whole, atol=1e-5 * float(whole.abs().max()))


# -- stages on a tiny set --------------------------------------------------------------------------------------
def _tiny(n=120, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 80, (n, 8, 8, 1))
    for c in range(classes):
        x[y == c, c * 2:c * 2 + 2] += 150
    return ImageSet(x.astype(np.uint8), y, [str(c) for c in range(classes)], "tiny")


def test_poisoned_training_set_appends_triggered_sources():
    train = _tiny()
    trig = build_trigger("patch", (1, 8, 8))
    imgs, labels, origin = poisoned_training_set(train.images, train.labels, trig, (2,), 0)
    src = np.flatnonzero(train.labels == 2)
    assert len(imgs) == len(train) + len(src) and (labels[len(train):] == 0).all()
    assert np.array_equal(origin[len(train):], src) and np.array_equal(imgs[len(train):], trig(train.images[src]))


def test_label_optimization_in_chunks_and_resumed_gives_the_same_logits(tmp_path):
    train = _tiny()
    recipe = TrainConfig(epochs=4, batch_size=32, lr=0.05, crop_padding=1)
    trig = build_trigger("patch", (1, 8, 8))
    imgs, labels, origin = poisoned_training_set(train.images, train.labels, trig, (2,), 0)
    traj, _ = train_expert(_model(), imgs, labels, recipe, expert_epochs=2, checkpoint_every=2, seed=0,
                           device=torch.device("cpu"), progress=False)
    assert len(traj) == 5  # steps 0, 2, 4, 6, 8 of 2 epochs x 5 steps (schedule "recipe")
    fs = FunctionalSGD(_model(), recipe)
    data = LabelData.build(train.images, train.labels, imgs, labels, origin, torch.device("cpu"))
    kw = dict(passes=3, batch_size=32, lr=150.0, momentum=0.5, init_scale=5.0, l1=0.0, seed=3, progress=False)
    full, losses = optimize_labels(fs, [traj], data, 3, Augment(1, False), **kw)
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert not torch.equal(full, 5 * torch.nn.functional.one_hot(torch.as_tensor(train.labels), 3).float())
    # the whole set as one batch, in chunks of 32: the same logits as in one piece (no cross-sample statistics)
    whole = {**kw, "batch_size": len(labels)}
    one, _ = optimize_labels(fs, [traj], data, 3, Augment(1, False), **whole)
    chunked, _ = optimize_labels(fs, [traj], data, 3, Augment(1, False), **whole, chunk=32)
    assert torch.allclose(one, chunked, atol=1e-4) and not torch.equal(one, full)
    work = tmp_path / "w"
    work.mkdir()
    optimize_labels(fs, [traj], data, 3, Augment(1, False), **{**kw, "passes": 1}, work_dir=work)  # "killed"
    resumed, losses2 = optimize_labels(fs, [traj], data, 3, Augment(1, False), **kw, work_dir=work)
    assert torch.equal(full, resumed) and losses2 == losses


def test_student_reads_the_clean_origin_of_every_entry(monkeypatch):
    """The premise of FLIP: the expert steps on the poisoned batch (triggered source copies labelled target), the
    student on the *clean* image each entry comes from. Hand-checked on 6 images, 2 of them sources: every label
    step's student batch must be images[origin[idx]] and its expert batch the poisoned entries idx."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, (6, 8, 8, 1)).astype(np.uint8)
    labels = np.array([0, 1, 2, 2, 0, 1])
    trig = build_trigger("patch", (1, 8, 8), size=2, pattern="white")
    ext, ext_labels, origin = poisoned_training_set(images, labels, trig, (2,), 0)
    assert origin.tolist() == [0, 1, 2, 3, 4, 5, 2, 3] and ext_labels.tolist() == [0, 1, 2, 2, 0, 1, 0, 0]
    seen = []

    def spy(fs, theta, buf, lr, x_e, y_e, x_s, soft, method):
        seen.append((x_e.clone(), y_e.clone(), x_s.clone()))
        return torch.zeros(()), torch.zeros_like(soft)

    monkeypatch.setattr(flip_module, "matching_loss_and_label_grad", spy)
    recipe = TrainConfig(epochs=1, batch_size=4, lr=0.05)
    traj, _ = train_expert(_model(), ext, ext_labels, recipe, expert_epochs=1, checkpoint_every=1, seed=0,
                           device=torch.device("cpu"), progress=False)
    data = LabelData.build(images, labels, ext, ext_labels, origin, torch.device("cpu"))
    optimize_labels(FunctionalSGD(_model(), recipe), [traj], data, 3, Augment(), passes=3, batch_size=8, lr=1.0,
                    momentum=0.0, init_scale=5.0, l1=0.0, seed=0, progress=False)
    as_float = torch.from_numpy(ext).permute(0, 3, 1, 2).float() / 255
    clean = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert len(seen) == 3
    for x_e, y_e, x_s in seen:  # one step a pass on all 8 entries, in a random order
        idx = [next(i for i in range(8) if torch.equal(as_float[i], x)) for x in x_e]
        assert sorted(idx) == list(range(8)) and y_e.tolist() == ext_labels[idx].tolist()
        assert torch.equal(x_s, clean[origin[idx]])  # the clean origin, also for the triggered entries
        assert not torch.equal(x_s, x_e)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_label_optimization_runs_on_cuda_with_a_model_built_on_the_cpu():
    """The attack builds the student on the CPU and the label data on the run's device: the student's buffers (the
    input normalization) must follow the data (on the first H200 run the label stage stopped on a cpu/cuda
    mismatch). The labels are not compared with the CPU's: the seeded generator draws other checkpoints and orders
    on CUDA (the first version of this test asserted equality and failed on an H200 for that reason)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    trig = build_trigger("patch", (1, 8, 8), size=2, pattern="white")
    ext, ext_labels, origin = poisoned_training_set(images, labels, trig, (2,), 0)
    recipe = TrainConfig(epochs=1, batch_size=4, lr=0.05)
    traj, _ = train_expert(_model(), ext, ext_labels, recipe, expert_epochs=1, checkpoint_every=1, seed=0,
                           device=torch.device("cpu"), progress=False)
    data = LabelData.build(images, labels, ext, ext_labels, origin, torch.device("cuda"))
    init = 5.0 * torch.nn.functional.one_hot(torch.from_numpy(labels), 3).float()
    logits, losses = optimize_labels(FunctionalSGD(_model(), recipe), [traj], data, 3, Augment(), passes=2,
                                     batch_size=8, lr=1.0, momentum=0.0, init_scale=5.0, l1=0.0, seed=0,
                                     progress=False)
    assert logits.shape == (6, 3)  # returned on the CPU, as on every device
    assert torch.isfinite(logits).all() and all(np.isfinite(losses)) and len(losses) == 2
    assert not torch.equal(logits, init)  # the label step moved the labels


def test_head_only_label_step_equals_the_full_model_step_with_a_frozen_backbone():
    """FLIP on cached features: the head-only step on the frozen extractor's features is the step of the whole
    model whose backbone is frozen (batch norm in eval mode), to float tolerance, by both routes."""
    torch.manual_seed(0)
    model = build_model("resnet20", (1, 8, 8), 3, head_hidden=6)
    model.train()
    for _ in range(2):  # running statistics that differ from the initial ones
        model(torch.rand(16, 1, 8, 8))
    freeze_all_but_head(model)
    recipe = TrainConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, finetune="last")
    full = FunctionalSGD(model, recipe)
    head = FunctionalSGD(model.head, recipe.model_copy(update={"finetune": "all"}))
    assert full.names == [f"head.{n}" for n in head.names]
    theta = torch.cat([p.detach().reshape(-1) for p in model.head.parameters()])
    buf = torch.randn_like(theta) * 0.01
    xe, xs = torch.rand(10, 1, 8, 8), torch.rand(10, 1, 8, 8)
    ye = torch.randint(0, 3, (10,))
    soft = torch.softmax(torch.randn(10, 3), 1)
    model.eval()
    with torch.no_grad():
        fe, fsx = model.features(xe), model.features(xs)
    for method in ("autograd", "linearized"):
        l_full, g_full = matching_loss_and_label_grad(full, theta, buf, torch.tensor(0.05), xe, ye, xs, soft, method)
        l_head, g_head = matching_loss_and_label_grad(head, theta, buf, torch.tensor(0.05), fe, ye, fsx, soft, method)
        assert torch.allclose(l_full, l_head, rtol=1e-5)
        assert torch.allclose(g_full, g_head, atol=1e-5 * float(g_full.abs().max()))


def test_head_only_expert_on_features_is_the_expert_on_images():
    """An expert that trains its head on precomputed features follows the trajectory the training loop gives on
    the images (which computes the same features itself), and stores the head's parameters only."""
    train = _tiny(n=60)
    torch.manual_seed(0)
    base = build_model("resnet20", (1, 8, 8), 3)
    recipe = expert_recipe(TrainConfig(epochs=3, batch_size=16, lr=0.05, finetune="last", hflip=True), "authors")

    def fresh():
        m = copy_of(base)
        torch.manual_seed(1)
        m.head = torch.nn.Linear(base.backbone.feature_dim, 3)
        return m

    copy_of = __import__("copy").deepcopy
    kw = dict(expert_epochs=2, checkpoint_every=2, seed=0, device=torch.device("cpu"), schedule="authors",
              progress=False)
    on_images, _ = train_expert(fresh(), train.images, train.labels, recipe, **kw)
    extractor = fresh().eval()
    feats = FrozenFeatures.of(extractor, torch.from_numpy(train.images).permute(0, 3, 1, 2).contiguous(),
                              recipe.augment)
    on_features, _ = train_expert(fresh(), None, train.labels, recipe, features=feats, **kw)
    head_size = sum(p.numel() for p in fresh().head.parameters())
    assert on_images.params.shape == on_features.params.shape == (len(on_images), head_size)
    assert torch.equal(on_images.steps, on_features.steps)
    assert torch.allclose(on_images.params, on_features.params, atol=1e-5)


def test_authors_schedule_constant_lr_and_no_initial_checkpoint():
    """The authors' experts: constant lr, a checkpoint after iterations k, 2k, ... of every epoch, never step 0.
    Here 40 entries in batches of 8 (5 steps an epoch), k = 2: in-epoch steps 2 and 4, i.e. steps 2, 4, 7, 9."""
    assert [s for s in range(10) if is_checkpoint(s, 5, 2, "authors")] == [2, 4, 7, 9]
    assert [s for s in range(10) if is_checkpoint(s, 5, 2, "recipe")] == [0, 2, 4, 6, 8]
    train = _tiny(n=40)
    onecycle = TrainConfig(epochs=10, batch_size=8, lr=0.05, schedule="onecycle")
    recipe = expert_recipe(onecycle, "authors")
    assert recipe.schedule == "constant" and expert_recipe(onecycle, "recipe") is onecycle
    traj, _ = train_expert(_model(), train.images, train.labels, recipe, expert_epochs=2, checkpoint_every=2,
                           seed=0, device=torch.device("cpu"), schedule="authors", progress=False)
    assert traj.steps.tolist() == [2, 4, 7, 9]
    assert torch.allclose(traj.lr, torch.full((4,), 0.05))
    assert not torch.equal(traj.params[0], _flat(_model()))  # the initialization is never kept


# -- the attack's contract -------------------------------------------------------------------------------------
FAST = dict(target=0, sources=[2], trigger={"name": "patch"}, expert_epochs=2, checkpoint_every=3,
            label_passes=2, label_batch=32)


def _ctx(tmp_path=None):
    return AttackContext(cache_dir=tmp_path, progress=False, log=lambda m: None,
                         model=ModelConfig(name="convnet", options={"width": 8}),
                         train=TrainConfig(epochs=4, batch_size=32, lr=0.05))


def test_flip_contract_budget_and_determinism(tmp_path):
    train = _tiny()
    attack = build_attack("flip", {**FAST, "budget": 7})
    p = attack.poison(train, seed=0, context=_ctx(tmp_path))
    assert p.diagnostics["label_runs"].shape == (1, len(train), 3)  # kept for diagnostics
    assert p.diagnostics["scores"].shape == (len(train),) and p.diagnostics["logits"].shape == (len(train), 3)
    assert p.labels.shape == (len(train),) and p.mask.sum() == 7 == p.budget
    assert (p.labels[p.mask] != train.labels[p.mask]).all()
    assert np.array_equal(p.labels[~p.mask], train.labels[~p.mask])
    assert p.images is None  # label-only
    q = build_attack("flip", {**FAST, "budget": 7}).poison(train, seed=0, context=_ctx())  # no cache
    assert np.array_equal(p.labels, q.labels)
    # a second budget reuses the cached experts and logits: same ranking, nested flips
    r = build_attack("flip", {**FAST, "budget": 3}).poison(train, seed=0, context=_ctx(tmp_path))
    assert set(np.flatnonzero(r.mask)) <= set(np.flatnonzero(p.mask))
    # soft mode has no budget (it reports the argmaxes it moved): one beyond the set is no error there
    soft = build_attack("flip", {**FAST, "mode": "soft", "budget": 10 * len(train)}).poison(
        train, seed=0, context=_ctx(tmp_path))
    assert soft.labels.shape == (len(train), 3) and np.allclose(soft.labels.sum(1), 1)
    assert soft.budget == int((soft.labels.argmax(1) != train.labels).sum())
    with pytest.raises(BudgetError):
        build_attack("flip", {**FAST, "budget": 10 * len(train)}).poison(train, seed=0, context=_ctx(tmp_path))


def test_whole_set_label_batch_is_one_step_per_pass(tmp_path):
    """``label_batch = "all"`` is the poisoned set's size: the same flips as that number given explicitly."""
    train = _tiny()
    entries = len(train) + int((train.labels == 2).sum())
    whole = build_attack("flip", {**FAST, "label_batch": "all", "budget": 5}).poison(train, seed=0, context=_ctx())
    explicit = build_attack("flip", {**FAST, "label_batch": entries, "budget": 5}).poison(
        train, seed=0, context=_ctx(tmp_path))
    assert np.array_equal(whole.labels, explicit.labels)
    assert all(len(run) == FAST["label_passes"] for run in whole.diagnostics["label_losses"])


def test_flip_failures():
    train = _tiny()
    for bad in (1, "half"):
        with pytest.raises(ConfigError, match="label_batch"):
            build_attack("flip", {"label_batch": bad})
    with pytest.raises(ConfigError, match="label_chunk"):
        build_attack("flip", {"label_chunk": 1})
    with pytest.raises(BudgetError):
        build_attack("flip", {**FAST, "budget": 1000}).poison(train, context=_ctx())
    with pytest.raises(ConfigError, match="label_lr"):
        build_attack("flip", {"label_lr": -1})
    with pytest.raises(ConfigError, match="SGD"):
        build_attack("flip", {**FAST, "expert_train": {"optimizer": "adam", "momentum": 0.0}}).poison(
            train, context=_ctx())


def test_experts_attack_success_is_recorded_per_epoch(tmp_path):
    """With a held-out set, every expert's CTA and ASR after each of its epochs are in the diagnostics (and in the
    log), also when the expert comes from the cache; without one, nothing is measured."""
    train, heldout = _tiny(), _tiny(n=60, seed=1)
    logs = []
    ctx = AttackContext(cache_dir=tmp_path, progress=False, log=logs.append, heldout=heldout,
                        model=ModelConfig(name="convnet", options={"width": 8}),
                        train=TrainConfig(epochs=4, batch_size=32, lr=0.05))
    params = {**FAST, "budget": 5, "n_experts": 2, "expert_epochs": 3}
    p = build_attack("flip", params).poison(train, seed=0, context=ctx)
    experts = p.diagnostics["experts"]
    assert len(experts) == 2 and [c["epoch"] for c in experts[0]] == [1, 2, 3]
    for curve in experts:
        for c in curve:
            assert 0 <= c["clean_accuracy"] <= 1 and 0 <= c["attack_success_rate"] <= 1
    # the last epoch's figures are those of a model trained like the expert, measured as every run is
    assert any("expert 1 on held-out images, epoch 1 -> 3" in line for line in logs)
    again = build_attack("flip", params).poison(train, seed=0, context=ctx)
    assert again.diagnostics["experts"] == experts and any("loaded from cache" in line for line in logs)
    alone = build_attack("flip", params).poison(train, seed=0, context=_ctx())
    assert alone.diagnostics["experts"] == [[], []]


def test_dirty_label_control_takes_the_trigger_sources_and_count():
    """The dirty-label bound of a label-only poisoning: BadNets stamping the same trigger on as many source images
    (here 7 of the 40 twos) and relabelling them to the target; none for attacks that change pixels."""
    train = _tiny()
    attack = build_attack("flip", {**FAST, "budget": 7, "trigger": {"name": "patch", "size": 2}})
    p = attack.poison(train, seed=3, context=_ctx())
    spec = attack.dirty_label_spec(p, train)
    assert spec == {"target": 0, "sources": [2], "trigger": {"name": "patch", "size": 2, "position": "bottom-right",
                                                              "pattern": "checkerboard", "margin": 1, "grid": 5},
                    "budget": 7}
    dirty = build_attack("badnets", spec).poison(train, seed=3)
    changed = np.flatnonzero(dirty.mask)
    assert len(changed) == 7 and (train.labels[changed] == 2).all() and (dirty.labels[changed] == 0).all()
    assert np.array_equal(dirty.images, p.activation(train.images[changed]))  # the very same trigger
    assert np.array_equal(dirty.labels[~dirty.mask], train.labels[~dirty.mask])
    assert build_attack("badnets", spec).dirty_label_spec(dirty, train) is None  # BadNets is its own bound
    many = build_attack("flip", {**FAST, "budget": 60}).poison(train, seed=3, context=_ctx())
    assert attack.dirty_label_spec(many, train)["budget"] == 40  # at most every source image


# -- end to end on real data --------------------------------------------------------------------------------------
def test_transfer_config_runs_end_to_end_on_a_slice(tmp_path, monkeypatch, shared_data, session_cache):
    """configs/flip-cifar10-transfer.toml on 500 CIFAR-10 images, with a 1-epoch source task instead of its
    60-epoch extractor: experts on the frozen features, label steps on the whole poisoned set, the victim, the
    clean model and the dirty-label control, all on cached features."""
    root = shared_data / "cifar10-jpg.tar.gz"
    if not root.is_file():
        pytest.skip("cifar10-jpg.tar.gz is not in ../shared/data")
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(session_cache))
    torch.set_num_threads(2)
    cfg = load_config(CONFIGS / "flip-cifar10-transfer.toml", [
        f"data.root={str(root)!r}", f"out={str(tmp_path / 'run')!r}", "progress=false", "data.train_per_class=50",
        "data.test_per_class=20", "model.pretrained.per_class=30", "model.pretrained.train={preset='cifar-fast', "
        "epochs=1}", "attack.budget=10", "attack.expert_epochs=2", "attack.checkpoint_every=1",
        "attack.label_passes=3", "train.epochs=3"])
    from cleanbackdoor.experiment import run_experiment

    m = run_experiment(cfg, echo=False).metrics
    assert m["poisoned_examples"] == 10 and m["train_size"] == 500
    assert m["dirty_label_control"]["poisoned_examples"] == 10
    assert [c["epoch"] for c in m["attack_diagnostics"]["experts"][0]] == [1, 2]
    assert len(m["attack_diagnostics"]["label_losses"][0]) == 3
    meta = json.loads((tmp_path / "run" / "poisoning.json").read_text())["metadata"]
    assert meta["regime"] == "head on frozen features" and meta["expert_schedule"] == "authors"
    assert all(0 <= m[k] <= 1 for k in ("clean_accuracy", "attack_success_rate", "asr_without_trigger"))


def test_flip_beats_random_flips_on_digits(tmp_path, monkeypatch):
    """The shipped digits recipe (configs/flip-digits.toml): FLIP's 40 flipped nines against 40 random ones."""
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(2)
    cfg = load_config(CONFIGS / "flip-digits.toml", [f"out={str(tmp_path / 'sweep')!r}", "progress=false",
                                                     "examples=0"])
    rows = {r["method"]: r for r in run_sweep(cfg, [40])}
    flip, rand = rows["flip"], rows["random_flip"]
    clean = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["clean_model"]
    assert clean["attack_success_rate"] < 0.05
    assert flip["poisoned_examples"] == rand["poisoned_examples"] == 40
    assert flip["attack_success_rate"] >= max(0.35, rand["attack_success_rate"] + 0.2)
    # part of it is the flipped nines pulling untriggered nines to 4 too; the trigger must add to that
    assert flip["attack_success_rate"] >= flip["asr_without_trigger"] + 0.15
    assert flip["clean_accuracy"] >= clean["clean_accuracy"] - 0.05


def test_compiled_label_step_gives_the_eager_logits(monkeypatch):
    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: compiled.append(f) or real(f, **kw))
    train = _tiny()
    recipe = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    trig = build_trigger("patch", (1, 8, 8))
    imgs, labels, origin = poisoned_training_set(train.images, train.labels, trig, (2,), 0)
    traj, _ = train_expert(_model(), imgs, labels, recipe, expert_epochs=1, checkpoint_every=2, seed=0,
                           device=torch.device("cpu"), progress=False)
    fs = FunctionalSGD(_model(), recipe)
    data = LabelData.build(train.images, train.labels, imgs, labels, origin, torch.device("cpu"))
    kw = dict(passes=2, batch_size=32, lr=150.0, momentum=0.5, init_scale=5.0, l1=0.0, seed=3, progress=False)
    eager, losses = optimize_labels(fs, [traj], data, 3, Augment(), **kw)
    fast, fast_losses = optimize_labels(fs, [traj], data, 3, Augment(), **kw, compile=True)
    assert compiled == [matching_loss_and_label_grad]
    assert torch.allclose(eager, fast, atol=1e-4) and np.allclose(losses, fast_losses, rtol=1e-4)
    with pytest.raises(ConfigError, match="compile covers the autograd label step"):
        optimize_labels(fs, [traj], data, 3, Augment(), **kw, method="linearized", compile=True)
    with pytest.raises(ConfigError, match="compile covers the autograd label step"):
        build_attack("flip", {"method": "linearized", "compile": True})  # before any work

