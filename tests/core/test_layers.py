"""The package imports one way: every module imports only from its own part of the package or from parts below it
in LAYERS, never from above, and imports the toolkit's modules at the top of the file (docs/architecture.md)."""

import ast
import subprocess
import sys
from pathlib import Path

import cleanbackdoor

# Lowest first. A module of the toolkit may import from its own entry (e.g. attacks.flip from attacks.base) and
# from entries before it. Add a new module here, at the lowest place its imports allow.
LAYERS = [
    "errors",              # the error types
    "components",          # the base class of attacks and defenses, their help, one-line validation errors
    "metrics",             # accuracy and attack success on predictions
    "cache",               # cache keys, atomic writes, compute-once with locks, the cache's kinds
    "data",                # datasets, loaders, image sets, transforms
    "triggers",            # pixel triggers
    "models",              # architectures
    "executor",            # serial and Ray execution of independent jobs
    "recipes",             # TrainConfig and the papers' presets
    "training",            # the training loop, frozen features, prediction
    "multilabel_metrics",  # mAP, multi-label ASR and side effects
    "report",              # tables and plots
    "specs",               # the data and model parts of a config (pretraining's source task)
    "pretrain",            # extractors pretrained on a source task, victims built on them
    "attacks",             # the attacks: poisonings, never training or evaluating a victim
    "defenses",            # the detectors and filters
    "config",              # the experiment config: validates attack and defense names, attack recipes
    "experiment",          # one run: stages, evaluation, defenses stage, defense table
    "sweep",               # budget sweeps
    "reproduce",           # the papers at one scale
    "audit",               # scanning received labels
    "describe",            # what a component takes
    "cli",                 # the command line
    "__main__",
]
# The command line imports a command's modules when the command runs, so that `cleanbackdoor --help` and `list`
# start without loading PyTorch: the one place where the toolkit's imports sit inside functions.
LAZY = {"cli"}

ROOT = Path(cleanbackdoor.__file__).parent


def _entry(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported toolkit module, at the top of the file, line) for every import of the toolkit in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cleanbackdoor."):
            found.append((node.module.removeprefix("cleanbackdoor."), id(node) in top, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("cleanbackdoor."), id(node) in top, node.lineno)
                      for a in node.names if a.name.startswith("cleanbackdoor.")]
    return found


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(ROOT.rglob("*.py")) if p.name != "__init__.py" or p.parent != ROOT}


def test_every_module_has_a_layer():
    missing = sorted({_entry(m) for m in _modules()} - set(LAYERS))
    assert not missing, f"add these to LAYERS at the lowest place their imports allow: {missing}"


def test_imports_only_go_down():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward, inner = [], []
    for module, path in _modules().items():
        for target, at_top, line in _imports(path):
            if rank[_entry(target)] > rank[_entry(module)]:
                upward.append(f"{path.relative_to(ROOT)}:{line} {module} -> {target}")
            if not at_top and _entry(module) not in LAZY:
                inner.append(f"{path.relative_to(ROOT)}:{line} {module} -> {target}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)
    assert not inner, "toolkit imports inside functions (move them to the top):\n" + "\n".join(inner)


def test_the_check_sees_an_upward_import(tmp_path):
    """The test above fails when it should: a module of a low layer importing a high one is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from cleanbackdoor.experiment import run_experiment\n\n\ndef f():\n"
                   "    from cleanbackdoor.config import load_config\n")
    assert _imports(bad) == [("experiment", True, 1), ("config", False, 5)]
    rank = {name: i for i, name in enumerate(LAYERS)}
    assert rank["experiment"] > rank["attacks"] and rank["config"] > rank["defenses"]


def test_a_defense_loads_no_attack():
    """Defenses share their base class with attacks through ``components``: importing a defense loads none of the
    attacks (FLIP, the hidden trigger, pretraining's victims) that sit beside it."""
    code = ("import sys, cleanbackdoor.defenses; "
            "print(sorted(m for m in sys.modules if m.startswith('cleanbackdoor.attacks')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
