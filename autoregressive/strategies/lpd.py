"""`lpd`: locality-aware parallel decoding (arXiv 2507.01957; official: mit-han-lab/lpd).

Schedule (`decoding/orders.py`, shared with ARPG): by default, as officially, a locality-aware
order (`decoding/lpd_order.py`, generated on the fly from each image's seed; or `--order FILE`) and
the official group-size table for the grid and `--steps` (20 / 32 at 256 px, 48 at 512 px, ...);
the shared flags choose any other (`--order random | raster`, `--sample-schedule cosine | arccos`
for grids without a table, `--group-sizes`).
Training (as the official `main.py` / `engine.py`): one schedule drawn per step from the grid's
training list, one uniformly random order per sample and label dropout to `fake_latent`, all from
the driver's generator; the model predicts every token from the position queries of its group
(`models/lpd.py`).
Sampling (as the official `LPD.sample_tokens`, driven by `engine.evaluate`) runs the shared loop
`decoding/group_decode.py:decode_in_groups`: step g feeds the tokens sampled at step g - 1 (the
class slot at g = 0) plus the queries of group g, under the block-causal mask, with CFG `linear`
(scale 1 + (cfg - 1) t / N for the token of order index t) or `constant`.

Differences from the official code, on purpose: orders and label dropout come from explicit
generators (the official `np.random.shuffle` / `torch.rand` / unseeded order files are not
reproducible); with a per-row sampler every image draws its own order (an image does not depend on
its batch-mates; a `torch.Generator` draws one order for the batch); an order file's row for an
image is drawn from the image's seed (officially image k takes row k); cfg_scale 1 runs no
unconditional half; a scale below 1 is refused.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from autoregressive.models.lpd import (LPD, LPD_SIZES, block_causal_mask, build_lpd, interpolate_pos_embed)
from autoregressive.models.official import read_gpt_checkpoint
from autoregressive.decoding.fast_decode import StepRunner
from autoregressive.decoding.group_decode import decode_in_groups
from autoregressive.decoding.logits import Generator, cfg_enabled
from autoregressive.decoding.lpd_order import training_group_sizes
from autoregressive.decoding.orders import CFG_SCHEDULES, PreparedOrders, Schedule, check_known
from autoregressive.decoding.schedules import check_group_sizes
from autoregressive.strategies.base import Strategy, TrainingBatch
from utils.checkpoint import CheckpointError, load_state_dict_strict

#: Steps when `--steps` is not given: the official evaluation settings; other grids: one token per step.
DEFAULT_STEPS = {16: 20, 32: 48}
#: The official factory names (`--model` of the official main.py) -> our sizes.
OFFICIAL_MODELS = {"lpd_l": "LPD-L", "lpd_xl": "LPD-XL", "lpd_xxl": "LPD-XXL"}


def lpd_model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The training / sampling drivers' GPT keyword arguments -> `LPDConfig` fields.

    `class_dropout_prob` is LPD's `label_drop_prob`, `--dropout-p` (resid / FFN) its
    `proj_dropout`. The official LPD has no input-token dropout and no stochastic depth:
    `token_dropout_p` does not apply and is dropped; a `drop_path_rate` > 0 is refused.
    """
    config = dict(config)
    if config.pop("cls_token_num", 1) != 1:
        raise ValueError("LPD has exactly one class slot (cls_token_num = 1)")
    if config.pop("drop_path_rate", 0.0):
        raise ValueError("LPD has no stochastic depth: --drop-path-rate must be 0")
    config.pop("token_dropout_p", None)
    if "class_dropout_prob" in config:
        config["label_drop_prob"] = config.pop("class_dropout_prob")
    resid, ffn = config.pop("resid_dropout_p", None), config.pop("ffn_dropout_p", None)
    if resid is not None and ffn is not None and resid != ffn:
        raise ValueError(f"LPD has one projection dropout: resid {resid} and ffn {ffn} dropouts differ")
    if resid is not None or ffn is not None:
        config["proj_dropout"] = resid if resid is not None else ffn
    return config


