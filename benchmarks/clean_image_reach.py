"""How many modified test images the clean-image bound can lift to the threshold, kernel by kernel (no training).

The share depends on the kernel draw: a random 3x3 kernel whose entries sum far from zero scores the corner's
brightness, which the bound cannot move far. The authors' random CIFAR-10 kernel is their kernel.py's first draw,
``torch.manual_seed(2023); torch.normal(0, 1, (3, 3))`` (the values of their saved ``backdoor/cifar10_3.pth``).

    PYTHONPATH=src python benchmarks/clean_image_reach.py --root ../shared/data/cifar10-jpg.tar.gz [--seeds 0-5]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cleanbackdoor.attacks.clean_image import CornerKernel, random_kernel, select_top
from cleanbackdoor.data import load_dataset
from cleanbackdoor.data.transforms import channel_stats


def authors_random_kernel() -> np.ndarray:
    torch.manual_seed(2023)
    return torch.normal(0, 1, (3, 3)).double().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="the CIFAR-10 archive or folder")
    ap.add_argument("--seeds", default="0-5", help="the toolkit's draws to list, as FIRST-LAST")
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--norm", type=float, default=1.0)
    ap.add_argument("--target", type=int, default=6)
    args = ap.parse_args()
    splits = load_dataset("cifar10", root=args.root)
    train, test = splits.train, splits.test
    mean, std = channel_stats(train.images)
    first, last = (int(v) for v in args.seeds.split("-"))
    kernels = {"authors' random (torch seed 2023)": authors_random_kernel(),
               **{f"toolkit seed {s}": random_kernel(3, s) for s in range(first, last + 1)}}
    print("kernel | |sum k| / ||k|| | natural share | reach tau: authors' step | maximal step")
    for name, k in kernels.items():
        f = CornerKernel((train.images.shape[3], *train.images.shape[1:3]), k, mean, std)
        sel = select_top(f.score(train.images), args.ratio)
        score = f.score(test.images)
        eligible = test.labels != args.target
        modified = eligible & (score < sel.threshold)
        cells = []
        for step in ("authors", "maximal"):
            lifted = f.lift(test.images[modified], sel.expectation, args.norm, step)
            cells.append(f"{np.mean(f.score(lifted) >= sel.threshold):.1%}")
        print(f"{name} | {abs(k.sum()) / np.linalg.norm(k):.2f} | "
              f"{np.mean(eligible & (score >= sel.threshold)):.1%} | {cells[0]} | {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
