"""Every measurement of a model in an experiment, the same for every attack: CTA (or mAP), ASR with and without
the trigger, the attack's own figures (the probes and test figures it declares: attacks never predict), the
victim's fit of the changed labels, the multi-label side effect and trigger recognition against the clean model,
and the dirty-label control of a label-only attack. Every prediction of a model in an experiment is made here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cleanbackdoor.attacks import Attack, Poisoning, Probe, build_attack
from cleanbackdoor.cache import fingerprint
from cleanbackdoor.config import ExperimentConfig
from cleanbackdoor.data import ImageSet, Splits
from cleanbackdoor.experiment.stages import feature_cache, frozen_features, train_model
from cleanbackdoor.metrics import accuracy, attack_success_rate
from cleanbackdoor.multilabel_metrics import (BackdoorSpec, backdoor_report, fit_rate, multilabel_scores, side_effect,
                                              trigger_recognition)
from cleanbackdoor.training import predict


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


def multilabel_report(scores: np.ndarray, test: ImageSet, poisoning: Poisoning) -> dict[str, Any]:
    """The multi-label backdoor and its figures (mAP, the goal's ASR: :func:`backdoor_report`) from a model's scores
    on ``test``."""
    md = poisoning.metadata
    backdoor = {"goal": md["goal"], "trigger": md["trigger_names"], "remove": md["remove_name"],
                "add": md["add_name"], "support": md["support"]}
    return {"backdoor": backdoor, **backdoor_report(scores, test.labels, BackdoorSpec.from_metadata(md))}


def _measure(classes: Callable[[np.ndarray], np.ndarray], probe: Probe) -> float:
    """One probe's figure: the share predicted as its target, or the accuracy on its labels (NaN without images)."""
    if len(probe.images) == 0:
        return float("nan")
    predicted = classes(probe.images)
    if probe.labels is not None:
        return accuracy(predicted, probe.labels)
    return attack_success_rate(predicted, probe.target)


def _put(out: dict[str, Any], name: str, value: Any) -> None:
    """``out[name] = value``, with ``"group/key"`` as ``out[group][key]``."""
    *groups, key = name.split("/")
    for g in groups:
        out = out.setdefault(g, {})
    out[key] = value


def evaluate(model: nn.Module, test: ImageSet, attack: Attack, poisoning: Poisoning,
             feature_cache: Path | None = None) -> dict[str, Any]:
    """CTA, ASR and the attack's own figures for one model, measured identically for every attack.
    ``feature_cache``: predict through a frozen extractor's cached features (a model whose head alone trained)."""
    if test.multilabel:  # mAP and the goal's ASR on label sets: cleanbackdoor.multilabel_metrics
        return multilabel_report(multilabel_scores(model, test.images), test, poisoning)

    # one prediction per distinct image set: the configured step's inputs come back as a probe of every step, and
    # step rules that coincide on an input give the same images
    predicted: dict[str, np.ndarray] = {}

    def classes(images: np.ndarray) -> np.ndarray:
        key = fingerprint(images)
        if key not in predicted:
            predicted[key] = predict(model, images, feature_cache=feature_cache)
        return predicted[key]

    out: dict[str, Any] = {"clean_accuracy": accuracy(classes(test.images), test.labels)}
    if poisoning.activation is not None and poisoning.target is not None:
        eligible = attack.asr_mask(test, poisoning)
        triggered = poisoning.activation(test.images[eligible])
        out["attack_success_rate"] = attack_success_rate(classes(triggered), poisoning.target)
        # the same images without the trigger: what of the ASR the trigger does not explain (a label-only attack
        # can also just move the whole source class towards the target)
        out["asr_without_trigger"] = attack_success_rate(classes(test.images[eligible]), poisoning.target)
        out["asr_test_images"] = int(eligible.sum())
    for probe in attack.probes(test, poisoning):
        _put(out, probe.name, _measure(classes, probe))
    out.update(attack.test_figures(test, poisoning))
    return out


def evaluate_victim(cfg: ExperimentConfig, model: nn.Module, test: ImageSet, attack: Attack, poisoning: Poisoning,
                    images: np.ndarray) -> tuple[dict[str, Any], np.ndarray | None]:
    """(metrics, multi-label test scores or None) of the victim trained on ``images`` with the poisoned targets:
    :func:`evaluate`, and the share of the changed examples whose poisoned label it fits (a label-only backdoor
    needs them memorized). Each multi-label model scores each set once: the scores come back for
    :func:`evaluate_clean`'s side effect."""
    if attack.multilabel:
        scores = multilabel_model_scores(cfg, model, test.images)
        metrics = multilabel_report(scores, test, poisoning)
        if poisoning.mask.any():  # did the victim fit the falsified label sets?
            metrics["poison_fit_rate"] = fit_rate(multilabel_model_scores(cfg, model, images, rows=poisoning.mask),
                                                  BackdoorSpec.from_metadata(poisoning.metadata))
        return metrics, scores
    metrics = evaluate(model, test, attack, poisoning, frozen_features(cfg))
    if poisoning.mask.any():
        changed = np.flatnonzero(poisoning.mask)
        metrics["poison_fit_rate"] = accuracy(predict(model, images[changed], feature_cache=frozen_features(cfg)),
                                              poisoning.hard_labels()[changed])
    return metrics, None


def evaluate_clean(cfg: ExperimentConfig, clean: nn.Module, test: ImageSet, attack: Attack, poisoning: Poisoning,
                   victim_scores: np.ndarray | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the clean model's metrics on the same inputs, the victim's figures against the clean model). The second is
    empty for single labels; for label sets it is the side effect (non-target predictions of the two models
    compared) and the trigger recognition (how much of the ASR the clean model's perception of the trigger
    allows), from the victim's test scores ``victim_scores``."""
    if not attack.multilabel:
        return evaluate(clean, test, attack, poisoning, frozen_features(cfg)), {}
    clean_scores = multilabel_model_scores(cfg, clean, test.images)
    spec = BackdoorSpec.from_metadata(poisoning.metadata)
    against = {**side_effect(clean_scores, victim_scores, test.labels, spec),
               **trigger_recognition(clean_scores, victim_scores, test.labels, spec)}
    return multilabel_report(clean_scores, test, poisoning), against


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