class LpdStrategy(Strategy):
    """LPD; the model is `autoregressive/models/lpd.py:LPD`."""

    name = "lpd"
    can_edit = True
    model_sizes = LPD_SIZES
    official_reader = "mit-han-lab/lpd main.py --pretrained_ckpt (checkpoint['model'])"
    image_flags = ("steps", "order", "sample_schedule", "repulsion_threshold", "cfg_schedule")

    def __init__(self) -> None:
        # The official sampler's defaults until `configure` reads the flags.
        self.schedule = Schedule(order="lpd", step_schedule="lpd")
        self.cfg_schedule = "linear"
        self.train_schedules: list[list[int]] | None = None  # --group-sizes-list
        self.label_drop_prob = 0.1  # training: --class-dropout-prob (the official label_drop_prob)

    # -- flags ------------------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        # The sampling schedule flags (--order, --group-sizes, ...) are shared: `decoding/orders.py`.
        group.add_argument("--group-sizes-list", type=str, default=None,
                           help="lpd training: JSON file with the schedules one is drawn from per step (official "
                                "--group_sizes_list); default: the official list of the grid")

    def configure(self, args: argparse.Namespace, *, training: bool) -> None:
        """Training: `--group-sizes-list` (each schedule checked against the grid) and the label
        dropout. Sampling: the shared schedule flags; an order file is checked against the grid and
        `--steps` must have a schedule, before any weight is loaded."""
        n = (args.image_size // args.downsample_size) ** 2
        if training:
            path = args.group_sizes_list
            if path is not None:
                self.train_schedules = [list(s) for s in json.loads(Path(path).read_text())]
                for s in self.train_schedules:
                    check_group_sizes(s, n, what=f"a schedule of --group-sizes-list {path}")
            self.label_drop_prob = args.class_dropout_prob
            return
        self.schedule = Schedule.from_args(args, order="lpd", step_schedule="lpd")
        self.cfg_schedule = args.cfg_schedule or "linear"
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"lpd: unknown --cfg-schedule {self.cfg_schedule!r}; known: {', '.join(CFG_SCHEDULES)}")
        if args.cfg_interval != -1:
            raise ValueError("lpd has no --cfg-interval: use --cfg-schedule linear or constant")
        self.schedule_sizes(n, args.steps)  # a bad schedule fails before any weight is loaded

    # -- model ------------------------------------------------------------------------------------

    def build_model(self, gpt_model: str, **config: Any) -> LPD:
        return build_lpd(gpt_model, **lpd_model_kwargs(config))

    def load_official(self, model: LPD, state_dict: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
        """Strict load; a `pos_embed` of another square grid is bicubic-resized first (official
        `interpolate_pos_embed`, e.g. a 512 px model started from a 256 px checkpoint)."""
        pe = state_dict.get("pos_embed")
        if pe is not None and pe.dim() == 3 and pe.shape != model.pos_embed.shape and pe.shape[-1] == model.pos_embed.shape[-1]:
            n_old, n_new = pe.shape[1] - 1, model.pos_embed.shape[1] - 1
            if math.isqrt(n_old) ** 2 == n_old and math.isqrt(n_new) ** 2 == n_new:
                state_dict = {**state_dict, "pos_embed": interpolate_pos_embed(pe, n_new)}
        load_state_dict_strict(model, state_dict, what=what)

    def load_model(self, path: str | os.PathLike, gpt_model: str | None = None, *,
                   prefer_ema: bool = False, map_location: str | torch.device = "cpu",
                   **config: Any) -> LPD:
        """An official release (`{'model': ..., 'args': Namespace}`, no EMA) or our checkpoint.

        The size comes from the recorded args (official `--model lpd_l`, ours `gpt_model`) or the
        caller; a checkpoint of another size fails the strict load, naming the mis-shaped keys.
        """
        weights, args = read_gpt_checkpoint(path, prefer_ema=prefer_ema, map_location=map_location)
        what = f"LPD checkpoint {path}"
        recorded = None
        if args is not None:
            if args.get("strategy", "lpd") != "lpd":
                raise CheckpointError(f"{what} was trained with --strategy {args['strategy']}, not lpd")
            recorded = args.get("gpt_model") or OFFICIAL_MODELS.get(str(args.get("model")))
        if recorded is not None and gpt_model is not None and recorded != gpt_model:
            raise CheckpointError(f"{what} holds an {recorded} model, but --gpt-model {gpt_model} was asked for")
        gpt_model = recorded or gpt_model
        if gpt_model is None:
            raise CheckpointError(f"{what} records no model size; pass --gpt-model ({', '.join(LPD_SIZES)})")
        if gpt_model not in LPD_SIZES:
            raise CheckpointError(f"{what}: {gpt_model!r} is not an LPD size ({', '.join(LPD_SIZES)})")
        model = self.build_model(gpt_model, **config)
        self.load_official(model, weights, what=f"{what} (as {gpt_model})")
        return model.eval()

    # -- training ---------------------------------------------------------------------------------

    def training_batch(self, codes: torch.Tensor, labels: torch.Tensor,
                       generator: torch.Generator | None = None) -> TrainingBatch:
        """One schedule for the batch (official `random.choice` of the training list), one uniform
        order per sample, label dropout with `label_drop_prob`; all drawn from `generator`."""
        b, n = codes.shape
        device = generator.device if generator is not None else codes.device
        schedules = self.train_schedules or training_group_sizes(math.isqrt(n))
        pick = int(torch.randint(len(schedules), (1,), generator=generator, device=device))
        orders = torch.rand(b, n, generator=generator, device=device).argsort(dim=1).to(codes.device)
        drop = (torch.rand(b, generator=generator, device=device) < self.label_drop_prob).to(codes.device)
        sizes = check_group_sizes(schedules[pick], n, what="the training schedule")
        return TrainingBatch(inputs={"codes": codes, "labels": labels, "orders": orders, "group_sizes": sizes,
                                     "drop": drop}, targets=codes, extras={"orders": orders, "group_sizes": sizes})

    # -- schedules --------------------------------------------------------------------------------

    def schedule_sizes(self, num_tokens: int, steps: int | None) -> list[int]:
        """Group sizes for the whole grid of `num_tokens` tokens (default steps: the official
        evaluation setting of the grid, else one token per step)."""
        grid = math.isqrt(num_tokens)
        return self.schedule.sizes(num_tokens, steps, DEFAULT_STEPS.get(grid, num_tokens))

    # -- sampling ---------------------------------------------------------------------------------

    def decoding_steps(self, model: LPD, steps: int | None = None) -> int:
        return len(self.schedule_sizes(model.config.block_size, steps))

    def prepare(self, model: LPD, labels: torch.Tensor, seeds: torch.Tensor, *,
                steps: int | None = None) -> PreparedOrders | None:
        """The batch's locality-aware orders, built on the host ahead of `generate` (about 34 ms for
        64 images at 256 px, 111 ms at 512 px on 2 cores); None for the other orders."""
        return self.schedule.prepare_orders(self.schedule_sizes(model.config.block_size, steps), seeds)

    @torch.no_grad()
    def generate(self, model: LPD, labels: torch.Tensor, *, cfg_scale: float = 1.0,
                 cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, steps: int | None = None,
                 generator: Generator | None = None,
                 record_logits: list | None = None, prepared: PreparedOrders | None = None) -> torch.Tensor:
        """Sample (B, N) raster token ids for labels (B,) with the configured order and `steps`
        (default: 20 at 16x16, 48 at 32x32, else N). `record_logits` receives per step the
        (B, G, V) logits after CFG, in generation order. `prepared`: the orders from `prepare`."""
        self.check_call(model, labels, model.num_classes, cfg_scale, temperature, require_generator=False)
        if cfg_interval != -1:
            raise ValueError("lpd has no cfg_interval: use the linear or constant CFG schedule")
        sizes = self.schedule_sizes(model.config.block_size, steps)
        order = self.schedule.orders(labels.shape[0], sizes, generator, model.pos_embed.device, prepared=prepared)
        return decode_lpd(model, labels, order, sizes, cfg_scale=cfg_scale, cfg_schedule=self.cfg_schedule,
                          temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                          record_logits=record_logits, runner=self.runner)

    @torch.no_grad()
    def edit(self, model: LPD, labels: torch.Tensor, known_tokens: torch.Tensor,
             known_mask: torch.Tensor, *, cfg_scale: float = 1.0, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, steps: int | None = None,
             generator: Generator | None = None, record_logits: list | None = None) -> torch.Tensor:
        """Keep `known_tokens` (B, N) where `known_mask` (N,) or (grid, grid) is True (context at
        step 0, one group seen by every query); generate the rest in the configured order
        (locality-aware: grown from the known cells) over `steps` steps (default: N_unknown / N of
        the grid's default step count, at least 1; the official table, made for whole grids,
        gives way to its cosine curve over the unknown tokens)."""
        self.check_call(model, labels, model.num_classes, cfg_scale, temperature, require_generator=False)
        n, device = model.config.block_size, model.pos_embed.device
        known_mask = check_known(known_tokens, known_mask, labels.shape[0], n).to(device)
        n_u = int((~known_mask).sum())
        default = max(1, round(DEFAULT_STEPS.get(math.isqrt(n), n) * n_u / n))
        sizes = self.schedule.sizes(n_u, steps, default, grid_tokens=n)
        order = self.schedule.orders(labels.shape[0], sizes, generator, device, known=known_mask)
        return decode_lpd(model, labels, order, sizes, known_tokens=known_tokens.to(device),
                          known_mask=known_mask, cfg_scale=cfg_scale, cfg_schedule=self.cfg_schedule,
                          temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                          record_logits=record_logits, runner=self.runner)


@torch.no_grad()
def decode_lpd(model: LPD, labels: torch.Tensor | None, order: torch.Tensor, group_sizes: Sequence[int], *,
               known_tokens: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               cfg_scale: float = 1.0, cfg_schedule: str = "linear", temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, generator: Generator | None = None, record_logits: list | None = None,
               record_head: list | None = None, runner: StepRunner | None = None) -> torch.Tensor:
    """Run one schedule with the KV cache (as the official `LPD.sample_tokens`) -> (B, N) raster token ids.

    Args:
        labels: (B,) class ids, or None for unconditional generation (`fake_latent`).
        order: (B, M) or (M,) raster cells in generation order; M = N, or the unknown cells when
            `known_mask` (N,) marks context cells whose `known_tokens` (B, N) are kept.
        cfg_schedule: `linear` scales the token of order index t by 1 + (cfg - 1) t / N (known
            tokens count first when editing), `constant` by cfg.
        record_head: if a list, receives per step the raw head logits (B', G, V) (parity).
        runner: how the model steps run and where the cache comes from (default: eager).
    Cache slots: 0 = class, then the known cells, then one per order index. Step g writes
    `[prev ; queries of group g]` and attends under the block-causal mask over
    `[1, (M_known,) g_1, ..., g_K]`; a query's K/V slot is overwritten by its token a step later.
    """
    device = model.pos_embed.device
    n = model.config.block_size
    b = order.shape[0] if labels is None else labels.shape[0]
    sizes = [int(g) for g in group_sizes]
    reps = 2 if cfg_enabled(cfg_scale) else 1
    rows = model.class_rows(None if labels is None else labels.to(device), b)  # (B, D)
    if reps == 2:
        rows = torch.cat([rows, model.fake_latent.expand(b, -1).to(rows.dtype)])  # (2B, D): [cond ; null]
    first = model.embed_class(rows)  # (B', 1, D)
    blocks = [1] + sizes
    n_known = 0
    if known_mask is not None and bool(known_mask.any()):
        cells = known_mask.nonzero().squeeze(1)  # (M_k,) raster
        n_known = cells.numel()
        ctx = model.embed_tokens(known_tokens[:, cells].to(device), cells)  # (B, M_k, D)
        first = torch.cat([first, ctx.repeat(reps, 1, 1)], dim=1)  # (B', 1 + M_k, D)
        blocks = [1, n_known] + sizes
    mask = block_causal_mask(blocks, device=device)  # (L, L), L = 1 + M_k + M
    bounds = [0, 1 + n_known]
    for g in sizes:
        bounds.append(bounds[-1] + g)
    run = runner or StepRunner()
    cache = run.cache(model, b * reps, max_len=bounds[-1])
    # Columns up to the cache's rounded-up length (hidden): a step's mask is then exactly as wide as
    # the slots it reads, in every bucket, and the compiled step needs no graph for a narrower one.
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], cache.max_len - mask.shape[1])], dim=1)  # (L, L_cache)

    def step(g: int, prev: torch.Tensor | None, prev_pos: torch.Tensor | None, next_pos: torch.Tensor) -> torch.Tensor:
        x_prev = first if g == 0 else model.embed_tokens(prev, prev_pos)  # (B', P, D)
        x = torch.cat([x_prev, model.embed_queries(next_pos, b * reps)], dim=1)  # (B', P + G, D)
        slots = torch.arange(bounds[g], bounds[g + 2], device=device)
        seen = cache.upto(bounds[g + 2])  # the slots written so far (a prefix of the cache)
        # The rows of the new elements over the visible slots.
        logits = run(model.decode_step, x, seen, slots, mask[slots, :seen.max_len],
                     next_pos.shape[-1])  # (B', G, V)
        if record_head is not None:
            record_head.append(logits.clone())  # a replayed graph reuses its output buffer
        return logits

    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"unknown cfg schedule {cfg_schedule!r}; known: {', '.join(CFG_SCHEDULES)}")

    def linear_scale(g: int, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return 1 + (cfg_scale - 1) * (idx + n_known).float() / n  # (G,): one scale per token

    scale_at = linear_scale if cfg_schedule == "linear" else None  # None: constant cfg_scale
    tokens = decode_in_groups(step, order.to(device), sizes, b, cfg_scale=cfg_scale, cfg_scale_at=scale_at,
                              temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                              record_logits=record_logits, num_tokens=n)
    if n_known:
        tokens[:, known_mask] = known_tokens.to(device)[:, known_mask]
    return tokens
