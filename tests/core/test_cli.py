import pytest
import torch

from cleanbackdoor.cli import main


@pytest.mark.parametrize("argv, message", [
    (["run", "--attack", "nope"], "unknown attack 'nope'; allowed: badnets"),
    (["run", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["run", "--model", "resnet99"], "unknown model 'resnet99'"),
    (["run", "--set", "train.epochs=-2"], "train.epochs"),
    (["run", "--set", "attack.budget=5000"], "budget 5000"),
    (["run", "--set", "attack.target=99"], "no class 99"),
    (["run", "--set", "colour=red"], "colour: unknown key"),
    (["sweep", "--budgets", "1,x"], "--budgets"),
    (["sweep", "--budgets", "10", "--baselines", "zebra"], "unknown sweep baseline 'zebra'"),
    (["sweep", "--budgets", "10", "--seeds", "0,a"], "--seeds"),
    (["run", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "device 'cuda"),
    (["run", "--device", "abacus"], "unknown device 'abacus'"),
    (["run", "--attack", "flip", "--set", "attack.expert_train={preset='nope'}"], "unknown expert_train preset"),
    (["run", "--attack", "inner_product", "--set", "attack.space='features'"], "space = 'features' needs"),
])
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # later --set values win, so the test's own override comes after the fast-run defaults
    code = main(argv[:1] + ["--quiet", "--set", "train.epochs=1"] + argv[1:])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_list(capsys):
    assert main(["list", "attacks"]) == 0
    assert "badnets" in capsys.readouterr().out.split()
