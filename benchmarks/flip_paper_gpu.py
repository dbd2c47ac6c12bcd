"""FLIP at (shortened) paper scale on one GPU: the paper's recipe, in minutes, with every control beside it.

CIFAR-10, truck -> deer, the paper's sinusoidal trigger (6/255, 8 periods), 1,000 flipped labels (2%).
Expert and victims: pre-activation ResNet-32 (LeakyReLU 0.1), the paper's SGD recipe (lr 0.1, momentum 0.9,
Nesterov, weight decay 2e-4, batch 256, crop + flip) shortened to ``--epochs`` epochs (milestones moved to the same
fractions); one expert on the authors' schedule (constant lr 0.1, checkpoints after iterations 50/100/150/200 of
each of ``--expert-epochs`` epochs); ``--passes`` label passes at batch 256, label lr 150, momentum 0.5. The run
trains the FLIP victim, the clean model and the dirty-label control (BadNets with the same trigger and 1,000
triggered trucks), and prints CTA, ASR, ASR without the trigger and each stage's time. Defaults are sized for
under 10 minutes on one H200; ``--smoke`` runs the same pipeline on 2,000 images for a minute on a CPU (a check
that the script works, not a result).

    PYTHONPATH=src python benchmarks/flip_paper_gpu.py --root ../shared/data/cifar10-jpg.tar.gz [--epochs 50]
        [--expert-epochs 20] [--passes 5] [--amp] [--compile] [--out runs/flip-paper-gpu]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cleanbackdoor.config import load_config
from cleanbackdoor.experiment import run_experiment

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flip-cifar10-paper.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="CIFAR-10 (folder or archive)")
    ap.add_argument("--epochs", type=int, default=50, help="victim epochs (the paper: 200)")
    ap.add_argument("--expert-epochs", type=int, default=20)
    ap.add_argument("--passes", type=int, default=5, help="label passes (the authors' example: 5)")
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the victims (CUDA only)")
    ap.add_argument("--compile", action="store_true", help="torch.compile and channels-last for the victims")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="runs/flip-paper-gpu")
    ap.add_argument("--smoke", action="store_true", help="2,000 training images, 2 epochs: the pipeline only")
    args = ap.parse_args()
    overrides = [f"data.root={args.root!r}", f"out={args.out!r}", f"device={args.device!r}",
                 "examples=0", f"attack.budget={args.budget}", "attack.n_experts=1",
                 f"attack.expert_epochs={args.expert_epochs}", f"attack.label_passes={args.passes}",
                 "attack.expert_schedule='authors'",
                 f"train={{preset='flip-cifar', epochs={args.epochs}, amp={str(args.amp).lower()}, "
                 f"compile={str(args.compile).lower()}, channels_last={str(args.compile).lower()}}}"]
    if args.smoke:
        overrides += ["data.train_per_class=200", "data.test_per_class=100", "attack.budget=40",
                      "attack.expert_epochs=1", "attack.label_passes=1", "attack.checkpoint_every=2",
                      "train={preset='flip-cifar', epochs=2}"]
    cfg = load_config(CONFIG, overrides)
    t0 = time.perf_counter()
    # the run's log lines (and one line per tenth of each training when no terminal shows a bar) stream as they
    # come, so a run cut short by a deadline still says how far each stage got and how long it took
    m = run_experiment(cfg, echo=True).metrics
    total = time.perf_counter() - t0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    rows = [("FLIP victim", m), ("clean model", m["clean_model"]), ("dirty-label control", m["dirty_label_control"])]
    print(f"FLIP, {m['poisoned_examples']} flips of {m['train_size']} ({cfg.model.name}, {cfg.train.epochs}-epoch "
          f"victims, {cfg.attack['expert_epochs']} expert epochs, {cfg.attack['label_passes']} label passes) "
          f"on {device}")
    print(f"{'':22}{'CTA':>8}{'ASR':>8}{'noT':>8}")
    for name, r in rows:
        print(f"{name:22}" + "".join(f"{100 * r[k]:7.1f}%" for k in ("clean_accuracy", "attack_success_rate",
                                                                      "asr_without_trigger")))
    print("flips fitted by the victim: " + f"{100 * m['poison_fit_rate']:.1f}%")
    experts = (m.get("attack_diagnostics") or {}).get("experts") or [[]]
    if experts[0]:
        last = experts[0][-1]
        print(f"expert after epoch {last['epoch']}: CTA {100 * last['clean_accuracy']:.1f}%, "
              f"ASR {100 * last['attack_success_rate']:.1f}%")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in m["seconds"].items()) + f"; total {total:.0f}")
    (Path(args.out) / "benchmark.json").write_text(json.dumps({"metrics": m, "total_seconds": total,
                                                              "device": device, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
