"""The Strategy plug-in: what differs between decoding methods, and nothing else.

A strategy builds and loads its model, turns a batch of codes into one training step's inputs and
targets, and runs its sampling loop. Training loop, sampling driver, logits processing
(`autoregressive/decoding/logits.py`) and evaluation are shared. Strategies do no argparse, file
layout decisions, `torch.distributed` or logging set-up; randomness comes from an explicit
`torch.Generator`.
"""
from __future__ import annotations

import argparse
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from autoregressive.decoding.fast_decode import StepRunner
from autoregressive.decoding.logits import Generator, check_cfg_scale
from tokenizer.registry import get_kind


@dataclass
class TrainingBatch:
    """One training step: `model(**inputs, targets=targets)` returns (logits, loss)."""

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. the order a strategy sampled


@dataclass
class Generation:
    """What one sampling call produced: the token ids (B, N) and, where the tokenizer decodes
    something other than them, that input (VAR's `more_smooth`: the soft f_hat map)."""

    tokens: torch.Tensor
    latent: torch.Tensor | None = None


class Strategy(ABC):
    """Base class of every decoding strategy; see `autoregressive/strategies/__init__.py`."""

    name: str = ""
    #: size name -> constructor, the `--gpt-model` choices of this strategy.
    model_sizes: dict[str, Any] = {}
    #: this strategy's flags (argparse dests) that fix the model's shape: saved with every
    #: training checkpoint, taken from it on resume, and an error when contradicted.
    arch_flags: tuple[str, ...] = ()
    #: this strategy's flags that fix the training schedule but not the model (e.g. NPP's patch
    #: stages): like `arch_flags`, taken from the checkpoint on resume and an error when contradicted.
    schedule_flags: tuple[str, ...] = ()
    #: this strategy's official training recipe for shared driver flags (argparse dest -> value),
    #: applied by the training driver as a whole when the user gave none of these flags.
    training_recipe: dict[str, Any] = {}
    #: the sampler flags (argparse dests: its own, or the shared decoding flags it reads) that change
    #: the images it samples; every sample folder name spells them out, even at their defaults (the
    #: other image settings appear there when they differ from their defaults: `sample_c2i_ddp.run_name`).
    image_flags: tuple[str, ...] = ()
    #: whether `edit` can regenerate any region (arbitrary-order strategies); the others refuse.
    can_edit: bool = False
    #: official flag aliases this strategy adds (its dest -> the driver's dest); `apply_flag_aliases`.
    flag_aliases: dict[str, str] = {}
    #: the tokenizer kind (`tokenizer/registry.py`) whose codes this strategy trains on and decodes.
    tokenizer_kind: str = "vq"
    #: the training flag naming the tokenizer checkpoint, for a strategy that trains and generates
    #: with the tokenizer itself, not only its codes (VAR builds its next-scale inputs from its
    #: VQVAE: `--vae-ckpt`); drivers then load it and hand it over with `use_tokenizer`. None: the
    #: strategy reads codes only and the sampler decodes them.
    tokenizer_flag: str | None = None
    #: how this method's official code reads a released checkpoint (what `autoregressive/export.py`
    #: writes): "model" = `{"model": state_dict}`, "flat" = the bare state dict.
    official_layout: str = "model"
    #: where the official code reads it, for messages and the README.
    official_reader: str = ("FoundationVision/LlamaGen autoregressive/sample/sample_c2i_ddp.py "
                            "(checkpoint['model'])")

    # -- decoding path ----------------------------------------------------------------------------

    @property
    def runner(self) -> StepRunner:
        """How `generate` / `edit` run their model steps and get their KV cache
        (`autoregressive/decoding/fast_decode.py`): the eager reference unless a driver set another."""
        if "_runner" not in self.__dict__:
            self._runner = StepRunner()
        return self._runner

    @runner.setter
    def runner(self, runner: StepRunner) -> None:
        self._runner = runner

    # -- flags ------------------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Add this strategy's own flags (with the official names) to a driver's parser.

        Called for every registered strategy by the training and sampling drivers, so a flag name
        belongs to one strategy only; flags common to several strategies live in the drivers.
        """

    def configure(self, args: argparse.Namespace, *, training: bool) -> None:
        """Read and validate this strategy's flags for training (`training=True`, the training
        driver's flags) or sampling (the samplers' flags); raise ValueError with the reason when
        wrong. Reads files at most to validate them; never changes `args`."""

    def model_config(self, args: argparse.Namespace) -> dict[str, Any]:
        """Constructor arguments of the model that come from this strategy's flags."""
        return {}

    # -- tokenizer --------------------------------------------------------------------------------

    def tokenizer_path(self, args: argparse.Namespace) -> str | None:
        """The tokenizer checkpoint the drivers load for this strategy: --vq-ckpt."""
        return getattr(args, "vq_ckpt", None)

    def tokenizer_options(self, args: argparse.Namespace) -> dict[str, Any]:
        """Keyword arguments of `tokenizer.registry.load_tokenizer` for this strategy's tokenizer
        (called after `configure`): the --vq-model size and the codebook flags."""
        return dict(size=args.vq_model, codebook_size=args.codebook_size, codebook_embed_dim=args.codebook_embed_dim)

    def use_tokenizer(self, vq: nn.Module) -> None:
        """Take the tokenizer a driver loaded through the registry; refuses one of another kind."""
        kind = get_kind(self.tokenizer_kind)
        if not kind.owns(vq):
            raise TypeError(f"--strategy {self.name} decodes with {kind.title}, got a {type(vq).__name__}")
        self.tokenizer = vq

    def decode_tokens(self, vq: nn.Module, tokens: torch.Tensor, grid: int) -> torch.Tensor:
        """Token ids from `generate` -> images (B, 3, H, W) in about [-1, 1]."""
        return get_kind(self.tokenizer_kind).decode(vq, tokens, (grid, grid))

    def generate_for_decoding(self, model: nn.Module, labels: torch.Tensor, **kwargs: Any) -> Generation:
        """`generate`, with everything `decode_generation` needs besides the token ids (nothing,
        except for VAR's `more_smooth` maps). The samplers call this pair; nothing is kept on `self`."""
        return Generation(self.generate(model, labels, **kwargs))

    def decode_generation(self, vq: nn.Module, generation: Generation, grid: int) -> torch.Tensor:
        """A `generate_for_decoding` result -> images (B, 3, H, W) in about [-1, 1]."""
        return self.decode_tokens(vq, generation.tokens, grid)

    @classmethod
    def code_length(cls, args: argparse.Namespace) -> int:
        """Codes per image this strategy trains on (checked against the code folder): the raster
        grid; VAR's multi-scale ids are sum pn^2."""
        return (args.image_size // args.downsample_size) ** 2

    @classmethod
    def alias_value(cls, alias: str, args: argparse.Namespace) -> Any:
        """The driver value an alias given as `getattr(args, alias)` stands for (default: itself)."""
        return getattr(args, alias)

    @classmethod
    def apply_flag_aliases(cls, args: argparse.Namespace, given: set[str]) -> None:
        """Set the driver's flags from this strategy's official aliases of them (`flag_aliases`,
        e.g. VAR's --bs for --global-batch-size); the training driver calls it first, before any
        flag is read. An alias and its driver flag both given with different values is an error
        naming both; an alias not given changes nothing."""
        for alias, dest in cls.flag_aliases.items():
            if alias not in given or getattr(args, alias, None) is None:
                continue
            value = cls.alias_value(alias, args)
            if dest in given and getattr(args, dest) != value:
                raise ValueError(f"--{alias.replace('_', '-')} {getattr(args, alias)} (= --{dest.replace('_', '-')} "
                                 f"{value}) contradicts --{dest.replace('_', '-')} {getattr(args, dest)}: "
                                 f"give one of them")
            setattr(args, dest, value)

    @abstractmethod
    def build_model(self, gpt_model: str, **config: Any) -> nn.Module:
        """A fresh model of a named size; `config` overrides its constructor arguments."""

    @abstractmethod
    def load_official(self, model: nn.Module, state_dict: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
        """Copy an official (or our) state dict into `model` strictly, naming any mismatch."""

    def official_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s weights under the official key names: the inverse of `load_official`.

        `load_official` copies official state dicts in without renaming (our modules carry the
        official key names; `tests/test_parity_*.py` check them against every release's key list),
        so its inverse is the state dict itself. A strategy whose model can hold what the official
        one cannot overrides this and raises `CheckpointError` with the reason."""
        return dict(model.state_dict())

    @abstractmethod
    def load_model(self, path: str | os.PathLike, gpt_model: str | None = None, *,
                   prefer_ema: bool = False, map_location: str | torch.device = "cpu",
                   **config: Any) -> nn.Module:
        """Build the model a checkpoint file needs and load it strictly; eval mode."""

    @abstractmethod
    def training_batch(self, codes: torch.Tensor, labels: torch.Tensor,
                       generator: torch.Generator | None = None) -> TrainingBatch:
        """codes (B, N) raster-order token ids, labels (B,) -> the step's inputs and targets."""

    def owns_lr(self) -> bool:
        """Whether `on_step` sets the learning rate itself (NPP --scheduler, VAR --wpe); the driver's
        --lr-schedule then stays constant."""
        return False

    def on_step(self, step: int, steps_per_epoch: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Called by the training driver before every optimizer step; returns scalars to log.

        `step` counts the optimizer-sized batches consumed so far (the driver's `data_pos`, restored
        on resume), so `step // steps_per_epoch` is the epoch. A strategy whose batches or learning
        rate depend on the training position sets them here (NPP: patch stage, per-stage lr).
        """
        return {}

    def cost_phases(self) -> list[tuple[str, int]]:
        """(name, first epoch) of each stretch of a training run whose steps cost the same, after
        `configure`: the run planner (`--estimate`) times each one. Default: one for the whole run."""
        return [("", 0)]

    def training_loss(self, model: nn.Module, codes: torch.Tensor, labels: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The scalar loss of one step (the hook the training driver calls)."""
        batch = self.training_batch(codes, labels, generator)
        _, loss = model(**batch.inputs, targets=batch.targets)
        return loss

    @abstractmethod
    def generate(self, model: nn.Module, labels: torch.Tensor, *, cfg_scale: float = 1.0,
                 cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, steps: int | None = None,
                 generator: Generator | None = None,
                 record_logits: list | None = None) -> torch.Tensor:
        """Sample token ids (B, N) in raster layout for class labels (B,)."""

    def prepare(self, model: nn.Module, labels: torch.Tensor, seeds: torch.Tensor, *,
                steps: int | None = None) -> Any:
        """The host-side set-up of a `generate` call for `labels` (B,) whose images draw from
        `RowRNG(seeds)`, built ahead: a sampler runs it in a worker thread for the next batch while
        this one decodes, and passes a result that is not None on as `generate(..., prepared=...)`
        (which then gives the same tokens). Thread-safe, on the host. Default: nothing (None)."""
        return None

    def decoding_steps(self, model: nn.Module, steps: int | None = None) -> int:
        """Model forwards `generate` runs for one image (`steps` as given to it); raster: one per token."""
        return steps if steps is not None else model.config.block_size

    def edit(self, model: nn.Module, labels: torch.Tensor, known_tokens: torch.Tensor,
             known_mask: torch.Tensor, *, cfg_scale: float = 1.0, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, steps: int | None = None,
             generator: Generator | None = None, record_logits: list | None = None) -> torch.Tensor:
        """Zero-shot editing (inpainting, outpainting, class-conditional editing): keep the raster
        tokens `known_tokens` (B, N) where `known_mask` (N,) is True as context, generate the
        others for `labels` (B,); returns (B, N). Only strategies that generate in arbitrary
        orders can do this; the others refuse."""
        raise NotImplementedError(f"the {self.name!r} strategy cannot edit images: it only generates "
                                  f"in a fixed order (use an arbitrary-order strategy such as arpg)")

    def check_call(self, model: nn.Module, labels: torch.Tensor, num_classes: int, cfg_scale: float,
                   temperature: float, generator: Generator | None = None, *,
                   require_generator: bool = True, what: str = "generate") -> None:
        """The checks every sampling loop starts with: eval mode, a guidance scale >= 1, a
        temperature >= 0, an explicit generator when sampling, and class ids in range."""
        if model.training:
            raise ValueError(f"{what} needs the model in eval mode (call model.eval())")
        check_cfg_scale(cfg_scale)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if require_generator and temperature > 0 and generator is None:
            raise ValueError("sampling (temperature > 0) needs an explicit generator; temperature 0 is greedy")
        self.check_labels(labels, num_classes)

    @staticmethod
    def check_labels(labels: torch.Tensor, num_classes: int) -> None:
        """Class ids must lie in [0, num_classes); the null class is not a valid request."""
        if labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point:
            raise ValueError(f"labels must be integer class ids, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"class ids must lie in [0, {num_classes}), got min {int(labels.min())}, "
                             f"max {int(labels.max())}")
