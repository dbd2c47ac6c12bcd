"""The attack x defense table: one row per experiment config (any attack), one column per defense.

Every row is an ordinary experiment with a ``defenses = [...]`` key, measured by the same code
(:func:`cleanbackdoor.experiment.defense_stage.run_defenses`). Rows are expensive, so nothing is computed twice:

1. a row whose result is already in ``OUT/rows/<name>.json`` under the same key (the resolved config, defenses
   included, less the keys that do not change results: out, progress, device, examples, cache_dir; the data
   root as a hash of its files) is reused;
2. a row whose experiment folder (``out`` of its config) already holds a complete run of the same experiment
   (same config less those keys and ``defenses``) keeps that run's victim, poisoning and figures: only the
   defenses run (and retrain), and the run folder is left untouched;
3. otherwise the experiment runs, defenses included, into its ``out`` folder (into ``OUT/runs/<name>`` when that
   folder holds another experiment, which is never replaced).

Writes ``OUT/table.md`` (detection table and after-defense table, with the reproducing command) and
``OUT/table.json``.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cleanbackdoor.attacks import AttackContext, Poisoning, build_attack
from cleanbackdoor.cache import VERSIONS, stable_key
from cleanbackdoor.config import ExperimentConfig, config_to_dict, load_config
from cleanbackdoor.data import source_fingerprint
from cleanbackdoor.errors import ConfigError, DataError
from cleanbackdoor.executor import Executor, Job, Serial
from cleanbackdoor.experiment.defense_stage import run_defenses
from cleanbackdoor.experiment.run import run_experiment, to_json_value, written_by_this_code
from cleanbackdoor.experiment.stages import load_data, new_model
from cleanbackdoor.pretrain import model_key
from cleanbackdoor.report import percent
from cleanbackdoor.training import resolve_device

VOLATILE = ("out", "progress", "device", "examples", "cache_dir")


def experiment_key(cfg: ExperimentConfig, with_defenses: bool = True) -> str:
    """What a row's figures depend on: the config less VOLATILE, its data (and a pretrained extractor's source
    data) as hashes of their files where they resolve, so that another spelling of the same root reuses the run,
    and the versions of the code (:data:`VERSIONS`: a row is computed by all of it)."""
    d = {k: v for k, v in config_to_dict(cfg).items() if k not in VOLATILE}
    try:
        d["data"] = {**d["data"], "root": source_fingerprint(cfg.data.name, cfg.data.root)}
        d["model"] = model_key(cfg.model)
    except (ConfigError, DataError):  # the data are not there: the key keeps the root as written
        pass
    if not with_defenses:
        d.pop("defenses", None)
    return stable_key("experiment", VERSIONS, d)


def reusable_run(cfg: ExperimentConfig) -> Path | None:
    """The config's experiment folder, when it holds a complete run of the same experiment (defenses aside)."""
    folder = cfg.output_dir()
    needed = ("config.toml", "metrics.json", "model.pt", "poisoning.npz", "poisoning.json")
    if not all((folder / n).is_file() for n in needed):
        return None
    try:
        stored = load_config(folder / "config.toml")
    except ConfigError:
        return None
    if not written_by_this_code(json.loads((folder / "metrics.json").read_text())):
        return None
    return folder if experiment_key(stored, False) == experiment_key(cfg, False) else None


