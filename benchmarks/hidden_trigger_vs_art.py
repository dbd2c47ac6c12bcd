"""This toolkit's hidden-trigger attack against ART's ``HiddenTriggerBackdoor``, one run, same inputs.

Both get the same feature map, the one the victim of ``--config`` reads (its pretrained extractor with the
config's model options, e.g. a global max pool: the ``backbone`` output is the feature layer for both), the same K
target images, the same source-class images, eps, iterations, learning rate and decay, and the same secret trigger
(pasted at random positions, or with ``--fixed-position`` at one position as in ART's notebook); early stopping is
off for both, so both run exactly ``--iterations`` steps per poison. Printed, for each:

- poison-generation time (wall clock, same process, same thread count) and the ratio ART / ours, at the same
  number of iterations, and the time ours needs to reach ART's final feature loss (checked every
  ``--eval-every`` iterations, the clock paused while checking);
- the final feature loss, measured identically for both on held-out data: the mean over poisons of
  ||f(z_k) - f(s~_a(k))||^2 against the source-class *test* images patched at fixed random positions, a(k) the
  optimal one-to-one assignment (and the same figure for the unperturbed targets, for scale);
- the resulting attack: the victim of ``--config`` (its head trained on the frozen extractor's cached features)
  trained on the clean task with the K target images replaced by each method's poisons (quantized to uint8 within
  eps): CTA, ASR (patched source test images predicted as the target) and the ASR without the trigger, next to the
  clean victim's.

What differs is the implementation: ART optimizes batches of ``--art-batch`` poisons one after the other against
sources drawn once per batch, matches greedily in a Python loop, and back-propagates into the model's weights as
well; ours optimizes all K poisons together, matches with the Hungarian algorithm, differentiates with respect to
the images only, and draws its sources once per batch too (``--source-draw once``, the default here) or fresh
every iteration as the paper reads (``--source-draw fresh``: one more forward pass per iteration);
``--precision bfloat16`` runs our extractor passes in bfloat16 on channels-last tensors. The held-out loss and the
victims always use the float32 extractor.

    PYTHONPATH=src python benchmarks/hidden_trigger_vs_art.py --root ../shared/data/cifar10-jpg.tar.gz \\
        [--config configs/hidden-trigger-cifar10.toml] [--poisons 800] [--iterations 100] [--threads 2] \\
        [--source-draw once|fresh] [--precision float32|bfloat16] [--fixed-position] [--set KEY=VALUE ...]

Needs the benchmark extra: ``pip install -e .[bench]`` (adversarial-robustness-toolbox).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from cleanbackdoor.attacks.hidden_trigger import HiddenTrigger, feature_fn, paste_patch, patch_pixels, quantize
from cleanbackdoor.config import load_config
from cleanbackdoor.experiment import frozen_features, load_data
from cleanbackdoor.metrics import accuracy, attack_success_rate
from cleanbackdoor.pretrain import build_victim
from cleanbackdoor.training import predict, resolve_device, train


def heldout_loss(features, poisons: torch.Tensor, patched: torch.Tensor) -> float:
    """Mean over poisons of the squared feature distance to their optimally assigned (distinct) patched sources."""
    with torch.no_grad():
        fz, fs = features(poisons), features(patched)
        cost = torch.cdist(fz, fs).square().cpu().numpy().astype(np.float64)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def to01(a: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, C) as float (N, C, H, W) in [0, 1]."""
    return torch.from_numpy(a).permute(0, 3, 1, 2).float().div(255)


