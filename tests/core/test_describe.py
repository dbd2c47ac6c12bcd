"""``cleanbackdoor describe NAME``: every component's parameters with type, default and a description read from
where the parameter is declared (issue 21)."""

import functools
import os

import pytest

from cleanbackdoor.attacks import ATTACKS
from cleanbackdoor.attacks.flip import FlipParams
from cleanbackdoor.cli import main
from cleanbackdoor.describe import describe, parameters, registries
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.models import MODELS

COMPONENTS = [(kind, name) for kind, registry in registries().items() for name in registry]


@pytest.mark.parametrize(("kind", "name"), COMPONENTS, ids=[f"{k}-{n}" for k, n in COMPONENTS])
def test_every_parameter_has_a_description(kind, name):
    params = parameters(registries()[kind][name])
    missing = [p.name for p in params if not p.description.strip()]
    assert not missing, f"{kind} {name!r}: parameters without a description: {missing}"


def test_describe_flip_lists_every_parameter_with_its_description_and_the_recipes(capsys):
    assert main(["describe", "flip"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flip (attack)\n") and "Jha, Hayase, Oh" in out
    for name, info in FlipParams.model_fields.items():
        line = next(x for x in out.splitlines() if x.split()[:1] == [name])
        assert info.description.split()[0] in line, line
    assert "label_passes" in out and "default 5" in out
    for key in ATTACKS["flip"].recipes:
        assert f"\n  {key}: " in out


def test_a_model_shows_its_options_and_what_its_name_fixes():
    assert isinstance(MODELS["resnet20"], functools.partial)
    text = describe("resnet20")
    assert "fixed here: depth=20" in text
    names = [p.name for p in parameters(MODELS["resnet20"])]
    assert "pool" in names and "depth" not in names and "in_channels" not in names


def test_a_trigger_leaves_out_what_the_experiment_gives_it():
    names = [p.name for p in parameters(registries()["trigger"]["patch"])]
    assert names[:2] == ["size", "position"] and "seed" not in names and "image_shape" not in names
    assert 'default "bottom-right"' in describe("patch")


def test_an_unknown_name_is_one_line_and_exit_2(capsys):
    with pytest.raises(ConfigError, match="unknown attack, defense, trigger or model 'flop'"):
        describe("flop")
    assert main(["describe", "flop"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flip" in err


def test_a_reader_that_goes_away_is_not_an_error():
    """``cleanbackdoor describe flip | head -1``: once the reader has closed the pipe, the command stops quietly
    (exit 0) instead of printing a BrokenPipeError traceback."""
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written
    proc = subprocess.run([sys.executable, "-m", "cleanbackdoor", "describe", "flip"], stdout=w,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(w)
    assert proc.returncode == 0 and proc.stderr == ""
