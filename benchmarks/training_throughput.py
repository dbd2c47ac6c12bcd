"""Images per second of cleanbackdoor's training loop against a bare PyTorch loop, and with its speed switches
(``train.compile``, ``train.channels_last``, ``train.amp``), in one process.

Same model, batch size, optimizer and data (random CIFAR-shaped uint8 images held in memory); no augmentation,
constant learning rate, so the loops do the same arithmetic. Runs alternate (bare, project, compiled, ...) and the
median of each is compared, which keeps the shared machine's noise out of the ratios. The first call of each case
is a warm-up; its time is printed for the compiled loop (what compiling costs once per process).

    PYTHONPATH=src python benchmarks/training_throughput.py [--model convnet] [--images 4096] [--repeats 3]
        [--variants compile,channels_last]   (amp too on CUDA)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from cleanbackdoor.data.transforms import to_nchw
from cleanbackdoor.models import build_model
from cleanbackdoor.training import resolve_device, train
from cleanbackdoor.recipes import TrainConfig


def bare_loop(model, data_u8: torch.Tensor, y: torch.Tensor, batch: int, lr: float, seed: int) -> None:
    """The loop a PyTorch tutorial writes: shuffle, slice, forward, loss, backward, step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator(device=data_u8.device).manual_seed(seed)
    model.train()
    perm = torch.randperm(len(y), generator=g, device=data_u8.device)
    for i in range(0, len(y), batch):
        idx = perm[i:i + batch]
        x = data_u8[idx].float().div_(255)
        loss = F.cross_entropy(model(x), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="convnet")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default="compile,channels_last",
                    help="speed switches to compare with the eager loop (comma-separated; amp: CUDA only)")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3)).astype(np.uint8)
    labels = rng.integers(0, 10, args.images)
    data_u8 = to_nchw(images, dev)
    y = torch.from_numpy(labels).to(dev)
    cfg = TrainConfig(epochs=1, batch_size=args.batch, lr=0.01, momentum=0.9, weight_decay=5e-4,
                      schedule="constant")

    def fresh():
        torch.manual_seed(0)
        return build_model(args.model, (3, 32, 32), 10).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    cases = {"bare": lambda r: bare_loop(fresh(), data_u8, y, args.batch, 0.01, r),
             "eager": lambda r: train(fresh(), images, labels, cfg, seed=r, device=dev, progress=False)}
    for name in [v for v in args.variants.split(",") if v]:
        if name not in ("compile", "channels_last", "amp"):
            raise SystemExit(f"unknown variant {name!r}: compile, channels_last, amp")
        variant = cfg.model_copy(update={name: True})
        cases[name] = lambda r, variant=variant: train(fresh(), images, labels, variant, seed=r, device=dev,
                                                       progress=False)
    warm = {}
    for name, fn in cases.items():
        sync()
        t0 = time.perf_counter()
        fn(0)
        sync()
        warm[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.repeats):
        for name, fn in cases.items():  # interleaved: drifting machine load hits every case alike
            sync()
            t0 = time.perf_counter()
            fn(r)
            sync()
            times[name].append(time.perf_counter() - t0)
    ips = {k: args.images / statistics.median(v) for k, v in times.items()}
    print(f"model {args.model}, batch {args.batch}, {args.images} images, device {dev}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"bare PyTorch loop : {ips['bare']:9.1f} images/s")
    print(f"cleanbackdoor loop: {ips['eager']:9.1f} images/s  (includes moving the data to the device)")
    print(f"ratio (ours / bare): {ips['eager'] / ips['bare']:.3f}")
    for name in cases:
        if name not in ("bare", "eager"):
            print(f"train.{name:13s}: {ips[name]:9.1f} images/s  ratio to eager {ips[name] / ips['eager']:.3f}"
                  f"  (first call {warm[name]:.1f} s, eager's {warm['eager']:.1f} s)")


if __name__ == "__main__":
    main()
