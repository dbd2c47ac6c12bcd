"""Transfer-learning victims: class selection, the cached pretrained extractor, fine-tuning of the last layer."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cleanbackdoor.cache import model_file
from cleanbackdoor.cli import main
from cleanbackdoor.config import load_config
from cleanbackdoor.specs import ModelConfig
from cleanbackdoor.data import ImageSet, load_dataset
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.models import build_model
from cleanbackdoor.pretrain import (pretrain_key, pretrained_model, select_classes, source_task,
                                   victim_from_pretrained)
from cleanbackdoor.training import train
from cleanbackdoor.recipes import TrainConfig

PRETRAIN = 'model.pretrained={classes=[0, 1, 2, 3, 4], train={preset="digits", epochs=8}}'
VICTIM = 'train={preset="digits", epochs=10, finetune="last"}'


def _cfg(cache, *extra):
    return load_config(None, ["model.options={width=16}", PRETRAIN, f'cache_dir="{cache}"', *extra])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the digits extractor is pretrained once."""
    return tmp_path_factory.mktemp("pretrain-cache")


def test_select_classes_relabels_in_the_given_order():
    images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4, 1)
    s = ImageSet(images, np.array([0, 1, 2, 0, 1, 2]), ("a", "b", "c"))
    sub = select_classes(s, ["c", 0])
    assert sub.class_names == ("c", "a")
    assert sub.labels.tolist() == [1, 0, 1, 0]
    assert np.array_equal(sub.images, images[[0, 2, 3, 5]])
    with pytest.raises(ConfigError, match="twice"):
        select_classes(s, ["a", 0])
    with pytest.raises(ConfigError, match="no class 'zebra'"):
        select_classes(s, ["a", "zebra"])


def test_config_resolves_the_source_task_and_keeps_old_cache_keys():
    cfg = load_config(None, ["data.classes=[5, 6]", 'model.pretrained={classes=[0, 1]}', 'train.finetune="last"'])
    assert cfg.model.pretrained.dataset == "digits"  # the experiment's dataset unless named
    assert cfg.model.pretrained.train.epochs == 12  # the default recipe, cifar-fast
    # options added for transfer learning stay out of dumps at their defaults: existing cache keys are unchanged
    plain = load_config(None)
    assert "pretrained" not in plain.model.model_dump() and "classes" not in plain.data.model_dump()
    assert "finetune" not in plain.train.model_dump()
    with pytest.raises(ConfigError, match="whole network"):
        load_config(None, ['model.pretrained={train={finetune="last"}}'])
    with pytest.raises(ConfigError, match="finetune"):
        load_config(None, ['train.finetune="first"'])


def test_pretrained_model_is_cached_under_its_inputs(cache):
    cfg = _cfg(cache)
    logs: list[str] = []
    first = pretrained_model(cfg.model, cache_dir=cfg.cache_path(), device="cpu", progress=False, log=logs.append)
    assert first.head.out_features == 5 and first.source_task["source_test_accuracy"] > 0.5
    again = pretrained_model(cfg.model, cache_dir=cfg.cache_path(), device="cpu", progress=False, log=logs.append)
    assert "loaded from cache" in logs[-1]
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(first.normalize.mean, again.normalize.mean)
    other = _cfg(cache, 'model.pretrained={classes=[0, 1, 2], train={preset="digits", epochs=8}}')
    assert pretrain_key(other.model) != pretrain_key(cfg.model)
    with pytest.raises(ConfigError, match="no pretrained"):
        pretrain_key(ModelConfig())
    unresolved = ModelConfig(pretrained={"classes": [0, 1]})  # built directly, not through load_config
    with pytest.raises(ConfigError, match="not resolved"):
        pretrain_key(unresolved)
    with pytest.raises(ConfigError, match="not resolved"):
        source_task(unresolved.pretrained)


