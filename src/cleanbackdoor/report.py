"""Tables and plots of results: the short table a run prints, example images, and budget-sweep curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cleanbackdoor.data.imageset import ImageSet  # noqa: E402
from cleanbackdoor.training import predict  # noqa: E402


def percent(v: Any) -> str:
    """A fraction as a percentage with one decimal; "-" for a missing or NaN figure."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{100 * v:.1f}%"


# figures shown in the run table, in order, with their column titles
TABLE_COLUMNS = [("clean_accuracy", "CTA"), ("attack_success_rate", "ASR"), ("asr_without_trigger", "ASR-noT"),
                 ("natural_attack_success_rate", "NASR"), ("mean_average_precision", "mAP"),
                 ("mean_average_precision_no_trigger", "mAP-noT"), ("side_effect_rate", "SideEff")]


def metrics_table(metrics: dict[str, Any]) -> str:
    """A short fixed-width table: clean and poisoned model side by side, then one line on the poisoning."""
    rows = [("poisoned model", metrics)]
    if metrics.get("clean_model"):
        rows.insert(0, ("clean model", metrics["clean_model"]))
    cols = [(k, t) for k, t in TABLE_COLUMNS if any(k in r for _, r in rows)]
    lines = [f"{'':16}" + "".join(f"{t:>9}" for _, t in cols)]
    for name, r in rows:
        lines.append(f"{name:16}" + "".join(f"{percent(r.get(k)):>9}" for k, _ in cols))
    lines.append(f"{metrics['attack']} on {metrics['dataset']}: {metrics['poisoned_examples']} of "
                 f"{metrics['train_size']} training examples changed ({percent(metrics['poisoned_fraction'])})")
    if metrics.get("backdoor"):  # multi-label: the trigger combination and the goal
        b = metrics["backdoor"]
        goal = (f", remove {b['remove']}" if b.get("remove") else "") + (f", add {b['add']}" if b.get("add") else "")
        lines.append(f"trigger {{{', '.join(b['trigger'])}}} ({percent(b['support'])} of training images), "
                     f"goal {b['goal']}{goal}")
        by = metrics.get("attack_success_rate_by_threshold")
        if by:  # the ASR is thresholded: the same goal read at other score thresholds
            clean_by = (metrics.get("clean_model") or {}).get("attack_success_rate_by_threshold") or {}
            line = f"ASR at score threshold {' / '.join(by)}: {' / '.join(percent(v) for v in by.values())}"
            if clean_by:
                line += f" (clean model {' / '.join(percent(clean_by.get(t)) for t in by)})"
            lines.append(line)
        if metrics.get("trigger_recognized_rate") is not None:  # the ASR against the trigger's perception
            lines.append(f"the clean model sees the whole trigger on {percent(metrics['trigger_recognized_rate'])} "
                         f"of them: ASR there {percent(metrics['attack_success_rate_recognized'])}, elsewhere "
                         f"{percent(metrics['attack_success_rate_unrecognized'])}")
    if metrics.get("defenses"):
        lines.append(defenses_table(metrics["defenses"]))
    return "\n".join(lines)


def defenses_table(defenses: dict[str, Any]) -> str:
    """One line per defense: what it flagged, precision / recall / ROC AUC against the attack's true mask, and
    CTA (mAP for label sets) / ASR after it (retrained without the flagged examples, or, for STRIP, with rejected
    inputs counted)."""
    lines = [f"{'defense':24}{'flagged':>9}{'prec.':>8}{'recall':>8}{'AUC':>7}{'CTA after':>11}{'ASR after':>11}"]
    for key, d in defenses.items():
        if d.get("skipped"):
            lines.append(f"{key:24}  skipped: {d['skipped']}")
            continue
        m = d["detection"]
        after = d.get("after_removal") or d.get("after_rejection") or {}
        auc = "-" if m["roc_auc"] != m["roc_auc"] else f"{m['roc_auc']:.3f}"
        quality = after.get("clean_accuracy", after.get("mean_average_precision"))  # mAP for label sets
        line = (f"{key:24}{m['flagged']:>9}{percent(m['precision']):>8}{percent(m['recall']):>8}{auc:>7}"
                f"{percent(quality):>11}{percent(after.get('attack_success_rate')):>11}")
        if d.get("kind") == "inference":
            line += f"  (test inputs; FRR {percent(d.get('false_rejection_rate'))})"
        lines.append(line)
    return "\n".join(lines)


def sweep_table(rows: Sequence[dict[str, Any]], keys: Sequence[tuple[str, str]]) -> str:
    """A fixed-width table of dict rows; ``keys`` are (key, title); floats shown as percentages."""
    def cell(v: Any) -> str:
        return percent(v) if v is None or isinstance(v, float) else str(v)

    widths = [max([len(t)] + [len(cell(r.get(k))) for r in rows]) for k, t in keys]
    out = ["  ".join(f"{t:>{w}}" for (_, t), w in zip(keys, widths))]
    out += ["  ".join(f"{cell(r.get(k)):>{w}}" for (k, _), w in zip(keys, widths)) for r in rows]
    return "\n".join(out)


