"""Which head and pooling let a frozen-extractor victim learn a multi-label backdoor: a sweep on cached features.

The transfer victim of ``configs/multilabel-cifar10-mosaic-transfer.toml`` spends most of its time computing the
frozen extractor's features (about 6 minutes on 2 cores); its head trains in seconds to minutes. This script
computes the features once per model option set (cached in ``--features-dir``) and trains, for each head setting,
a clean head and one head per goal on the falsified label sets, with the recipe's ASL loss, optimizer and
schedule and the same flip augmentation (its own small loop on feature tensors, so the numbers are close to, not
bit-equal with, a ``cleanbackdoor run``). Printed per goal: ASR at 0.75 (clean head's in brackets), mAP of both
heads, the ASR at thresholds 0.5 / 0.75 / 0.9, and the share of falsified training label sets the head fits.

    PYTHONPATH=src python benchmarks/multilabel_heads.py --root ../shared/data/cifar10-jpg.tar.gz \\
        --heads "256/30/1e-3;1024,1024/100/2e-3" --goals disappearing,appearing --set 'model.options={pool=2}'

A head setting is HIDDEN/EPOCHS/LR, HIDDEN a comma-separated list of layer sizes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cleanbackdoor.attacks.multilabel import MultiLabel
from cleanbackdoor.config import load_config, stable_key
from cleanbackdoor.data.transforms import Augment, to_nchw
from cleanbackdoor.experiment import load_data, new_model
from cleanbackdoor.models import make_head
from cleanbackdoor.multilabel_metrics import BackdoorSpec, backdoor_report
from cleanbackdoor.training import FrozenFeatures, lr_at, make_loss, make_optimizer


def train_head(feats: FrozenFeatures, labels: np.ndarray, hidden: list[int], cfg, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    head = make_head(feats.plain.shape[1], labels.shape[1], hidden)
    y = torch.as_tensor(labels).float()
    loss_fn, opt = make_loss(cfg, y), make_optimizer(head, cfg)
    gen = torch.Generator().manual_seed(seed)
    n, bs = len(y), cfg.batch_size
    steps = (n + bs - 1) // bs
    aug = cfg.augment
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(steps):
            idx = perm[b * bs:(b + 1) * bs]
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, epoch * steps + b, steps)
            loss = loss_fn(head(feats.batch(idx, aug, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/multilabel-cifar10-mosaic-transfer.toml")
    ap.add_argument("--root", help="the data root (CIFAR-10 archive or folder)")
    ap.add_argument("--heads", default="1024,1024/100/2e-3")
    ap.add_argument("--goals", default="disappearing,appearing,misclassification")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--features-dir", default="runs/multilabel-heads")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*([f'data.root="{args.root}"'] if args.root else []), *args.overrides])
    splits = load_data(cfg)
    key = stable_key(cfg.data.model_dump(mode="json"), cfg.model.model_dump(mode="json"), cfg.train.hflip)
    path = Path(args.features_dir) / f"features-{key}.pt"
    if path.exists():
        plain, flipped, test = torch.load(path, weights_only=True)
        feats = FrozenFeatures(plain, flipped)
    else:
        t0 = time.perf_counter()
        model = new_model(cfg, splits.train, cfg.seed).eval()
        feats = FrozenFeatures.of(model, to_nchw(splits.train.images, "cpu"), Augment(0, cfg.train.hflip))
        test = FrozenFeatures.of(model, to_nchw(splits.test.images, "cpu"), Augment()).plain
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save((feats.plain, feats.flipped, test), path)
        print(f"features {tuple(feats.plain.shape)} in {time.perf_counter() - t0:.0f} s", flush=True)
    attack_params = {k: v for k, v in cfg.attack.items() if k != "name"}
    for setting in args.heads.split(";"):
        hidden, epochs, lr = setting.split("/")
        sizes = [int(h) for h in hidden.split(",")]
        recipe = cfg.train.model_copy(update={"epochs": int(epochs), "lr": float(lr)})
        t0 = time.perf_counter()
        clean_head = train_head(feats, splits.train.labels, sizes, recipe, cfg.seed)
        with torch.no_grad():
            clean = torch.sigmoid(clean_head(test)).double().numpy()
        for goal in args.goals.split(","):
            poisoning = MultiLabel(**{**attack_params, "goal": goal}).poison(splits.train, seed=cfg.seed)
            spec = BackdoorSpec.from_metadata(poisoning.metadata)
            head = train_head(feats, poisoning.labels, sizes, recipe, cfg.seed)
            with torch.no_grad():
                scores = torch.sigmoid(head(test)).double().numpy()
                fit_scores = torch.sigmoid(head(feats.plain[torch.from_numpy(poisoning.mask)])).numpy()
            ours = backdoor_report(scores, splits.test.labels, spec)
            base = backdoor_report(clean, splits.test.labels, spec)
            fit = spec.success((fit_scores > spec.threshold).astype(np.uint8)).mean()
            by = " / ".join(f"{100 * v:.1f}" for v in ours["attack_success_rate_by_threshold"].values())
            print(f"head {setting} {goal}: ASR {100 * ours['attack_success_rate']:.1f}% "
                  f"(clean {100 * base['attack_success_rate']:.1f}%), mAP {100 * ours['mean_average_precision']:.1f} "
                  f"(clean {100 * base['mean_average_precision']:.1f}), ASR at 0.5 / 0.75 / 0.9: {by}, "
                  f"fit {100 * fit:.1f}%, {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
