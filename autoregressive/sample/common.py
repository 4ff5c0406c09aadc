"""What both samplers share: the sampling flags, loading the GPT and the tokenizer, one batch.

`sample_c2i.py` (a PNG grid) and `sample_c2i_ddp.py` (50k images -> ADM `.npz`) differ only in
what they do with the images; model loading, flag names and the generate-then-decode step live here.
"""
from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from autoregressive.decoding.fast_decode import DECODE_PATHS, StepRunner, check_same_tokens, make_runner
from autoregressive.decoding.logits import check_cfg_scale
from autoregressive.decoding.orders import add_schedule_arguments
from autoregressive.decoding.row_rng import RowRNG, image_seeds
from autoregressive.strategies import (Generation, Strategy, add_strategy_arguments, check_strategy_flags,
                                      get_strategy, model_size_names, strategy_names)
from tokenizer.registry import codebook, load_tokenizer, size_names
from utils.checkpoint import load_checkpoint_entries
from utils.run import given_flags

PRECISIONS = {"none": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
T = TypeVar("T")
P = TypeVar("P")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The official sampling flags (LlamaGen's `autoregressive/sample/sample_c2i_ddp.py`) plus `--strategy`."""
    g = p.add_argument_group("model")
    g.add_argument("--strategy", type=str, default="raster", choices=strategy_names(), help="decoding strategy")
    g.add_argument("--gpt-model", type=str, default=None, choices=model_size_names(),
                   help="model size (required for official release files, which do not record it)")
    g.add_argument("--gpt-ckpt", type=str, required=True, help="GPT checkpoint (official release or ours)")
    g.add_argument("--gpt-type", type=str, default="c2i", choices=["c2i"], help="class-conditional only")
    g.add_argument("--from-fsdp", action="store_true",
                   help="accepted for official commands; the bare FSDP layout is detected by itself")
    g.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    g.add_argument("--cls-token-num", type=int, default=1, help="class tokens before the image tokens")
    g.add_argument("--precision", type=str, default="bf16", choices=list(PRECISIONS),
                   help="GPT weights and KV cache dtype on CUDA (CPU always runs float32)")
    g.add_argument("--decode-path", type=str, default="auto", choices=DECODE_PATHS,
                   help="eager: the reference loop; cuda-graphs: persistent KV caches and one CUDA graph per "
                        "step shape; compiled: the same over torch.compile'd steps, and the tokenizer decodes "
                        "in bf16 channels_last; auto: compiled on CUDA (a batch whose fast path fails is "
                        "decoded again eagerly and the run goes on eagerly, with a warning), eager on CPU")
    g.add_argument("--verify-fast-path", action="store_true",
                   help="decode the first batch greedily on the fast path and on the eager loop and stop "
                        "unless the tokens are identical (nothing to compare on the eager path)")
    g.add_argument("--vq-model", type=str, default="VQ-16", choices=size_names(), help="tokenizer size")
    g.add_argument("--vq-ckpt", type=str, required=True, help="tokenizer checkpoint")
    g.add_argument("--codebook-size", type=int, default=16384, help="tokenizer codebook size")
    g.add_argument("--codebook-embed-dim", type=int, default=8, help="tokenizer code dimension")
    g.add_argument("--image-size", type=int, default=384, help="image size the GPT generates at")
    g.add_argument("--image-size-eval", type=int, default=256, help="images are resized to this size")
    g.add_argument("--downsample-size", type=int, default=16, help="tokenizer downsampling factor")
    g.add_argument("--num-classes", type=int, default=1000,
                   help="number of classes (default: the checkpoint's, where it records them; else 1000)")
    s = p.add_argument_group("sampling")
    s.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--cfg-interval", type=float, default=-1, help="guide only the first tokens (-1 = all)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = all)")
    s.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0 = greedy)")
    s.add_argument("--steps", "--step", dest="steps", type=int, default=None,
                   help="decoding steps (parallel strategies; ARPG's official flag is --step)")
    add_schedule_arguments(s)  # --order, --sample-schedule, --group-sizes, --cfg-schedule, ...
    s.add_argument("--global-seed", type=int, default=0, help="seed; each image's seed derives from it and its index")
    s.add_argument("--device", type=str, default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    add_strategy_arguments(p)


#: the official `sample_c2i.py` classes (ImageNet ids): the grid's default for a 1000-class model
IMAGENET_GRID_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]


