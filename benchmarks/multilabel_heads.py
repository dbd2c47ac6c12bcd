"""Which head and pooling let a frozen-extractor victim learn a multi-label backdoor: a sweep on cached features.

The transfer victim of ``configs/multilabel-cifar10-mosaic-transfer.toml`` spends most of its time computing the
frozen extractor's features (about 6 minutes on 2 cores); its head trains in seconds to minutes. The toolkit keeps
those features in its cache (:class:`cleanbackdoor.training.FrozenFeatures`), so this script trains, for each head
setting, a clean victim and one victim per goal on the falsified label sets with the toolkit's own training loop
and the recipe's loss, optimizer, schedule and flips: the features are computed once for the whole sweep, and each
victim is the one ``cleanbackdoor run`` would train with that head. Printed per goal: ASR at 0.75 (clean victim's
in brackets), mAP of both, the ASR at thresholds 0.5 / 0.75 / 0.9, and the share of falsified training label sets
the victim fits.

    PYTHONPATH=src python benchmarks/multilabel_heads.py --root ../shared/data/cifar10-jpg.tar.gz \\
        --heads "256/30/1e-3;1024,1024/100/2e-3" --goals disappearing,appearing --set 'model.options={pool=2}'

A head setting is HIDDEN/EPOCHS/LR, HIDDEN a comma-separated list of layer sizes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cleanbackdoor.attacks.multilabel import MultiLabel
from cleanbackdoor.config import load_config
from cleanbackdoor.experiment import feature_cache, load_data
from cleanbackdoor.pretrain import build_victim
from cleanbackdoor.multilabel_metrics import BackdoorSpec, backdoor_report, multilabel_scores, predict_labels
from cleanbackdoor.training import train


def victim(cfg, splits, labels: np.ndarray, hidden: list[int], recipe) -> tuple[np.ndarray, np.ndarray]:
    """A victim with this head trained on ``labels`` as ``cleanbackdoor run`` trains it: its scores on the test and
    on the training images (through the cached features of both sets)."""
    model_cfg = cfg.model.model_copy(update={"options": {**cfg.model.options, "head_hidden": hidden}})
    model = build_victim(model_cfg, splits.train.images, splits.train.num_classes, cfg.seed,
                         cache_dir=cfg.cache_path())
    train(model, splits.train.images, labels, recipe, seed=cfg.seed, device="cpu", progress=False,
          feature_cache=feature_cache(cfg))
    return tuple(multilabel_scores(model, part.images, feature_cache=feature_cache(cfg))
                 for part in (splits.test, splits.train))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/multilabel-cifar10-mosaic-transfer.toml")
    ap.add_argument("--root", help="the data root (CIFAR-10 archive or folder)")
    ap.add_argument("--heads", default="1024,1024/100/2e-3")
    ap.add_argument("--goals", default="disappearing,appearing,misclassification")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*([f'data.root="{args.root}"'] if args.root else []), *args.overrides])
    if cfg.train.finetune != "last":
        raise SystemExit("this sweep trains heads on a frozen extractor: the config needs train.finetune = 'last'")
    splits = load_data(cfg)
    attack_params = {k: v for k, v in cfg.attack.items() if k != "name"}
    for setting in args.heads.split(";"):
        hidden, epochs, lr = setting.split("/")
        sizes = [int(h) for h in hidden.split(",")]
        recipe = cfg.train.model_copy(update={"epochs": int(epochs), "lr": float(lr)})
        t0 = time.perf_counter()
        clean, _ = victim(cfg, splits, splits.train.labels, sizes, recipe)
        for goal in args.goals.split(","):
            poisoning = MultiLabel(**{**attack_params, "goal": goal}).poison(splits.train, seed=cfg.seed)
            spec = BackdoorSpec.from_metadata(poisoning.metadata)
            scores, on_train = victim(cfg, splits, poisoning.labels, sizes, recipe)
            ours = backdoor_report(scores, splits.test.labels, spec)
            base = backdoor_report(clean, splits.test.labels, spec)
            fit = spec.success(predict_labels(on_train[poisoning.mask], spec.threshold, spec.top_k)).mean()
            by = " / ".join(f"{100 * v:.1f}" for v in ours["attack_success_rate_by_threshold"].values())
            print(f"head {setting} {goal}: ASR {100 * ours['attack_success_rate']:.1f}% "
                  f"(clean {100 * base['attack_success_rate']:.1f}%), mAP {100 * ours['mean_average_precision']:.1f} "
                  f"(clean {100 * base['mean_average_precision']:.1f}), ASR at 0.5 / 0.75 / 0.9: {by}, "
                  f"fit {100 * fit:.1f}%, {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
