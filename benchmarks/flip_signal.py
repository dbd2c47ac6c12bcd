"""How much of the trigger does FLIP's label optimization find? A diagnostic for small-scale FLIP runs.

FLIP's flips are only as good as the ordering of its margin scores. At small scale that ordering can be mostly
noise; this script measures it, in one run, on the source-class training images:
- run-to-run: the mean Spearman correlation of the label margin (L_target - L_source) between independent label
  runs (1 = every run orders the images alike, 0 = each run is a fresh draw);
- trigger: the Spearman correlation of the margin averaged over the runs with the images' projection on the
  trigger direction (the mean of trigger(x) - x over the source images), the feature a label-only backdoor
  must teach;
- victims at each budget, trained with the config's recipe: FLIP's flips (the paper's min-over-runs score),
  the same number of random source images flipped (the `random_flip` attack, as in `cleanbackdoor sweep`), and
  the source images of largest trigger projection flipped (the `inner_product` attack: the attacker knows its
  trigger, so this is a label-only attack too). It shows what a label-only backdoor can reach at this scale
  without trajectory matching.

    PYTHONPATH=src python benchmarks/flip_signal.py [configs/flip-digits.toml] [--runs 10] [--budgets 20,40]
        [--set attack.label_passes=20 ...]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from scipy.stats import spearmanr

from cleanbackdoor.attacks import build_attack
from cleanbackdoor.attacks.base import AttackContext
from cleanbackdoor.attacks.flip import select_flips
from cleanbackdoor.attacks.inner_product import trigger_alignment
from cleanbackdoor.config import load_config
from cleanbackdoor.experiment import evaluate, load_data, train_model
from cleanbackdoor.metrics import asr_eligible


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default="configs/flip-digits.toml")
    ap.add_argument("--runs", type=int, default=10, help="label-optimization runs (at least 2)")
    ap.add_argument("--budgets", default="20,40")
    ap.add_argument("--root", default=None)
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--fresh", action="store_true", help="do not reuse cached experts and labels")
    args = ap.parse_args()
    overrides = [*args.overrides, "progress=false", f"attack.label_runs={args.runs}"]
    if args.root:
        overrides.append(f"data.root={args.root!r}")
    cfg = load_config(args.config, overrides)
    if cfg.attack_name != "flip" or args.runs < 2:
        raise SystemExit("needs a FLIP config and --runs >= 2")
    splits = load_data(cfg)
    train, test = splits.train, splits.test
    attack = build_attack("flip", {k: v for k, v in cfg.attack.items() if k != "name"})
    cache = tempfile.mkdtemp() if args.fresh else cfg.cache_path()
    ctx = AttackContext(cache_dir=cache, device=cfg.device, progress=False, log=lambda _: None,
                        model=cfg.model, train=cfg.train)
    poisoning = attack.poison(train, seed=cfg.seed, context=ctx)
    target, trigger = poisoning.target, poisoning.activation
    src = np.flatnonzero(asr_eligible(train.labels, target, poisoning.sources))

    projection = trigger_alignment(train.images[src], trigger)
    margins = [run[src, target] - run[src, train.labels[src]] for run in poisoning.diagnostics["label_runs"]]
    pairs = [spearmanr(margins[i], margins[j]).statistic
             for i in range(len(margins)) for j in range(i + 1, len(margins))]
    trigger_rho = spearmanr(np.mean(margins, 0), projection).statistic
    single_rho = float(np.mean([spearmanr(m, projection).statistic for m in margins]))
    print(f"{cfg.data.name}: {len(src)} source images, {args.runs} label runs")
    print(f"run-to-run margin correlation (mean over pairs): {np.mean(pairs):.2f}")
    print(f"margin vs trigger projection: {single_rho:.2f} for one run, {trigger_rho:.2f} for the mean of {args.runs}")

    sources = list(poisoning.sources) if poisoning.sources else "all"

    def victim(labels: np.ndarray) -> str:  # measured as every run is, with FLIP's trigger
        model = train_model(cfg, train, train.images, labels, desc="victim")
        m = evaluate(model, test, attack, poisoning)
        return " / ".join(f"{100 * m[k]:5.1f}" for k in ("clean_accuracy", "attack_success_rate",
                                                           "asr_without_trigger"))

    print("victims: CTA / ASR / ASR without the trigger")
    print(f"{'budget':>6} | {'FLIP':>21} | {'random':>21} | {'inner product':>21}")
    for budget in (int(b) for b in args.budgets.split(",")):
        flip_labels, _ = select_flips(poisoning.diagnostics["scores"], poisoning.diagnostics["logits"], train.labels,
                                      budget)
        # the sweep's baselines at the same budget and seed
        shared = {"target": target, "sources": sources, "budget": budget}
        if "trigger" in cfg.attack:
            shared["trigger"] = cfg.attack["trigger"]
        rand = build_attack("random_flip", shared).poison(train, seed=cfg.seed).labels
        inner = build_attack("inner_product", shared).poison(train, seed=cfg.seed).labels
        print(f"{budget:>6} | {victim(flip_labels):>21} | {victim(rand):>21} | {victim(inner):>21}", flush=True)


if __name__ == "__main__":
    main()
