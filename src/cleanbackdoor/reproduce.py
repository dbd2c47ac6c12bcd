"""``cleanbackdoor reproduce``: the four papers' attacks (and BadNets, the dirty-label reference) at one scale, one
table and one figure: the paper's figure beside this toolkit's, the clean model's and the ASR without the trigger.

Scales (each row is an attack's recipe, :attr:`cleanbackdoor.attacks.Attack.recipes`):

- ``small``: the embedded digits (no download, no ``--root``), minutes on 2 CPU cores;
- ``cpu``: the real datasets (``--root cifar10=... --root mnist=...``), the recipes the results pages measured on
  2 CPU cores (hours from an empty cache; the extractors of ``artifacts/`` save most of it);
- ``paper``: the papers' own recipes, for a GPU; attacks without one are listed with the reason.

A row whose run folder already holds a finished run of exactly the same resolved config is read back, not run
again, so an interrupted reproduction resumes and ``cleanbackdoor run --attack NAME`` runs can be reused.

The paper column quotes a figure from the paper (or its authors' logs) on the paper's own data: at the ``small``
and ``cpu`` scales it is the reference, not a like-for-like target. A row *fires* when its ASR is at least
``margin`` above the clean model's on the same inputs and above its own ASR without the trigger.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cleanbackdoor.attacks import require_recipe
from cleanbackdoor.config import merge_configs, validate_config
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.executor import Executor, Job, Serial
from cleanbackdoor.experiment import experiment_metrics, finished_metrics


@dataclass(frozen=True)
class PaperFigure:
    asr: float | None  # the figure (a fraction), None where the paper gives none to compare with
    text: str  # as the paper gives it
    setting: str
    source: str


FLIP_PAPER = PaperFigure(0.994, "99.4%", "CIFAR-10, ResNet-32, 1,000 flips (2%), sinusoidal trigger",
                         "Jha, Hayase, Oh, NeurIPS 2023 (headline result)")
CLEAN_IMAGE_MNIST = PaperFigure(0.866, "86.5-86.7%", "MNIST, 2-layer linear net, ratio 0.05, 3 seeds",
                                "Rong et al., arXiv:2403.15010 (authors' logs)")
CLEAN_IMAGE_CIFAR = PaperFigure(0.467, "37.9-55.4%", "CIFAR-10, ResNet-20, random kernel, ratio 0.05, 3 seeds",
                                "Rong et al., arXiv:2403.15010 (authors' logs)")
MULTILABEL_PAPER = PaperFigure(0.982, "up to 98.2%", "VOC 2007 / MS-COCO / NUS-WIDE photos",
                               "Chen et al., ICLR 2023 (abstract)")
HIDDEN_TRIGGER_PAPER = PaperFigure(0.818, "81.8%", "CIFAR-10 random pairs, 800 poisons, 8x8 trigger "
                                   "(patched-source accuracy 0.182)", "Saha et al., AAAI 2020 (poster)")
BADNETS_PAPER = PaperFigure(None, "-", "the dirty-label reference of this toolkit", "Gu et al. 2017")


@dataclass(frozen=True)
class Row:
    attack: str
    recipe: str  # the recipe's key: a dataset name, or e.g. "cifar10-paper"
    paper: PaperFigure
    margin: float  # how far above the clean model's ASR the row must be to count as firing


LABEL_MARGIN, HIDDEN_MARGIN = 0.40, 0.20  # issue 21: 40 points for label attacks, 20 for the hidden trigger

SCALES: dict[str, list[Row]] = {
    "small": [Row("flip", "digits", FLIP_PAPER, LABEL_MARGIN),
              Row("clean_image", "digits", CLEAN_IMAGE_MNIST, LABEL_MARGIN),
              Row("multilabel", "digits", MULTILABEL_PAPER, LABEL_MARGIN),
              Row("hidden_trigger", "digits", HIDDEN_TRIGGER_PAPER, HIDDEN_MARGIN),
              Row("badnets", "digits", BADNETS_PAPER, LABEL_MARGIN)],
    "cpu": [Row("flip", "cifar10", FLIP_PAPER, LABEL_MARGIN),
            Row("clean_image", "mnist", CLEAN_IMAGE_MNIST, LABEL_MARGIN),
            Row("multilabel", "cifar10", MULTILABEL_PAPER, LABEL_MARGIN),
            Row("hidden_trigger", "cifar10", HIDDEN_TRIGGER_PAPER, HIDDEN_MARGIN),
            Row("badnets", "cifar10", BADNETS_PAPER, LABEL_MARGIN)],
    "paper": [Row("flip", "cifar10-paper", FLIP_PAPER, LABEL_MARGIN),
              Row("clean_image", "cifar10-paper", CLEAN_IMAGE_CIFAR, LABEL_MARGIN)],
}
# attacks a scale leaves out, and why (shown under the table)
MISSING: dict[str, dict[str, str]] = {
    "paper": {"multilabel": "the paper's photos (VOC 2007, MS-COCO, NUS-WIDE) with an ImageNet-pretrained victim: "
                            "no recipe yet",
              "hidden_trigger": "the paper's CIFAR-10 recipe is not published beyond 8x8 triggers and 800 poisons "
                                "added to 3,000 clean images; its ImageNet runs need ImageNet and AlexNet",
              "badnets": "the dirty-label reference runs at the other scales"},
}


def row_config(row: Row, roots: dict[str, str], fields: dict[str, Any]) -> dict[str, Any]:
    """The resolved config dict of one row: its recipe, the data root of its dataset, the common fields."""
    raw = require_recipe(row.attack, row.recipe)
    name = raw["data"]["name"]
    root = roots.get(name) or roots.get(name.removesuffix("-mosaic"))
    if root is not None:
        raw["data"]["root"] = root
    return merge_configs(raw, fields)


def command(row: Row, root: str | None) -> str:
    """The ``cleanbackdoor run`` line of a row."""
    dataset = row.recipe.split("-")[0] if row.recipe.endswith("-paper") else row.recipe
    line = f"cleanbackdoor run --attack {row.attack} --dataset {dataset}"
    if row.recipe != dataset:
        line += f" --recipe {row.recipe}"
    return line + (f" --root {root}" if root else "")


def run_reproduce(scale: str, out: str | Path | None = None, roots: dict[str, str] | None = None, seed: int = 0,
                  device: str = "auto", progress: bool = True, log: Callable[[str], None] = print,
                  executor: Executor | None = None) -> list[dict[str, Any]]:
    """Run (or read back) every row of ``scale``; write ``reproduce.md``, ``reproduce.json`` and
    ``reproduce.png`` to ``out``; return the rows. ``executor``: how the rows run (:mod:`cleanbackdoor.executor`;
    default one after another)."""
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    roots = dict(roots or {})
    out = Path(out or f"runs/reproduce-{scale}")
    configs = []
    for row in SCALES[scale]:  # every config is checked before anything runs
        name = f"{row.attack}-{row.recipe}"
        fields = {"seed": seed, "device": device, "progress": progress, "out": str(out / name)}
        cfg = validate_config(row_config(row, roots, fields))
        if cfg.data.name not in ("digits", "digits-mosaic") and cfg.data.root is None:
            raise ConfigError(f"reproduce --scale {scale}: {row.attack} runs on {cfg.data.name}; give its location "
                              f"with --root {cfg.data.name.removesuffix('-mosaic')}=PATH")
        configs.append((row, cfg))
    for row, cfg in configs:
        state = "read back from " + str(cfg.output_dir()) if finished_metrics(cfg) is not None else "to run"
        log(f"reproduce: {row.attack} ({row.recipe}): {state}")
    jobs = [Job(f"{row.attack} ({row.recipe})", experiment_metrics, (cfg,)) for row, cfg in configs]
    rows = []
    for (row, cfg), metrics in zip(configs, (executor or Serial()).map(jobs, "reproduce")):
        rows.append(summarize(row, metrics, command(row, cfg.data.root)))
        log(f"reproduce: {row.attack}: ASR {_pct(rows[-1]['asr'])} (clean model {_pct(rows[-1]['clean_asr'])}, "
            f"without the trigger {_pct(rows[-1]['asr_without_trigger'])})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.json").write_text(json.dumps({"scale": scale, "seed": seed, "rows": rows}, indent=2))
    text = reproduce_table(rows, scale)
    (out / "reproduce.md").write_text(text)
    plot_reproduce(rows, out / "reproduce.png", f"cleanbackdoor reproduce --scale {scale}")
    log(text)
    return rows


def summarize(row: Row, m: dict[str, Any], cmd: str) -> dict[str, Any]:
    """One table row from a run's metrics."""
    clean = m.get("clean_model") or {}
    multilabel = "mean_average_precision" in m
    accuracy_key = "mean_average_precision" if multilabel else "clean_accuracy"
    asr, clean_asr = m.get("attack_success_rate"), clean.get("attack_success_rate")
    no_trigger = m.get("asr_without_trigger")
    fired = (asr is not None and clean_asr is not None and asr >= clean_asr + row.margin
             and (no_trigger is None or asr > no_trigger))
    return {"attack": row.attack, "recipe": row.recipe, "dataset": m.get("dataset"),
            "paper": asdict(row.paper), "asr": asr, "clean_asr": clean_asr, "asr_without_trigger": no_trigger,
            "accuracy_metric": "mAP" if multilabel else "CTA", "accuracy": m.get(accuracy_key),
            "clean_accuracy": clean.get(accuracy_key), "poisoned_examples": m.get("poisoned_examples"),
            "train_size": m.get("train_size"), "margin": row.margin, "fired": bool(fired), "command": cmd,
            "seconds": round(sum((m.get("seconds") or {}).values()), 1)}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def reproduce_table(rows: list[dict[str, Any]], scale: str) -> str:
    """The Markdown table (and the notes under it)."""
    lines = ["| attack | data | paper: ASR (setting; source) | ASR | clean model ASR | ASR without trigger | "
             "CTA / mAP (clean model) | changed | fired | command |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["paper"]
        lines.append(
            f"| {r['attack']} | {r['dataset']} | {p['text']} ({p['setting']}; {p['source']}) | {_pct(r['asr'])} | "
            f"{_pct(r['clean_asr'])} | {_pct(r['asr_without_trigger'])} | {r['accuracy_metric']} "
            f"{_pct(r['accuracy'])} ({_pct(r['clean_accuracy'])}) | {r['poisoned_examples']} of {r['train_size']} | "
            f"{'yes' if r['fired'] else 'no'} (+{round(100 * r['margin'])}) | `{r['command']}` |")
    notes = [f"- not at this scale: {a}: {why}" for a, why in MISSING.get(scale, {}).items()]
    notes.append("- fired: ASR at least the given points above the clean model's on the same inputs, and above the "
                 "ASR without the trigger (multi-label: the trigger is a combination of labels, so there is no "
                 "image without it).")
    if scale != "paper":
        notes.append("- the paper's figure is on the paper's data and victim: a reference, not a like-for-like "
                     "target at this scale.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot_reproduce(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars per attack: ASR, the clean model's ASR, ASR without the trigger; the paper's figure as a mark."""
    import matplotlib  # noqa: PLC0415 - only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4.2))
    width = 0.26
    series = [("asr", "ASR", "tab:red"), ("clean_asr", "clean model ASR", "tab:gray"),
              ("asr_without_trigger", "ASR without the trigger", "tab:orange")]
    for j, (key, label, color) in enumerate(series):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        ax.bar(xs, [100 * (r[key] or 0) for r in rows], width, label=label, color=color)
    papers = [(i, 100 * r["paper"]["asr"]) for i, r in enumerate(rows) if r["paper"]["asr"] is not None]
    if papers:
        ax.scatter([i for i, _ in papers], [v for _, v in papers], marker="_", s=900, color="black", zorder=3,
                   label="paper (its own setting)")
    ax.set_xticks(range(len(rows)), [f"{r['attack']}\n{r['dataset']}" for r in rows], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=4, frameon=False, markerscale=0.4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
