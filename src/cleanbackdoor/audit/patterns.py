"""Label patterns: the suspected label changes grouped by (given, predicted) and their tight clusters in feature
space (the method is described in :mod:`cleanbackdoor.audit`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from sklearn.decomposition import PCA


def embed(features: np.ndarray, seed: int) -> np.ndarray:

    x = features[:, features.std(axis=0) > 1e-12]
    if x.shape[1] == 0:
        return np.zeros((len(features), 1))
    x = (x - x.mean(0)) / x.std(0)
    k = min(32, x.shape[1], len(x))
    return PCA(k, random_state=seed).fit_transform(x) if k < x.shape[1] else x


def _median_distance(x: np.ndarray) -> float:

    return float(np.median(pdist(x))) if len(x) >= 2 else float("nan")


def label_patterns(given: np.ndarray, predicted: np.ndarray, suspect: np.ndarray, embedding: np.ndarray,
                   class_names: Sequence[str], *, min_cluster: int = 5, radius: float = 0.6, tight: float = 0.4,
                   seed: int = 0, reference_size: int = 300) -> list[dict[str, Any]]:
    """Groups of suspected label changes by (given, predicted) and their tight clusters in feature space.

    ``given`` and ``predicted`` are (N,) class indices or (N, K) 0/1 sets; ``suspect`` (N,) marks the suspected
    label changes (flagged, with predicted != given). Returns one dict per group of at least 2 members, largest
    first."""
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
