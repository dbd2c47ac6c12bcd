"""``cleanbackdoor audit``: scan a labelled dataset received from an outsourced labeller for poisoned labels.

The user holds images and the labels someone else gave them. The audit trains the dataset's default victim (or
the architecture and recipe asked for) on those labels, runs the training-set detectors of
:mod:`cleanbackdoor.defenses` (spectral signatures, activation clustering, confident learning by default), and
writes a report folder:

- ``report.md`` and ``report.html``: the detectors' counts, the most suspicious examples with thumbnails, and
  the **label patterns**;
- ``audit.json``: every figure, the ranking, the patterns, and per-example scores of the top examples;
- ``thumbs/*.png`` (one per reported example) and ``suspicious.png``, ``patterns/pattern-*.png`` (grids).

**Ranking.** Each detector's scores become percentile ranks; an example's suspicion is their mean, and examples
are ordered by the number of detectors that flag them, then by suspicion.

**Label patterns.** A poisoning labeller does not err at random: a targeted attack moves labels from some classes
to one, and a clean-image attack relabels images that share a feature, which sit together in feature space. The
audit takes the label changes confident learning suspects (flagged examples whose out-of-sample predicted label
differs from the given one), groups them by (given label, predicted label) pair (for multi-label sets: by the
(given category set, predicted category set) combination), and for each group reports its size, its share of the
flags of that given label, and how tightly its members sit in feature space: the median pairwise distance of the
members divided by the median pairwise distance of unflagged examples of the predicted class (features: the audit
model's penultimate layer, standardized and reduced by PCA to at most 32 dimensions). Within each group the
members are clustered (average linkage, cut at ``radius`` = 0.6 times the reference distance); a cluster of at
least ``min_cluster`` = 5 members whose tightness is at most ``tight`` = 0.4 is reported as a *tight cluster*:
many label changes concentrated in one region of feature space. (The cut is looser than the tightness asked for,
so a chance grouping of a few spread-out members does not qualify.)
"""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cleanbackdoor.cache import AUDIT, compute_once, fingerprint, save_atomic, stable_key
from cleanbackdoor.config import load_config, parse_value
from cleanbackdoor.data import DATASETS, ImageSet, load_dataset, load_folder_splits, load_image_folder
from cleanbackdoor.data.archive import is_archive
from cleanbackdoor.data.folder import find_split_root
from cleanbackdoor.defenses import DefenseContext, build_defenses, defense_spec
from cleanbackdoor.defenses.base import result_keys
from cleanbackdoor.defenses.internal import (
    defender_recipe,
    penultimate_features,
    percentile_ranks,
    probabilities,
    train_defender_model,
)
from cleanbackdoor.errors import ConfigError, DataError
from cleanbackdoor.pretrain import build_victim, model_key
from cleanbackdoor.report import plt
from cleanbackdoor.training import resolve_device

DEFAULT_DETECTORS = ("spectral", "activation_clustering", "confident_learning")


# -- input ----------------------------------------------------------------------------------------------------
def load_audit_data(dataset: str, root: str | None = None) -> tuple[ImageSet, str]:
    """The labelled images to audit and the catalog name whose defaults (model, recipe) apply: a catalog dataset's
    training split, or an image folder tree (``<class>/<image>``, or ``train/<class>/<image>``, or an archive)."""
    if dataset in DATASETS:
        return load_dataset(dataset, root=root).train, dataset
    path = Path(dataset).expanduser()
    if not path.exists():
        raise ConfigError(f"audit: {dataset!r} is neither a dataset name ({', '.join(sorted(DATASETS))}) nor an "
                          "existing image folder")
    if (path.is_file() and is_archive(path)) or find_split_root(path) is not None:
        return load_folder_splits(path, name=path.name).train, "folder"
    return load_image_folder(path, name=path.name), "folder"


def _label_value(v: Any, data: ImageSet, where: str) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise DataError(f"{where}: label {v!r} is not a class")
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)
    if isinstance(v, str):
        v = v.strip()
    try:
        return data.class_index(v)
    except ConfigError as e:
        raise DataError(f"{where}: {e}") from None


