"""Which device a role computes on, from what Ray assigned it: a role given GPUs (`resources.<role>.num_gpus`
> 0) sees exactly its GPUs through CUDA_VISIBLE_DEVICES, so its device is `cuda` (local index 0);
otherwise the CPU. Every tensor a role builds goes to its model's device (`model_device`), and
results leave the role on the CPU, so the driver never needs a GPU."""

from __future__ import annotations

import torch
from torch import nn


def role_device(num_gpus: float) -> torch.device:
    """The device of a role that was given `num_gpus` GPUs."""
    if num_gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(f"this role was given {num_gpus:g} GPU(s) but torch sees no CUDA device (is a CUDA build of torch installed?)")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """Where a model's weights live (the device its inputs must be on)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_cpu(t: torch.Tensor) -> torch.Tensor:
    """A result leaving its role: on the CPU (a `meta` tensor, in device checks, stays as it is)."""
    return t if t.device.type == "meta" else t.cpu()
