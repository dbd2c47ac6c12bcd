"""One experiment: data -> attack -> victim training -> evaluation -> results.

The victim is trained and evaluated the same way for every attack, with the user's recipe; a clean model with the
same recipe and seed is trained for comparison (and cached, so a budget sweep trains it once). An experiment
writes one folder: ``config.toml`` (as resolved), ``poisoning.npz`` + ``poisoning.json``, ``metrics.json``,
``log.txt``, ``model.pt`` (the victim's weights) and plots.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cleanbackdoor.attacks import AttackContext, Poisoning, build_attack
from cleanbackdoor.cache import VERSIONS, fingerprint, stable_key
from cleanbackdoor.config import ExperimentConfig, config_to_dict, dump_toml
from cleanbackdoor.data import Splits
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.experiment.defense_stage import run_defenses
from cleanbackdoor.experiment.evaluation import dirty_label_control, evaluate_clean, evaluate_victim
from cleanbackdoor.experiment.stages import clean_model, feature_cache, load_data, new_model, train_model
from cleanbackdoor.pretrain import pretrained_model
from cleanbackdoor.report import metrics_table, plot_examples
from cleanbackdoor.training import resolve_device


class Logger:
    """Prints and appends to the run's log file."""

    def __init__(self, path: Path | None = None, echo: bool = True) -> None:
        self.path, self.echo = path, echo

    def __call__(self, message: str) -> None:
        if self.echo:
            print(message, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(message + "\n")


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


# -- the whole run ------------------------------------------------------------------------------------------
@dataclass
class ExperimentResult:
    metrics: dict[str, Any]
    out: Path
    poisoning: Poisoning
    model: nn.Module
    clean_model: nn.Module | None
    splits: Splits


def _work_dir(final: Path) -> Path:
    """Where a run writes until it has finished: ``final`` is replaced only by a complete result, so a run that
    fails (or is interrupted) leaves an earlier result intact. Rerunning resumes from the work folder."""
    if final.exists() and any(final.iterdir()) and not (final / "config.toml").exists():
        raise ConfigError(f"output folder {final} holds other files; choose an empty or new --out")
    work = final.parent / f".{final.name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    return work


def _publish(work: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)


def finished_metrics(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The metrics of a completed run of exactly this config in its output folder (its ``config.toml`` equal to
    this config's), computed by the same versions of the algorithms (:func:`written_by_this_code`), else None: what
    an interrupted sweep or ``reproduce`` reads back instead of running again."""
    final = cfg.output_dir()
    done, written = final / "metrics.json", final / "config.toml"
    if done.is_file() and written.is_file() and written.read_text() == dump_toml(config_to_dict(cfg)):
        metrics = json.loads(done.read_text())
        return metrics if written_by_this_code(metrics) else None
    return None


def written_by_this_code(metrics: dict[str, Any]) -> bool:
    """Whether a run's ``metrics.json`` was written under the cache versions of this code (:data:`VERSIONS`,
    recorded as ``code_versions``): a run from before a change to an algorithm is never read back as current."""
    return metrics.get("code_versions") == VERSIONS


def experiment_metrics(cfg: ExperimentConfig, executor: Any = None) -> dict[str, Any]:
    """The metrics of one run, quietly: read back when finished (:func:`finished_metrics`), else run. A job of
    the sweeps, tables and ``reproduce`` (the worker returns only the metrics)."""
    done = finished_metrics(cfg)
    return done if done is not None else run_experiment(cfg, echo=False, executor=executor).metrics


def run_experiment(cfg: ExperimentConfig, echo: bool = True, executor: Any = None) -> ExperimentResult:
    """One run: data, attack, victim, evaluation, clean model, controls, defenses and plots; ``metrics.json`` and
    the rest in the config's output folder. ``executor`` runs the attack's independent jobs (FLIP's experts and
    label runs; :mod:`cleanbackdoor.executor`), by default one after another."""
    # everything that can be checked without data is checked before anything is written
    attack = build_attack(cfg.attack_name, {k: v for k, v in cfg.attack.items() if k != "name"})
    final = cfg.output_dir()
    out = _work_dir(final)
    (out / "log.txt").write_text("")
    log = Logger(out / "log.txt", echo)
    (out / "config.toml").write_text(dump_toml(config_to_dict(cfg)))
    timer = Timer()
    device = resolve_device(cfg.device)
    log(f"cleanbackdoor: {cfg.attack_name} on {cfg.data.name}, victim {cfg.model.name}, device {device}, "
        f"seed {cfg.seed}")
    if cfg.recipe_note:
        log(f"config: {cfg.recipe_note}; a config file or --set changes it")

    with timer.stage("data"):
        splits = load_data(cfg)
    train_set, test_set = splits.train, splits.test
    log(f"data: {len(train_set)} training and {len(test_set)} test images of shape {train_set.image_shape}")
    for note in train_set.meta.get("notes", []):  # what the loader changed, e.g. empty categories left out
        log(f"data: {note}")
    if train_set.multilabel != attack.multilabel:
        kinds = ("single-label", "multi-label")
        raise ConfigError(f"attack {cfg.attack_name!r} is for {kinds[attack.multilabel]} data but dataset "
                          f"{cfg.data.name!r} is {kinds[train_set.multilabel]}")

    if cfg.model.pretrained is not None:  # transfer learning: the source-task extractor, trained once and cached
        with timer.stage("pretrain"):
            pretrained_model(cfg.model, cache_dir=cfg.cache_path(), device=cfg.device, progress=cfg.progress, log=log)

    context = AttackContext(cache_dir=cfg.cache_path(), device=cfg.device, progress=cfg.progress, log=log,
                            model=cfg.model, train=cfg.train, victim=lambda s: new_model(cfg, train_set, s),
                            heldout=test_set, features_dir=feature_cache(cfg), executor=executor)
    with timer.stage("attack"):
        poisoning = attack.poison(train_set, seed=cfg.seed, context=context)
    poisoning.save(out)
    log(f"attack: {poisoning.poisoned_examples} of {len(train_set)} training examples changed "
        f"({100 * poisoning.poisoned_examples / len(train_set):.2f}% of the training set)")

    with timer.stage("victim"):
        images, targets = poisoning.apply(train_set)
        run_key = stable_key(config_to_dict(cfg), fingerprint(poisoning.labels))
        model = train_model(cfg, train_set, images, targets, desc="poisoned model", checkpoint=out / "victim.ckpt",
                            checkpoint_key=run_key)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    (out / "victim.ckpt").unlink(missing_ok=True)

    with timer.stage("evaluation"):
        poisoned_metrics, victim_scores = evaluate_victim(cfg, model, test_set, attack, poisoning, images)

    clean = None
    clean_metrics: dict[str, Any] | None = None
    if cfg.clean_baseline:
        with timer.stage("clean_model"):
            clean, _ = clean_model(cfg, train_set, log)
            clean_metrics, against_clean = evaluate_clean(cfg, clean, test_set, attack, poisoning, victim_scores)
            poisoned_metrics.update(against_clean)

    control = None
    if cfg.dirty_label_control and not attack.multilabel:
        with timer.stage("dirty_label_control"):
            control = dirty_label_control(cfg, splits, attack, poisoning, log)

    metrics: dict[str, Any] = {
        "attack": cfg.attack_name,
        "dataset": cfg.data.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "budget": poisoning.budget,
        "budget_unit": "training examples",
        "poisoned_examples": poisoning.poisoned_examples,
        "poisoned_fraction": poisoning.poisoned_examples / len(train_set),
        "train_size": len(train_set),
        "test_size": len(test_set),
        "target": poisoning.target,
        "sources": list(poisoning.sources) if poisoning.sources else "all",
        **poisoned_metrics,
        "clean_model": clean_metrics,
        **({"dirty_label_control": control} if control is not None else {}),
        **({"attack_diagnostics": poisoning.figures()} if poisoning.diagnostics else {}),
    }

    if cfg.defenses:  # detection against the true mask, removal + retraining: .defense_stage
        with timer.stage("defenses"):
            metrics["defenses"] = run_defenses(cfg, splits, attack, poisoning, model, log=log, work_dir=out)

    if cfg.examples:
        with timer.stage("plots"):
            plot_examples(model, test_set, attack, poisoning, out / "examples.png", cfg.examples, seed=cfg.seed)
    metrics["seconds"] = timer.seconds
    metrics["code_versions"] = dict(VERSIONS)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=to_json_value))

    log(metrics_table(metrics))
    log(f"results: {final}")
    _publish(out, final)
    return ExperimentResult(metrics, final, poisoning, model, clean, splits)


def to_json_value(o: Any) -> Any:
    """``json.dumps`` default for numpy scalars and arrays, tuples and paths."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
