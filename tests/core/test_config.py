import tomllib

import pytest

from cleanbackdoor.config import ExperimentConfig, dump_toml, load_config, parse_value
from cleanbackdoor.errors import ConfigError


def test_defaults_are_the_digits_experiment():
    cfg = ExperimentConfig()
    assert cfg.data.name == "digits" and cfg.attack_name == "badnets"
    assert cfg.model.name == "convnet" and cfg.train.epochs == 30


def test_file_then_fields_then_overrides(tmp_path):
    f = tmp_path / "exp.toml"
    f.write_text('seed = 3\n[attack]\nname = "badnets"\nbudget = 40\n[train]\npreset = "flip-cifar"\nepochs = 7\n')
    cfg = load_config(f, ["attack.budget=0.1", "train.lr=0.2", "attack.trigger={name = 'turner'}"], seed=5)
    assert cfg.seed == 5 and cfg.attack["budget"] == 0.1 and cfg.attack["trigger"] == {"name": "turner"}
    assert cfg.train.epochs == 7 and cfg.train.nesterov and cfg.train.lr == 0.2  # the preset, then overrides
    assert cfg.train.milestones == [3, 4]  # the paper's [75, 125] of 200 epochs, moved to a 7-epoch run


def test_resolved_config_round_trips_through_toml():
    cfg = load_config(None, ["train.milestones=[5, 8]", "train.schedule=multistep", "train.epochs=10"])
    text = dump_toml(cfg.model_dump(mode="json"))
    again = ExperimentConfig(**tomllib.loads(text))
    assert again == cfg


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("cifar10") == "cifar10"


@pytest.mark.parametrize("override, message", [
    ("trian.epochs=3", "trian: unknown key"),
    ("train.epochs=0", "train.epochs"),
    ("train.optimizer=adagrad", "train.optimizer"),
    ("train.preset=fast", "unknown training preset 'fast'"),
    ("seed=-1", "seed"),
    ("train.epochs", "key=value"),
])
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_fingerprint_tells_data_apart_by_content_shape_and_dtype():
    import numpy as np

    from cleanbackdoor.cache import fingerprint

    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert fingerprint(a) == fingerprint(a.copy()) == fingerprint(np.asfortranarray(a))
    assert fingerprint(a) != fingerprint(a.reshape(4, 3))  # same bytes, other shape
    assert fingerprint(a) != fingerprint(a.astype(np.int8))  # same values, other dtype
    b = a.copy()
    b[2, 3] += 1
    assert fingerprint(a) != fingerprint(b) and fingerprint(a, b) != fingerprint(b, a)


def test_a_config_extends_another(tmp_path):
    """``extends``: the parent's tables merged key by key, the child's values win; a table naming another component
    or another training preset replaces the parent's; a cycle is one clear error."""
    (tmp_path / "base.toml").write_text('seed = 3\n[train]\nepochs = 7\nlr = 0.2\n'
                                        '[attack]\nname = "flip"\nbudget = 10\nlabel_passes = 4\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[train]\nlr = 0.1\n[attack]\nbudget = 20\n')
    (tmp_path / "other.toml").write_text('extends = "child.toml"\nattack = { name = "badnets", budget = 5 }\n')
    cfg = load_config(tmp_path / "child.toml")
    assert cfg.seed == 3 and (cfg.train.epochs, cfg.train.lr) == (7, 0.1)
    assert cfg.attack == {"name": "flip", "budget": 20, "label_passes": 4}
    assert load_config(tmp_path / "other.toml").attack == {"name": "badnets", "budget": 5}
    (tmp_path / "preset.toml").write_text('extends = "child.toml"\ntrain = { preset = "digits", epochs = 9 }\n')
    train = load_config(tmp_path / "preset.toml").train  # another preset: the parent's lr 0.1 is not kept
    assert (train.epochs, train.lr, train.schedule) == (9, 0.05, "cosine")
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('extends = "missing.toml"\n')
    with pytest.raises(ConfigError, match="missing.toml does not exist"):
        load_config(tmp_path / "c.toml")
