"""Recipes: ``cleanbackdoor run --attack NAME`` with nothing else runs a recipe that fires on the embedded data, and
``cleanbackdoor reproduce --scale small`` puts the five of them in one table (issue 21)."""

import json

import pytest
import torch

from cleanbackdoor.attacks import recipe
from cleanbackdoor.cli import main
from cleanbackdoor.config import load_config
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.reproduce import SCALES

SMALL = {row.attack: row for row in SCALES["small"]}


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """Each attack run from the command line with only its name (FLIP with nothing at all: the default), from an
    empty cache, into the folders ``reproduce --scale small`` uses; then ``reproduce`` over the same folder."""
    root = tmp_path_factory.mktemp("recipes")
    mp = pytest.MonkeyPatch()
    mp.setenv("CLEANBACKDOOR_CACHE", str(root / "cache"))
    torch.set_num_threads(2)
    try:
        for name, row in SMALL.items():
            argv = ["run"] + ([] if name == "flip" else ["--attack", name])
            assert main([*argv, "--out", str(root / f"{name}-{row.recipe}"), "--quiet"]) == 0
        assert main(["reproduce", "--scale", "small", "--out", str(root), "--quiet"]) == 0
    finally:
        mp.undo()
    return root


@pytest.mark.parametrize("name", list(SMALL))
def test_run_with_only_the_attack_name_fires_on_digits(recipe_runs, name):
    m = json.loads((recipe_runs / f"{name}-digits" / "metrics.json").read_text())
    assert m["attack"] == name
    clean = m["clean_model"]
    # label-flipping attacks and multi-label: 40 points above the clean model; the hidden trigger: 20
    assert m["attack_success_rate"] >= clean["attack_success_rate"] + SMALL[name].margin
    if "asr_without_trigger" in m:  # and the trigger does the work
        assert m["attack_success_rate"] > m["asr_without_trigger"] + 0.2
    log = (recipe_runs / f"{name}-digits" / "log.txt").read_text()
    assert f"the {name} recipe for digits" in log
    if name == "multilabel":  # it says which data it took
        assert m["dataset"] == "digits-mosaic" and "multi-label counterpart of digits" in log


def test_reproduce_small_reads_the_runs_back_and_tables_every_row(recipe_runs):
    data = json.loads((recipe_runs / "reproduce.json").read_text())
    rows = {r["attack"]: r for r in data["rows"]}
    assert list(rows) == list(SMALL)
    for name, r in rows.items():
        assert r["fired"], name
        assert r["paper"]["source"] and r["paper"]["text"]
        m = json.loads((recipe_runs / f"{name}-digits" / "metrics.json").read_text())
        assert r["asr"] == m["attack_success_rate"]  # read back, not run again
        assert r["command"] == f"cleanbackdoor run --attack {name} --dataset digits"
    table = (recipe_runs / "reproduce.md").read_text()
    assert table.count("| yes (+") == len(SMALL)
    assert (recipe_runs / "reproduce.png").stat().st_size > 0


def test_recipe_fills_in_the_names_and_configs_can_extend_it(tmp_path):
    r = recipe("multilabel", "digits")
    assert r["attack"]["name"] == "multilabel" and r["data"]["name"] == "digits-mosaic"
    assert recipe("flip", "imagenet") is None
    path = tmp_path / "mine.toml"
    path.write_text('extends = "recipe:flip/digits"\nseed = 3\n[attack]\nbudget = 20\n')
    cfg = load_config(path)
    assert cfg.seed == 3 and cfg.attack["budget"] == 20 and cfg.attack["label_lr"] == recipe("flip", "digits")[
        "attack"]["label_lr"]
    path.write_text('extends = "recipe:flip/imagenet"\n')
    with pytest.raises(ConfigError, match="no recipe 'imagenet'; its recipes: cifar10, cifar10-paper, digits"):
        load_config(path)


def test_a_dataset_without_a_recipe_takes_the_attack_defaults():
    cfg = load_config(None, recipe=True, **{"attack.name": "flip", "data.name": "mnist"})
    assert cfg.attack == {"name": "flip"}
    assert "no recipe for 'mnist'" in cfg.recipe_note
    assert load_config(None, recipe=True).attack == recipe("flip", "digits")["attack"]  # the default attack


@pytest.mark.parametrize("argv, message", [
    (["run", "--attack", "flip", "--recipe", "cifar10-big"], "no recipe 'cifar10-big'"),
    (["run", "x.toml", "--recipe", "cifar10-paper"], "--recipe starts a run without a config file"),
    (["reproduce", "--scale", "cpu"], "give its location with --root cifar10=PATH"),
    (["reproduce", "--root", "cifar10"], "--root takes DATASET=PATH"),
])
def test_recipe_and_reproduce_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
