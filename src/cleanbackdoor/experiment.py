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
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cleanbackdoor.attacks import Attack, AttackContext, Poisoning, build_attack
from cleanbackdoor.cache import FEATURES, compute_once, fingerprint, model_file, save_atomic, stable_key
from cleanbackdoor.config import ExperimentConfig, config_to_dict, dump_toml
from cleanbackdoor.data import ImageSet, Splits, load_dataset, stratified_subset
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.metrics import accuracy, attack_success_rate
from cleanbackdoor.multilabel_metrics import (BackdoorSpec, fit_rate, multilabel_scores, side_effect,
                                              trigger_recognition)
from cleanbackdoor.data.subset import select_classes
from cleanbackdoor.pretrain import build_victim, model_key, pretrained_model
from cleanbackdoor.training import predict, resolve_device, train


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


# -- stages -------------------------------------------------------------------------------------------------
def load_data(cfg: ExperimentConfig) -> Splits:
    splits = load_dataset(cfg.data.name, root=cfg.data.root, **cfg.data.options)
    train_set, test_set = splits.train, splits.test
    if cfg.data.classes:  # the task is some classes of the dataset, relabelled 0..k-1
        train_set, test_set = select_classes(train_set, cfg.data.classes), select_classes(test_set, cfg.data.classes)
    if cfg.data.train_per_class:
        train_set = stratified_subset(train_set, per_class=cfg.data.train_per_class, seed=cfg.seed)
    if cfg.data.test_per_class:
        test_set = stratified_subset(test_set, per_class=cfg.data.test_per_class, seed=cfg.seed)
    return Splits(train_set, test_set)


def new_model(cfg: ExperimentConfig, train_set: ImageSet, seed: int) -> nn.Module:
    """A freshly initialized victim (seeded), normalizing with the clean training set's statistics; with
    ``model.pretrained``, the pretrained extractor (its weights and normalization) and a fresh seeded head."""
    return build_victim(cfg.model, train_set.images, train_set.num_classes, seed, cache_dir=cfg.cache_path(),
                        progress=cfg.progress)


def train_model(cfg: ExperimentConfig, train_set: ImageSet, images: np.ndarray, targets: np.ndarray, *,
                desc: str, checkpoint: Path | None = None, checkpoint_key: str = "") -> nn.Module:
    model = new_model(cfg, train_set, cfg.seed)
    train(model, images, targets, cfg.train, seed=cfg.seed, device=cfg.device, progress=cfg.progress,
          desc=desc, checkpoint=checkpoint, checkpoint_key=checkpoint_key, feature_cache=feature_cache(cfg))
    return model


def feature_cache(cfg: ExperimentConfig) -> Path:
    """Where a frozen extractor's features are kept (``train.finetune = "last"``): shared by the clean model and
    the victim, which train on the same images (:class:`cleanbackdoor.training.FrozenFeatures`)."""
    return cfg.cache_path() / FEATURES


def clean_model(cfg: ExperimentConfig, train_set: ImageSet, log: Callable[[str], None]) -> tuple[nn.Module, bool]:
    """The clean model for this data, architecture, recipe and seed: from the cache, or trained and cached. The key
    holds the training set's bytes (not the data root as written), the model, the recipe and the seed."""
    key = stable_key("clean-model", fingerprint(train_set.images, train_set.labels), model_key(cfg.model),
                     cfg.train.model_dump(mode="json"), cfg.seed, len(train_set))
    path = model_file(cfg.cache_path(), "clean", key)
    model = new_model(cfg, train_set, cfg.seed)

    def fit() -> nn.Module:
        train(model, train_set.images, train_set.labels, cfg.train, seed=cfg.seed, device=cfg.device,
              progress=cfg.progress, desc="clean model", feature_cache=feature_cache(cfg))
        return model

    def load(p: Path) -> nn.Module:
        model.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
        return model.to(resolve_device(cfg.device)).eval()

    model, loaded = compute_once(path, fit, load, save_weights)
    if loaded:
        log(f"clean model: loaded from cache {path}")
    return model, loaded


def save_weights(model: nn.Module, path: Path) -> None:
    """A model's weights, on the CPU, written atomically into the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({k: v.cpu() for k, v in model.state_dict().items()}, path)


def multilabel_model_scores(cfg: ExperimentConfig, model: nn.Module, images: np.ndarray,
                            rows: np.ndarray | None = None) -> np.ndarray:
    """A multi-label model's scores on ``images`` (on ``images[rows]`` with a boolean ``rows``). When only its
    head trained, through the frozen extractor's cached features of the whole set (training left those of the
    training set in the cache; the clean model and the victim share those of the test set), so scoring costs the
    head alone."""
    if cfg.train.finetune == "last":
        scores = multilabel_scores(model, images, feature_cache=feature_cache(cfg))
        return scores if rows is None else scores[rows]
    return multilabel_scores(model, images if rows is None else images[rows])


def evaluate(model: nn.Module, test: ImageSet, attack: Attack, poisoning: Poisoning,
             feature_cache: Path | None = None) -> dict[str, Any]:
    """CTA, ASR and the attack's own figures for one model, measured identically for every attack.
    ``feature_cache``: predict through a frozen extractor's cached features (a model whose head alone trained)."""
    if test.multilabel:  # mAP and the goal's ASR on label sets: cleanbackdoor.multilabel_metrics, via the attack
        return attack.extra_metrics(model, test, poisoning)

    def classes(images: np.ndarray) -> np.ndarray:
        return predict(model, images, feature_cache=feature_cache)

    out: dict[str, Any] = {"clean_accuracy": accuracy(classes(test.images), test.labels)}
    if poisoning.activation is not None and poisoning.target is not None:
        eligible = attack.asr_mask(test, poisoning)
        triggered = poisoning.activation(test.images[eligible])
        out["attack_success_rate"] = attack_success_rate(classes(triggered), poisoning.target)
        # the same images without the trigger: what of the ASR the trigger does not explain (a label-only attack
        # can also just move the whole source class towards the target)
        out["asr_without_trigger"] = attack_success_rate(classes(test.images[eligible]), poisoning.target)
        out["asr_test_images"] = int(eligible.sum())
    out.update(attack.extra_metrics(model, test, poisoning))
    return out


