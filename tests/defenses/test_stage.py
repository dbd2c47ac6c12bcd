"""The defenses stage of an experiment (detection, removal + retraining), the attack x defense table, and the
errors a bad `defenses` config gets."""

import json

import numpy as np
import pytest

from cleanbackdoor import experiment
from cleanbackdoor.experiment import defense_stage, run  # noqa: F401 - the modules the test patches
from cleanbackdoor.cli import main
from cleanbackdoor.config import load_config
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.report import percent

FAST = ["train.epochs=5", "examples=0", "clean_baseline=false", "progress=false"]


def _config(tmp_path, defenses):
    text = f"""
seed = 0
out = "{tmp_path / 'run'}"
defenses = {defenses}
[train]
preset = "digits"
epochs = 5
[attack]
name = "badnets"
budget = 0.1
"""
    path = tmp_path / "row.toml"
    path.write_text(text)
    return path


def test_removal_retrains_on_exactly_the_unflagged_examples(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    sizes = []
    real = experiment.train_model

    def spy(cfg, train_set, images, targets, **kw):
        sizes.append(len(images))
        return real(cfg, train_set, images, targets, **kw)

    monkeypatch.setattr(experiment.run, "train_model", spy)  # the victim's training
    monkeypatch.setattr(experiment.defense_stage, "train_model", spy)  # the retraining after removal
    cfg = load_config(None, FAST + [f"out={tmp_path / 'run'}",
                                    'defenses=[{name="spectral", epsilon=0.2}, "strip"]'])
    result = experiment.run_experiment(cfg, echo=False)
    d = result.metrics["defenses"]
    n = result.metrics["train_size"]
    spectral = d["spectral"]
    flagged = spectral["detection"]["flagged"]
    assert sizes == [n, n - flagged]  # the victim, then the retrained model without the flagged examples
    after = spectral["after_removal"]
    assert after["removed"] == flagged
    assert after["poisons_removed"] + after["poisons_left"] == result.metrics["poisoned_examples"]
    assert 0 <= after["clean_accuracy"] <= 1 and 0 <= after["attack_success_rate"] <= 1
    with np.load(result.out / "defenses.npz") as z:
        assert int(z["spectral/flagged"].sum()) == flagged and len(z["spectral/scores"]) == n
    strip = d["strip"]
    assert strip["kind"] == "inference" and "after_removal" not in strip
    assert 0 <= strip["false_rejection_rate"] <= 1
    assert strip["after_rejection"]["attack_success_rate"] <= strip["after_rejection"]["attack_success_rate_before"]
    stored = json.loads((result.out / "metrics.json").read_text())
    assert stored["defenses"]["spectral"]["detection"] == spectral["detection"]
    log = (result.out / "log.txt").read_text()
    assert "defense spectral: flagged" in log and "strip" in log.splitlines()[-2]  # the printed table's last row


def test_defense_table_runs_reuses_and_defends_an_existing_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    row = _config(tmp_path, '["spectral", {name = "strip", overlays = 8}]')
    out = tmp_path / "table"
    argv = ["defense-table", str(row), "--out", str(out), "--quiet", "--set", "examples=0",
            "--set", "clean_baseline=false"]
    assert main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["columns"] == ["spectral", "strip"]
    assert [r["attack"] for r in table["rows"]] == ["badnets"]
    md = (out / "table.md").read_text()
    assert "| badnets (126 changed, 10.0%)" in md and "AUC" in md and "FRR" in md
    row = table["rows"][0]
    assert f"ASR {percent(row['attack_success_rate'])} (noT {percent(row['asr_without_trigger'])}) / CTA" in md
    after = row["defenses"]["spectral"]["after_removal"]
    assert f"ASR {percent(after['attack_success_rate'])} (noT {percent(after['asr_without_trigger'])})" in md
    capsys.readouterr()
    assert main(argv) == 0  # the second time: reused, nothing trained
    assert "reused from" in capsys.readouterr().out
    # a completed run folder as a row, with other defenses: the victim is reused, the run folder untouched
    before = (tmp_path / "run" / "metrics.json").read_text()
    assert main(["defense-table", str(tmp_path / "run"), "--out", str(tmp_path / "t2"), "--quiet",
                 "--set", 'defenses=[{name = "activation_clustering", analysis = "size", retrain = false}]']) == 0
    assert "reusing the victim" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.json").read_text() == before
    t2 = json.loads((tmp_path / "t2" / "table.json").read_text())
    assert t2["columns"] == ["activation_clustering"]
    assert "after_removal" not in t2["rows"][0]["defenses"]["activation_clustering"]


@pytest.mark.parametrize("override, message", [
    ('defenses=["nope"]', "unknown defense 'nope'; allowed: activation_clustering"),
    ('defenses=[{name = "spectral", epsilon = 0.9}]', "epsilon"),
    ('defenses=[{name = "strip", retrain = true}]', "retrain: unknown key"),
    ('defenses=[{epsilon = 0.1}]', "`name` key"),
    ("defenses=3", "a list of defenses"),
])
def test_bad_defense_configs_are_one_line_errors(override, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="defenses"):
        load_config(None, [override])
    assert main(["run", "--quiet", "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # nothing written


def test_table_rows_need_defenses(tmp_path, capsys):
    row = tmp_path / "row.toml"
    row.write_text('[attack]\nname = "badnets"\n')
    assert main(["defense-table", str(row), "--out", str(tmp_path / "t")]) == 2
    assert "lists no defenses" in capsys.readouterr().err


def test_list_defenses(capsys):
    assert main(["list", "defenses"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["activation_clustering", "confident_learning", "spectral", "strip"]


def test_table_rows_key_the_data_by_their_files(tmp_path, monkeypatch):
    """A row names its data by a hash of the files: the same folder written relative or absolute is one experiment
    (its run is reused), another folder's bytes another."""
    from cleanbackdoor.experiment.defense_table import experiment_key

    root = tmp_path / "data" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    (root / "data_batch_1").write_bytes(b"some bytes")
    monkeypatch.chdir(tmp_path)
    key = experiment_key(load_config(None, ['data={name="cifar10", root="data/cifar-10-batches-py"}']))
    assert experiment_key(load_config(None, [f'data={{name="cifar10", root="{root}"}}'])) == key
    (root / "data_batch_1").write_bytes(b"other bytes")
    assert experiment_key(load_config(None, [f'data={{name="cifar10", root="{root}"}}'])) != key
    missing = load_config(None, ['data={name="cifar10", root="nowhere"}'])
    assert experiment_key(missing) != key  # no files: the key keeps the root as written
