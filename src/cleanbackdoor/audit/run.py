"""``run_audit``: train the audit model on the received labels, run the detectors, rank, find the label patterns,
write the report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cleanbackdoor.audit.labels import load_audit_data, read_labels
from cleanbackdoor.audit.patterns import embed, label_patterns
from cleanbackdoor.audit.report import label_text, write_report
from cleanbackdoor.cache import AUDIT, compute_once, entry_key, fingerprint, save_atomic
from cleanbackdoor.config import load_config, parse_value
from cleanbackdoor.data import DATASETS, ImageSet
from cleanbackdoor.defenses import DefenseContext, build_defenses, defense_spec
from cleanbackdoor.defenses.base import result_keys
from cleanbackdoor.defenses.internal import (
    defender_recipe,
    penultimate_features,
    percentile_ranks,
    probabilities,
    train_defender_model,
)
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.pretrain import build_victim, model_key
from cleanbackdoor.training import resolve_device

DEFAULT_DETECTORS = ("spectral", "activation_clustering", "confident_learning")


def run_audit(dataset: str, *, root: str | None = None, labels: str | None = None, out: Path | None = None,
              model: str | None = None, overrides: Sequence[str] = (), defenses: Sequence[str] | None = None,
              top: int = 32, seed: int = 0, device: str = "auto", progress: bool = True,
              log: Any = print) -> dict[str, Any]:
    """Audit ``dataset`` (with ``labels`` from a file, if given); writes the report to ``out``; returns the
    summary (also in ``audit.json``)."""
    if top < 1:
        raise ConfigError(f"--top must be at least 1, got {top}")
    detectors = _detectors(defenses)
    data, catalog_name = load_audit_data(dataset, root)
    source = "the dataset's own"
    if labels is not None:
        data = data.with_labels(read_labels(labels, data))
        source = str(labels)
    cfg = load_config(None, list(overrides), **{"data.name": catalog_name, "model.name": model,
                                                "data.root": root if dataset in DATASETS else dataset,
                                                "seed": seed, "device": device, "progress": progress})
    out = Path(out or f"runs/audit-{Path(dataset).name}")
    out.mkdir(parents=True, exist_ok=True)
    log(f"audit: {len(data)} images of {data.num_classes} classes from {dataset}; labels: {source}")

    context = DefenseContext(model=cfg.model, train=cfg.train, cache_dir=cfg.cache_path(), device=cfg.device,
                             progress=cfg.progress, log=log,
                             model_factory=lambda s: build_victim(cfg.model, data.images, data.num_classes, s,
                                                                  cache_dir=cfg.cache_path(), progress=cfg.progress,
                                                                  log=log))
    recipe = defender_recipe(context, None, data.multilabel)
    net = _audit_model(data, cfg, context, recipe, seed, log)
    fit_probs = probabilities(net, data.images, data.multilabel, context.feature_cache)
    train_fit = (float((fit_probs.argmax(1) == data.labels).mean()) if not data.multilabel
                 else float(((fit_probs >= 0.5) == data.labels.astype(bool)).all(1).mean()))

    results = {}
    for key, d in zip(result_keys([d.name for d in detectors]), detectors):  # a repeated name gets -2, -3 ...
        results[key] = d.detect(data, net, seed=seed, context=context)
        log(f"audit: {key} flags {results[key].num_flagged} of {len(data)} examples")
    suspicion, n_flags = rank(results)
    predicted, probs = _predicted(results, data.multilabel)
    most = _most_suspicious(np.lexsort((-suspicion, -n_flags))[:top], data, results, suspicion, predicted, probs)
    patterns, note = _patterns(data, net, results, predicted, context, seed)
    summary = {
        "dataset": dataset, "examples": len(data), "classes": list(data.class_names), "multilabel": data.multilabel,
        "labels_source": source, "model": cfg.model.name, "recipe": recipe.model_dump(mode="json"),
        "train_fit": train_fit, "seed": seed,
        "detectors": {k: {"flagged": r.num_flagged, "flagged_share": r.num_flagged / len(data),
                          "spec": d.spec(),
                          "note": (f"classes called poisoned: {r.metadata.get('classes_flagged')}"
                                   if "classes_flagged" in r.metadata else "")}
                      for (k, r), d in zip(results.items(), detectors)},
        "most_suspicious": most, "patterns": patterns, "patterns_note": note,
    }
    write_report(out, summary, data)
    np.savez_compressed(out / "scores.npz", suspicion=suspicion, flags=n_flags,
                        **{f"{k}/scores": r.scores for k, r in results.items()},
                        **{f"{k}/flagged": r.flagged for k, r in results.items()})
    (out / "audit.json").write_text(json.dumps(summary, indent=2))
    log(f"audit: report in {out / 'report.md'} ({len(patterns)} label patterns, "
        f"{sum(p['tight_clusters'] for p in patterns)} tight clusters)")
    return summary


def _detectors(defenses: Sequence[str] | None) -> list:
    """The training-set detectors named (specs as names or ``{name, ...}`` text); the default three when None."""
    specs = [defense_spec(parse_value(s) if isinstance(s, str) and s.strip().startswith("{") else s)
             for s in (defenses or DEFAULT_DETECTORS)]
    detectors = build_defenses(specs)
    for d in detectors:
        if d.kind != "training":
            raise ConfigError(f"audit: {d.name!r} scores test inputs at inference time, not a labelled dataset; "
                              f"use {', '.join(DEFAULT_DETECTORS)}")
    return detectors


def _audit_model(data: ImageSet, cfg: Any, context: DefenseContext, recipe: Any, seed: int, log: Any) -> nn.Module:
    """The model trained on the received labels, from the cache when an identical audit trained it before."""
    key = entry_key("audit", fingerprint(data.images, data.labels), model_key(cfg.model),
                    recipe.model_dump(mode="json"), seed)
    path = cfg.cache_path() / AUDIT / f"model-{key}.pt"
    net = context.model_factory(seed)

    def fit() -> dict[str, torch.Tensor]:
        trained = train_defender_model(data, np.arange(len(data)), recipe, seed=seed, context=context,
                                       desc="audit model")
        return {k: v.cpu() for k, v in trained.state_dict().items()}

    weights, loaded = compute_once(path, fit, lambda p: torch.load(p, map_location="cpu", weights_only=True),
                                   save_atomic)
    net.load_state_dict(weights)
    if loaded:
        log(f"audit model: loaded from cache {path}")
    return net.to(resolve_device(cfg.device)).eval()


def rank(results: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(suspicion, flags) per example: the mean of the detectors' percentile ranks, and how many flag it."""
    suspicion = np.mean([percentile_ranks(r.scores) for r in results.values()], axis=0)
    return suspicion, np.sum([r.flagged for r in results.values()], axis=0)


