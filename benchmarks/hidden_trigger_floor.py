"""Where do hidden-trigger poisons end up in feature space, next to real patched sources? A diagnostic.

The attack pulls each poison towards the features of a trigger-patched source image. This script measures, with
the same held-out figure as ``hidden_trigger_vs_art.py`` (the mean over K images of the squared feature distance
to their optimally assigned, distinct patched source *test* images), four sets of K images:

- the unperturbed targets (where the poisons start);
- clean source training images (how far the source class itself is, without the trigger);
- the same source images patched (the floor a poison reaches by *being* a patched source);
- with ``--run DIR`` (a finished ``hidden_trigger`` run), that run's poisons;

and each set's distance to the same source test images *without* the trigger, for comparison.

Poisons below the patched-source floor have collided as closely as real patched sources. Then the attack's ASR is
bounded by how far the trigger moves features: by the gap between clean and patched sources, not by the
optimization.

    PYTHONPATH=src python benchmarks/hidden_trigger_floor.py --root ../shared/data/cifar10-jpg.tar.gz \\
        [--config configs/hidden-trigger-cifar10.toml] [--run runs/hidden-trigger-cifar10-dog-horse] [--set ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from hidden_trigger_vs_art import heldout_loss, random_paste, to01

from cleanbackdoor.attacks import Poisoning, resolve_budget
from cleanbackdoor.attacks.hidden_trigger import HiddenTrigger, feature_fn, patch_pixels
from cleanbackdoor.config import load_config
from cleanbackdoor.experiment import load_data
from cleanbackdoor.pretrain import pretrained_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/hidden-trigger-cifar10.toml")
    ap.add_argument("--root", default=None, help="dataset location (overrides the config's data.root)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--run", default=None, help="a finished hidden_trigger run whose poisons to place as well")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides, **({"data.root": args.root} if args.root else {}))
    splits = load_data(cfg)
    train_set, test_set = splits.train, splits.test
    spec = HiddenTrigger(cfg.attack)
    target, sources = spec.resolve_classes(train_set)
    source = sources[0] if sources else 1 - target
    extractor = pretrained_model(cfg.model, cache_dir=cfg.cache_path(), device="cpu", progress=False)
    extractor.requires_grad_(False)
    features = feature_fn(extractor)
    trigger = spec.params.trigger.build(train_set.image_shape, cfg.seed)
    patch = torch.from_numpy(patch_pixels(trigger)).permute(2, 0, 1).float().div(255)

    def pasted(x: torch.Tensor, seed: int) -> torch.Tensor:  # the trigger at random positions, as the attack does
        return random_paste(x, patch, np.random.default_rng(seed))

    clean_heldout = to01(test_set.images[test_set.labels == source])
    heldout = pasted(clean_heldout, 10_000 + args.seed)
    rng = np.random.default_rng(args.seed)
    target_pool = np.flatnonzero(train_set.labels == target)
    k = resolve_budget(spec.params.budget, len(train_set), len(target_pool), "target-class images")
    targets = to01(train_set.images[np.sort(rng.choice(target_pool, k, replace=False))])
    src = to01(train_set.images[np.sort(rng.choice(np.flatnonzero(train_set.labels == source), k, replace=False))])
    names = train_set.class_names
    print(f"{names[source]} -> {names[target]}, {k} images per set, extractor {cfg.model.name} {cfg.model.options}; "
          f"held-out squared feature distance to the {len(heldout)} {names[source]} test images, patched and clean:")
    rows = [("unperturbed targets", targets), (f"clean {names[source]} (training)", src),
            (f"patched {names[source]} (training): the floor", pasted(src, 1 + args.seed))]
    if args.run:
        p = Poisoning.load(args.run)
        rows.append((f"poisons of {args.run}", to01(p.images)))
    print(f"  {'':48} {'patched':>8} {'clean':>8}")
    for name, images in rows:
        print(f"  {name:48} {heldout_loss(features, images, heldout):8.1f} "
              f"{heldout_loss(features, images, clean_heldout):8.1f}")


if __name__ == "__main__":
    main()
