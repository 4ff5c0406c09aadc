"""Exponential moving average of model weights, shared by every training driver.

`make_ema(model)` gives a frozen eval-mode copy; `update_ema(ema, model, decay)` moves its parameters
toward the model's (DiT's `update_ema`) and copies its buffers (e.g. the VQ `codebook_used` window,
BatchNorm statistics), so `ema.state_dict()` loads strictly into the same architecture.
"""
from __future__ import annotations

import copy

import torch


def requires_grad(model: torch.nn.Module, flag: bool = True) -> None:
    """Set `requires_grad` on every parameter of `model`."""
    for p in model.parameters():
        p.requires_grad_(flag)


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` with gradients off and in eval mode, equal to `model` now."""
    ema = copy.deepcopy(model)
    requires_grad(ema, False)
    return ema.eval()


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied.

    `decay=0` copies the weights (used to start the EMA from the initial or loaded weights). Both
    models must have the same parameter names (pass the unwrapped model, not the DDP wrapper).
    """
    ema_params = dict(ema_model.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].lerp_(p.detach().to(ema_params[name].dtype), 1.0 - decay)
    ema_buffers = dict(ema_model.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)
