"""The audit's report folder: ``report.md``, ``report.html``, thumbnails and grids."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cleanbackdoor.data import ImageSet
from cleanbackdoor.report import plt


def _thumb(image: np.ndarray, path: Path, size: int = 64) -> None:

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


def label_text(labels: np.ndarray, i: int, names: Sequence[str]) -> str:
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