def defend_run(cfg: ExperimentConfig, run_dir: Path, *, log: Callable[[str], None] = print,
               work_dir: Path | None = None) -> dict[str, Any]:
    """Run ``cfg.defenses`` against the victim of a completed run in ``run_dir`` (read only); returns the run's
    figures with ``defenses`` added."""
    attack = build_attack(cfg.attack_name, {k: v for k, v in cfg.attack.items() if k != "name"})
    splits = load_data(cfg)
    train_set = splits.train
    poisoning = Poisoning.load(run_dir, image_shape=train_set.image_shape)
    info = json.loads((run_dir / "poisoning.json").read_text())
    if poisoning.activation is None and info.get("activation") is not None:
        # a trigger that cannot be rebuilt from its parameters (e.g. a learned feature): redo the attack, which
        # is deterministic for the seed, and check that it is the stored poisoning
        context = AttackContext(cache_dir=cfg.cache_path(), device=cfg.device, progress=cfg.progress, log=log,
                                model=cfg.model, train=cfg.train)
        again = attack.poison(train_set, seed=cfg.seed, context=context)
        if not (np.array_equal(again.labels, poisoning.labels) and np.array_equal(again.mask, poisoning.mask)):
            raise DataError(f"{run_dir}: the attack no longer reproduces the stored poisoning; rerun the experiment")
        poisoning = again
    model = new_model(cfg, train_set, cfg.seed)
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
    model.to(resolve_device(cfg.device)).eval()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log(f"reusing the victim of {run_dir} ({cfg.attack_name}: CTA {metrics.get('clean_accuracy')}, "
        f"ASR {metrics.get('attack_success_rate')})")
    t0 = time.perf_counter()
    metrics["defenses"] = run_defenses(cfg, splits, attack, poisoning, model, log=log, work_dir=work_dir)
    metrics.setdefault("seconds", {})["defenses"] = round(time.perf_counter() - t0, 3)
    metrics["victim_from"] = str(run_dir)
    return metrics


def _require_defenses(cfg: ExperimentConfig, name: str) -> None:
    if not cfg.defenses:
        raise ConfigError(f"row {name!r} lists no defenses: add `defenses = [...]` to its config or "
                          "--set 'defenses=[\"spectral\"]'")


def row_metrics(cfg: ExperimentConfig, name: str, out: Path, *, log: Callable[[str], None] = print) -> dict:
    """The figures of one row: reused from ``out/rows``, from the config's completed run, or a fresh run."""
    _require_defenses(cfg, name)
    key = experiment_key(cfg)
    row_file = out / "rows" / f"{name}.json"
    if row_file.is_file():
        stored = json.loads(row_file.read_text())
        if stored.get("key") == key:
            log(f"row {name}: reused from {row_file}")
            return stored["metrics"]
    run_dir = reusable_run(cfg)
    work = out / "rows" / name
    work.mkdir(parents=True, exist_ok=True)
    if run_dir is not None:
        metrics = defend_run(cfg, run_dir, log=log, work_dir=work)
    else:
        final = cfg.output_dir()
        if final.exists() and any(final.iterdir()):  # another experiment's folder: never replace it
            cfg = cfg.model_copy(update={"out": str(out / "runs" / name)})
        log(f"row {name}: running the experiment into {cfg.output_dir()}")
        metrics = run_experiment(cfg, echo=False).metrics
    tmp = row_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "config": config_to_dict(cfg), "metrics": metrics}, indent=2,
                              default=to_json_value))
    tmp.replace(row_file)
    return json.loads(row_file.read_text())["metrics"]




# -- formatting ---------------------------------------------------------------------------------------------
def _auc(v: Any) -> str:
    return "-" if v is None or np.isnan(v) else f"{v:.2f}"


def detection_cell(d: dict[str, Any] | None) -> str:
    if d is None:
        return "not run"
    if d.get("skipped"):
        return f"skipped ({d['skipped']})"
    m = d["detection"]
    cell = f"R {percent(m['recall'])} / P {percent(m['precision'])} / AUC {_auc(m['roc_auc'])}"
    if d.get("kind") == "inference":
        cell += f" (FRR {percent(d.get('false_rejection_rate'))})"
    else:
        cell += f" ({m['flagged']} flagged)"
    return cell


def asr_cell(m: dict[str, Any]) -> str:
    """"ASR a (noT b) / CTA c": noT is the ASR on the same test images without the trigger (what of the ASR the
    trigger does not explain); mAP instead of CTA on multi-label data."""
    asr = f"ASR {percent(m.get('attack_success_rate'))}"
    if m.get("asr_without_trigger") is not None:
        asr += f" (noT {percent(m['asr_without_trigger'])})"
    if "clean_accuracy" not in m and "mean_average_precision" in m:  # multi-label
        return f"{asr} / mAP {percent(m['mean_average_precision'])}"
    return f"{asr} / CTA {percent(m.get('clean_accuracy'))}"


def after_cell(d: dict[str, Any] | None) -> str:
    if d is None or d.get("skipped"):
        return "-"
    after = d.get("after_removal") or d.get("after_rejection")
    if not after:
        return "not retrained"
    return asr_cell(after)


