"""Budget sweeps: one attack at several budgets, next to label-only baselines at the same budgets.

The baselines (``baselines``, default ``("random_flip",)``) take the attack's target, sources and trigger:
``random_flip`` flips random source images, ``inner_product`` the source images most aligned with the trigger.

Every point is an ordinary experiment (:func:`~cleanbackdoor.experiment.run_experiment`) in its own sub-folder,
so it is measured exactly like a single run. Expensive products are cached by the experiment and the attacks: the
clean model is trained once, FLIP's experts and label logits once; each budget then only trains a victim. The
sweep writes ``sweep.json``, prints a table, and draws the FLIP paper's main figure (ASR against CTA, one point
per budget) and ASR/CTA against the budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cleanbackdoor.config import ExperimentConfig
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.experiment import run_experiment
from cleanbackdoor.report import percent, plot_budget_curves, plot_tradeoff, sweep_table

BASELINES = ("random_flip", "inner_product")
# what a baseline copies from the attack so both are measured on the same backdoor
_SHARED_KEYS = ("target", "sources", "trigger")


def run_sweep(cfg: ExperimentConfig, budgets: list[int | float],
              baselines: tuple[str, ...] = ("random_flip",)) -> list[dict[str, Any]]:
    for name in baselines:
        if name not in BASELINES:
            raise ConfigError(f"unknown sweep baseline {name!r}; choose from {', '.join(BASELINES)}")
    out = cfg.output_dir() if cfg.out else Path(f"runs/sweep-{cfg.attack_name}-{cfg.data.name}-seed{cfg.seed}")
    out.mkdir(parents=True, exist_ok=True)
    methods = [(cfg.attack_name, dict(cfg.attack))]
    for name in dict.fromkeys(baselines):
        if name == cfg.attack_name:
            continue
        base = {"name": name}
        base.update({k: v for k, v in _attack_defaults(cfg).items() if k in _SHARED_KEYS})
        base.update({k: v for k, v in cfg.attack.items() if k in _SHARED_KEYS})
        methods.append((name, base))
    rows, clean = [], None
    for budget in budgets:
        for method, attack in methods:
            point = cfg.model_copy(update={"attack": {**attack, "budget": budget},
                                           "out": str(out / f"{method}-{budget}")})
            result = run_experiment(point, echo=False)
            m = result.metrics
            rows.append({"method": method, "budget": m["budget"], "poisoned_examples": m["poisoned_examples"],
                         "clean_accuracy": m["clean_accuracy"], "attack_success_rate": m["attack_success_rate"],
                         "asr_without_trigger": m.get("asr_without_trigger"),
                         "poison_fit_rate": m.get("poison_fit_rate")})
            clean = m.get("clean_model") or clean
            print(f"{method} at budget {budget}: CTA {100 * m['clean_accuracy']:.1f}%, "
                  f"ASR {100 * m['attack_success_rate']:.1f}%", flush=True)
    summary = {"attack": cfg.attack_name, "dataset": cfg.data.name, "model": cfg.model.name, "seed": cfg.seed,
               "budget_unit": "training examples", "points": rows, "clean_model": clean}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    table = sweep_table(rows, [("method", "method"), ("budget", "budget"), ("clean_accuracy", "CTA"),
                               ("attack_success_rate", "ASR"), ("asr_without_trigger", "ASR no trigger"),
                               ("poison_fit_rate", "poisons fit")])
    if clean:
        table += (f"\nclean model: CTA {percent(clean['clean_accuracy'])}, "
                  f"ASR {percent(clean['attack_success_rate'])}, "
                  f"ASR without the trigger {percent(clean.get('asr_without_trigger'))}")
    (out / "sweep.txt").write_text(table + "\n")
    print(table)
    title = f"{cfg.attack_name} on {cfg.data.name} ({cfg.model.name}), budget = labels changed"
    plot_tradeoff(rows, out / "asr_vs_cta.png", title, clean)
    plot_budget_curves(rows, out / "budget_curves.png", title)
    print(f"results: {out}")
    return rows


def _attack_defaults(cfg: ExperimentConfig) -> dict[str, Any]:
    from cleanbackdoor.attacks import ATTACKS

    params = ATTACKS[cfg.attack_name].Params()
    return params.model_dump(mode="json")