def read_labels(path: str | Path, data: ImageSet) -> np.ndarray:
    """Labels from a file, in the dataset's order: ``.npy`` ((N,) class indices, or (N, K) 0/1 for label sets),
    ``.json`` (a list of classes or of class lists, or ``{"labels": [...]}``), ``.csv``/``.txt`` (one row per
    image; the label in the last column, as a class name or index; a header row is skipped; label sets as names
    separated by ``;`` or ``|``). Classes may be given by name or index."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist")
    suffix = path.suffix.lower()
    where = f"labels file {path}"
    if suffix == ".npy":
        try:
            raw: Any = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{where}: not a plain numeric .npy array ({e})") from None
        if raw.ndim == 2:
            if raw.shape[1] != data.num_classes or not np.isin(raw, (0, 1)).all():
                raise DataError(f"{where}: a (N, K) label matrix must be 0/1 with K = {data.num_classes} columns, "
                                f"got shape {raw.shape}")
            labels = raw.astype(np.uint8)
        elif raw.ndim == 1:
            labels = np.array([_label_value(v, data, where) for v in raw.tolist()], dtype=np.int64)
        else:
            raise DataError(f"{where}: labels must be (N,) or (N, classes), got shape {raw.shape}")
    elif suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if isinstance(raw, dict):
            raw = raw.get("labels")
        if not isinstance(raw, list):
            raise DataError(f"{where}: expected a list of labels or {{\"labels\": [...]}}")
        labels = _from_items(raw, data, where)
    elif suffix in (".csv", ".txt", ".tsv"):
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",") if r]
        items = [r[-1].strip() for r in rows]
        if items and not _is_label(items[0], data):
            items = items[1:]  # a header
        items = [[s for s in (x.replace("|", ";").split(";")) if s.strip()] if (";" in x or "|" in x) else x
                 for x in items]
        labels = _from_items(items, data, where)
    else:
        raise DataError(f"{where}: unknown format {suffix!r}; use .csv, .json or .npy")
    if len(labels) != len(data):
        raise DataError(f"{where} has {len(labels)} labels for {len(data)} images")
    return labels


def _is_label(text: str, data: ImageSet) -> bool:
    try:
        _label_value(text.split(";")[0].split("|")[0], data, "")
        return True
    except DataError:
        return False


def _from_items(items: list, data: ImageSet, where: str) -> np.ndarray:
    if any(isinstance(x, list) for x in items):
        out = np.zeros((len(items), data.num_classes), dtype=np.uint8)
        for i, x in enumerate(items):
            for v in (x if isinstance(x, list) else [x]):
                out[i, _label_value(v, data, f"{where}, row {i}")] = 1
        return out
    return np.array([_label_value(v, data, f"{where}, row {i}") for i, v in enumerate(items)], dtype=np.int64)


# -- label patterns -------------------------------------------------------------------------------------------
def _embed(features: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    x = features[:, features.std(axis=0) > 1e-12]
    if x.shape[1] == 0:
        return np.zeros((len(features), 1))
    x = (x - x.mean(0)) / x.std(0)
    k = min(32, x.shape[1], len(x))
    return PCA(k, random_state=seed).fit_transform(x) if k < x.shape[1] else x


def _median_distance(x: np.ndarray) -> float:
    from scipy.spatial.distance import pdist

    return float(np.median(pdist(x))) if len(x) >= 2 else float("nan")


def label_patterns(given: np.ndarray, predicted: np.ndarray, suspect: np.ndarray, embedding: np.ndarray,
                   class_names: Sequence[str], *, min_cluster: int = 5, radius: float = 0.6, tight: float = 0.4,
                   seed: int = 0, reference_size: int = 300) -> list[dict[str, Any]]:
    """Groups of suspected label changes by (given, predicted) and their tight clusters in feature space.

    ``given`` and ``predicted`` are (N,) class indices or (N, K) 0/1 sets; ``suspect`` (N,) marks the suspected
    label changes (flagged, with predicted != given). Returns one dict per group of at least 2 members, largest
    first."""
    from scipy.cluster.hierarchy import fcluster, linkage

    rng = np.random.default_rng(seed)
    multilabel = given.ndim == 2

    def key_of(i: int) -> tuple:
        if multilabel:
            return (tuple(np.flatnonzero(given[i])), tuple(np.flatnonzero(predicted[i])))
        return (int(given[i]), int(predicted[i]))

    def names(k: Any) -> str:
        return "{" + ", ".join(class_names[c] for c in k) + "}" if multilabel else class_names[k]

    groups: dict[tuple, list[int]] = {}
    for i in np.flatnonzero(suspect):
        groups.setdefault(key_of(int(i)), []).append(int(i))
    flags_per_given: dict[Any, int] = {}
    for (g, _), members in groups.items():
        flags_per_given[g] = flags_per_given.get(g, 0) + len(members)
    out = []
    for (g, p), members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        if len(members) < 2:
            continue
        idx = np.array(members)
        if multilabel:
            ref_pool = np.flatnonzero(~suspect & np.all(given == predicted[idx[0]], axis=1))
        else:
            ref_pool = np.flatnonzero(~suspect & (given == p))
        if len(ref_pool) < 2:
            ref_pool = np.flatnonzero(~suspect)
        ref = rng.choice(ref_pool, size=min(reference_size, len(ref_pool)), replace=False)
        ref_d = _median_distance(embedding[ref])
        spread = _median_distance(embedding[idx]) / ref_d if ref_d > 0 else float("nan")
        clusters = []
        if len(idx) >= min_cluster and ref_d > 0:
            assign = fcluster(linkage(embedding[idx], "average"), t=radius * ref_d, criterion="distance")
            for c in np.unique(assign):
                mem = idx[assign == c]
                if len(mem) < min_cluster:
                    continue
                t = _median_distance(embedding[mem]) / ref_d
                clusters.append({"size": len(mem), "tightness": t, "tight": bool(t <= tight),
                                 "members": mem.tolist()})
            clusters.sort(key=lambda c: -c["size"])
        out.append({"given": names(g), "predicted": names(p), "count": len(idx),
                    "share_of_given_flags": len(idx) / flags_per_given[g], "tightness": spread,
                    "clusters": clusters, "tight_clusters": sum(c["tight"] for c in clusters),
                    "members": idx.tolist()})
    return out


# -- output ---------------------------------------------------------------------------------------------------
def _thumb(image: np.ndarray, path: Path, size: int = 64) -> None:
    from PIL import Image

    img = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    scale = max(1, size // max(image.shape[:2]))
    img.resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST).save(path)


def _grid(images: np.ndarray, titles: Sequence[str], path: Path, title: str, cols: int = 8) -> None:
    n = len(images)
    if n == 0:
        return
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.55 * rows), squeeze=False)
    for j, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if j < n:
            img = images[j]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(titles[j], fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def _label_text(labels: np.ndarray, i: int, names: Sequence[str]) -> str:
    if labels.ndim == 2:
        return "{" + ", ".join(names[c] for c in np.flatnonzero(labels[i])) + "}"
    return names[int(labels[i])]


def write_report(out: Path, summary: dict[str, Any], data: ImageSet) -> None:
    """report.md, report.html, thumbs/, suspicious.png and patterns/ from the audit's summary (which carries the
    predicted labels of the examples it shows)."""
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    (out / "patterns").mkdir(exist_ok=True)
    names = data.class_names
    top = summary["most_suspicious"]
    for r in top:
        _thumb(data.images[r["index"]], out / "thumbs" / f"{r['index']}.png")
    _grid(data.images[[r["index"] for r in top]],
          [f"#{r['index']} {r['given']}" + (f"\n-> {r['predicted']}" if r.get("predicted") else "") for r in top],
          out / "suspicious.png", "most suspicious examples: given label -> out-of-sample prediction")
    for j, p in enumerate(summary["patterns"]):
        members = (p["clusters"][0]["members"] if p["clusters"] else p["members"])[:32]
        p["grid"] = f"patterns/pattern-{j}.png"
        _grid(data.images[members], [f"#{i}" for i in members], out / p["grid"],
              f"given {p['given']}, predicted {p['predicted']}: {p['count']} suspected label changes")
        for i in members[:8]:
            _thumb(data.images[i], out / "thumbs" / f"{i}.png")

    det_lines = [f"| {k} | {v['flagged']} | {v['flagged_share']:.1%} | {v.get('note', '')} |"
                 for k, v in summary["detectors"].items()]
    top_lines = [f"| {n + 1} | {r['index']} | {r['given']} | {r.get('predicted') or '-'} | "
                 f"{_fmt(r.get('probability_of_given'))} | {r['suspicion']:.3f} | {', '.join(r['flagged_by']) or '-'} "
                 f"| ![](thumbs/{r['index']}.png) |" for n, r in enumerate(top)]
    pat_lines = [f"| {p['given']} | {p['predicted']} | {p['count']} | {p['share_of_given_flags']:.0%} | "
                 f"{_fmt(p['tightness'])} | "
                 + ("; ".join(f"{c['size']} at {c['tightness']:.2f}" + (" **tight**" if c["tight"] else "")
                              for c in p["clusters"]) or "-")
                 + f" | ![]({p['grid']}) |" for p in summary["patterns"]]
    md = [
        f"# Label audit of {summary['dataset']}",
        "",
        (f"{summary['examples']} images, {len(names)} classes{' (multi-label)' if data.multilabel else ''}; "
         f"labels: {summary['labels_source']}. Model trained on these labels: {summary['model']} "
         f"({summary['recipe']['epochs']} epochs); its accuracy on its own training labels: "
         f"{_fmt(summary.get('train_fit'))}."),
        "",
        "## Detectors",
        "",
        "| detector | flagged | share | note |",
        "|---|---|---|---|",
        *det_lines,
        "",
        f"## The {len(top)} most suspicious examples",
        "",
        ("Ordered by how many detectors flag them, then by their mean percentile rank over the detectors. "
         "'predicted' is confident learning's out-of-sample prediction (a model that never saw the example's label)."),
        "",
        "| rank | index | given | predicted | p(given) | suspicion | flagged by | image |",
        "|---|---|---|---|---|---|---|---|",
        *top_lines,
        "",
        "![](suspicious.png)",
        "",
        "## Label patterns",
        "",
        summary["patterns_note"],
        "",
        ("| given | predicted | suspected changes | share of the given label's flags | tightness | clusters (size at "
         "tightness) | members |"),
        "|---|---|---|---|---|---|---|",
        *pat_lines,
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html("\n".join(md), summary["dataset"]))


def _html(markdown: str, title: str) -> str:
    """A small self-contained HTML rendering of the report's markdown (headings, paragraphs, tables, images)."""
    import re

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"!\[\]\(([^)]+)\)", r'<img src="\1" style="image-rendering:pixelated;max-height:96px">', text)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)

    body, rows = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if set(line.replace("|", "").strip()) <= {"-"}:
                continue
            rows.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if rows:
            head, *rest = rows
            body.append("<table border=1 cellspacing=0 cellpadding=3><tr>" + "".join(f"<th>{inline(c)}</th>"
                                                                                   for c in head) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rest]
            body.append("</table>")
            rows = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif'>{''.join(body)}</body></html>\n")


