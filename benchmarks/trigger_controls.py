"""Can this victim see the trigger? The controls that bound any label-only attack, for several triggers at once.

For a victim that trains its head on a frozen extractor (a config with ``train.finetune = "last"``), each trigger
gets, with the config's data, victim recipe, target, sources and budget:
- a linear probe: a logistic regression telling clean source images from triggered ones in the extractor's
  feature space (trained on the training set's source images, scored on the test set's);
- the dirty-label control (``badnets``: the trigger stamped on ``budget`` source images, relabelled target);
- the two label-only baselines that need no optimization (``inner_product`` in the extractor's feature space and
  in pixel space) and ``random_flip``.
Every victim is trained and measured as ``cleanbackdoor run`` does (the experiment's ``evaluate``, through the
cached features): CTA / ASR / ASR without the trigger. When even the dirty-label control fails, no label-only
attack can succeed with that trigger, and a FLIP run there says nothing about FLIP.

    PYTHONPATH=src python benchmarks/trigger_controls.py configs/flip-cifar10-transfer.toml \\
        --root ../shared/data/cifar10-jpg.tar.gz [--budget 1000] [--trigger '{name="sinusoidal", amplitude=6.0}' ...]
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression

from cleanbackdoor.attacks import AttackContext, build_attack
from cleanbackdoor.config import load_config, parse_value
from cleanbackdoor.data.transforms import Augment, to_nchw
from cleanbackdoor.experiment import clean_model, evaluate, feature_cache, load_data, new_model
from cleanbackdoor.metrics import asr_eligible
from cleanbackdoor.training import FrozenFeatures, train

TRIGGERS = ['{name="sinusoidal", amplitude=6.0, periods=8.0}', '{name="sinusoidal", amplitude=12.0, periods=8.0}',
            '{name="sinusoidal", amplitude=20.0, periods=8.0}', '{name="sinusoidal", amplitude=20.0, periods=2.0}',
            '{name="pixels"}', '{name="turner"}', '{name="patch", size=3}', '{name="blend", alpha=0.1}']


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--root")
    ap.add_argument("--budget", type=int, default=None, help="default: the config's attack budget")
    ap.add_argument("--trigger", action="append", help="a trigger as a TOML table (repeat); default: eight triggers")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = [*args.overrides, "progress=false"] + ([f"data.root={args.root!r}"] if args.root else [])
    cfg = load_config(args.config, overrides)
    if cfg.train.finetune != "last":
        raise SystemExit("needs a victim that trains its head on a frozen extractor (train.finetune = 'last')")
    splits = load_data(cfg)
    train_set, test = splits.train, splits.test
    fc = feature_cache(cfg)
    extractor = new_model(cfg, train_set, cfg.seed)
    context = AttackContext(cache_dir=cfg.cache_path(), device=cfg.device, progress=False, log=lambda _: None,
                            model=cfg.model, train=cfg.train, victim=lambda s: new_model(cfg, train_set, s),
                            features_dir=fc)
    shared = {k: cfg.attack[k] for k in ("target", "sources") if k in cfg.attack}
    budget = args.budget if args.budget is not None else cfg.attack.get("budget", 1000)
    clean, _ = clean_model(cfg, train_set, lambda _: None)

    def features(images: np.ndarray) -> np.ndarray:
        return FrozenFeatures.of(extractor, to_nchw(images), Augment(), cache_dir=fc).plain.numpy()

    def measure(name: str, params: dict) -> str:
        attack = build_attack(name, params)
        poisoning = attack.poison(train_set, seed=cfg.seed, context=context)
        images, targets = poisoning.apply(train_set)
        model = new_model(cfg, train_set, cfg.seed)
        train(model, images, targets, cfg.train, seed=cfg.seed, device=cfg.device, progress=False, feature_cache=fc)
        m = evaluate(model, test, attack, poisoning, fc)
        return f"{100 * m['attack_success_rate']:.1f} / {100 * m['asr_without_trigger']:.1f}", m, poisoning

    print(f"{cfg.data.name}, {len(train_set)} training images, budget {budget}; cells: ASR / ASR without the trigger")
    print("| trigger | probe | clean model | dirty-label | inner product (features) | inner product (pixels) "
          "| random |")
    print("|---|---|---|---|---|---|---|")
    for text in args.trigger or TRIGGERS:
        trigger = parse_value(text)
        params = {**shared, "trigger": trigger, "budget": budget}
        dirty, m, poisoning = measure("badnets", params)
        src_train = asr_eligible(train_set.labels, poisoning.target, poisoning.sources)
        src_test = asr_eligible(test.labels, poisoning.target, poisoning.sources)
        x_fit = np.concatenate([features(train_set.images[src_train]),
                                features(poisoning.activation(train_set.images[src_train]))])
        x_eval = np.concatenate([features(test.images[src_test]),
                                 features(poisoning.activation(test.images[src_test]))])
        y_fit = np.repeat([0, 1], int(src_train.sum()))
        y_eval = np.repeat([0, 1], int(src_test.sum()))
        probe = LogisticRegression(max_iter=2000).fit(x_fit, y_fit).score(x_eval, y_eval)
        c = evaluate(clean, test, build_attack("badnets", params), poisoning, fc)
        ipf = measure("inner_product", {**params, "space": "features"})[0]
        ipp = measure("inner_product", {**params, "space": "pixels"})[0]
        rand = measure("random_flip", params)[0]
        print(f"| `{text}` | {probe:.3f} | {100 * c['attack_success_rate']:.1f} / "
              f"{100 * c['asr_without_trigger']:.1f} (CTA {100 * c['clean_accuracy']:.1f}) | {dirty} | {ipf} | {ipp} | "
              f"{rand} |", flush=True)


if __name__ == "__main__":
    main()
