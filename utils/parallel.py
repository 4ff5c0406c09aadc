"""Data parallelism for the training driver: DDP for the sizes that fit, FSDP for XXL / 3B.

`--data-parallel` keeps the official FSDP script's names (LlamaGen `autoregressive/train/train_c2i_fsdp.py`):
`ddp` (our default, the official `train_c2i.py`), `fsdp` = FULL_SHARD (the official FSDP default),
`sdp` = SHARD_GRAD_OP (parameters stay gathered between forward and backward), `hsdp` =
HYBRID_SHARD (shard inside a node, replicate across nodes). FSDP here is PyTorch's per-parameter
`fully_shard` (FSDP2): every transformer block is one unit, then the root; it runs on NCCL and on
gloo (CPU), so the tests exercise it. Checkpoints hold the full, unsharded state (model and
optimizer, gathered to rank 0 on CPU), so an FSDP checkpoint loads in the sampler like any other.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

PARALLEL_MODES = ("ddp", "fsdp", "sdp", "hsdp")
DTYPES = {"none": None, "fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def is_sharded(mode: str) -> bool:
    return mode in ("fsdp", "sdp", "hsdp")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks that become FSDP units: the entries of every `layers` / `blocks` ModuleList."""
    blocks = []
    for name in ("layers", "blocks"):
        child = getattr(model, name, None)
        if isinstance(child, nn.ModuleList):
            blocks.extend(child)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no `layers` or `blocks` ModuleList to shard")
    return blocks


def wrap_model(model: nn.Module, mode: str, world: int, device: torch.device,
               mixed_precision: str = "none", grad_precision: str | None = None) -> nn.Module:
    """Wrap `model` (already on `device`, weights loaded) for data parallelism; returns the module the
    loop calls. DDP wraps (world > 1 only); FSDP shards `model` in place and returns it."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"unknown --data-parallel {mode!r}; choose one of {', '.join(PARALLEL_MODES)}")
    if not is_sharded(mode):
        if world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mode == "hsdp":
        per_node = torch.cuda.device_count() if device.type == "cuda" else world
        if world % per_node:
            raise ValueError(f"--data-parallel hsdp needs the world size ({world}) to be a multiple of the "
                             f"processes per node ({per_node})")
        mesh = init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))
    param_dtype = DTYPES.get(mixed_precision)
    reduce_dtype = DTYPES.get(grad_precision) if grad_precision else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype or torch.float32)
    reshard = mode != "sdp"
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, mode: str, enabled: bool) -> Iterator[None]:
    """Inside, backward does (enabled) or does not (a gradient-accumulation micro-step) all-reduce."""
    if enabled:
        yield
    elif is_sharded(mode):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (across shards for FSDP) and return it as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state_dict(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """The full state dict (plain tensors, the unwrapped key names); with FSDP a collective whose
    result is complete on rank 0 only."""
    if is_sharded(mode):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(model, options=_full_options())
    return getattr(model, "module", model).state_dict()


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> dict:
    """The optimizer state to checkpoint; with FSDP the full state keyed by parameter name (rank 0)."""
    if is_sharded(mode):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer, options=_full_options())
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, mode: str) -> None:
    """Restore what `optimizer_state_dict` saved (every rank passes the full state it read)."""
    if is_sharded(mode):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
