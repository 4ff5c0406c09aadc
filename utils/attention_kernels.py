"""Which scaled-dot-product attention kernel PyTorch runs for a model's real attention calls.

`record_attention_kernels()` wraps `torch.nn.functional.scaled_dot_product_attention` for the
duration of a `with` block: each call made by the models is passed on unchanged, and PyTorch's own
dispatcher is asked which kernel it picks for exactly those arguments (`torch._fused_sdp_choice`,
what `scaled_dot_product_attention` itself consults). The math kernel on CUDA materialises the whole
attention matrix (and upcasts bf16 in some cases), so it is warned about: it usually means a head
size, mask or dtype the fused kernels do not take.
"""
from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

_NAMES = {-1: "none (error)", 0: "math", 1: "flash", 2: "memory-efficient", 3: "cuDNN", 4: "overrideable"}
_ACTIVE: list["AttentionKernels"] = []
_ORIGINAL = F.scaled_dot_product_attention


@dataclass(frozen=True)
class AttentionCall:
    """What decides the kernel: device, dtype, head size, mask kind; and the kernel chosen."""

    device: str
    dtype: str
    head_dim: int
    mask: str  # "none", "causal", "bool mask", "additive mask"
    kernel: str

    def describe(self) -> str:
        return f"{self.kernel} (head dim {self.head_dim}, {self.dtype}, {self.mask}, {self.device})"


class AttentionKernels:
    """The attention calls seen inside `record_attention_kernels()`, counted by kind."""

    def __init__(self) -> None:
        self.calls: Counter[AttentionCall] = Counter()

    def add(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
            dropout_p: float, is_causal: bool, kwargs: dict) -> None:
        try:
            choice = int(torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, **kwargs))
        except (RuntimeError, TypeError) as e:  # never let the report break the run
            kernel = f"unknown ({type(e).__name__})"
        else:
            kernel = _NAMES.get(choice, f"backend {choice}")
        if attn_mask is None:
            mask = "causal" if is_causal else "no mask"
        else:
            mask = "bool mask" if attn_mask.dtype == torch.bool else "additive mask"
        dtype = str(q.dtype).removeprefix("torch.")
        self.calls[AttentionCall(q.device.type, dtype, int(q.shape[-1]), mask, kernel)] += 1

    @property
    def math_on_cuda(self) -> list[AttentionCall]:
        return [c for c in self.calls if c.kernel == "math" and c.device == "cuda"]

    def summary(self) -> str:
        """One line: every kind of call with its kernel and count."""
        if not self.calls:
            return "no attention call was seen"
        return "; ".join(f"{c.describe()} x{n}" for c, n in sorted(self.calls.items(), key=lambda x: -x[1]))

    def log(self, logger: logging.Logger, what: str) -> None:
        """Log the kernels of `what` (e.g. "training step"), with a warning for math on CUDA."""
        logger.info(f"attention kernels of the {what}: {self.summary()}")
        for c in self.math_on_cuda:
            logger.warning(f"the math attention kernel runs on CUDA ({c.describe()}): it materialises the "
                           f"attention matrix; the fused kernels need a head dim that is a multiple of 8 and "
                           f"a supported mask and dtype")


def recording() -> bool:
    """Whether a `record_attention_kernels()` block is open (callers may run an extra eager step)."""
    return bool(_ACTIVE)


@contextmanager
def record_attention_kernels() -> Iterator[AttentionKernels]:
    """Record the kernel of every eager `scaled_dot_product_attention` call inside the block
    (calls traced by `torch.compile` or captured in a CUDA graph are passed through unrecorded)."""
    report = AttentionKernels()
    original = _ORIGINAL

    def recorded(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        if not (torch.compiler.is_compiling() or capturing):
            report.add(q, k, v, attn_mask, dropout_p, is_causal, kwargs)
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    F.scaled_dot_product_attention = recorded
    _ACTIVE.append(report)
    try:
        yield report
    finally:
        _ACTIVE.remove(report)
        F.scaled_dot_product_attention = original


@contextmanager
def suspended() -> Iterator[None]:
    """Run the block with the plain `scaled_dot_product_attention` (around `torch.compile` tracing
    and CUDA graph capture, so that no compiled code depends on the recording wrapper)."""
    patched = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _ORIGINAL
    try:
        yield
    finally:
        F.scaled_dot_product_attention = patched
