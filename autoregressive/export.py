"""Export one of our checkpoints in the layout of its method's official release, for the official code.

    python scripts/export_official.py results/000-GPT-L-raster/checkpoints/0050000.pt --out c2i_L_256.pt
    python scripts/export_official.py results/000-VAR-d16-var/checkpoints/0050000.pt --out var_d16.pth --ema

Reads a checkpoint of `autoregressive/train/train_c2i.py` (a GPT of any strategy) or of
`tokenizer/train_vq.py` (LlamaGen's VQ or VAR's multi-scale VQVAE), loads it strictly with the
project's own loaders (the same that sampling uses), and writes the weights as the official code
reads its released files (`official_layout` and `official_reader` of each strategy and tokenizer kind):

| ours | written as | official release |
| --- | --- | --- |
| raster, par, npp, arpg GPTs | `{"model": state_dict}` | `c2i_*.pt`, `PAR-*.pt`, NPP's `c2i_*_256.pt`, `arpg_*.pt` |
| lpd | `{"model": state_dict}` | `lpd_*.pth` |
| var | the bare state dict | `var_d*.pth` |
| LlamaGen VQ | `{"model": state_dict}` | `vq_ds16_c2i.pt`, `vq_ds8_c2i.pt` |
| VAR VQVAE | the bare state dict | `vae_ch160v4096z32.pth` |

LlamaGen's GPT-XXL / GPT-3B releases are bare (FSDP) state dicts read with `--from-fsdp`; the
`{"model": ...}` file is read by the same official samplers without that flag, at any size.
Nothing but tensors is written (no `args`, no optimizer), so `torch.load(..., weights_only=True)`
reads every export. Our key names are the official ones (`load_official` renames nothing), so the
weights go out under the names they came in with; what the official model cannot hold (ARPG-debug's
learned absolute positions) is refused with the reason.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autoregressive.models.official import gpt_kwargs_from_args
from autoregressive.strategies import get_strategy, strategy_names
from tokenizer.registry import TOKENIZER_KINDS, load_tokenizer
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.cli import run_cli

#: `official_layout` values: how the weights are wrapped.
LAYOUTS = {"model": "{'model': state_dict}", "flat": "the bare state dict"}


@dataclass
class Exported:
    """What `export_official` wrote."""

    path: Path
    what: str  # e.g. "GPT-L (--strategy raster)" or "VQ-16 tokenizer (a LlamaGen VQ tokenizer)"
    weights: str  # "model" or "ema"
    layout: str  # an `official_layout`
    reader: str  # where the official code reads such a file
    num_tensors: int
    notes: list[str] = field(default_factory=list)


def in_layout(state_dict: dict[str, torch.Tensor], layout: str) -> dict:
    """The object to save: `{"model": state_dict}` or the state dict itself."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown official layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return state_dict if layout == "flat" else {"model": state_dict}


def _gpt_args(ckpt: Mapping[str, Any]) -> dict | None:
    args = ckpt.get("args")
    return dict(args) if isinstance(args, Mapping) and "strategy" in args and "gpt_model" in args else None


def export_official(path: str | Path, out: str | Path, ema: bool = False) -> Exported:
    """Write the weights of our checkpoint `path` (its `ema` with `ema=True`) to `out` in the official
    release layout of its method, atomically; `CheckpointError` when that cannot be done."""
    path, out = Path(path), Path(out)
    if out.exists() and path.exists() and out.resolve() == path.resolve():
        raise ValueError(f"--out {out} is the checkpoint being exported: write the export to another file")
    peek = load_checkpoint(path, mmap=True)  # keys and args only; the loaders below read the weights
    if not isinstance(peek, Mapping):
        raise CheckpointError(f"{path} is not a checkpoint dict ({type(peek).__name__})")
    kind = next((k for k in TOKENIZER_KINDS.values() if k.config_key in peek), None)
    args = None if kind is not None else _gpt_args(peek)
    if kind is None and args is None:
        raise CheckpointError(f"{path} is not a checkpoint of autoregressive/train/train_c2i.py (no args with "
                              f"strategy and gpt_model) nor of tokenizer/train_vq.py (no "
                              f"{' / '.join(k.config_key for k in TOKENIZER_KINDS.values())}); an official "
                              f"release is already in its official layout")
    if ema and not isinstance(peek.get("ema"), Mapping):
        raise CheckpointError(f"{path} holds no EMA weights (its run was trained without --ema): export its "
                              f"model weights, without --ema")
    size = peek.get("vq_model") or "?"
    del peek
    weights = "ema" if ema else "model"

    if kind is not None:
        model = load_tokenizer(path, kind=kind.name, prefer_ema=ema)
        plugin, notes, what = kind, kind.official_notes(model), f"{size} tokenizer ({kind.title})"
    else:
        if args["strategy"] not in strategy_names():
            raise CheckpointError(f"{path} was trained with --strategy {args['strategy']!r}, which this version "
                                  f"does not know ({', '.join(strategy_names())})")
        strategy = get_strategy(args["strategy"])
        model = strategy.load_model(path, args["gpt_model"], prefer_ema=ema, **gpt_kwargs_from_args(args))
        plugin, notes, what = strategy, [], f"{args['gpt_model']} (--strategy {args['strategy']})"
    try:
        state_dict = plugin.official_state_dict(model)
    except CheckpointError as e:
        raise CheckpointError(f"cannot export {path} in the official layout: {e}") from e
    state_dict = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_checkpoint(in_layout(state_dict, plugin.official_layout), out)
    return Exported(out, what, weights, plugin.official_layout, plugin.official_reader, len(state_dict), notes)


def main(args: argparse.Namespace) -> Exported:
    """Export one checkpoint and say what was written and what reads it."""
    done = export_official(args.ckpt, args.out, ema=args.ema)
    print(f"wrote {done.path}: {done.what}, '{done.weights}' weights, {done.num_tensors} tensors as "
          f"{LAYOUTS[done.layout]}; official reader: {done.reader}")
    for note in done.notes:
        print(f"note: {note}")
    return done


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="a checkpoint of train_c2i.py (any strategy) or tokenizer/train_vq.py")
    p.add_argument("--out", required=True, help="the file to write (atomically)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=False,
                   help="export the EMA weights (an error when the checkpoint has none); default: the "
                        "model weights, what the official releases hold")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
