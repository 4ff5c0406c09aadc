"""`arpg`: randomized parallel decoding with target-aware queries (arXiv 2503.10568; official: hp-l33/ARPG).

Schedule (`decoding/orders.py`): by default, as officially, `order` = a uniformly random permutation
of the grid and group sizes from the `arccos` step schedule over `--step` steps (64); the shared
flags choose any other (`--sample-schedule cosine`, `--order lpd | raster | FILE`, `--group-sizes`),
and the model decodes any of them. Training draws one random order per sample from the driver's
generator and predicts every token in that order under causal masks (the model does the
shuffling). Sampling runs the shared KV-cached loop
`decoding/group_decode.py:decode_in_groups`; one step feeds the tokens of the previous group (the
class token at step 0) and asks one query per target of the next group.

Differences from the official sampler (hp-l33/ARPG `models/arpg.py:Transformer.generate` and
`sample_c2i_ddp.py`), on purpose:
* `--top-k` / `--top-p` are applied (officially ignored by the DDP sampler, and top-p < 1 crashes);
* a `--step` larger than the number of tokens is refused (officially a crash);
* with a per-row sampler (`RowRNG`, what the sampling drivers pass) every image draws its own order,
  so an image does not depend on its batch-mates; with a `torch.Generator` the batch shares one
  order, as officially;
* cfg_scale 1 runs no unconditional half (officially computed and then weighted by 0).
Editing (inpainting / outpainting / class-conditional editing, described in the ARPG paper; the
official repository has no code for it): the known tokens are fed with the class token at step 0
and the schedule runs over the unknown tokens only.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from autoregressive.models.arpg import ARPG, ARPG_SIZES, build_arpg
from autoregressive.decoding.group_decode import decode_in_groups
from autoregressive.decoding.logits import Generator, cfg_labels
from autoregressive.decoding.orders import Schedule, check_known
from autoregressive.strategies.base import TrainingBatch
from autoregressive.strategies.raster import RasterStrategy
from utils.checkpoint import CheckpointError

#: CFG scale of a step from (guidance g, tokens known after the step, tokens generated in all).
CFG_SCHEDULES = {
    "linear": lambda g, known, total: 1.0 + (g - 1.0) * known / total,  # reaches g at the last step
    "constant": lambda g, known, total: g,
}
DEFAULT_STEPS = 64  # the official evaluation commands' --step


class ArpgStrategy(RasterStrategy):
    """ARPG; loading (official layouts, strict keys, our checkpoints) is raster's."""

    name = "arpg"
    can_edit = True
    model_sizes = ARPG_SIZES
    official_reader = "hp-l33/ARPG sample_c2i_ddp.py (checkpoint['model'])"
    image_flags = ("steps", "order", "sample_schedule", "cfg_schedule")
    #: the official schedule (hp-l33/ARPG `train_c2i.py`): 100 warm-up epochs, then a half-cosine
    #: to --min-lr; applied when no lr-schedule flag is given (`--warmup-epochs 0` keeps a constant rate).
    training_recipe = {"lr_schedule": "cosine", "warmup_epochs": 100.0}

    def __init__(self, sample_schedule: str = "arccos", cfg_schedule: str = "linear"):
        # The official sampler defaults until `configure` reads the flags.
        self.schedule = Schedule(order="random", step_schedule=sample_schedule)
        self.cfg_schedule = cfg_schedule
        self._check_cfg_schedule()

    # -- flags ------------------------------------------------------------------------------------

    def configure(self, args: argparse.Namespace, *, training: bool) -> None:
        """Read the shared schedule flags (`decoding/orders.py`: `--order`, `--sample-schedule`,
        `--group-sizes`, `--cfg-schedule`, ...); refuse a `--step` above the token count or one the
        schedule cannot serve, and `--cfg-interval` (ARPG has none). Training reads none of them
        (orders are drawn per step; the lr recipe is `training_recipe`)."""
        if training:
            return
        self.schedule = Schedule.from_args(args, order="random", step_schedule="arccos")
        self.cfg_schedule = args.cfg_schedule or "linear"
        self._check_cfg_schedule()
        n = (args.image_size // args.downsample_size) ** 2
        self.schedule.sizes(n, args.steps, min(DEFAULT_STEPS, n))  # sampling: fail before loading
        if args.cfg_interval != -1:
            raise ValueError("arpg has no --cfg-interval: use --cfg-schedule linear or constant")

    def _check_cfg_schedule(self) -> None:
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"unknown --cfg-schedule {self.cfg_schedule!r}; known: {', '.join(CFG_SCHEDULES)}")

    # -- model ------------------------------------------------------------------------------------

    def build_model(self, gpt_model: str, **config: Any) -> ARPG:
        return build_arpg(gpt_model, **config)

    def official_state_dict(self, model: ARPG) -> dict[str, torch.Tensor]:
        """The state dict, refused for a model with our learned absolute positions (`abs_pos_embed`,
        ARPG-debug): the official ARPG (hp-l33/ARPG `models/arpg.py`) places tokens by RoPE alone and
        has no `pos_embed`; its sampler, loading with strict=False, would drop it and run another model."""
        if model.pos_embed is not None:
            raise CheckpointError(
                "this ARPG model has a learned absolute position embedding (pos_embed, abs_pos_embed=True: "
                "ours, as in ARPG-debug) that the official ARPG (hp-l33/ARPG models/arpg.py, RoPE positions "
                "only) has no parameter for: its sampler would drop it and compute another model; only "
                "models without it (ARPG-L/XL/XXL) can be exported")
        return super().official_state_dict(model)

    # -- training ---------------------------------------------------------------------------------

    def training_batch(self, codes: torch.Tensor, labels: torch.Tensor,
                       generator: torch.Generator | None = None) -> TrainingBatch:
        """One uniformly random order per sample (official `rand(B, N).argsort(1)`), drawn from
        `generator`; the model feeds the class + the first N - 1 tokens of the order and predicts
        all N (logits in order layout)."""
        device = generator.device if generator is not None else codes.device
        orders = torch.rand(codes.shape, generator=generator, device=device).argsort(dim=1).to(codes.device)
        return TrainingBatch(inputs={"idx": codes, "cond": labels, "orders": orders}, targets=codes,
                             extras={"orders": orders})

    # -- sampling ---------------------------------------------------------------------------------

    def cfg_scales(self, cfg_scale: float, sizes: list[int]) -> list[float]:
        """The CFG scale of every step; linear counts the tokens known after the step (official)."""
        total, known, out = sum(sizes), 0, []
        for g in sizes:
            known += g
            out.append(CFG_SCHEDULES[self.cfg_schedule](cfg_scale, known, total))
        return out

    def decoding_steps(self, model: ARPG, steps: int | None = None) -> int:
        n = model.config.block_size
        return len(self.schedule.sizes(n, steps, min(DEFAULT_STEPS, n)))

    @torch.no_grad()
    def generate(self, model: ARPG, labels: torch.Tensor, *, cfg_scale: float = 1.0,
                 cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, steps: int | None = None,
                 generator: Generator | None = None,
                 record_logits: list | None = None) -> torch.Tensor:
        """Sample (B, N) raster token ids (int64) for labels (B,) in `steps` steps (default
        min(64, N)) under the configured schedule; the order is drawn from `generator` (required
        unless raster, also for temperature 0). `record_logits` receives per step the (B, G, V)
        logits after CFG (generation order)."""
        self.check_call(model, labels, model.num_classes, cfg_scale, temperature, require_generator=False)
        if cfg_interval != -1:
            raise ValueError("arpg has no cfg_interval: use the linear or constant CFG schedule")
        n = model.config.block_size
        sizes = self.schedule.sizes(n, steps, min(DEFAULT_STEPS, n))
        order = self.schedule.orders(labels.shape[0], sizes, generator, model.embeddings.weight.device)
        return self.decode(model, labels, order, sizes, cfg_scale=cfg_scale, temperature=temperature,
                           top_k=top_k, top_p=top_p, generator=generator, record_logits=record_logits)

    @torch.no_grad()
    def edit(self, model: ARPG, labels: torch.Tensor, known_tokens: torch.Tensor,
             known_mask: torch.Tensor, *, cfg_scale: float = 1.0, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, steps: int | None = None,
             generator: Generator | None = None, record_logits: list | None = None) -> torch.Tensor:
        """Keep `known_tokens` (B, N) where `known_mask` (N,) or (grid, grid) is True; generate the
        rest for `labels` (B,) in the configured order over `steps` steps (default min(64, unknown))
        of the configured step schedule, over the unknown tokens."""
        self.check_call(model, labels, model.num_classes, cfg_scale, temperature, require_generator=False)
        n, device = model.config.block_size, model.embeddings.weight.device
        known_mask = check_known(known_tokens, known_mask, labels.shape[0], n).to(device)
        n_u = int((~known_mask).sum())
        sizes = self.schedule.sizes(n_u, steps, min(DEFAULT_STEPS, n_u), grid_tokens=n)
        order = self.schedule.orders(labels.shape[0], sizes, generator, device, known=known_mask)
        known = known_mask.nonzero().squeeze(1)  # (M,) raster order
        return self.decode(model, labels, order, sizes, known_positions=known,
                           known_tokens=known_tokens.to(device)[:, known], cfg_scale=cfg_scale,
                           temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                           record_logits=record_logits)

    def decode(self, model: ARPG, labels: torch.Tensor, order: torch.Tensor, sizes: list[int], *,
               known_positions: torch.Tensor | None = None, known_tokens: torch.Tensor | None = None,
               cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: Generator | None = None, record_logits: list | None = None) -> torch.Tensor:
        """Run a given schedule: `order` (N_u,) or (B, N_u) raster positions in generation order,
        `sizes` tokens per step; the known tokens (B, M) at `known_positions` (M,) are context.

        Cache slots: 0 = class, 1..M = known tokens, then the groups in order (the last group is
        never fed). Step 0 feeds `[class ; known]`, step g > 0 the tokens of group g - 1.
        """
        device = model.embeddings.weight.device
        n = model.config.block_size
        labels, order = labels.to(device), order.to(device)
        b = labels.shape[0]
        cond = cfg_labels(labels, model.num_classes, cfg_scale)  # (B' = 2B with CFG, else B); C = null
        reps = cond.shape[0] // b
        first_ids = model.condition_ids(cond)  # (B', 1)
        first_rows = torch.zeros(1, dtype=torch.long, device=device)  # RoPE row 0: the class token
        if known_positions is not None and known_positions.numel():
            first_ids = torch.cat([first_ids, known_tokens.repeat(reps, 1)], dim=1)  # (B', 1 + M)
            first_rows = torch.cat([first_rows, known_positions.to(device) + 1])  # (1 + M,)
        run = self.runner
        cache = run.cache(model, cond.shape[0], max_len=first_ids.shape[1] + order.shape[-1] - sizes[-1])
        scales = self.cfg_scales(cfg_scale, sizes)
        filled = [0]  # cache slots written so far

        def step(g: int, prev: torch.Tensor | None, prev_pos: torch.Tensor | None,
                 next_pos: torch.Tensor) -> torch.Tensor:
            ids, rows = (first_ids, first_rows) if g == 0 else (prev, prev_pos + 1)
            slots = torch.arange(filled[0], filled[0] + ids.shape[1], device=device)
            filled[0] += ids.shape[1]
            return run(model.decode_step, ids, rows, next_pos + 1, cache.upto(filled[0]), slots)  # (B', G, V)

        tokens = decode_in_groups(step, order, sizes, b, cfg_scale=cfg_scale,
                                  cfg_scale_at=lambda g, pos, idx: scales[g], temperature=temperature,
                                  top_k=top_k, top_p=top_p, generator=generator,
                                  record_logits=record_logits, num_tokens=n)
        if known_positions is not None and known_positions.numel():
            tokens[:, known_positions] = known_tokens
        return tokens
