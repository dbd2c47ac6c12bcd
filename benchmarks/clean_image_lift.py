"""Where the clean-image backdoor's test-time lift lands, and what the victim does with it: one finished run.

For each step rule, over the modified-input test images (true class not the target, score below tau): the share
whose lifted score reaches tau and the expectation e, the ASR among those that reach tau, among those that do not,
and by quintile of the lifted score; next to it the NASR (images above tau unmodified), the victim's rate on the
same images unmodified, and the CTA split by whether a test image carries the feature (with ``--clean``, the clean
model's too): the backdoor firing on natural inputs costs CTA on the featured images by design. A victim that
learned "score >= tau -> target" sends the lifted images that reach tau to the target about as often as the
natural ones (NASR); one that learned what high-scoring training images look like does not.

With ``--norms``, the ASR against the perturbation actually spent: for each bound, the ASR (and, with ``--clean``,
the clean model's rate on the same lifted images) and the mean L2 and L_inf of the change in grey levels. The
activation is test-time only, so one trained model answers for every bound.

    PYTHONPATH=src python benchmarks/clean_image_lift.py RUN_FOLDER [--steps minimal,maximal,authors]
        [--norms 0.1,0.25,0.5,1,2 --clean CLEAN_MODEL.pt]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cleanbackdoor.attacks.base import Poisoning
from cleanbackdoor.attacks.clean_image import STEPS, CleanImageActivation
from cleanbackdoor.config import load_config
from cleanbackdoor.experiment import load_data, new_model
from cleanbackdoor.training import predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a finished clean_image run (config.toml, poisoning.*, model.pt)")
    ap.add_argument("--steps", default="minimal,maximal", help=f"step rules, comma-separated ({', '.join(STEPS)})")
    ap.add_argument("--norms", default="", help="bounds to sweep with the run's step rule, comma-separated")
    ap.add_argument("--clean", type=Path, help="the clean model's weights (the run's log names the cache file)")
    args = ap.parse_args()
    cfg = load_config(args.run / "config.toml")
    splits = load_data(cfg)
    test = splits.test
    poisoning = Poisoning.load(args.run)
    act = CleanImageActivation.from_params(json.loads((args.run / "poisoning.json").read_text())["activation"])
    model = new_model(cfg, splits.train, cfg.seed)
    model.load_state_dict(torch.load(args.run / "model.pt", map_location="cpu", weights_only=True))
    model.eval()
    clean = None
    if args.clean is not None:
        clean = new_model(cfg, splits.train, cfg.seed)
        clean.load_state_dict(torch.load(args.clean, map_location="cpu", weights_only=True))
        clean.eval()
    target, tau, e = poisoning.target, act.threshold, act.expectation
    score = act.feature.score(test.images)
    modified = (test.labels != target) & (score < tau)
    natural = (test.labels != target) & (score >= tau)
    x = test.images[modified]
    print(f"{args.run}: {int(modified.sum())} modified-input images, {int(natural.sum())} natural ones; "
          f"tau {tau:.3f}, e {e:.3f}, norm {act.norm}")
    print(f"NASR {np.mean(predict(model, test.images[natural]) == target):.3f}; the modified-input images "
          f"unmodified -> target: {np.mean(predict(model, x) == target):.3f}")
    featured = score >= tau
    print(f"CTA over all {len(test)} test images | the {int((~featured).sum())} without the feature | the "
          f"{int(featured.sum())} with it (any class)")
    for name, m in (("victim", model), ("clean model", clean)):
        if m is not None:
            right = predict(m, test.images) == test.labels
            print(f"  {name:11s}: {right.mean():.4f} | {right[~featured].mean():.4f} | {right[featured].mean():.4f}")
    for step in args.steps.split(","):
        lifted = act.feature.lift(x, e, act.norm, step)
        g = act.feature.score(lifted)
        hit = predict(model, lifted) == target
        reach = g >= tau
        print(f"{step:11s}: ASR {hit.mean():.3f}; reached tau {reach.mean():.3f} (e {np.mean(g >= e):.3f}); ASR among "
              f"those {hit[reach].mean() if reach.any() else float('nan'):.3f}, among the rest "
              f"{hit[~reach].mean() if (~reach).any() else float('nan'):.3f}")
        edges = np.quantile(g, np.linspace(0, 1, 6))
        cells = [f"{a:.1f}..{b:.1f}: {hit[(g >= a) & (g <= b)].mean():.3f}" for a, b in zip(edges[:-1], edges[1:])]
        print("             ASR by quintile of the lifted score: " + "; ".join(cells))

    if args.norms:
        print(f"\nASR against the bound (step {act.step}): norm | ASR | clean model | reached tau | L2 mean | "
              "L_inf mean (grey levels)")
        for norm in (float(v) for v in args.norms.split(",")):
            lifted = act.feature.lift(x, e, norm, act.step)
            diff = (lifted.astype(np.float64) - x.astype(np.float64)).reshape(len(x), -1)
            asr = np.mean(predict(model, lifted) == target)
            base = f"{np.mean(predict(clean, lifted) == target):.3f}" if clean is not None else "-"
            print(f"{norm:g} | {asr:.3f} | {base} | {np.mean(act.feature.score(lifted) >= tau):.3f} | "
                  f"{np.linalg.norm(diff, axis=1).mean():.0f} | {np.abs(diff).max(axis=1).mean():.0f}")


if __name__ == "__main__":
    main()