def _row_label(m: dict[str, Any]) -> str:
    return f"{m['attack']} ({m['poisoned_examples']} changed, {percent(m['poisoned_fraction'])})"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], command: str) -> str:
    head = ("| attack (training examples changed) | victim ASR / CTA (mAP) | clean model ASR | " + " | ".join(columns)
            + " |")
    rule = "|" + "---|" * (3 + len(columns))
    det, aft = [head, rule], [head, rule]
    for r in rows:
        m = r["metrics"]
        clean = m.get("clean_model") or {}
        lead = f"| {_row_label(m)} | {asr_cell(m)} | {percent(clean.get('attack_success_rate'))} | "
        d = m.get("defenses", {})
        det.append(lead + " | ".join(detection_cell(d.get(c)) for c in columns) + " |")
        aft.append(lead + " | ".join(after_cell(d.get(c)) for c in columns) + " |")
    first = rows[0]["metrics"] if rows else {}
    return "\n".join([
        f"# Attacks x defenses on {first.get('dataset', '?')}",
        "",
        f"    {command}",
        "",
        "## Detection (against the attack's true mask)",
        "",
        ("R = recall (share of the changed training examples flagged), P = precision (share of the flagged that "
         "were changed), at the method's own threshold; AUC = ROC AUC of its scores. STRIP scores test inputs "
         "(clean vs triggered) instead, with its false rejection rate (FRR) on clean inputs. noT = the ASR on the "
         "same test images without the trigger (a label-only attack may move a whole source class)."),
        "",
        *det,
        "",
        "## After the defense",
        "",
        ("Training-set defenses: the flagged examples removed, the victim retrained (same recipe and seed). STRIP: "
         "rejected inputs count as errors for CTA and as failures for ASR (on its evaluation half of the test set)."),
        "",
        *aft,
        "",
    ])


def run_table(paths: Sequence[str], out: Path, *, overrides: Sequence[str] = (), fields: dict[str, Any] | None = None,
              log: Callable[[str], None] = print, command: str | None = None,
              executor: Executor | None = None) -> dict[str, Any]:
    """Build the table from experiment configs (files, or completed run folders holding ``config.toml``).
    ``executor``: how the rows run (:mod:`cleanbackdoor.executor`; default one after another)."""
    if not paths:
        raise ConfigError("defense-table needs at least one experiment config")
    out.mkdir(parents=True, exist_ok=True)
    plan, names = [], set()
    for path in paths:
        p = Path(path)
        source = p / "config.toml" if p.is_dir() else p
        name = p.name if p.is_dir() else p.stem
        while name in names:
            name += "+"
        names.add(name)
        cfg = load_config(source, list(overrides), **(fields or {}))
        if p.is_dir():
            cfg = cfg.model_copy(update={"out": str(p)})
        _require_defenses(cfg, name)  # every row is checked before any runs
        plan.append((path, name, cfg))
    jobs = [Job(f"row {name}", row_metrics, (cfg, name, out)) for _, name, cfg in plan]
    rows = [{"name": name, "config": str(path), "metrics": metrics}
            for (path, name, _), metrics in zip(plan, (executor or Serial()).map(jobs, "defense table"))]
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r["metrics"].get("defenses", {}) if c not in columns]
    command = command or "cleanbackdoor defense-table " + " ".join(shlex.quote(str(p)) for p in paths)
    summary = {"columns": columns, "command": command,
               "rows": [{"name": r["name"], "config": r["config"], "attack": r["metrics"]["attack"],
                         "dataset": r["metrics"]["dataset"], "poisoned_examples": r["metrics"]["poisoned_examples"],
                         "poisoned_fraction": r["metrics"]["poisoned_fraction"],
                         "clean_accuracy": r["metrics"].get("clean_accuracy"),
                         "attack_success_rate": r["metrics"].get("attack_success_rate"),
                         "asr_without_trigger": r["metrics"].get("asr_without_trigger"),
                         "clean_model": r["metrics"].get("clean_model"),
                         "defenses": r["metrics"].get("defenses", {})} for r in rows]}
    (out / "table.json").write_text(json.dumps(summary, indent=2, default=to_json_value))
    text = markdown_table(rows, columns, command)
    (out / "table.md").write_text(text)
    log(text)
    log(f"results: {out}")
    return summary
