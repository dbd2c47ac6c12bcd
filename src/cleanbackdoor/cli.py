"""The ``cleanbackdoor`` command.

    cleanbackdoor run [CONFIG.toml] [--attack NAME] [--dataset NAME] [--recipe NAME] [--root PATH] [--model NAME]
                      [--out DIR] [--seed N] [--device DEV] [--set key=value ...]
        without CONFIG.toml: the attack's recipe for the dataset (FLIP on digits by default)
    cleanbackdoor sweep [CONFIG.toml] --budgets 150,300,500 [...]   budget sweep with baselines and plots
    cleanbackdoor reproduce [--scale small|cpu|paper] [--root DATASET=PATH ...] [--out DIR]   the four papers
        run, sweep, reproduce and defense-table take --executor ray [--address ADDR]: independent runs as Ray tasks
    cleanbackdoor describe NAME   an attack's (defense's, trigger's, model's) parameters, paper and recipes
    cleanbackdoor defense-table CONFIG... --out DIR [--root PATH] [--set key=value ...]   attacks x defenses
    cleanbackdoor audit DATASET [--root PATH] [--labels FILE] [--out DIR]   scan received labels for poisoning
    cleanbackdoor list {attacks,datasets,models,triggers,presets,defenses}
    cleanbackdoor cache [--dir DIR] [--list] [--clear KIND ...] [--older-than DAYS] [--dry-run]   what is cached

A problem with the user's input exits with status 2 and one line that says what is wrong and what is allowed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cleanbackdoor.errors import CleanBackdoorError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a TOML experiment config (optional: without it the run starts from "
                   "the attack's recipe for the dataset, FLIP on digits by default)")
    p.add_argument("--attack", help="attack name (see `cleanbackdoor list attacks`; default flip)")
    p.add_argument("--dataset", help="dataset name (see `cleanbackdoor list datasets`; default digits)")
    p.add_argument("--recipe", help="without a config: start from this recipe of the attack instead of the "
                                    "dataset's (e.g. cifar10-paper; `cleanbackdoor describe ATTACK` lists them)")
    p.add_argument("--root", help="dataset location: folder or archive")
    p.add_argument("--model", help="victim architecture (see `cleanbackdoor list models`)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 --set attack.budget=300")


def _scale_out(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("running on several workers (docs/scale.md)")
    g.add_argument("--executor", choices=("serial", "ray"), default="serial",
                   help=f"serial: {what} one after another in this process (default); ray: each a Ray task "
                        "(pip install 'cleanbackdoor[ray]')")
    g.add_argument("--address", help="the Ray cluster to join (ray start --head prints it; auto: the one this "
                                     "machine belongs to); default: a local cluster on this machine's CPUs")
    g.add_argument("--cpus-per-run", type=float, help="CPUs each Ray task asks for (default 1)")
    g.add_argument("--gpus-per-run", type=float, help="GPUs each Ray task asks for (default 0; e.g. 0.25 puts four "
                                                      "runs on one GPU)")
    g.add_argument("--threads", type=int, help="PyTorch threads per run (Ray's default: --cpus-per-run); the "
                                               "serial and Ray runs are bit-identical on CPU with the same threads")


def _executor(args: argparse.Namespace):
    from cleanbackdoor.executor import make_executor

    return make_executor(args.executor, address=args.address, cpus=args.cpus_per_run, gpus=args.gpus_per_run,
                         threads=args.threads)


def _load(args: argparse.Namespace):
    from cleanbackdoor.config import load_config

    fields = {"attack.name": args.attack, "data.name": args.dataset, "data.root": args.root,
              "model.name": args.model, "out": args.out, "seed": args.seed, "device": args.device}
    if args.quiet:
        fields["progress"] = False
    if args.config is not None and args.recipe:
        from cleanbackdoor.errors import ConfigError

        raise ConfigError("--recipe starts a run without a config file; in a file, write "
                          "extends = \"recipe:ATTACK/NAME\"")
    return load_config(args.config, args.overrides, recipe=args.recipe or args.config is None, **fields)


def cmd_run(args: argparse.Namespace) -> int:
    from cleanbackdoor.experiment import run_experiment

    cfg = _load(args)
    executor = _executor(args)  # serial: FLIP's experts one after another, as without an executor
    run_experiment(cfg, executor=executor if args.executor == "ray" else None)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cleanbackdoor.sweep import run_sweep

    budgets = [_budget(b) for b in args.budgets.split(",") if b.strip()]
    baselines = () if args.no_baseline else tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    seeds = _seeds(args.seeds) if args.seeds else None
    cfg = _load(args)
    run_sweep(cfg, budgets, baselines=baselines, seeds=seeds, executor=_executor(args))
    return 0


def _budget(text: str) -> int | float:
    from cleanbackdoor.errors import ConfigError

    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise ConfigError(f"--budgets takes comma-separated counts or fractions, got {text!r}") from None


def _seeds(text: str) -> list[int]:
    from cleanbackdoor.errors import ConfigError

    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts or not all(t.isdigit() for t in parts):
        raise ConfigError(f"--seeds takes comma-separated non-negative integers, got {text!r}")
    return [int(t) for t in parts]


def cmd_list(args: argparse.Namespace) -> int:
    from cleanbackdoor.attacks import ATTACKS
    from cleanbackdoor.data import DATASETS
    from cleanbackdoor.models import MODELS
    from cleanbackdoor.recipes import PRESETS
    from cleanbackdoor.triggers import TRIGGERS

    registry = {"attacks": ATTACKS, "datasets": DATASETS, "models": MODELS, "triggers": TRIGGERS,
                "presets": PRESETS}.get(args.what)
    if registry is None:
        from cleanbackdoor.defenses import DEFENSES as registry
    width = max(map(len, registry), default=0)
    for name in sorted(registry):
        summary = (getattr(registry[name], "__doc__", None) or "").strip().split("\n")[0]
        print(f"{name:{width}}  {summary}".rstrip() if args.what in ("attacks", "defenses", "triggers") else name)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from cleanbackdoor.errors import ConfigError
    from cleanbackdoor.reproduce import run_reproduce

    roots = {}
    for item in args.root:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--root takes DATASET=PATH, e.g. cifar10=../shared/data/cifar10-jpg.tar.gz; "
                              f"got {item!r}")
        roots[name.strip()] = path.strip()
    run_reproduce(args.scale, args.out, roots, seed=args.seed, device=args.device, progress=not args.quiet,
                  executor=_executor(args))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from cleanbackdoor.describe import describe

    print(describe(args.name))
    return 0


def cmd_defense_table(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cleanbackdoor.experiment.defense_table import run_table

    fields = {"data.root": args.root, "seed": args.seed, "device": args.device}
    if args.quiet:
        fields["progress"] = False
    command = "cleanbackdoor " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["defense-table"] else None
    run_table(args.configs, Path(args.out), overrides=args.overrides, fields=fields, command=command,
              executor=_executor(args))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cleanbackdoor.audit import run_audit

    run_audit(args.dataset, root=args.root, labels=args.labels, out=Path(args.out) if args.out else None,
              model=args.model, overrides=args.overrides, defenses=args.defense or None, top=args.top,
              seed=args.seed, device=args.device, progress=not args.quiet)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cleanbackdoor import cache

    root = Path(args.dir).expanduser() if args.dir else cache.default_root()
    found = cache.entries(root)
    if not args.clear:
        if args.older_than is not None:
            found = cache.select(found, ["all"], args.older_than) + [e for e in found if e.kind == "other"]
        print(f"cache: {root}")
        print(cache.listing(found) if args.list else cache.summary(found))
        return 0
    chosen = cache.select(found, args.clear, args.older_than)
    if chosen and (args.list or args.dry_run):
        print(cache.listing(chosen))
    size = cache.human(sum(e.size for e in chosen))
    count = f"{len(chosen)} {'entry' if len(chosen) == 1 else 'entries'}"
    if args.dry_run:
        print(f"cache: would remove {count} ({size}) from {root}")
        return 0
    cache.remove(chosen)
    print(f"cache: removed {count} ({size}) from {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleanbackdoor", description=__doc__.split("\n")[1].strip() or None)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment: attack, victim training, evaluation")
    _common(run)
    _scale_out(run, "FLIP's experts and label runs")
    run.set_defaults(func=cmd_run)
    sweep = sub.add_parser("sweep", help="run an attack over several budgets, with label-only baselines")
    _common(sweep)
    sweep.add_argument("--budgets", required=True, help="comma-separated counts (or fractions) of training examples")
    sweep.add_argument("--baselines", default="random_flip",
                       help="baselines at each budget (comma-separated): random_flip, inner_product (label-only), "
                            "badnets (the dirty-label bound)")
    sweep.add_argument("--seeds", help="comma-separated seeds: every point runs once per seed; the table and plots "
                                       "show the mean and the standard deviation")
    sweep.add_argument("--no-baseline", action="store_true", help="skip the baselines")
    _scale_out(sweep, "the points (budget x method x seed)")
    sweep.set_defaults(func=cmd_sweep)
    rep = sub.add_parser("reproduce", help="the four papers' attacks and BadNets at one scale: one table (paper / "
                         "this toolkit / clean model / ASR without the trigger) and one figure")
    rep.add_argument("--scale", choices=["small", "cpu", "paper"], default="small",
                     help="small: the embedded digits, minutes on 2 cores; cpu: the real datasets, the results "
                          "pages' recipes; paper: the papers' recipes, for a GPU")
    rep.add_argument("--root", action="append", default=[], metavar="DATASET=PATH",
                     help="where a dataset lies (repeat), e.g. --root cifar10=../shared/data/cifar10-jpg.tar.gz")
    rep.add_argument("--out", help="output folder (default runs/reproduce-SCALE)")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--device", default="auto")
    rep.add_argument("--quiet", action="store_true", help="no progress bars")
    _scale_out(rep, "the rows")
    rep.set_defaults(func=cmd_reproduce)
    desc = sub.add_parser("describe", help="an attack, defense, trigger or model: its parameters (type, default, "
                          "description), its paper and its recipes")
    desc.add_argument("name")
    desc.set_defaults(func=cmd_describe)
    table = sub.add_parser("defense-table", help="attacks (rows) x defenses (columns): detection and after-defense "
                           "figures, markdown + json")
    table.add_argument("configs", nargs="+", help="experiment configs with a `defenses` key (or run folders)")
    table.add_argument("--out", required=True, help="folder for table.md, table.json and the rows")
    table.add_argument("--root", help="dataset location for every row")
    table.add_argument("--seed", type=int)
    table.add_argument("--device")
    table.add_argument("--quiet", action="store_true")
    table.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value in every row's config")
    _scale_out(table, "the rows")
    table.set_defaults(func=cmd_defense_table)
    audit = sub.add_parser("audit", help="scan a labelled dataset for poisoned labels: report with thumbnails")
    audit.add_argument("dataset", help="a catalog name (digits, mnist, cifar10 ...) or an image folder tree")
    audit.add_argument("--root", help="where a catalog dataset lies (folder or archive)")
    audit.add_argument("--labels", help="the labels received (CSV, JSON or .npy), replacing the dataset's own")
    audit.add_argument("--out", help="report folder (default runs/audit-<dataset>)")
    audit.add_argument("--model", help="architecture the detectors train (default: the dataset's)")
    audit.add_argument("--defense", action="append", metavar="SPEC",
                       help='a detector: a name or a TOML table, e.g. \'{name = "confident_learning", folds = 2}\' '
                            "(repeat; default: spectral, activation_clustering, confident_learning)")
    audit.add_argument("--top", type=int, default=32, help="how many of the most suspicious examples to show")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--device", default="auto")
    audit.add_argument("--quiet", action="store_true")
    audit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override the model or recipe, e.g. --set train.epochs=10")
    audit.set_defaults(func=cmd_audit)
    cached = sub.add_parser("cache", help="what the cache holds (by kind, size, age); remove entries")
    cached.add_argument("--dir", help="the cache folder (default $CLEANBACKDOOR_CACHE, else ~/.cache/cleanbackdoor)")
    cached.add_argument("--list", action="store_true", help="one line an entry instead of a summary by kind")
    cached.add_argument("--clear", action="append", metavar="KIND",
                        help="remove the entries of a kind (repeat): all, datasets, pretrained, clean, checkpoints, "
                             "features, flip, hidden_trigger, defenses, audit")
    cached.add_argument("--older-than", type=float, metavar="DAYS",
                        help="only entries last modified more than DAYS days ago")
    cached.add_argument("--dry-run", action="store_true", help="say what --clear would remove, remove nothing")
    cached.set_defaults(func=cmd_cache)
    lst = sub.add_parser("list", help="list the names the config accepts")
    lst.add_argument("what", choices=["attacks", "datasets", "models", "triggers", "presets", "defenses"])
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CleanBackdoorError as e:
        print(f"cleanbackdoor: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cleanbackdoor: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`cleanbackdoor describe flip | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        return 0


if __name__ == "__main__":
    sys.exit(main())
