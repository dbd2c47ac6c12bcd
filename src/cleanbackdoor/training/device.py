"""Where training and inference run: the device a config names, checked to exist."""

from __future__ import annotations

import torch

from cleanbackdoor.errors import ConfigError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; otherwise the device named, checked to exist here."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: this PyTorch has no CUDA device (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available here")
    return dev
