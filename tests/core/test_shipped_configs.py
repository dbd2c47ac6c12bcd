from pathlib import Path

import pytest

from cleanbackdoor.attacks import build_attack
from cleanbackdoor.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    build_attack(cfg.attack_name, {k: v for k, v in cfg.attack.items() if k != "name"})


def test_configs_exist():
    assert len(CONFIGS) >= 4