def random_paste(x: torch.Tensor, patch: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
    """``patch`` (C, s, s) pasted on each image of ``x`` at a position drawn from ``generator``."""
    h, w, s = x.shape[2], x.shape[3], patch.shape[-1]
    pos = torch.from_numpy(np.stack([generator.integers(0, h - s + 1, len(x)),
                                     generator.integers(0, w - s + 1, len(x))], 1))
    return paste_patch(x, patch.to(x.device), pos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/hidden-trigger-cifar10.toml")
    ap.add_argument("--root", default=None, help="dataset location (overrides the config's data.root)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--poisons", type=int, default=800)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--eps", type=float, default=16 / 255)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--decay", type=float, default=0.5)
    ap.add_argument("--decay-every", type=int, default=1000)
    ap.add_argument("--art-batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=5, help="iterations between held-out checks of ours")
    ap.add_argument("--source-draw", choices=["fresh", "once"], default="once",
                    help="ours: fresh patched sources every iteration (the paper), or once per batch (ART, authors)")
    ap.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                    help="ours: the extractor's passes in float32, or in bfloat16 on channels-last tensors (a copy "
                         "of the extractor; ART keeps the float32 one)")
    ap.add_argument("--fixed-position", action="store_true",
                    help="the trigger at one position, 5 pixels in from the bottom-right border (ART's notebook), "
                         "instead of a random one per image")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()

    from art.attacks.poisoning import HiddenTriggerBackdoor, PoisoningAttackBackdoor
    from art.estimators.classification import PyTorchClassifier

    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {"data.root": args.root} if args.root else {}
    cfg = load_config(args.config, args.overrides, **fields)
    dev = resolve_device(args.device)
    splits = load_data(cfg)
    train_set, test_set = splits.train, splits.test
    spec = HiddenTrigger(cfg.attack if cfg.attack_name == "hidden_trigger" else {}, budget=args.poisons,
                         eps=args.eps)
    target, sources = spec.resolve_classes(train_set)
    source = sources[0] if sources else 1 - target
    # the feature map the victim reads (the config's model options, e.g. pool, included), as the attack uses it
    extractor = build_victim(cfg.model, train_set.images, train_set.num_classes, cfg.seed,
                             cache_dir=cfg.cache_path()).to(dev).eval()
    features = feature_fn(extractor)
    trigger = spec.params.trigger.build(train_set.image_shape, args.seed)
    if args.fixed_position:  # ART's notebook: the patch's corner 5 pixels in from the bottom-right border
        _, h, w = train_set.image_shape
        at = [h - trigger.size - 5, w - trigger.size - 5]
        trigger = spec.params.trigger.model_copy(update={"position": at}).build(train_set.image_shape, args.seed)
    patch = torch.from_numpy(patch_pixels(trigger)).permute(2, 0, 1).float().div(255).to(dev)
    fixed = tuple(int(v) for v in trigger.positions(1)[0]) if args.fixed_position else None

    def paste(x: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
        if fixed is None:
            return random_paste(x, patch, generator)
        return paste_patch(x, patch.to(x.device), torch.tensor([fixed]).expand(len(x), 2))

    rng = np.random.default_rng(args.seed)
    target_idx = np.sort(rng.choice(np.flatnonzero(train_set.labels == target), args.poisons, replace=False))
    source_idx = np.flatnonzero(train_set.labels == source)

    targets = to01(train_set.images[target_idx])
    test_sources = to01(test_set.images[test_set.labels == source]).to(dev)
    heldout = paste(test_sources, np.random.default_rng(10_000 + args.seed))
    print(f"{cfg.data.classes or cfg.data.name}: {args.poisons} poisons of class {train_set.class_names[target]!r}, "
          f"sources {train_set.class_names[source]!r} ({len(source_idx)} images), {args.iterations} iterations, "
          f"eps {args.eps:.4f}, lr {args.lr}, trigger at {'a fixed position' if fixed else 'random positions'}, "
          f"our sources drawn {args.source_draw}, our precision {args.precision}, device {dev}, "
          f"{torch.get_num_threads()} threads")

    # -- this toolkit ------------------------------------------------------------------------------------------
    from cleanbackdoor.attacks.hidden_trigger import optimize_poisons

    extractor.requires_grad_(False)  # ours differentiates with respect to the images only
    trace: list[tuple[int, float, float]] = []  # (iterations, optimization seconds, held-out loss)
    paused = [0.0]

    def checkpoint(done: int, poisons: torch.Tensor) -> None:  # the clock stops while we measure
        start = time.perf_counter()
        images = quantize(poisons, train_set.images[target_idx], args.eps)
        trace.append((done, start - t0 - paused[0], heldout_loss(features, to01(images).to(dev), heldout)))
        paused[0] += time.perf_counter() - start

    ours_features = features if args.precision == "float32" else feature_fn(copy.deepcopy(extractor), args.precision)
    t0 = time.perf_counter()
    ours = optimize_poisons(
        ours_features, targets.to(dev),
        torch.from_numpy(train_set.images[source_idx]).permute(0, 3, 1, 2).contiguous().to(dev), patch,
        eps=args.eps, iterations=args.iterations, lr=args.lr, lr_decay=args.decay, decay_every=args.decay_every,
        random_position=fixed is None, fixed_position=fixed or (0, 0), stop_loss=None,
        source_draw=args.source_draw, seed=args.seed, log_every=args.eval_every, callback=checkpoint)
    t_ours = time.perf_counter() - t0 - paused[0]
    extractor.requires_grad_(True)  # hand ART the model as a user would: a trained network, weights trainable

    # -- ART -------------------------------------------------------------------------------------------------
    classifier = PyTorchClassifier(model=extractor, loss=torch.nn.CrossEntropyLoss(),
                                   input_shape=train_set.image_shape, nb_classes=train_set.num_classes,
                                   clip_values=(0.0, 1.0), device_type="gpu" if dev.type == "cuda" else "cpu")
    art_rng = np.random.default_rng(args.seed)
    backdoor = PoisoningAttackBackdoor(lambda x: paste(torch.from_numpy(x), art_rng).numpy())
    onehot = np.eye(train_set.num_classes, dtype=np.float32)
    attack = HiddenTriggerBackdoor(classifier, target=onehot[target], source=onehot[source], feature_layer="backbone",
                                   backdoor=backdoor, eps=args.eps, learning_rate=args.lr, decay_coeff=args.decay,
                                   decay_iter=args.decay_every, stopping_threshold=0.0, max_iter=args.iterations,
                                   batch_size=args.art_batch, poison_percent=1.0, verbose=False,
                                   print_iter=10 ** 9)
    x = np.concatenate([train_set.images[target_idx], train_set.images[source_idx]])
    y = np.concatenate([np.full(len(target_idx), target), np.full(len(source_idx), source)])
    x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.random.seed(args.seed)  # ART draws its source images with numpy's global generator
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        art_poisons, art_index = attack.poison(x, onehot[y])
    t_art = time.perf_counter() - t0
    order = np.argsort(art_index)  # ART returns poisons in its own random order of the K targets
    art_poisons = torch.from_numpy(np.asarray(art_poisons)[order]).float()
    assert np.array_equal(np.sort(art_index), np.arange(args.poisons)), "ART poisoned other images than the targets"

    # -- the same figures for both ---------------------------------------------------------------------------
    extractor.requires_grad_(False)
    rows = {}
    base_images = train_set.images
    store = frozen_features(cfg)  # the victims train their head on the frozen extractor's cached features

    def fresh_victim() -> torch.nn.Module:
        return build_victim(cfg.model, train_set.images, train_set.num_classes, cfg.seed, cache_dir=cfg.cache_path())

    def measure(victim: torch.nn.Module) -> dict:
        return {"cta": accuracy(predict(victim, test_set.images), test_set.labels),
                "asr": attack_success_rate(predict(victim, triggered), target),
                "asr_without_trigger": attack_success_rate(predict(victim, untriggered), target)}

    untriggered = test_set.images[test_set.labels == source]
    triggered = trigger(untriggered)
    clean_victim = fresh_victim()
    train(clean_victim, base_images, train_set.labels, cfg.train, seed=cfg.seed, device=dev, progress=False,
          feature_cache=store)
    rows["clean victim"] = measure(clean_victim)
    rows["targets (no attack)"] = {"feature_loss": heldout_loss(features, targets.to(dev), heldout)}
    for name, poisons, seconds in (("cleanbackdoor", ours.poisons, t_ours), ("ART", art_poisons, t_art)):
        images = quantize(poisons, train_set.images[target_idx], args.eps)
        assert np.abs(images.astype(int) - train_set.images[target_idx].astype(int)).max() <= round(args.eps * 255)
        poisoned = base_images.copy()
        poisoned[target_idx] = images
        victim = fresh_victim()
        train(victim, poisoned, train_set.labels, cfg.train, seed=cfg.seed, device=dev, progress=False,
              feature_cache=store)
        rows[name] = {"seconds": round(seconds, 2), "seconds_per_iteration": round(seconds / args.iterations, 4),
                      "feature_loss": heldout_loss(features, to01(images).to(dev), heldout), **measure(victim)}
    ratio = t_art / t_ours
    print(f"{'':22s} {'seconds':>8s} {'feature loss':>13s} {'CTA':>7s} {'ASR':>7s} {'noT':>7s}")
    for name, r in rows.items():
        cells = [f"{r['seconds']:8.1f}" if "seconds" in r else " " * 8,
                 f"{r['feature_loss']:13.3f}" if "feature_loss" in r else " " * 13,
                 f"{100 * r['cta']:6.1f}%" if "cta" in r else " " * 7,
                 f"{100 * r['asr']:6.1f}%" if "asr" in r else " " * 7,
                 f"{100 * r['asr_without_trigger']:6.1f}%" if "asr" in r else " " * 7]
        print(f"{name:22s} " + " ".join(cells))
    print(f"same iterations: time ratio ART / cleanbackdoor {ratio:.2f}x; feature loss ours "
          f"{rows['cleanbackdoor']['feature_loss']:.3f} vs ART {rows['ART']['feature_loss']:.3f} "
          "(held-out patched sources, lower is better)")
    reached = [(it, sec) for it, sec, loss in trace if loss <= rows["ART"]["feature_loss"]]
    match = None
    if reached:
        it, sec = reached[0]
        match = {"iterations": it, "seconds": round(sec, 2), "time_ratio": t_art / sec}
        print(f"equal feature loss: ours reaches ART's final loss after {it} iterations, {sec:.1f}s: "
              f"{t_art / sec:.2f}x faster than ART's {args.iterations} iterations")
    else:
        print("equal feature loss: ours never reached ART's final held-out feature loss")
    print("ours, held-out loss by iteration: " + ", ".join(f"{it}: {loss:.2f}" for it, _, loss in trace))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "time_ratio": ratio, "trace": trace,
                       "equal_loss": match}, f, indent=2)


if __name__ == "__main__":
    main()
