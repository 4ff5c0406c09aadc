"""Tokenizer throughput: encode and decode images/s, eager vs channels_last vs torch.compile.

    python bench/bench_tokenizer.py                                  # VQ-16, 256 px, batch 64, CPU
    python bench/bench_tokenizer.py --device cuda --precision bf16   # bf16 autocast on the GPU
    python bench/bench_tokenizer.py --batch-size 4 --image-size 64 --iters 2 --modes eager
    python bench/bench_tokenizer.py --vq-ckpt pretrained_models/vq_ds16_c2i.pt

Without `--vq-ckpt` the weights are random (throughput does not depend on them; the output says
so). Each mode runs `--warmup` untimed batches first (compilation happens there), then `--iters`
timed batches; on CUDA the device is synchronised before every clock read. `match` is the share
of code indices (encode) or the largest absolute pixel difference (decode) against eager, so a
mode that is fast but wrong shows it.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.registry import kind_of_model, kind_of_size, load_tokenizer, size_names  # noqa: E402
from utils.cli import run_cli  # noqa: E402

MODES = ("eager", "channels_last", "compile")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, arg: torch.Tensor, warmup: int, iters: int, device: torch.device):
    """Seconds per call over `iters` calls after `warmup` dropped calls; returns (s, last output)."""
    for _ in range(warmup):
        out = fn(arg)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(arg)
    sync(device)
    return (time.perf_counter() - t0) / iters, out


def prepare(model: torch.nn.Module, mode: str):
    """(encode fn, decode fn, input memory format) for one mode."""
    kind = kind_of_model(model)

    def enc(x: torch.Tensor) -> torch.Tensor:
        return kind.encode(model, x)

    def dec(codes: torch.Tensor) -> torch.Tensor:
        return kind.decode(model, codes)

    if mode == "eager":
        return enc, dec, torch.contiguous_format
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        return enc, dec, torch.channels_last
    if mode == "compile":
        return torch.compile(enc), torch.compile(dec), torch.contiguous_format
    raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")


def main(args: argparse.Namespace) -> None:
    # -- setup ------------------------------------------------------------------------------------
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.vq_ckpt:
        model = load_tokenizer(args.vq_ckpt, args.vq_model, codebook_size=args.codebook_size,
                               codebook_embed_dim=args.codebook_embed_dim, image_size=args.image_size)
        weights = args.vq_ckpt
    else:
        model = kind_of_size(args.vq_model).build(args.vq_model, codebook_size=args.codebook_size,
                                                  codebook_embed_dim=args.codebook_embed_dim,
                                                  image_size=args.image_size)
        weights = "random (no --vq-ckpt; throughput does not depend on the weights)"
    model = model.to(device).eval()
    f = model.downsample
    if args.image_size % f:
        raise SystemExit(f"--image-size {args.image_size} is not a multiple of {args.vq_model}'s "
                         f"downsampling {f}")
    def amp():
        return (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else nullcontext())

    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer bench: {args.vq_model} ({n_params / 1e6:.1f}M params), weights {weights}")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}, precision {args.precision}, batch {args.batch_size}, "
          f"{args.image_size} px -> {args.image_size // f}x{args.image_size // f} codes, "
          f"warm-up {args.warmup} (dropped), {args.iters} timed iters")
    print(f"{'mode':<14} {'encode img/s':>13} {'ms/batch':>10} {'decode img/s':>13} {'ms/batch':>10} "
          f"{'peak MiB':>9}  match vs eager")

    # -- one row per mode -------------------------------------------------------------------------
    ref_codes = ref_images = None
    for mode in args.modes:
        try:
            enc, dec, fmt = prepare(model, mode)
            xin = x.contiguous(memory_format=fmt)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.inference_mode(), amp():
                t_enc, codes = time_fn(enc, xin, args.warmup, args.iters, device)
                # Every mode decodes the same codes (eager's), so decode timings are comparable.
                t_dec, images = time_fn(dec, codes if ref_codes is None else ref_codes,
                                        args.warmup, args.iters, device)
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a working compiler
            print(f"{mode:<14} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        finally:
            model = model.to(memory_format=torch.contiguous_format)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else "-"
        if ref_codes is None:
            ref_codes, ref_images, match = codes, images.float(), "(reference)"
        else:
            same = (codes == ref_codes).float().mean().item()
            diff = (images.float() - ref_images).abs().max().item()
            match = f"codes {same:.1%}, decode max|diff| {diff:.2e}"
        b = args.batch_size
        print(f"{mode:<14} {b / t_enc:>13.2f} {t_enc * 1e3:>10.1f} {b / t_dec:>13.2f} "
              f"{t_dec * 1e3:>10.1f} {peak:>9}  {match}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--vq-model", choices=size_names(), default="VQ-16")
    parser.add_argument("--vq-ckpt", default=None, help="tokenizer checkpoint; random weights if absent")
    parser.add_argument("--codebook-size", type=int, default=16384, help="codebook entries (VAR's release: 4096)")
    parser.add_argument("--codebook-embed-dim", type=int, default=8, help="code width (VAR's release: 32)")
    # Workload
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5, help="timed batches per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per mode (dropped)")
    parser.add_argument("--seed", type=int, default=0)
    # Execution
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16 = torch.autocast(bfloat16) around encode and decode")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="eager first: the other modes are compared with it")
    run_cli(main, parser.parse_args())
