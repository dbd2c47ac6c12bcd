"""The experiment's defenses stage: run every configured defense against the trained victim and measure it.

For a *training-set* defense (spectral, activation_clustering, confident_learning) the poisoned training set is
what the victim trained on (poisoned images where the attack changed pixels, the labels it was given: the hard
labels for soft poisonings). The detection is scored against the attack's true mask (precision, recall, ROC AUC:
:mod:`.metrics`); with ``retrain`` on, the flagged examples are removed and the victim is retrained with the same
architecture, recipe and seed, then CTA and ASR are measured exactly as for the victim
(:func:`cleanbackdoor.experiment.evaluation.evaluate`).

For an *inference* defense (STRIP) the test set is split in two halves (seeded): the first is the defender's clean
held-out set (overlays and the entropy boundary), the second is presented to the deployed victim twice, clean and
with the attack's trigger (the images the ASR counts; at most 2,000 of each, a seeded sample). Detection is scored
against "triggered"; the false rejection rate is the share of clean inputs rejected; "after rejection", CTA counts
a rejected clean input as an error and ASR counts only the triggered inputs that are accepted *and* classified as
the target.

Everything lands in ``metrics["defenses"][<name>]``; the scores and flags are saved to ``defenses.npz``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cleanbackdoor.data import ImageSet, Splits
from cleanbackdoor.defenses import Defense, DefenseContext, build_defenses, detection_metrics
from cleanbackdoor.defenses.base import result_keys
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.experiment.evaluation import evaluate
from cleanbackdoor.experiment.stages import frozen_features, new_model, train_model
from cleanbackdoor.training import predict


def _small(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata worth keeping in metrics.json (numbers, short lists, per-class summaries)."""
    return {k: v for k, v in meta.items() if not isinstance(v, np.ndarray)}


def run_defenses(cfg: Any, splits: Splits, attack: Any, poisoning: Any, model: nn.Module, *,
                 log: Callable[[str], None] = print, work_dir: Path | None = None) -> dict[str, Any]:
    """Run ``cfg.defenses`` against ``model`` (trained on ``poisoning`` of ``splits.train``); returns the figures."""
    defenses = build_defenses(cfg.defenses)
    train_set, test_set = splits.train, splits.test
    images, targets = poisoning.apply(train_set)
    data = ImageSet(images, poisoning.hard_labels(), train_set.class_names, f"{train_set.name} (as trained on)")
    truth = poisoning.mask
    context = DefenseContext(model=cfg.model, train=cfg.train, cache_dir=cfg.cache_path(), device=cfg.device,
                             progress=cfg.progress, log=log,
                             model_factory=lambda seed: new_model(cfg, train_set, seed))
    results: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for key, defense in zip(result_keys([d.name for d in defenses]), defenses):
        t0 = time.perf_counter()
        if defense.kind == "inference":
            entry = _inference(defense, model, test_set, attack, poisoning, cfg.seed, context)
        else:
            det = defense.detect(data, model, seed=cfg.seed, context=context)
            arrays[f"{key}/scores"], arrays[f"{key}/flagged"] = det.scores, det.flagged
            entry = {"kind": "training", "detection": detection_metrics(det.scores, det.flagged, truth),
                     "details": _small(det.metadata)}
            m = entry["detection"]
            log(f"defense {key}: flagged {m['flagged']} of {m['examples']} training examples, "
                f"{m['true_positives']} of {m['positives']} poisons (ROC AUC {m['roc_auc']:.3f})")
            if defense.retrain:
                keep = ~det.flagged
                if not keep.any():
                    raise ConfigError(f"defense {key!r} flagged every training example; nothing left to retrain on")
                ckpt = work_dir / f"retrain-{key}.ckpt" if work_dir is not None else None
                retrained = train_model(cfg, train_set, images[keep], targets[keep], desc=f"retrain after {key}",
                                        checkpoint=ckpt, checkpoint_key=f"{key}|{det.flagged.tobytes().hex()[:64]}")
                if ckpt is not None:
                    ckpt.unlink(missing_ok=True)
                after = evaluate(retrained, test_set, attack, poisoning, frozen_features(cfg))
                entry["after_removal"] = {"removed": int(det.flagged.sum()), "poisons_removed": m["true_positives"],
                                          "poisons_left": int((truth & keep).sum()), **after}
                shown = {"CTA": "clean_accuracy", "mAP": "mean_average_precision", "ASR": "attack_success_rate"}
                log(f"defense {key}: retrained without the flagged examples: "
                    + ", ".join(f"{t} {after[k]:.3f}" for t, k in shown.items() if k in after))
        entry["spec"] = defense.spec()
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        results[key] = entry
    if work_dir is not None and arrays:
        np.savez_compressed(work_dir / "defenses.npz", **arrays)
    return results


INFERENCE_INPUTS = 2000  # at most this many clean and this many triggered test inputs (a seeded sample)


def strip_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out reference indices, evaluation indices) of a test set of ``n`` images: two seeded halves."""
    perm = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


def _inference(defense: Defense, model: nn.Module, test: ImageSet, attack: Any, poisoning: Any, seed: int,
               context: DefenseContext) -> dict[str, Any]:
    if test.multilabel or poisoning.activation is None or poisoning.target is None:
        why = "multi-label data" if test.multilabel else "the attack has no test-time trigger with a single target"
        context.log(f"defense {defense.name}: skipped ({why})")
        return {"kind": "inference", "skipped": why}
    ref, ev = strip_split(len(test), seed)
    eligible = attack.asr_mask(test, poisoning)
    ev_trig = ev[eligible[ev]]
    rng = np.random.default_rng(seed + 1)
    if len(ev) > INFERENCE_INPUTS:
        ev = np.sort(rng.choice(ev, INFERENCE_INPUTS, replace=False))
    if len(ev_trig) > INFERENCE_INPUTS:
        ev_trig = np.sort(rng.choice(ev_trig, INFERENCE_INPUTS, replace=False))
    if len(ev_trig) == 0:
        return {"kind": "inference", "skipped": "no test image of a source class in the evaluation half"}
    clean = test.images[ev]
    triggered = poisoning.activation(test.images[ev_trig])
    inputs = np.concatenate([clean, triggered])
    truth = np.r_[np.zeros(len(clean), dtype=bool), np.ones(len(triggered), dtype=bool)]
    ctx = replace(context, reference=test.images[ref])
    det = defense.detect(inputs, model, seed=seed, context=ctx)
    pred = predict(model, inputs)
    n = len(clean)
    correct = pred[:n] == test.labels[ev]
    hit = pred[n:] == poisoning.target
    rejected = det.flagged
    m = detection_metrics(det.scores, det.flagged, truth)
    frr = float(rejected[:n].mean())
    context.log(f"defense {defense.name}: rejects {m['true_positives']} of {len(triggered)} triggered and "
                f"{int(rejected[:n].sum())} of {n} clean test inputs (FRR {frr:.3f}, ROC AUC {m['roc_auc']:.3f})")
    return {"kind": "inference", "detection": m, "false_rejection_rate": frr,
            "after_rejection": {"clean_accuracy": float((correct & ~rejected[:n]).mean()),
                                "attack_success_rate": float((hit & ~rejected[n:]).mean()),
                                "clean_accuracy_before": float(correct.mean()),
                                "attack_success_rate_before": float(hit.mean()),
                                "clean_test_images": n, "triggered_test_images": len(triggered),
                                "reference_images": len(ref)},
            "details": _small(det.metadata)}
