"""Time of one FLIP label-optimization step divided by one plain training step, same model and batch, one run.

A label step does an expert step (forward + backward on the poisoned batch), the student's step (forward +
backward with soft labels) and the differentiation of the matching loss back to the labels. Printed ratios:
- autograd:   the default route, torch.func.grad differentiated again by autograd (backward through backward);
- linearized: one vector-Jacobian and one Jacobian-vector product (see attacks/flip.py);
- disk:       the default route plus reloading the checkpoint from disk three times per batch, as the
              authors' code does;
- chunked:    the default route on the same batch in ``--chunks`` pieces (``label_chunk``, for batches that do not
              fit one differentiable pass): one more pass over the batch, the memory of one piece;
- head:       the head-only route of a victim that trains its head on a frozen extractor (FLIP against a transfer
              victim, ``train.finetune = "last"``): one label step on cached features (``--head-batch`` entries of
              ``--feature-dim``, default the whole poisoned CIFAR-10 set of the transfer config, 55,000 x 64) divided
              by one training step of the head on the same batch.
- compiled:   with ``--compile``, the default route through ``torch.compile`` (FLIP's ``compile = true``), and the
              plain training step compiled likewise; the first call of each (compiling) is printed apart.

    PYTHONPATH=src python benchmarks/flip_label_step.py [--model convnet] [--batch 128] [--repeats 5] [--chunks 2]
        [--head-batch 55000] [--feature-dim 64] [--head-hidden 0] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cleanbackdoor.attacks.flip import FunctionalSGD, chunked_matching_loss_and_label_grad, matching_loss_and_label_grad
from cleanbackdoor.models import build_model, make_head
from cleanbackdoor.training import resolve_device
from cleanbackdoor.recipes import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="convnet")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=2, help="pieces of the batch for the chunked route")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--head-batch", type=int, default=55000, help="entries of the head-only label step")
    ap.add_argument("--feature-dim", type=int, default=64)
    ap.add_argument("--head-hidden", type=int, default=0, help="hidden units of an MLP head (0: linear)")
    ap.add_argument("--compile", action="store_true", help="also the compiled label step and training step")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, (3, 32, 32), 10).to(dev)
    recipe = TrainConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-4)
    x = torch.rand(args.batch, 3, 32, 32, device=dev)
    x_trig = x.clone()
    x_trig[: args.batch // 10] += 0.02 * torch.sin(torch.linspace(0, 50, 32, device=dev))
    y = torch.randint(0, 10, (args.batch,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-4)
    fs = FunctionalSGD(model, recipe)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buf = torch.zeros_like(theta)
    logits = (5 * F.one_hot(y, 10).float()).requires_grad_(True)
    label_opt = torch.optim.SGD([logits], lr=150, momentum=0.5)
    ckpt = Path(tempfile.mkdtemp()) / "ckpt.pt"
    torch.save({"params": theta.cpu(), "momentum": buf.cpu()}, ckpt)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train_step(net=model, inputs=x, targets=y, optimizer=opt):
        net.train()
        loss = F.cross_entropy(net(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def update_labels(label_logits, optimizer, grad_of_soft):
        """One label step: the matching loss's gradient w.r.t. the soft labels, chained to the logits."""
        soft = F.softmax(label_logits, 1)
        g = grad_of_soft(soft.detach())
        optimizer.zero_grad(set_to_none=True)
        (soft * g).sum().backward()
        optimizer.step()

    compiled_matching = torch.compile(matching_loss_and_label_grad)
    compiled_model = torch.compile(model)
    lr = torch.tensor(0.1, device=dev)

    def label_step(method: str, reload: bool = False):
        th, bf = theta, buf
        if reload:
            for _ in range(3):
                state = torch.load(ckpt, map_location=dev, weights_only=True)
            th, bf = state["params"], state["momentum"]

        def grad_of_soft(soft):
            if method == "chunked":
                size = -(-args.batch // args.chunks)
                parts = [slice(a, min(a + size, args.batch)) for a in range(0, args.batch, size)]
                return chunked_matching_loss_and_label_grad(
                    fs, th, bf, lr, [(r, lambda r=r: (x_trig[r], y[r], x[r])) for r in parts], soft, "autograd")[1]
            matching = compiled_matching if method == "compiled" else matching_loss_and_label_grad
            return matching(fs, th, bf, lr, x_trig, y, x, soft, "autograd" if method == "compiled" else method)[1]

        update_labels(logits, label_opt, grad_of_soft)

    # the head-only route: a head on cached features, the whole poisoned set in one step
    head = make_head(args.feature_dim, 10, args.head_hidden).to(dev)
    feats = torch.randn(args.head_batch, args.feature_dim, device=dev).relu()
    feats_trig = feats + 0.1 * torch.randn(args.feature_dim, device=dev)
    y_head = torch.randint(0, 10, (args.head_batch,), device=dev)
    head_opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=2e-4)
    head_fs = FunctionalSGD(head, recipe)
    head_theta = torch.cat([p.detach().reshape(-1) for p in head.parameters()])
    head_logits = (5 * F.one_hot(y_head, 10).float()).requires_grad_(True)
    head_label_opt = torch.optim.SGD([head_logits], lr=150, momentum=0.5)

    def head_train_step():
        train_step(head, feats, y_head, head_opt)

    def head_label_step():
        update_labels(head_logits, head_label_opt, lambda soft: matching_loss_and_label_grad(
            head_fs, head_theta, torch.zeros_like(head_theta), torch.tensor(0.01, device=dev), feats_trig, y_head,
            feats, soft)[1])

    cases = {"train": train_step, "linearized": lambda: label_step("linearized"),
             "autograd": lambda: label_step("autograd"), "disk": lambda: label_step("autograd", True),
             "chunked": lambda: label_step("chunked"), "head-train": head_train_step, "head": head_label_step}
    if args.compile:
        cases.update({"compiled-train": lambda: train_step(compiled_model),
                      "compiled": lambda: label_step("compiled")})
    times: dict[str, list[float]] = {k: [] for k in cases}
    warm = {}
    for name, fn in cases.items():  # warm-up (compiling, for the compiled cases)
        t0 = time.perf_counter()
        fn()
        warm[name] = time.perf_counter() - t0
    for _ in range(args.repeats):
        for name, fn in cases.items():  # interleaved, so drifting machine load hits every case alike
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model}, batch {args.batch}, device {dev}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"training step          : {1000 * med['train']:8.1f} ms")
    for k in ("autograd", "linearized", "disk", "chunked"):
        print(f"label step ({k:10s}): {1000 * med[k]:8.1f} ms   ratio {med[k] / med['train']:.2f}")
    if args.compile:
        print(f"compiled training step : {1000 * med['compiled-train']:8.1f} ms   ratio to eager "
              f"{med['train'] / med['compiled-train']:.2f}x faster (first call {warm['compiled-train']:.1f} s)")
        print(f"label step (compiled)  : {1000 * med['compiled']:8.1f} ms   ratio {med['compiled'] / med['train']:.2f}"
              f" to the eager training step; {med['autograd'] / med['compiled']:.2f}x faster than eager "
              f"(first call {warm['compiled']:.1f} s)")
    print(f"head on cached features, {args.head_batch} x {args.feature_dim}"
          f"{f', hidden {args.head_hidden}' if args.head_hidden else ''}:")
    print(f"training step          : {1000 * med['head-train']:8.1f} ms")
    print(f"label step (head)      : {1000 * med['head']:8.1f} ms   ratio {med['head'] / med['head-train']:.2f}")


if __name__ == "__main__":
    main()