def _predicted(results: dict[str, Any], multilabel: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(predicted labels, probabilities) out of sample, from the first detector that computed them (confident
    learning); (None, None) without one."""
    probs = next((r.diagnostics["probabilities"] for r in results.values() if "probabilities" in r.diagnostics),
                 None)
    if probs is None:
        return None, None
    return ((probs >= 0.5).astype(np.uint8) if multilabel else probs.argmax(1)), probs


def _most_suspicious(order: np.ndarray, data: ImageSet, results: dict[str, Any], suspicion: np.ndarray,
                     predicted: np.ndarray | None, probs: np.ndarray | None) -> list[dict[str, Any]]:
    names = data.class_names
    most = []
    for i in (int(i) for i in order):
        row = {"index": i, "given": label_text(data.labels, i, names), "suspicion": float(suspicion[i]),
               "flagged_by": [k for k, r in results.items() if r.flagged[i]],
               "scores": {k: float(r.scores[i]) for k, r in results.items()}}
        if predicted is not None:
            row["predicted"] = label_text(predicted, i, names)
            if not data.multilabel:
                row["probability_of_given"] = float(probs[i, data.labels[i]])
        most.append(row)
    return most


def _patterns(data: ImageSet, net: nn.Module, results: dict[str, Any], predicted: np.ndarray | None,
              context: DefenseContext, seed: int) -> tuple[list[dict[str, Any]], str]:
    """The label patterns of the changes confident learning suspects, and the note that explains them."""
    cl = next((r for k, r in results.items() if k.startswith("confident_learning")), None)
    if predicted is None or cl is None:
        return [], ("Label patterns need confident learning's out-of-sample predictions; add the "
                    "confident_learning detector.")
    differs = np.any(predicted != data.labels, axis=1) if data.multilabel else predicted != data.labels
    suspect = cl.flagged & differs
    embedding = embed(penultimate_features(net, data.images, feature_cache=context.feature_cache), seed)
    patterns = label_patterns(data.labels, predicted, suspect, embedding, data.class_names, seed=seed)
    per_given: dict[str, int] = {}
    for p in patterns:
        per_given[p["given"]] = per_given.get(p["given"], 0) + p["count"]
    note = (f"{int(suspect.sum())} suspected label changes (flagged by confident learning, out-of-sample "
            "prediction differs from the given label), grouped by (given, predicted). Tightness: median pairwise "
            "feature distance of the group's members over that of unflagged examples of the predicted class "
            "(1 = as spread as the class; well below 1 = concentrated in one region). A tight cluster of many "
            "changes, or one pair holding most of a class's flags, is the signature of a deliberate relabelling "
            "rather than of honest mistakes.")
    by_given = sorted(per_given.items(), key=lambda kv: -kv[1])
    if by_given:
        total = int(suspect.sum())
        note += (" Suspected changes by given label (groups of 2 or more): "
                 + ", ".join(f"{g}: {c} ({c / total:.0%})" for g, c in by_given) + ".")
    return patterns, note
