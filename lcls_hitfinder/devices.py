"""Which torch device a `device` setting means: one rule for simulation, training and serving."""

from __future__ import annotations

import torch

from lcls_hitfinder.errors import UserError


def resolve_device(setting: str, key: str = "device") -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU. `cuda` without one is refused in one line naming
    `key` (the setting it came from), rather than failing at the first tensor moved there."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} is cuda but torch sees no CUDA device")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)