# -- the audit ------------------------------------------------------------------------------------------------
def run_audit(dataset: str, *, root: str | None = None, labels: str | None = None, out: Path | None = None,
              model: str | None = None, overrides: Sequence[str] = (), defenses: Sequence[str] | None = None,
              top: int = 32, seed: int = 0, device: str = "auto", progress: bool = True,
              log: Any = print) -> dict[str, Any]:
    """Audit ``dataset`` (with ``labels`` from a file, if given); writes the report to ``out``; returns the
    summary (also in ``audit.json``)."""
    if top < 1:
        raise ConfigError(f"--top must be at least 1, got {top}")
    specs = [defense_spec(parse_value(s) if isinstance(s, str) and s.strip().startswith("{") else s)
             for s in (defenses or DEFAULT_DETECTORS)]
    detectors = build_defenses(specs)
    for d in detectors:
        if d.kind != "training":
            raise ConfigError(f"audit: {d.name!r} scores test inputs at inference time, not a labelled dataset; "
                              f"use {', '.join(DEFAULT_DETECTORS)}")
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
    key = stable_key("audit-model", fingerprint(data.images, data.labels), model_key(cfg.model),
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
    net.to(resolve_device(cfg.device)).eval()
    fit_probs = probabilities(net, data.images, data.multilabel, context.feature_cache)
    train_fit = (float((fit_probs.argmax(1) == data.labels).mean()) if not data.multilabel
                 else float(((fit_probs >= 0.5) == data.labels.astype(bool)).all(1).mean()))

    results, ranks = {}, []
    probs = None
    for key, d in zip(result_keys([d.name for d in detectors]), detectors):  # a repeated name gets -2, -3 ...
        det = d.detect(data, net, seed=seed, context=context)
        results[key] = det
        ranks.append(percentile_ranks(det.scores))
        if probs is None and "probabilities" in det.diagnostics:  # confident learning's out-of-sample ones
            probs = det.diagnostics["probabilities"]
        log(f"audit: {key} flags {det.num_flagged} of {len(data)} examples")
    suspicion = np.mean(ranks, axis=0)
    n_flags = np.sum([r.flagged for r in results.values()], axis=0)
    order = np.lexsort((-suspicion, -n_flags))[:top]

    predicted = None
    if probs is not None:
        predicted = (probs >= 0.5).astype(np.uint8) if data.multilabel else probs.argmax(1)
    names = data.class_names
    most = []
    for i in order:
        i = int(i)
        row = {"index": i, "given": _label_text(data.labels, i, names), "suspicion": float(suspicion[i]),
               "flagged_by": [k for k, r in results.items() if r.flagged[i]],
               "scores": {k: float(r.scores[i]) for k, r in results.items()}}
        if predicted is not None:
            row["predicted"] = _label_text(predicted, i, names)
            if not data.multilabel:
                row["probability_of_given"] = float(probs[i, data.labels[i]])
        most.append(row)

    patterns: list[dict[str, Any]] = []
    if predicted is not None:
        cl = next(r for k, r in results.items() if k == "confident_learning")
        differs = np.any(predicted != data.labels, axis=1) if data.multilabel else predicted != data.labels
        suspect = cl.flagged & differs
        embedding = _embed(penultimate_features(net, data.images, feature_cache=context.feature_cache), seed)
        patterns = label_patterns(data.labels, predicted, suspect, embedding, names, seed=seed)
        per_given = {}
        for p in patterns:
            per_given[p["given"]] = per_given.get(p["given"], 0) + p["count"]
        by_given = sorted(per_given.items(), key=lambda kv: -kv[1])
        note = (f"{int(suspect.sum())} suspected label changes (flagged by confident learning, out-of-sample "
                "prediction differs from the given label), grouped by (given, predicted). Tightness: median pairwise "
                "feature distance of the group's members over that of unflagged examples of the predicted class "
                "(1 = as spread as the class; well below 1 = concentrated in one region). A tight cluster of many "
                "changes, or one pair holding most of a class's flags, is the signature of a deliberate relabelling "
                "rather than of honest mistakes.")
        if by_given:
            total = int(suspect.sum())
            note += (" Suspected changes by given label (groups of 2 or more): "
                     + ", ".join(f"{g}: {c} ({c / total:.0%})" for g, c in by_given) + ".")
    else:
        note = ("Label patterns need confident learning's out-of-sample predictions; add the confident_learning "
                "detector.")
    summary = {
        "dataset": dataset, "examples": len(data), "classes": list(names), "multilabel": data.multilabel,
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