@dataclass
class CheckpointClasses:
    """What a GPT checkpoint records about its classes, read before its weights: the class
    embeddings it was trained with (`num_classes` of its recorded args; release files record none)
    and its class map (folder name -> id: our training checkpoints carry their codes' map, official
    files none). The samplers take class names through it and default their classes to it."""

    path: str
    num_classes: int | None = None
    class_to_idx: dict[str, int] | None = None

    @classmethod
    def read(cls, path: str) -> CheckpointClasses:
        """The records of the checkpoint file `path` (its tensors are not read where the format allows)."""
        entries = load_checkpoint_entries(path, ("args", "class_to_idx"))
        args = entries.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else args
        n = args.get("num_classes") if isinstance(args, Mapping) else None
        cmap = entries.get("class_to_idx")
        return cls(str(path), n if isinstance(n, int) and not isinstance(n, bool) else None,
                   dict(cmap) if isinstance(cmap, Mapping) and cmap else None)

    def resolve(self, args: argparse.Namespace, given: set[str]) -> None:
        """`--num-classes` not given: the checkpoint's own where it records one. A class map with ids
        at or above `--num-classes` is refused (a ValueError naming both)."""
        if "num_classes" not in given and self.num_classes is not None:
            args.num_classes = self.num_classes
        if self.class_to_idx and args.num_classes >= 1 and max(self.class_to_idx.values()) >= args.num_classes:
            top = max(self.class_to_idx.values())
            raise ValueError(f"--num-classes {args.num_classes} does not cover the class map of {self.path} "
                             f"({len(self.class_to_idx)} classes, ids up to {top}): pass --num-classes "
                             f"{self.num_classes or top + 1}")

    def ids(self, num_classes: int) -> list[int]:
        """The class ids a sampler draws from: those of the class map (the classes that had training
        images), else 0 .. num_classes - 1."""
        return sorted(self.class_to_idx.values()) if self.class_to_idx else list(range(num_classes))

    def name_of(self, class_id: int) -> str | None:
        """The class map's name of `class_id`, or None."""
        return next((k for k, v in (self.class_to_idx or {}).items() if v == class_id), None)

    def class_id(self, item: str | int, num_classes: int, flag: str = "--classes") -> int:
        """One class as given on the command line -> its id: an integer is an id (in [0,
        num_classes), and in the class map when there is one), anything else a name of the class map.
        A ValueError names the item and what would work (a few known names, the closest ones)."""
        try:
            idx = int(item)
        except ValueError:
            return self._id_of_name(str(item), num_classes, flag)
        if not 0 <= idx < num_classes:
            raise ValueError(f"{flag} {idx}: class ids must lie in [0, --num-classes {num_classes})")
        if self.class_to_idx and idx not in self.class_to_idx.values():
            raise ValueError(f"{flag} {idx}: the class map of {self.path} has no class with this id (no training "
                             f"image had it); its {len(self.class_to_idx)} classes: {self._few()}")
        return idx

    def _id_of_name(self, name: str, num_classes: int, flag: str) -> int:
        if not self.class_to_idx:
            raise ValueError(f"{flag} {name}: the checkpoint {self.path} carries no class map (official release "
                             f"files have none), so classes are given as ids in [0, {num_classes})")
        if name in self.class_to_idx:
            return self.class_to_idx[name]
        close = difflib.get_close_matches(name, list(self.class_to_idx), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{flag} {name!r} is no class of the class map of {self.path} ({len(self.class_to_idx)} "
                         f"classes: {self._few()}){hint}; give one of its names or a class id")

    def _few(self, n: int = 8) -> str:
        names = sorted(self.class_to_idx or {}, key=lambda k: self.class_to_idx[k])
        shown = ", ".join(f"{k!r} = {self.class_to_idx[k]}" for k in names[:n])
        return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")

    def grid_classes(self, num_classes: int) -> list[int]:
        """The grid sampler's classes when none are given: the official ImageNet list for a
        1000-class model, else every class (up to 16), else the first 8 ids."""
        ids = self.ids(num_classes)
        if len(ids) == 1000:
            return list(IMAGENET_GRID_CLASSES)
        return ids if len(ids) <= 16 else ids[:8]


def sample_plan(num_classes: int, per_class: int, global_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (N,), seeds (N,)) for N = num_classes * per_class images.

    Labels are class-balanced and interleaved (index i has class i % num_classes), so any prefix is
    nearly balanced; each seed is a hash of (global_seed, index), independent of ranks and batches.
    """
    n = num_classes * per_class
    labels = torch.arange(n) % num_classes
    return labels, image_seeds(global_seed, torch.arange(n))


@dataclass
class Sampler:
    """A loaded GPT + tokenizer pair and the strategy that decodes with them.

    Every batch runs through `strategy.runner.run`, so under `--decode-path auto` a batch whose fast
    path fails is decoded again eagerly (`runner.fallback` then says so for the run's summary)."""

    strategy: Strategy
    gpt: torch.nn.Module
    vq: torch.nn.Module
    args: argparse.Namespace
    #: where the `--verify-fast-path` lines go (the DDP sampler: its rank-0 logger)
    log: Callable[[str], None] = print
    #: the tokenizer decodes in bf16 for the whole run when it started on a fast path (a fallback
    #: to the eager loop changes the GPT's steps, not the tokenizer's precision)
    bf16_decode: bool = field(init=False)
    verified: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.bf16_decode = self.strategy.runner.name != "eager"

    @property
    def grid(self) -> int:
        return self.args.image_size // self.args.downsample_size

    def prepare(self, labels: torch.Tensor, seeds: torch.Tensor) -> Any:
        """The strategy's host-side set-up of the batch `images(labels, seeds)` (`Strategy.prepare`,
        e.g. LPD's orders), or None; thread-safe, so it can run while another batch decodes."""
        return self.strategy.prepare(self.gpt, labels, seeds, steps=self.args.steps)

    @torch.no_grad()
    def images(self, labels: torch.Tensor, seeds: torch.Tensor, prepared: Any = None) -> torch.Tensor:
        """Class labels (B,) and per-image seeds (B,) -> decoded images (B,3,S,S) in about [-1,1].
        With `--verify-fast-path`, the first call checks the fast path on its labels first.
        `prepared`: `prepare(labels, seeds)`, built ahead (the same images)."""
        a = self.args
        device = next(self.gpt.parameters()).device
        labels, seeds = labels.to(device), seeds.to(device)
        kw = dict(cfg_scale=a.cfg_scale, cfg_interval=a.cfg_interval, top_k=a.top_k, top_p=a.top_p, steps=a.steps)
        if prepared is not None:
            kw["prepared"] = prepared
        if getattr(a, "verify_fast_path", False) and not self.verified:
            self.verify_fast_path(lambda: self.strategy.generate(self.gpt, labels, temperature=0.0,
                                                                 generator=RowRNG(seeds), **kw))
        # a fresh RowRNG per attempt: a batch decoded again restarts every image's stream from its seed
        generation = self.strategy.runner.run(lambda: self.strategy.generate_for_decoding(
            self.gpt, labels, temperature=a.temperature, generator=RowRNG(seeds), **kw))
        return self.decode(generation)

    @torch.no_grad()
    def verify_fast_path(self, greedy: Callable[[], torch.Tensor]) -> None:
        """`--verify-fast-path`: `greedy()` (one greedy batch through `strategy.runner`) on the fast
        path and on the eager loop must give the same token ids, else `FastPathMismatch`. Nothing to
        compare on the eager path, or once `auto` has fallen back to it."""
        self.verified = True
        runner = self.strategy.runner
        if runner.name == "eager":
            self.log("--verify-fast-path: the decode path is eager, the reference itself; nothing to compare")
            return
        fast = runner.run(greedy, counted=False)  # under auto, a failing fast path falls back here
        if runner.fallback is not None:
            self.log("--verify-fast-path: the fast path failed on the first batch and the run goes on eagerly; "
                     "nothing to compare")
            return
        self.strategy.runner = StepRunner()
        try:
            eager = greedy()
        finally:
            self.strategy.runner = runner
        dtype = next(self.gpt.parameters()).dtype
        note = (f" (the GPT runs in {str(dtype).removeprefix('torch.')}, where a near tie between two tokens can "
                f"round either way on the two paths)" if dtype != torch.float32 else "")
        check_same_tokens(fast, eager, runner.name, note)
        self.log(f"fast path verified on the first batch: tokens identical ({runner.name} and eager, "
                 f"{eager.numel()} greedy tokens)")

    def decode(self, generation: Generation | torch.Tensor) -> torch.Tensor:
        """A generation (or bare token ids) -> images (B,3,S,S) float32; in bf16 autocast on the
        fast CUDA paths."""
        if isinstance(generation, torch.Tensor):
            generation = Generation(generation)
        fast = self.bf16_decode and generation.tokens.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=fast):
            return self.strategy.decode_generation(self.vq, generation, self.grid).float()


def prefetch(items: Sequence[T], prepare: Callable[[T], P]) -> Iterator[tuple[T, P]]:
    """`(item, prepare(item))` for each item in turn, `prepare` of the next item running in one
    worker thread while the caller works on the current one: the host-side set-up of batch b + 1
    (numpy and torch CPU ops, which release the GIL for much of their work) overlaps batch b's
    decoding (`concurrent.futures.ThreadPoolExecutor`). An error of `prepare` surfaces at its item."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
        ahead = pool.submit(prepare, items[0]) if len(items) else None
        for i, item in enumerate(items):
            prepared = ahead.result()
            if i + 1 < len(items):
                ahead = pool.submit(prepare, items[i + 1])
            yield item, prepared


def check_sampling_flags(args: argparse.Namespace) -> None:
    """The sampling flags that can be checked without a model: refused (ValueError naming the flag)
    before anything is loaded or written."""
    check_cfg_scale(args.cfg_scale)
    for flag, ok, want in (("--image-size", args.image_size > 0 and args.image_size % args.downsample_size == 0,
                            f"a positive multiple of --downsample-size {args.downsample_size}"),
                           ("--downsample-size", args.downsample_size > 0, "positive"),
                           ("--num-classes", args.num_classes >= 1, ">= 1"),
                           ("--temperature", args.temperature >= 0, ">= 0 (0 = greedy)"),
                           ("--top-k", args.top_k >= 0, ">= 0 (0 = all tokens)"),
                           ("--top-p", 0 < args.top_p <= 1, "in (0, 1] (1 = all tokens)"),
                           ("--steps", args.steps is None or args.steps >= 1, ">= 1"),
                           ("--image-size-eval", (getattr(args, "image_size_eval", None) or 1) > 0, "positive")):
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise ValueError(f"{flag} must be {want}, got {value}")


def load_sampler(args: argparse.Namespace, device: torch.device, given: set[str] | None = None) -> Sampler:
    """Load the tokenizer and the GPT strictly, check they fit together, and cast for `--precision`.

    `given`: the flags the user gave (None: those that differ from their defaults); a flag of
    another strategy than `--strategy` is refused before anything is loaded."""
    if given is None:
        probe = argparse.ArgumentParser()
        add_sampling_args(probe)
        given = given_flags(probe, args=args)
    check_strategy_flags(args.strategy, given)
    check_sampling_flags(args)
    strategy = get_strategy(args.strategy)
    strategy.configure(args, training=False)
    vq = load_tokenizer(strategy.tokenizer_path(args), kind=strategy.tokenizer_kind, downsample=args.downsample_size,
                        **strategy.tokenizer_options(args)).to(device)  # its kind: the strategy's
    strategy.use_tokenizer(vq)
    grid = args.image_size // args.downsample_size
    gpt = strategy.load_model(args.gpt_ckpt, args.gpt_model, prefer_ema=args.ema,
                              vocab_size=codebook(vq)[0], block_size=grid * grid,
                              num_classes=args.num_classes, cls_token_num=args.cls_token_num,
                              **strategy.model_config(args))
    dtype = PRECISIONS[args.precision] if device.type == "cuda" else torch.float32
    gpt = gpt.to(device=device, dtype=dtype).eval()
    strategy.runner = make_runner(args.decode_path, device)
    if strategy.runner.name != "eager":  # channels_last convolutions for the bf16 tokenizer decode
        vq = vq.to(memory_format=torch.channels_last)
    return Sampler(strategy, gpt, vq.eval(), args)
