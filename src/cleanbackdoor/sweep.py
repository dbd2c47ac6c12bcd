"""Budget sweeps: one attack at several budgets, next to baselines at the same budgets, over one or more seeds.

The baselines (``baselines``, default ``("random_flip",)``) take the attack's target, sources and trigger:
``random_flip`` flips random source images, ``inner_product`` the source images most aligned with the trigger
(both label-only), and ``badnets`` stamps the trigger on as many source images and relabels them: the dirty-label
bound that no label-only attack can beat in the same setting (with it in the sweep, the points skip the
per-run dirty-label control, which would train the same model again).

Every point is an ordinary experiment (:func:`~cleanbackdoor.experiment.run_experiment`) in its own sub-folder,
so it is measured exactly like a single run. Expensive products are cached by the experiment and the attacks: the
clean model is trained once per seed, FLIP's experts and label logits once per seed; each budget then only trains
a victim. The sweep writes ``sweep.json`` (every point, and with several seeds the mean and standard deviation of
each figure per method and budget), prints a table, and draws the FLIP paper's main figure (ASR against CTA, one
point per budget) and ASR/CTA against the budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cleanbackdoor.attacks import ATTACKS
from cleanbackdoor.config import ExperimentConfig
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.executor import Executor, Job, Serial
from cleanbackdoor.experiment import experiment_metrics
from cleanbackdoor.report import percent, plot_budget_curves, plot_tradeoff, sweep_table

BASELINES = ("random_flip", "inner_product", "badnets")
# what a baseline copies from the attack so both are measured on the same backdoor
_SHARED_KEYS = ("target", "sources", "trigger")
FIGURES = ("clean_accuracy", "attack_success_rate", "asr_without_trigger", "poison_fit_rate")


def run_sweep(cfg: ExperimentConfig, budgets: list[int | float], baselines: tuple[str, ...] = ("random_flip",),
              seeds: list[int] | None = None, executor: Executor | None = None) -> list[dict[str, Any]]:
    """Run the sweep; returns one row per method and budget (with several seeds: the mean over them, and the
    standard deviation of each figure as ``<figure>_std``). ``executor``: how the points run
    (:mod:`cleanbackdoor.executor`; default one after another in this process, Ray tasks with ``RayExecutor``).
    Points finished by an earlier, interrupted sweep with the same settings are read back."""
    for name in baselines:
        if name not in BASELINES:
            raise ConfigError(f"unknown sweep baseline {name!r}; choose from {', '.join(BASELINES)}")
    seeds = list(dict.fromkeys(seeds)) if seeds else [cfg.seed]
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
    control = cfg.dirty_label_control and "badnets" not in baselines
    plan = []
    for seed in seeds:
        for budget in budgets:
            for method, attack in methods:
                name = f"{method}-{budget}" + (f"-seed{seed}" if len(seeds) > 1 else "")
                point = cfg.model_copy(update={"attack": {**attack, "budget": budget}, "seed": seed,
                                               "out": str(out / name), "dirty_label_control": control})
                plan.append((method, budget, seed, point))
    jobs = [Job(f"{method} at budget {budget}, seed {seed}", experiment_metrics, (point,))
            for method, budget, seed, point in plan]
    points, cleans = [], {}
    for (method, budget, seed, _), m in zip(plan, (executor or Serial()).map(jobs, "sweep")):
        row = {"method": method, "budget": m["budget"], "seed": seed,
               "poisoned_examples": m["poisoned_examples"], **{k: m.get(k) for k in FIGURES}}
        if m.get("dirty_label_control"):
            row["dirty_label_asr"] = m["dirty_label_control"]["attack_success_rate"]
        points.append(row)
        cleans[seed] = m.get("clean_model") or cleans.get(seed)
        print(f"{method} at budget {budget}, seed {seed}: CTA {percent(m['clean_accuracy'])}, "
              f"ASR {percent(m['attack_success_rate'])}", flush=True)
    rows = summarize(points) if len(seeds) > 1 else points
    clean = _mean_clean([c for c in cleans.values() if c])
    summary = {"attack": cfg.attack_name, "dataset": cfg.data.name, "model": cfg.model.name, "seeds": seeds,
               "budget_unit": "training examples", "rows": rows, "points": points, "clean_model": clean,
               "clean_models": {str(k): v for k, v in cleans.items()}}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    spread = len(seeds) > 1
    columns = [("method", "method"), ("budget", "budget")]
    columns += [(k, t) for k, t in (("clean_accuracy", "CTA"), ("attack_success_rate", "ASR"),
                                    ("asr_without_trigger", "ASR no trigger"), ("poison_fit_rate", "poisons fit"),
                                    ("dirty_label_asr", "dirty-label ASR"))
                if any(r.get(k) is not None for r in rows)]
    table = sweep_table([_with_spread(r) for r in rows] if spread else rows, columns)
    if clean:
        table += (f"\nclean model{' (mean over seeds)' if spread else ''}: CTA {percent(clean['clean_accuracy'])}, "
                  f"ASR {percent(clean['attack_success_rate'])}, "
                  f"ASR without the trigger {percent(clean.get('asr_without_trigger'))}")
    if spread:
        table += f"\nmean +- standard deviation over seeds {', '.join(map(str, seeds))}"
    (out / "sweep.txt").write_text(table + "\n")
    print(table)
    title = f"{cfg.attack_name} on {cfg.data.name} ({cfg.model.name}), budget = labels changed"
    if spread:
        title += f", mean of {len(seeds)} seeds"
    plot_tradeoff(rows, out / "asr_vs_cta.png", title, clean)
    plot_budget_curves(rows, out / "budget_curves.png", title)
    print(f"results: {out}")
    return rows


def differences(a: Path, b: Path) -> list[str]:
    """What differs between the runs of two sweep folders (an empty list: the same points with bit-identical
    poisonings, victim weights and metrics, timings left out). How ``--executor ray`` is checked against the
    serial sweep."""
    names = sorted(p.name for p in Path(a).iterdir() if (p / "metrics.json").is_file())
    other = sorted(p.name for p in Path(b).iterdir() if (p / "metrics.json").is_file())
    if names != other:
        return [f"points {names} != {other}"]
    found = []
    for name in names:
        with np.load(a / name / "poisoning.npz") as x, np.load(b / name / "poisoning.npz") as y:
            if sorted(x.files) != sorted(y.files) or any(not np.array_equal(x[k], y[k]) for k in x.files):
                found.append(f"{name}: poisoning.npz")
        wa, wb = (torch.load(d / name / "model.pt", map_location="cpu", weights_only=True) for d in (a, b))
        if wa.keys() != wb.keys() or any(not torch.equal(wa[k], wb[k]) for k in wa):
            found.append(f"{name}: model.pt")
        ma, mb = (json.loads((d / name / "metrics.json").read_text()) for d in (a, b))
        ma.pop("seconds", None), mb.pop("seconds", None)
        if ma != mb:
            found.append(f"{name}: metrics.json")
    return found


def summarize(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, budget): the mean of each figure over the seeds and its standard deviation
    (``<figure>_std``, population), in the order the points came."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["method"], p["budget"]), []).append(p)
    rows = []
    for (method, budget), group in groups.items():
        row: dict[str, Any] = {"method": method, "budget": budget, "seeds": [p["seed"] for p in group],
                               "poisoned_examples": group[0]["poisoned_examples"]}
        for key in (*FIGURES, "dirty_label_asr"):
            values = [p[key] for p in group if p.get(key) is not None]
            if values:
                row[key], row[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
        rows.append(row)
    return rows


def _with_spread(row: dict[str, Any]) -> dict[str, Any]:
    """A summary row as table cells: "mean +- std" in percent."""
    out = dict(row)
    for key in (*FIGURES, "dirty_label_asr"):
        if row.get(key) is not None:
            out[key] = f"{percent(row[key])} +- {100 * row[f'{key}_std']:.2f}"
    return out


def _mean_clean(cleans: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not cleans:
        return None
    keys = [k for k in ("clean_accuracy", "attack_success_rate", "asr_without_trigger")
            if all(isinstance(c.get(k), float) for c in cleans)]
    return {k: float(np.mean([c[k] for c in cleans])) for k in keys}


def _attack_defaults(cfg: ExperimentConfig) -> dict[str, Any]:
    params = ATTACKS[cfg.attack_name].Params()
    return params.model_dump(mode="json")