def frozen_features(cfg: ExperimentConfig) -> Path | None:
    """The feature cache when the victim trains its head alone on a frozen extractor, else None."""
    return feature_cache(cfg) if cfg.train.finetune == "last" else None


def dirty_label_control(cfg: ExperimentConfig, splits: Splits, attack: Attack, poisoning: Poisoning,
                        log: Callable[[str], None]) -> dict[str, Any] | None:
    """The dirty-label bound of a label-only attack: BadNets with the same trigger, target and sources on as many
    training images as the attack changed, trained and measured with the same recipe and seed. When it fails, no
    label-only attack can succeed in this setting, and the attack's own figure says nothing about the attack."""
    spec = attack.dirty_label_spec(poisoning, splits.train)
    if spec is None:
        return None
    control = build_attack("badnets", spec)
    dirty = control.poison(splits.train, seed=cfg.seed)
    images, targets = dirty.apply(splits.train)
    model = train_model(cfg, splits.train, images, targets, desc="dirty-label control")
    out = evaluate(model, splits.test, control, dirty, frozen_features(cfg))
    log(f"dirty-label control (BadNets, {dirty.poisoned_examples} triggered source images relabelled, same "
        f"trigger): CTA {100 * out['clean_accuracy']:.1f}%, ASR {100 * out['attack_success_rate']:.1f}%")
    return {"attack": "badnets", "poisoned_examples": dirty.poisoned_examples, **out}


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
    this config's), else None: what an interrupted sweep or ``reproduce`` reads back instead of running again."""
    final = cfg.output_dir()
    done, written = final / "metrics.json", final / "config.toml"
    if done.is_file() and written.is_file() and written.read_text() == dump_toml(config_to_dict(cfg)):
        return json.loads(done.read_text())
    return None


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
        if attack.multilabel:  # each model scores each set once; the side effect below reuses the test scores
            victim_scores = multilabel_model_scores(cfg, model, test_set.images)
            poisoned_metrics = attack.report(victim_scores, test_set, poisoning)
            if poisoning.mask.any():  # did the victim fit the falsified label sets?
                poisoned_metrics["poison_fit_rate"] = fit_rate(
                    multilabel_model_scores(cfg, model, images, rows=poisoning.mask),
                    BackdoorSpec.from_metadata(poisoning.metadata))
        else:
            poisoned_metrics = evaluate(model, test_set, attack, poisoning, frozen_features(cfg))
            if poisoning.mask.any():
                # did the victim fit the poisoned labels? (a label-only backdoor needs them memorized)
                changed = np.flatnonzero(poisoning.mask)
                hard = poisoning.hard_labels()
                poisoned_metrics["poison_fit_rate"] = accuracy(
                    predict(model, images[changed], feature_cache=frozen_features(cfg)), hard[changed])

    clean = None
    clean_metrics: dict[str, Any] | None = None
    if cfg.clean_baseline:
        with timer.stage("clean_model"):
            clean, _ = clean_model(cfg, train_set, log)
            if attack.multilabel:  # and the side effect: non-target predictions of the two models compared
                clean_scores = multilabel_model_scores(cfg, clean, test_set.images)
                clean_metrics = attack.report(clean_scores, test_set, poisoning)
                spec = BackdoorSpec.from_metadata(poisoning.metadata)
                poisoned_metrics.update(side_effect(clean_scores, victim_scores, test_set.labels, spec))
                # how much of the ASR the extractor's perception of the trigger allows
                poisoned_metrics.update(trigger_recognition(clean_scores, victim_scores, test_set.labels, spec))
            else:
                clean_metrics = evaluate(clean, test_set, attack, poisoning, frozen_features(cfg))

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

    if cfg.defenses:  # detection against the true mask, removal + retraining: cleanbackdoor.defenses.stage
        from cleanbackdoor.defenses.stage import run_defenses  # noqa: PLC0415

        with timer.stage("defenses"):
            metrics["defenses"] = run_defenses(cfg, splits, attack, poisoning, model, log=log, work_dir=out)

    if cfg.examples:
        from cleanbackdoor.report import plot_examples  # noqa: PLC0415 - matplotlib only when plotting

        with timer.stage("plots"):
            plot_examples(model, test_set, attack, poisoning, out / "examples.png", cfg.examples, seed=cfg.seed)
    metrics["seconds"] = timer.seconds
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=to_json_value))

    from cleanbackdoor.report import metrics_table  # noqa: PLC0415

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
