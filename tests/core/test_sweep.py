import json

from cleanbackdoor.cli import main


def test_sweep_writes_table_plots_and_pairs_each_budget_with_the_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    code = main(["sweep", "--attack", "badnets", "--out", str(out), "--quiet", "--budgets", "10,30",
                 "--set", "train.epochs=2",
                 "--set", "attack.trigger={name = 'turner'}", "--set", "examples=0"])
    assert code == 0
    summary = json.loads((out / "sweep.json").read_text())
    points = {(p["method"], p["budget"]) for p in summary["points"]}
    assert points == {("badnets", 10), ("badnets", 30), ("random_flip", 10), ("random_flip", 30)}
    assert all(0 <= p["asr_without_trigger"] <= 1 for p in summary["points"])
    assert summary["clean_model"]["clean_accuracy"] > 0
    for name in ("asr_vs_cta.png", "budget_curves.png", "sweep.txt"):
        assert (out / name).exists()
    # the baseline is measured with the attack's trigger, and the clean model was trained once
    cfg = (out / "random_flip-10" / "poisoning.json").read_text()
    assert '"turner"' in cfg
    logs = [(out / f"{m}-{b}" / "log.txt").read_text() for m, b in points]
    assert sum("loaded from cache" in log for log in logs) == 3


def test_sweep_baselines_are_chosen_and_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), "--quiet", "--budgets", "10", "--set", "train.epochs=1", "--set", "examples=0",
            "--set", "attack={name = 'random_flip'}"]
    assert main([*args, "--baselines", "random_flip,inner_product"]) == 0
    points = {p["method"]: p for p in json.loads((out / "sweep.json").read_text())["points"]}
    assert set(points) == {"random_flip", "inner_product"}  # the attack itself is not repeated as a baseline
    inner = json.loads((out / "inner_product-10" / "poisoning.json").read_text())
    assert inner["attack"] == "inner_product" and points["inner_product"]["poisoned_examples"] == 10
    capsys.readouterr()
    assert main([*args, "--baselines", "random_flip,best"]) == 2
    assert "unknown sweep baseline 'best'" in capsys.readouterr().err