def test_an_extractor_kept_in_a_seed_folder_is_copied_into_an_empty_cache(cache, tmp_path, monkeypatch):
    """A fresh machine with artifacts/ (here a seed folder) loads the kept extractor instead of pretraining."""
    cfg = _cfg(cache)
    first = pretrained_model(cfg.model, cache_dir=cfg.cache_path(), device="cpu", progress=False, log=lambda _: None)
    kept = model_file(cfg.cache_path(), "pretrained", pretrain_key(cfg.model))
    seeds = tmp_path / "artifacts"
    seeds.mkdir()
    shutil.copyfile(kept, seeds / kept.name)
    monkeypatch.setenv("CLEANBACKDOOR_SEEDS", str(seeds))
    logs: list[str] = []
    again = pretrained_model(cfg.model, cache_dir=tmp_path / "empty", device="cpu", progress=False, log=logs.append)
    assert "copied from" in logs[0] and "loaded from cache" in logs[1] and len(logs) == 2  # no training
    assert (tmp_path / "empty" / kept.relative_to(cfg.cache_path())).is_file()
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_victim_keeps_the_extractor_and_fine_tuning_the_last_layer_trains_only_the_head(cache):
    cfg = _cfg(cache)
    extractor = pretrained_model(cfg.model, cache_dir=cfg.cache_path(), device="cpu", progress=False,
                                 log=lambda _: None)
    victim = victim_from_pretrained(extractor, (1, 8, 8), 3, seed=0)
    assert victim.head.out_features == 3
    assert torch.equal(victim.normalize.std, extractor.normalize.std)
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    digits = load_dataset("digits").train
    task = select_classes(digits, [5, 6, 7])
    train(victim, task.images, task.labels, TrainConfig(epochs=2, batch_size=64, lr=0.05, finetune="last"),
          progress=False)
    after = victim.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("head."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert all(torch.equal(a, b) for a, b in zip(extractor.state_dict().values(),
                                                  pretrained_model(cfg.model, cache_dir=cfg.cache_path(),
                                                                   progress=False, log=lambda _: None)
                                                  .state_dict().values()))  # the cached extractor is untouched
    with pytest.raises(ConfigError, match="takes"):
        victim_from_pretrained(extractor, (3, 8, 8), 3, seed=0)
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    with pytest.raises(ConfigError, match="head"):
        train(plain, task.images, task.labels, TrainConfig(epochs=1, finetune="last"), progress=False)


def test_finetune_last_keeps_batch_norm_statistics_frozen():
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 8, 8), 2, width=4)
    bn = model.backbone.stem_bn
    stats = bn.running_mean.clone()
    images = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    train(model, images, np.arange(32) % 2, TrainConfig(epochs=1, batch_size=16, finetune="last"), progress=False)
    assert torch.equal(bn.running_mean, stats)


def test_experiment_with_a_pretrained_victim(tmp_path, monkeypatch):
    """The whole pipeline: source-task pretraining (cached), a victim fine-tuning its last layer on other classes."""
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))  # a fresh cache: this run pretrains
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--attack", "badnets", "--quiet", "--set", "examples=0",
            "--set", "model.options={width=16}",
            "--set", PRETRAIN, "--set", "data.classes=[5, 6, 7, 8, 9]", "--set", VICTIM,
            "--set", "attack.budget=40", "--set", "attack.target=0"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "pretrain" in m["seconds"]
    assert m["clean_model"]["clean_accuracy"] > 0.4  # transferred features are useful on new classes (chance: 0.2)
    assert "pretrained extractor: training" in (out / "log.txt").read_text()
    features = sorted((tmp_path / "cache" / "features").glob("*/shard-*.pt"))  # the frozen extractor's, kept
    assert len({f.parent for f in features}) == 1  # one extractor, one view (no flips)
    assert main(args[:2] + [str(tmp_path / "run2")] + args[3:]) == 0
    assert "pretrained extractor: loaded from cache" in (tmp_path / "run2" / "log.txt").read_text()
    assert sorted((tmp_path / "cache" / "features").glob("*/shard-*.pt")) == features  # reused, nothing added
    again = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    for k in ("clean_accuracy", "attack_success_rate", "poison_fit_rate"):  # the same victim from cached features
        assert again[k] == m[k], k