def _show(ax, img: np.ndarray) -> None:
    ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
              vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_examples(model, test: ImageSet, attack, poisoning, path: Path, n: int = 8, seed: int = 0) -> None:
    """Clean test images of the source classes (top) and the same images triggered (bottom), titled with the
    victim's prediction; the changed pixels magnified in a third row."""
    if poisoning.activation is None or poisoning.target is None:
        return
    eligible = np.flatnonzero(attack.asr_mask(test, poisoning))
    if len(eligible) == 0:
        return
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(eligible, size=min(n, len(eligible)), replace=False))
    clean = test.images[idx]
    triggered = poisoning.activation(clean)
    pc, pt = predict(model, clean), predict(model, triggered)
    names = test.class_names
    diff = np.abs(triggered.astype(np.int16) - clean.astype(np.int16))
    fig, axes = plt.subplots(3, len(idx), figsize=(1.4 * len(idx), 4.6), squeeze=False)
    for j in range(len(idx)):
        _show(axes[0, j], clean[j])
        axes[0, j].set_title(f"{names[test.labels[idx[j]]]}\n-> {names[pc[j]]}", fontsize=7)
        _show(axes[1, j], triggered[j])
        ok = pt[j] == poisoning.target
        axes[1, j].set_title(f"-> {names[pt[j]]}", fontsize=7, color="red" if ok else "black")
        scale = 255.0 / max(1, diff[j].max())
        _show(axes[2, j], np.clip(diff[j] * scale, 0, 255).astype(np.uint8))
    axes[0, 0].set_ylabel("clean", fontsize=8)
    axes[1, 0].set_ylabel("triggered", fontsize=8)
    axes[2, 0].set_ylabel("|change|\n(scaled)", fontsize=8)
    fig.suptitle(f"{poisoning.attack}: true class -> prediction of the poisoned model "
                 f"(target {names[poisoning.target]})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: Path, title: str, clean: dict[str, Any] | None = None) -> None:
    """The FLIP paper's main figure: ASR against CTA, one point per budget, one line per method."""
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    methods = sorted({r["method"] for r in rows})
    markers = dict(zip(methods, "osd^v<>"))
    for m in methods:
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["budget"])
        xs = [100 * r["clean_accuracy"] for r in pts]
        ys = [100 * r["attack_success_rate"] for r in pts]
        if all("attack_success_rate_std" in r for r in pts):  # the mean over seeds, +- one standard deviation
            ax.errorbar(xs, ys, xerr=[100 * r["clean_accuracy_std"] for r in pts],
                        yerr=[100 * r["attack_success_rate_std"] for r in pts], marker=markers[m], label=m,
                        capsize=2, elinewidth=0.8)
        else:
            ax.plot(xs, ys, marker=markers[m], label=m)
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(str(r["budget"]), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if clean:
        ax.scatter([100 * clean["clean_accuracy"]], [100 * clean["attack_success_rate"]], marker="*", s=120,
                   color="black", label="clean model", zorder=5)
    ax.set_xlabel("clean test accuracy (CTA, %)")
    ax.set_ylabel("attack success rate (ASR, %)")
    ax.set_ylim(-3, 103)  # the full range, as in the FLIP paper: small ASR differences should look small
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_budget_curves(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """ASR and CTA against the budget (count of changed training examples), one line per method; dashed in the
    same colour, the ASR without the trigger where the rows have it (the part of ASR the trigger does not explain)."""
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for m in sorted({r["method"] for r in rows}):
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["budget"])
        b = [r["budget"] for r in pts]
        spread = all("attack_success_rate_std" in r for r in pts)  # the mean over seeds, +- one std

        def err(key: str) -> list[float] | None:
            return [100 * r[f"{key}_std"] for r in pts] if spread else None

        line = axes[0].errorbar(b, [100 * r["attack_success_rate"] for r in pts], yerr=err("attack_success_rate"),
                                marker="o", label=m, capsize=2).lines[0]
        if all(r.get("asr_without_trigger") is not None for r in pts):
            axes[0].errorbar(b, [100 * r["asr_without_trigger"] for r in pts], yerr=err("asr_without_trigger"),
                             linestyle="--", marker=".", color=line.get_color(), label=f"{m}, no trigger",
                             capsize=2)
        axes[1].errorbar(b, [100 * r["clean_accuracy"] for r in pts], yerr=err("clean_accuracy"), marker="o",
                         label=m, capsize=2)
    axes[0].set_ylabel("ASR (%)")
    axes[0].set_ylim(-3, 103)
    axes[1].set_ylabel("CTA (%)")
    for ax in axes:
        ax.set_xlabel("budget (training examples changed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
