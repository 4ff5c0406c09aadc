"""`raster`: LlamaGen next-token prediction in raster order, one KV-cached step per token.

Schedule: order = identity, group sizes 1 x N. Training shifts the codes by one (the class token
predicts z_0, z_{t-1} predicts z_t). Sampling follows the official `generate`
(FoundationVision/LlamaGen `autoregressive/models/generate.py`) through the shared group loop
(`autoregressive/decoding/group_decode.py`): prefill the class token (both CFG halves in one batch
`[labels ; null]`), then N - 1 decode steps, each feeding the last token to both halves; CFG before
temperature / top-k / top-p.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from autoregressive.models.gpt import GPT_SIZES, Transformer, build_gpt
from autoregressive.models.official import (
    check_args_agree, gpt_kwargs_from_args, load_weights_strict, read_gpt_checkpoint,
)
from autoregressive.decoding.group_decode import decode_in_groups
from autoregressive.decoding.logits import Generator, cfg_guided, cfg_labels
from autoregressive.strategies.base import Strategy, TrainingBatch
from utils.checkpoint import CheckpointError


class RasterStrategy(Strategy):
    name = "raster"
    model_sizes = GPT_SIZES

    # -- model ------------------------------------------------------------------------------------

    def build_model(self, gpt_model: str, **config: Any) -> Transformer:
        return build_gpt(gpt_model, **config)

    def load_official(self, model: Transformer, state_dict: dict[str, torch.Tensor],
                      what: str = "checkpoint") -> None:
        load_weights_strict(model, state_dict, what=what)

    def load_model(self, path: str | os.PathLike, gpt_model: str | None = None, *,
                   prefer_ema: bool = False, map_location: str | torch.device = "cpu",
                   **config: Any) -> Transformer:
        """Load an official release or our checkpoint strictly; returns the model in eval mode.

        Official release files record nothing, so `gpt_model` and the sizes (`block_size`,
        `vocab_size`, `num_classes`, ...) come from the caller. Training checkpoints (official
        or ours) record `args`; those build the model and must agree with the caller's values.
        """
        weights, args = read_gpt_checkpoint(path, prefer_ema=prefer_ema, map_location=map_location)
        what = f"GPT checkpoint {path}"
        if args is not None and "gpt_model" in args:
            check_args_agree(args, what, strategy=self.name, gpt_model=gpt_model)
            # The shared size flags and this strategy's own shape flags (their dests are config fields).
            recorded = {**gpt_kwargs_from_args(args), **{k: args[k] for k in self.arch_flags if k in args}}
            for k, v in config.items():
                if k in recorded and recorded[k] != v:
                    raise CheckpointError(f"{what} was trained with {k}={recorded[k]!r}, but {k}={v!r} was asked for")
            gpt_model, config = args["gpt_model"], {**config, **recorded}
        if gpt_model is None:
            raise CheckpointError(f"{what} records no model size; pass --gpt-model")
        model = self.build_model(gpt_model, **config)
        self.load_official(model, weights, what=f"{what} (as {gpt_model})")
        return model.eval()

    # -- training ---------------------------------------------------------------------------------

    def training_batch(self, codes: torch.Tensor, labels: torch.Tensor,
                       generator: torch.Generator | None = None) -> TrainingBatch:
        """Feed z[:, :-1] after the class token, predict z (row t -> z_t); plain causal mask."""
        return TrainingBatch(inputs={"idx": codes[:, :-1], "cond": labels}, targets=codes)

    # -- sampling ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, model: Transformer, labels: torch.Tensor, *, cfg_scale: float = 1.0,
                 cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, steps: int | None = None,
                 generator: Generator | None = None,
                 record_logits: list | None = None) -> torch.Tensor:
        """Sample (B, N) raster token ids (int64) for labels (B,).

        Args:
            cfg_scale: 1.0 = no guidance (no unconditional pass); > 1 guides; < 1 is refused.
            cfg_interval: -1 guides every token; c >= 0 guides the first c + 2 tokens (official).
            temperature: 0 = greedy (argmax); top_k 0 / top_p 1.0 = no filtering.
            steps: must be None or N (raster takes one step per token).
            generator: a torch.Generator (on the model's device) or a per-row sampler
                (`RowSampler`); required unless temperature is 0.
            record_logits: if a list, receives per token the (B, V) logits after CFG, before
                temperature and filtering (what the parity fixtures record).
        """
        self.check_call(model, labels, model.num_classes, cfg_scale, temperature, generator)
        n = model.config.block_size
        if steps is not None and steps != n:
            raise ValueError(f"raster decoding takes one step per token: steps must be {n}, got {steps}")
        device = model.tok_embeddings.weight.device
        labels = labels.to(device)
        cond = cfg_labels(labels, model.num_classes, cfg_scale)  # (B' = 2B with CFG, else B)
        # Slots: class token at 0, z_t at 1 + t for t < N - 1 (the last token is never fed).
        run = self.runner
        cache = run.cache(model, cond.shape[0], max_len=model.cls_token_num + n - 1)

        def step(g: int, prev: torch.Tensor | None, prev_pos: torch.Tensor | None,
                 pos: torch.Tensor) -> torch.Tensor:
            # Step g writes slot cls - 1 + g (z_{g-1}) and reads the slots written so far.
            if prev is None:
                return run(model.prefill, cond, cache.upto(model.cls_token_num))[:, -1:]  # (B', 1, V)
            return run(model.decode_step, prev, cache.upto(model.cls_token_num + g),
                       prev_pos + model.cls_token_num)  # (B', 1, V)

        recorded: list | None = [] if record_logits is not None else None
        tokens = decode_in_groups(
            step, torch.arange(n, device=device), [1] * n, labels.shape[0], cfg_scale=cfg_scale,
            cfg_scale_at=lambda g, pos, idx: cfg_scale if cfg_guided(g, cfg_interval) else None,
            temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, record_logits=recorded)
        if record_logits is not None:
            record_logits.extend(l[:, 0] for l in recorded)  # (B, V) per token
        return tokens