def test_victim_on_larger_images_takes_every_backbone_weight(cache):
    """A mosaic victim (2x2 grids of source-sized images) keeps the fully convolutional extractor: the architecture
    is rebuilt for its size, every backbone weight is the extractor's, and the head (here an MLP) is fresh."""
    cfg = _cfg(cache)
    extractor = pretrained_model(cfg.model, cache_dir=cfg.cache_path(), device="cpu", progress=False,
                                 log=lambda _: None)
    victim = victim_from_pretrained(extractor, (1, 16, 16), 4, seed=0, head_hidden=8)
    source = extractor.state_dict()
    backbone = {k: v for k, v in victim.state_dict().items() if not k.startswith("head.")}
    assert backbone.keys() == {k for k in source if not k.startswith("head.")}
    assert all(torch.equal(v, source[k]) for k, v in backbone.items())
    assert torch.equal(victim.normalize.mean, extractor.normalize.mean)
    assert victim.head[0].in_features == 16 * 2 * 2 and victim.head[-1].out_features == 4  # a 2x2 feature map
    assert victim(torch.rand(2, 1, 16, 16)).shape == (2, 4)
    again = victim_from_pretrained(extractor, (1, 16, 16), 4, seed=0, head_hidden=8)
    assert all(torch.equal(a, b) for a, b in zip(victim.head.parameters(), again.head.parameters()))  # seeded


def test_a_size_dependent_extractor_is_refused_on_other_sizes():
    torch.manual_seed(0)
    extractor = build_model("convnet", (1, 8, 8), 5, width=4, hidden=6)
    extractor.source_task = {"image_shape": (1, 8, 8), "class_names": list("abcde"), "model": "convnet",
                             "options": {"width": 4, "hidden": 6}}
    assert victim_from_pretrained(extractor, (1, 8, 8), 3, seed=0).head.in_features == 6  # same size: fine
    with pytest.raises(ConfigError, match="depend on that size"):
        victim_from_pretrained(extractor, (1, 16, 16), 3, seed=0)


def test_pretrained_root_defaults_to_the_data_root(tmp_path):
    cfg = load_config(None, ['data={name="digits-mosaic", root="somewhere"}',
                             'model.pretrained={dataset="digits", train={preset="digits", epochs=1}}'])
    assert cfg.model.pretrained.root == "somewhere" and cfg.model.pretrained.options == {}
    head = load_config(None, ['model.options={width=8, head_hidden=16}', PRETRAIN])
    assert pretrain_key(head.model) == pretrain_key(load_config(None, ['model.options={width=8}', PRETRAIN]).model)


def test_a_victim_may_pool_the_extractor_over_a_grid():
    torch.manual_seed(0)
    extractor = build_model("resnet20", (3, 8, 8), 5, width=4).eval()
    extractor.source_task = {"image_shape": (3, 8, 8), "class_names": list("abcde"), "model": "resnet20",
                             "options": {"width": 4}}
    victim = victim_from_pretrained(extractor, (3, 16, 16), 3, seed=0, pool=2, head_hidden=5).eval()
    assert victim.backbone.feature_dim == 16 * 4 and victim.head[0].in_features == 64
    source = extractor.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in victim.state_dict().items() if not k.startswith("head."))
    same = victim_from_pretrained(extractor, (3, 8, 8), 3, seed=0, pool=2)  # same size, another grid
    assert same.backbone.pool == 2 and extractor.backbone.pool == 1
    grid = load_config(None, ['model={name="resnet20", options={width=4, pool=2, head_hidden=8}}', PRETRAIN])
    plain = load_config(None, ['model={name="resnet20", options={width=4}}', PRETRAIN])
    assert pretrain_key(grid.model) == pretrain_key(plain.model)  # one extractor for every victim-side option


@pytest.mark.parametrize("config, overrides", [
    ("configs/flip-cifar10-transfer.toml", []),  # the 60-epoch extractor, also the mosaic config's
    ("configs/multilabel-cifar10-mosaic-transfer.toml", ["model.pretrained.train.epochs=30"]),
])
def test_the_kept_extractors_are_named_by_their_configs_keys(shared_data, config, overrides):
    """artifacts/ holds extractors under their cache keys: a change to the key (its inputs or the pretrained kind's
    code version) leaves them unused, and a fresh machine would pretrain for hours. Rename them when that is meant."""
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / config, [f'data.root="{shared_data / "cifar10-jpg.tar.gz"}"', *overrides])
    assert (repo / "artifacts" / f"pretrained-{pretrain_key(cfg.model)}.pt").is_file()
