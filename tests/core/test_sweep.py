import json

from cleanbackdoor.cli import main


def test_sweep_writes_table_plots_and_pairs_each_budget_with_the_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    code = main(["sweep", "--out", str(out), "--quiet", "--budgets", "10,30", "--set", "train.epochs=2",
                 "--set", "attack.trigger={name = 'turner'}", "--set", "examples=0"])
    assert code == 0
    summary = json.loads((out / "sweep.json").read_text())
    points = {(p["method"], p["budget"]) for p in summary["points"]}
    assert points == {("badnets", 10), ("badnets", 30), ("random_flip", 10), ("random_flip", 30)}
    assert summary["clean_model"]["clean_accuracy"] > 0
    for name in ("asr_vs_cta.png", "budget_curves.png", "sweep.txt"):
        assert (out / name).exists()
    # the baseline is measured with the attack's trigger, and the clean model was trained once
    cfg = (out / "random_flip-10" / "poisoning.json").read_text()
    assert '"turner"' in cfg
    logs = [(out / f"{m}-{b}" / "log.txt").read_text() for m, b in points]
    assert sum("loaded from cache" in log for log in logs) == 3
