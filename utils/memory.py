"""Peak memory of this process, for logs: CUDA memory allocated by PyTorch, or resident set size on CPU."""
from __future__ import annotations

import resource
import sys

import torch


def peak_memory_bytes(device: torch.device | str) -> int:
    """The peak since the start (or the last `torch.cuda.reset_peak_memory_stats`): allocated CUDA
    memory on a CUDA device, else the process's peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def peak_memory_text(device: torch.device | str) -> str:
    """E.g. "peak CUDA memory 12.30 GiB" or "peak RSS 1.05 GiB"."""
    device = torch.device(device)
    what = "peak CUDA memory" if device.type == "cuda" else "peak RSS"
    return f"{what} {peak_memory_bytes(device) / 2**30:.2f} GiB"
