"""The ``cleanbackdoor`` command.

    cleanbackdoor run [CONFIG.toml] [--attack NAME] [--dataset NAME] [--root PATH] [--model NAME] [--out DIR]
                      [--seed N] [--device DEV] [--set key=value ...]
    cleanbackdoor sweep [CONFIG.toml] --budgets 150,300,500 [...]   budget sweep with baselines and plots
    cleanbackdoor list {attacks,datasets,models,triggers,presets}

A problem with the user's input exits with status 2 and one line that says what is wrong and what is allowed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cleanbackdoor.errors import CleanBackdoorError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a TOML experiment config (optional: defaults run BadNets on digits)")
    p.add_argument("--attack", help="attack name (see `cleanbackdoor list attacks`)")
    p.add_argument("--dataset", help="dataset name (see `cleanbackdoor list datasets`)")
    p.add_argument("--root", help="dataset location: folder or archive")
    p.add_argument("--model", help="victim architecture (see `cleanbackdoor list models`)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 --set attack.budget=300")


def _load(args: argparse.Namespace):
    from cleanbackdoor.config import load_config

    fields = {"attack.name": args.attack, "data.name": args.dataset, "data.root": args.root,
              "model.name": args.model, "out": args.out, "seed": args.seed, "device": args.device}
    if args.quiet:
        fields["progress"] = False
    return load_config(args.config, args.overrides, **fields)


def cmd_run(args: argparse.Namespace) -> int:
    from cleanbackdoor.experiment import run_experiment

    run_experiment(_load(args))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cleanbackdoor.sweep import run_sweep

    budgets = [_budget(b) for b in args.budgets.split(",") if b.strip()]
    run_sweep(_load(args), budgets, baselines=not args.no_baseline)
    return 0


def _budget(text: str) -> int | float:
    from cleanbackdoor.errors import ConfigError

    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise ConfigError(f"--budgets takes comma-separated counts or fractions, got {text!r}") from None


def cmd_list(args: argparse.Namespace) -> int:
    from cleanbackdoor.attacks import ATTACKS
    from cleanbackdoor.data import DATASETS
    from cleanbackdoor.models import MODELS
    from cleanbackdoor.training import PRESETS
    from cleanbackdoor.triggers import TRIGGERS

    registry = {"attacks": ATTACKS, "datasets": DATASETS, "models": MODELS, "triggers": TRIGGERS,
                "presets": PRESETS}[args.what]
    for name in sorted(registry):
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleanbackdoor", description=__doc__.split("\n")[1].strip() or None)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment: attack, victim training, evaluation")
    _common(run)
    run.set_defaults(func=cmd_run)
    sweep = sub.add_parser("sweep", help="run an attack over several budgets, with a random-flip baseline")
    _common(sweep)
    sweep.add_argument("--budgets", required=True, help="comma-separated counts (or fractions) of training examples")
    sweep.add_argument("--no-baseline", action="store_true", help="skip the random baseline at each budget")
    sweep.set_defaults(func=cmd_sweep)
    lst = sub.add_parser("list", help="list the names the config accepts")
    lst.add_argument("what", choices=["attacks", "datasets", "models", "triggers", "presets"])
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


if __name__ == "__main__":
    sys.exit(main())
