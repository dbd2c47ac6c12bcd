"""Training and inference, split by job:

- :mod:`~cleanbackdoor.training.device`: the device a config names;
- :mod:`~cleanbackdoor.training.losses`: cross-entropy (hard or soft labels), BCE and ASL (Ridnik et al. 2021)
  on 0/1 label sets;
- :mod:`~cleanbackdoor.training.features`: a frozen extractor's features, cached per image, for heads trained on
  them;
- :mod:`~cleanbackdoor.training.loop`: the learning-rate schedules, the optimizer, the weight average and the loop
  that runs a recipe (:mod:`cleanbackdoor.recipes`), with checkpoints that resume exactly;
- :mod:`~cleanbackdoor.training.inference`: logits and predicted classes.

Targets can be hard labels (int64, (N,)), soft labels (float, (N, C): distillation, FLIP's soft variant), or
0/1 label sets (N, K) for multi-label training with BCE or ASL.
"""

from cleanbackdoor.training.device import resolve_device
from cleanbackdoor.training.features import FeatureStore, FrozenFeatures, freeze_all_but_head, image_digests
from cleanbackdoor.training.inference import predict, predict_logits
from cleanbackdoor.training.losses import asymmetric_loss, make_loss, soft_cross_entropy, targets_tensor
from cleanbackdoor.training.loop import (History, StepHook, WeightAverage, lr_at, make_optimizer, train,
                                         trainable_parameters)

__all__ = ["FeatureStore", "FrozenFeatures", "History", "StepHook", "WeightAverage", "asymmetric_loss",
           "freeze_all_but_head", "image_digests", "lr_at", "make_loss", "make_optimizer", "predict",
           "predict_logits", "resolve_device", "soft_cross_entropy", "targets_tensor", "train",
           "trainable_parameters"]
