"""`par`: PAR, parallelized autoregressive decoding (arXiv 2412.15119; official: YuqingWang1029/PAR).

Schedule: `order` = the PAR order (`models/par.py:par_order`), group sizes `[1] * n + [n] * (N/n - 1)`:
the first token of each of the n regions one by one, then the tokens at the same in-region offset
in every region in one step (N/n + n - 1 steps: 147 for PAR-4x, 51 for PAR-16x at 24 x 24).
Training reorders the raster codes into PAR order and predicts them through PAR's sequence and
mask. Sampling runs the shared KV-cached loop `decoding/group_decode.py:decode_in_groups`; this file
only says what one step feeds: the class token, then the previous token, then `[zp_{n-1}, M_1..M_S]`
(the transition), then the previous group. Flags keep the official names `--spe-token-num` (S)
and `--ar-token-num` (n): 3 and 4 for PAR-4x, 15 and 16 for PAR-16x.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from autoregressive.models.par import (PARTransformer, build_par, check_par_shape, check_par_tokens,
                                       par_group_sizes, par_order)
from autoregressive.decoding.group_decode import decode_in_groups
from autoregressive.decoding.logits import Generator, cfg_labels
from autoregressive.strategies.base import TrainingBatch
from autoregressive.strategies.raster import RasterStrategy


class ParStrategy(RasterStrategy):
    """PAR over the LlamaGen GPT; loading (official layouts, strict keys) is raster's."""

    name = "par"
    arch_flags = ("spe_token_num", "ar_token_num")
    official_reader = "YuqingWang1029/PAR autoregressive/sample/sample_c2i_ddp.py (checkpoint['model'])"
    image_flags = ("spe_token_num", "ar_token_num")

    def __init__(self, ar_token_num: int = 4, spe_token_num: int = 3):
        # The official defaults (PAR-4x) until `configure` reads the flags.
        self.ar_token_num = ar_token_num
        self.spe_token_num = spe_token_num

    # -- flags ------------------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--spe-token-num", type=int, default=3,
                           help="PAR transition tokens M_1..M_(n-1): 3 for PAR-4x, 15 for PAR-16x")
        group.add_argument("--ar-token-num", type=int, default=4,
                           help="PAR tokens per parallel step n = regions (a square): 4 or 16")

    def configure(self, args: argparse.Namespace, *, training: bool) -> None:
        """Refuse an n that is not a square >= 4, S != n - 1, or a grid the regions do not divide.

        The grid is checked here when `args` carries the drivers' `--image-size` and
        `--downsample-size` (a namespace of strategy flags alone gets it checked by `build_model`).
        """
        check_par_tokens(args.ar_token_num, args.spe_token_num)
        image_size, downsample = getattr(args, "image_size", None), getattr(args, "downsample_size", None)
        if image_size and downsample:
            check_par_shape(image_size // downsample, args.ar_token_num, args.spe_token_num)
        self.ar_token_num, self.spe_token_num = args.ar_token_num, args.spe_token_num

    def model_config(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"spe_token_num": args.spe_token_num, "ar_token_num": args.ar_token_num}

    # -- model ------------------------------------------------------------------------------------

    def build_model(self, gpt_model: str, **config: Any) -> PARTransformer:
        return build_par(gpt_model, **config)

    # -- training ---------------------------------------------------------------------------------

    def training_batch(self, codes: torch.Tensor, labels: torch.Tensor,
                       generator: torch.Generator | None = None) -> TrainingBatch:
        """codes (B, N) raster -> zp = codes in PAR order; feed zp[:, :-1], predict zp (official
        `train_c2i.py`); the model inserts the M tokens and applies PAR's mask."""
        grid = math.isqrt(codes.shape[1])
        check_par_shape(grid, self.ar_token_num, self.spe_token_num)
        zp = codes[:, par_order(grid, self.ar_token_num, device=codes.device)]  # (B, N)
        return TrainingBatch(inputs={"idx": zp[:, :-1], "cond": labels}, targets=zp)

    def training_loss(self, model: torch.nn.Module, codes: torch.Tensor, labels: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """As the base class, after checking that the model was built for this strategy's n: a
        mismatch would silently teach one order to a mask and RoPE table built for another."""
        core = model
        for wrapper in ("_orig_mod", "module"):  # torch.compile, then DDP
            core = getattr(core, wrapper, core)
        if core.ar_token_num != self.ar_token_num:
            raise ValueError(f"the model was built with ar_token_num={core.ar_token_num}, the strategy "
                             f"is configured for {self.ar_token_num}")
        return super().training_loss(model, codes, labels, generator)

    # -- sampling ---------------------------------------------------------------------------------

    @staticmethod
    def num_steps(num_tokens: int, ar_token_num: int) -> int:
        """N/n + n - 1 decoding steps."""
        return num_tokens // ar_token_num + ar_token_num - 1

    def decoding_steps(self, model, steps: int | None = None) -> int:
        return self.num_steps(model.config.block_size, model.ar_token_num)

    @staticmethod
    def cfg_step_guided(g: int, ar_token_num: int, cfg_interval: float) -> bool:
        """The official cfg_interval rule (YuqingWang1029/PAR `autoregressive/models/generate.py:generate`):
        the prefill (g = 0) is always guided; a sequential step g < n has counter i = g - 1; the
        parallel phase restarts, counting tokens i = 0, n, 2n, ... (i = (g - n) n); guidance is off
        when cfg_interval > -1 and i > cfg_interval."""
        if g == 0 or cfg_interval <= -1:
            return True
        i = g - 1 if g < ar_token_num else (g - ar_token_num) * ar_token_num
        return i <= cfg_interval

    @torch.no_grad()
    def generate(self, model: PARTransformer, labels: torch.Tensor, *, cfg_scale: float = 1.0,
                 cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, steps: int | None = None,
                 generator: Generator | None = None,
                 record_logits: list | None = None) -> torch.Tensor:
        """Sample (B, N) raster token ids (int64) for labels (B,) in N/n + n - 1 steps.

        Arguments as `RasterStrategy.generate`; `steps` must be None or N/n + n - 1 (PAR's
        schedule is fixed by n); `record_logits` receives per step the (B, G, V) guided logits.
        """
        self.check_call(model, labels, model.num_classes, cfg_scale, temperature, generator)
        n, num_tokens = model.ar_token_num, model.config.block_size
        if steps is not None and steps != self.num_steps(num_tokens, n):
            raise ValueError(f"PAR-{n}x decodes {num_tokens} tokens in {self.num_steps(num_tokens, n)} steps "
                             f"(n single steps, then groups of n), got steps={steps}")
        labels = labels.to(model.tok_embeddings.weight.device)
        cond = cfg_labels(labels, model.num_classes, cfg_scale)  # (B' = 2B with CFG, else B)
        run = self.runner
        cache = run.cache(model, cond.shape[0])
        written = [0]  # slots filled so far: the sequence [class, zp_0..zp_{n-1}, M, zp_n, ...] in order

        def step(g: int, prev: torch.Tensor | None, prev_pos: torch.Tensor | None,
                 next_pos: torch.Tensor) -> torch.Tensor:
            if g == 0:
                written[0] = model.cls_token_num
                return run(model.prefill, cond, cache.upto(written[0]))  # (B', 1, V) -> zp_0
            if g == n:
                written[0] += 1 + model.spe_token_num
                # [zp_{n-1}, M] -> (B', n, V) group 1
                return run(model.decode_transition, prev, cache.upto(written[0]))
            # The previous token (g < n) or group at its slots -> the next token or group.
            written[0] += prev.shape[1]
            return run(model.decode_step, prev, cache.upto(written[0]), model.slot_of_cell[prev_pos])  # (B', G, V)

        def cfg_scale_at(g: int, pos: torch.Tensor, idx: torch.Tensor) -> float | None:
            return cfg_scale if self.cfg_step_guided(g, n, cfg_interval) else None

        return decode_in_groups(step, model.order, par_group_sizes(num_tokens, n), labels.shape[0],
                                cfg_scale=cfg_scale, cfg_scale_at=cfg_scale_at, temperature=temperature,
                                top_k=top_k, top_p=top_p, generator=generator, record_logits=record_logits)
