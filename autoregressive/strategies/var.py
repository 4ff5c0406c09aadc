"""`var`: VAR next-scale prediction, one KV-cached step per scale (official: FoundationVision/VAR).

Codes are the multi-scale ids of VAR's VQVAE (`tokenizer/msvq.py`) concatenated scale after scale,
(B, L) with L = sum pn^2 (680 at 256 px). Schedule: order = identity over those L tokens, one group
per scale (group sizes pn^2), run by the shared `decode_in_groups` loop. What differs from the
other strategies is the input of a step: not the embeddings of the tokens just sampled but
`word_embed` of the tokenizer's accumulated f_hat, area-downsampled to the next scale, so the
strategy holds the multi-scale tokenizer, which the drivers load from `--vae-ckpt` / `--vq-ckpt`
through the tokenizer registry and hand over with `use_tokenizer`.

Training (`VARTrainer.train_step`): teacher-forcing input from the ids, plain token-mean
cross-entropy (every token weighs 1/L, officially) with label smoothing `--ls`.
Sampling (`VAR.autoregressive_infer_cfg`): CFG ramps linearly over the scales, from no guidance at
the first to `cfg_scale` at the last. `cfg_scale` is the project's convention (1 = off,
`uncond + s (cond - uncond)`); the official `cfg=c` (`(1+t) cond - t uncond`, t = c si/(SN-1)) is
`cfg_scale = 1 + c`, so the published FID setting cfg=1.5 is `--cfg-scale 2.5`. Top-k / top-p as
the shared logits processing (the official `top_p=0` "off" is `top_p=1` here); `more_smooth`
replaces each scale's code embeddings by a Gumbel-softmax mixture (visualisation only).
Zero-shot editing (`edit`, the paper's in/out-painting and class-conditional editing; no official
code): the same loop with masked teacher forcing, the image's ids kept at every scale's known cells.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoregressive.models.var import VAR, VAR_SIZES, build_var
from autoregressive.decoding.group_decode import decode_in_groups
from autoregressive.decoding.logits import Generator, cfg_enabled, cfg_labels, top_k_top_p_filter
from autoregressive.strategies.base import Generation, Strategy, TrainingBatch
from tokenizer.msvq import PATCH_NUMS, MultiScaleQuantizer, MultiScaleVQVAE, parse_patch_nums
from tokenizer.registry import get_kind
from utils.checkpoint import CheckpointError, extract_weights, load_checkpoint, load_state_dict_strict

#: official `--fp16` values -> the driver's `--mixed-precision`.
FP16 = {0: "none", 1: "fp16", 2: "bf16"}


def _bool01(v: str) -> bool:
    """Official boolean flags are written `--saln=1` / `--anorm=0` (also true/false)."""
    s = str(v).lower()
    if s in ("1", "true", "yes"):
        return True
    if s in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 or true/false, got {v!r}")


def draw_labels(batch_size: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform random class ids (B,), drawn as the official sampler does when `label_B is None`
    (first draw from the seeded generator, before any token)."""
    probs = torch.full((1, num_classes), 1.0 / num_classes, device=generator.device)
    return torch.multinomial(probs, batch_size, replacement=True, generator=generator).reshape(batch_size)


def lr_wd_factors(step: int, total: int, warmup: int, wp0: float, wpe: float, sche: str,
                  twd: float, twde: float) -> tuple[float, float]:
    """The official per-iteration schedule (`utils/lr_control.py: lr_wd_annealing`, sche 'lin0').

    Learning-rate factor: linear warm-up from wp0 to 1 over `warmup` steps, then 1 for the first 5%
    of the rest, then linear down to `wpe` at the last step. Weight decay: cosine from twd to twde.
    """
    if step < warmup:
        lr = wp0 + (1 - wp0) * step / max(warmup, 1)
    else:
        rest = max(total - warmup, 1)
        frac = (step - warmup) / rest
        if sche != "lin0":
            raise ValueError(f"only --sche lin0 (the released runs' schedule) is implemented, got {sche!r}")
        lr = 1.0 if frac < 0.05 else 1 + (wpe - 1) * (frac - 0.05) / 0.95
    wd = twde + (twd - twde) * (0.5 + 0.5 * math.cos(math.pi * step / max(total - 1, 1)))
    return lr, wd


class VarStrategy(Strategy):
    name = "var"
    can_edit = True
    model_sizes = VAR_SIZES
    arch_flags = ("depth", "saln", "anorm", "pn")
    image_flags = ("more_smooth",)
    #: official optimisation flags (`utils/arg_util.py` of FoundationVision/VAR) -> the driver's.
    flag_aliases = {"bs": "global_batch_size", "ep": "epochs", "twd": "weight_decay", "tclip": "max_grad_norm",
                    "fp16": "mixed_precision", "tblr": "lr"}
    tokenizer_kind = "msvq"
    tokenizer_flag = "--vae-ckpt"
    #: the released var_d*.pth are bare state dicts: `var.load_state_dict(torch.load(path), strict=True)`.
    official_layout = "flat"
    official_reader = "FoundationVision/VAR demo_sample.ipynb (var.load_state_dict(torch.load(path)))"

    def __init__(self) -> None:
        self.tokenizer: MultiScaleVQVAE | None = None
        self.label_smooth = 0.0
        self.more_smooth = False
        self.depth: int | None = None
        self.patch_nums: tuple[int, ...] | None = None
        self.shared_aln, self.attn_l2_norm = False, True
        self.init: dict[str, float] | None = None
        self.schedule: dict[str, float] | None = None

    # -- flags (official names, utils/arg_util.py) -------------------------------------------------

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--depth", type=int, default=None,
                           help="var: transformer depth (width 64*depth, depth heads); or --gpt-model VAR-dNN")
        group.add_argument("--saln", type=_bool01, default=False, help="var: shared AdaLN (the d36 release: 1)")
        group.add_argument("--anorm", type=_bool01, default=True, help="var: cosine (l2-normalised) attention")
        group.add_argument("--pn", type=str, default=None,
                           help="var: patch_nums, 256 / 512 / 1024 or e.g. 1_2_3_4_6 (default: from --image-size)")
        group.add_argument("--vae-ckpt", type=str, default=None,
                           help="var: the multi-scale VQVAE (vae_ch160v4096z32.pth or ours); sampling also "
                                "accepts it as --vq-ckpt")
        group.add_argument("--ls", type=float, default=0.0, help="var: label smoothing of the loss")
        group.add_argument("--more-smooth", action="store_true",
                           help="var: Gumbel-softmax code embeddings (visualisation only, never for FID)")
        # Initialisation of a model trained from scratch (VAR.init_weights).
        group.add_argument("--aln", type=float, default=0.5, help="var: AdaLN scale/shift init multiplier")
        group.add_argument("--alng", type=float, default=1e-5, help="var: AdaLN gamma init multiplier")
        group.add_argument("--hd", type=float, default=0.02, help="var: head init multiplier")
        group.add_argument("--ini", type=float, default=-1, help="var: init std (-1: sqrt(1/(3C)))")
        # Official optimisation flags: aliases of the driver's flags, and the official schedule.
        group.add_argument("--bs", type=int, default=None, help="var: alias of --global-batch-size")
        group.add_argument("--ep", type=int, default=None, help="var: alias of --epochs")
        group.add_argument("--tblr", type=float, default=None, help="var: base lr; sets --lr to tblr*bs/256")
        group.add_argument("--twd", type=float, default=None, help="var: alias of --weight-decay (start)")
        group.add_argument("--twde", type=float, default=None, help="var: final weight decay (cosine from --twd)")
        group.add_argument("--tclip", type=float, default=None, help="var: alias of --max-grad-norm")
        group.add_argument("--fp16", type=int, default=None, choices=sorted(FP16),
                           help="var: 0 fp32, 1 fp16, 2 bf16 (alias of --mixed-precision)")
        group.add_argument("--wp", type=float, default=None, help="var: warm-up epochs (default ep/50)")
        group.add_argument("--wp0", type=float, default=0.005, help="var: lr factor at the start of warm-up")
        group.add_argument("--wpe", type=float, default=None, help="var: final lr factor (turns the schedule on)")
        group.add_argument("--sche", type=str, default="lin0", help="var: lr schedule after warm-up (lin0)")

    def configure(self, args: argparse.Namespace, *, training: bool) -> None:
        """Resolve depth, patch_nums and the tokenizer; in training, the official schedule (`--wpe`)."""
        gpt_model = getattr(args, "gpt_model", None)
        if gpt_model in VAR_SIZES:
            if args.depth is not None and args.depth != VAR_SIZES[gpt_model]:
                raise ValueError(f"--gpt-model {gpt_model} has depth {VAR_SIZES[gpt_model]}, but --depth is {args.depth}")
            self.depth = VAR_SIZES[gpt_model]
        else:  # another strategy's size name (the drivers' default): --depth decides, official default 16
            self.depth = args.depth if args.depth is not None else 16
        downsample = getattr(args, "downsample_size", 16)
        self.patch_nums = self.resolve_patch_nums(args.pn, getattr(args, "image_size", None), downsample)
        if getattr(args, "cfg_interval", -1) != -1:
            raise ValueError("--strategy var ramps the guidance over the scales; --cfg-interval must stay -1")
        self.shared_aln, self.attn_l2_norm = bool(args.saln), bool(args.anorm)
        self.label_smooth, self.more_smooth = float(args.ls), bool(args.more_smooth)
        self.init = dict(init_adaln=args.aln, init_adaln_gamma=args.alng, init_head=args.hd, init_std=args.ini)
        self.schedule = self.official_schedule(args) if training else None
        if args.vae_ckpt and getattr(args, "vq_ckpt", None) and args.vae_ckpt != args.vq_ckpt:
            raise ValueError(f"--vae-ckpt {args.vae_ckpt} and --vq-ckpt {args.vq_ckpt} name different tokenizers")

    @staticmethod
    def resolve_patch_nums(pn: str | None, image_size: int | None, downsample: int = 16) -> tuple[int, ...]:
        """`--pn`, or the official list of `--image-size`; they must fit: image = downsample * pn[-1]
        (16 for the release; our MSVQ-debug tokenizer downsamples by 4)."""
        if pn is None:
            if image_size is None or str(image_size) not in PATCH_NUMS:
                raise ValueError(f"no official patch_nums for --image-size {image_size}; pass --pn "
                                 f"(e.g. 1_2_3_4_6 for 96 px)")
            pn = str(image_size)
        nums = parse_patch_nums(pn)
        if image_size is not None and image_size != downsample * nums[-1]:
            raise ValueError(f"--image-size {image_size} does not fit patch_nums {nums}: VAR's last scale is "
                             f"the {downsample}x-downsampled image, so the image size must be "
                             f"{downsample * nums[-1]}")
        return nums

    @classmethod
    def alias_value(cls, alias: str, args: argparse.Namespace) -> Any:
        """`--fp16 N` is a --mixed-precision name; `--tblr` is the base lr: --lr = tblr * bs / 256
        (official); the others are the driver's values as they are."""
        if alias == "fp16":
            return FP16[args.fp16]
        if alias == "tblr":
            return args.tblr * args.global_batch_size / 256
        return getattr(args, alias)

    @staticmethod
    def official_schedule(args: argparse.Namespace) -> dict[str, Any] | None:
        """The official lr / weight-decay schedule (`on_step`), on when `--wpe` is given."""
        if args.wpe is None:
            return None
        twd = args.weight_decay
        return dict(epochs=args.epochs, wp=args.wp if args.wp is not None else args.epochs / 50, wp0=args.wp0,
                    wpe=args.wpe, sche=args.sche, lr=args.lr, twd=twd,
                    twde=args.twde if args.twde is not None else twd)

    @classmethod
    def code_length(cls, args: argparse.Namespace) -> int:
        """L = sum pn^2: the concatenated per-scale ids of one image."""
        return sum(p * p for p in cls.resolve_patch_nums(args.pn, args.image_size,
                                                          getattr(args, "downsample_size", 16)))

    def model_config(self, args: argparse.Namespace) -> dict[str, Any]:
        return dict(depth=self.depth, shared_aln=self.shared_aln, attn_l2_norm=self.attn_l2_norm,
                    patch_nums=self.patch_nums, init=self.init)

    def owns_lr(self) -> bool:
        return self.schedule is not None

    def on_step(self, step: int, steps_per_epoch: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """The official lr warm-up / lin0 decay and weight-decay cosine, when `--wpe` is given."""
        if self.schedule is None:
            return {}
        s = self.schedule
        total = int(s["epochs"] * steps_per_epoch)
        lr_f, wd = lr_wd_factors(step, total, int(s["wp"] * steps_per_epoch), s["wp0"], s["wpe"], s["sche"],
                                 s["twd"], s["twde"])
        for group in optimizer.param_groups:
            group["lr"] = s["lr"] * lr_f
            if group["weight_decay"] > 0:
                group["weight_decay"] = wd
        return {"lr": s["lr"] * lr_f, "wd": wd}

    # -- tokenizer --------------------------------------------------------------------------------

    def tokenizer_path(self, args: argparse.Namespace) -> str | None:
        """--vae-ckpt (training), or --vq-ckpt (sampling)."""
        return args.vae_ckpt or getattr(args, "vq_ckpt", None)

    def tokenizer_options(self, args: argparse.Namespace) -> dict[str, Any]:
        """The VQVAE quantises over this run's patch_nums (the release serves the 256 and 512 px lists)."""
        return dict(patch_nums=self.patch_nums)

    def use_tokenizer(self, vq: nn.Module) -> None:
        """The multi-scale VQVAE this strategy trains and samples with (frozen, eval mode)."""
        if not get_kind(self.tokenizer_kind).owns(vq):
            raise TypeError(f"--strategy var needs VAR's multi-scale VQVAE (tokenizer/msvq.py), got a "
                            f"{type(vq).__name__}; a LlamaGen tokenizer cannot serve VAR")
        if self.patch_nums is not None and tuple(vq.patch_nums) != tuple(self.patch_nums):
            raise ValueError(f"the VQVAE quantises over patch_nums {vq.patch_nums}, but {self.patch_nums} "
                             f"was asked for")
        self.tokenizer = vq.eval().requires_grad_(False)

    def _quantizer(self, device: torch.device) -> MultiScaleQuantizer:
        if self.tokenizer is None:
            raise ValueError("--strategy var needs its multi-scale VQVAE: pass --vae-ckpt (or call use_tokenizer)")
        if self.tokenizer.quantize.embedding.weight.device != device:
            self.tokenizer.to(device)
        return self.tokenizer.quantize

    def check_fits(self, model: VAR) -> None:
        """The VAR model and the tokenizer must agree on patch_nums, vocabulary and code width."""
        if self.tokenizer is None:
            return
        tok, cfg = self.tokenizer.config, model.config
        for what, a, b in (("patch_nums", tuple(cfg.patch_nums), tuple(tok.v_patch_nums)),
                           ("vocabulary", cfg.vocab_size, tok.vocab_size), ("code width", cfg.Cvae, tok.z_channels)):
            if a != b:
                raise ValueError(f"the VAR model was built for {what} {a}, but the VQVAE has {what} {b}")

    def decode_tokens(self, vq: nn.Module, tokens: torch.Tensor, grid: int) -> torch.Tensor:
        """Concatenated per-scale ids (B, L) -> images in [-1, 1]."""
        if not get_kind(self.tokenizer_kind).owns(vq):
            raise TypeError(f"--strategy var decodes with VAR's multi-scale VQVAE, got a {type(vq).__name__}")
        return vq.decode_indices(tokens, grid=(grid, grid))

    # -- model ------------------------------------------------------------------------------------

    def build_model(self, gpt_model: str | None = None, **config: Any) -> VAR:
        """A VAR; `config` holds the VAR arguments (`depth`, `shared_aln`, `patch_nums`, ...,
        `init`) and may hold the training driver's shared keys, mapped onto VAR's:
        `vocab_size`, `num_classes`, `class_dropout_prob` (cond_drop_rate), `resid_dropout_p` =
        `ffn_dropout_p` (drop_rate), `drop_path_rate`, `token_dropout_p`; `block_size` must be the
        last scale's grid and `cls_token_num` 1. A None value takes VAR's official default."""
        cfg = dict(config)
        for ours, theirs in (("class_dropout_prob", "cond_drop_rate"), ("resid_dropout_p", "drop_rate")):
            if ours in cfg:
                cfg[theirs] = cfg.pop(ours)
        ffn_drop = cfg.pop("ffn_dropout_p", None)
        if ffn_drop is not None and ffn_drop != cfg.get("drop_rate", ffn_drop):
            raise ValueError("VAR has one dropout for the attention and FFN outputs: resid and ffn dropout must agree")
        cfg = {k: v for k, v in cfg.items() if v is not None}
        block_size, cls_tokens = cfg.pop("block_size", None), cfg.pop("cls_token_num", 1)
        if cls_tokens != 1:
            raise ValueError(f"VAR starts from one class token; --cls-token-num must be 1, got {cls_tokens}")
        if self.tokenizer is not None:
            cfg.setdefault("vocab_size", self.tokenizer.vocab_size)
            cfg.setdefault("Cvae", self.tokenizer.config.z_channels)
            cfg.setdefault("patch_nums", self.tokenizer.patch_nums)
        if gpt_model not in VAR_SIZES:
            gpt_model = None
            cfg.setdefault("depth", self.depth or 16)
        model = build_var(gpt_model, **cfg)
        if block_size is not None and block_size != model.config.patch_nums[-1] ** 2:
            raise ValueError(f"the image grid has {block_size} tokens, but the last of patch_nums "
                             f"{model.config.patch_nums} has {model.config.patch_nums[-1] ** 2}")
        self.check_fits(model)
        return model

    def load_official(self, model: VAR, state_dict: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
        load_state_dict_strict(model, state_dict, what=what)

    def load_model(self, path: str | os.PathLike, gpt_model: str | None = None, *,
                   prefer_ema: bool = False, map_location: str | torch.device = "cpu",
                   **config: Any) -> VAR:
        """Load an official release (flat state dict), an official training checkpoint
        (`["trainer"]["var_wo_ddp"]`) or ours (`model`/`ema` + `args`) strictly; eval mode.

        The shapes of the file must fit the tokenizer: a VQVAE of other patch_nums, vocabulary or
        code width is refused with the reason before the key check."""
        ckpt = load_checkpoint(path, map_location=map_location)
        what = f"VAR checkpoint {path}"
        if isinstance(ckpt, Mapping) and isinstance(ckpt.get("trainer"), Mapping):
            weights = dict(ckpt["trainer"]["var_wo_ddp"])
        else:
            weights = extract_weights(ckpt, prefer_ema=prefer_ema, what=what)
        config.pop("init", None)
        args = ckpt.get("args") if isinstance(ckpt, Mapping) else None
        if isinstance(args, Mapping) and args.get("strategy") == self.name:
            recorded = self.model_config_from_args(args)
            for k, v in config.items():
                if k in recorded and v is not None and recorded[k] != v:
                    raise CheckpointError(f"{what} was trained with {k}={recorded[k]!r}, but {k}={v!r} was asked for")
            config.update(recorded)
        self._check_weights_fit_tokenizer(weights, what)
        if self.tokenizer is None and "word_embed.weight" in weights:  # no VQVAE given: its code width
            config.setdefault("Cvae", weights["word_embed.weight"].shape[1])  # is the input width of the file
        model = self.build_model(gpt_model, **{k: v for k, v in config.items() if k != "block_size"})
        self.load_official(model, weights, what=what)
        return model.eval()

    def model_config_from_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The architecture a training run of ours recorded in its `args`."""
        ns = argparse.Namespace(**{**args, "vae_ckpt": None, "vq_ckpt": None})
        probe = VarStrategy()
        probe.configure(ns, training=False)
        out = probe.model_config(ns)
        out.pop("init")
        for k in ("vocab_size", "num_classes"):
            if args.get(k) is not None:
                out[k] = args[k]
        return out

    def _check_weights_fit_tokenizer(self, weights: Mapping[str, torch.Tensor], what: str) -> None:
        if self.tokenizer is None or "pos_1LC" not in weights:
            return
        tok = self.tokenizer.config
        found = {"tokens per image (sum pn^2)": weights["pos_1LC"].shape[1],
                 "scales": weights["lvl_embed.weight"].shape[0] if "lvl_embed.weight" in weights else None,
                 "vocabulary": weights["head.weight"].shape[0] if "head.weight" in weights else None,
                 "code width": weights["word_embed.weight"].shape[1] if "word_embed.weight" in weights else None}
        wanted = {"tokens per image (sum pn^2)": tok.num_tokens, "scales": len(tok.v_patch_nums),
                  "vocabulary": tok.vocab_size, "code width": tok.z_channels}
        for k, v in found.items():
            if v is not None and v != wanted[k]:
                raise CheckpointError(f"{what} does not fit the VQVAE (patch_nums {tok.v_patch_nums}, vocabulary "
                                      f"{tok.vocab_size}, code width {tok.z_channels}): it has {k} {v}, "
                                      f"the VQVAE {wanted[k]}")

    # -- training ---------------------------------------------------------------------------------

    def training_batch(self, codes: torch.Tensor, labels: torch.Tensor,
                       generator: torch.Generator | None = None) -> TrainingBatch:
        """codes (B, L) concatenated per-scale ids -> inputs (labels, next-scale inputs (B, L-1, Cvae)),
        targets = codes (position l predicts token l)."""
        quant = self._quantizer(codes.device)
        ids = self.tokenizer.split_ids(codes)
        with torch.no_grad():
            x = quant.ids_to_var_input(ids)  # (B, L - 1, Cvae) float32
        return TrainingBatch(inputs={"labels": labels, "x": x}, targets=codes)

    def training_loss(self, model: nn.Module, codes: torch.Tensor, labels: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Token-mean cross-entropy with label smoothing `--ls` (official: weight 1/L per token)."""
        batch = self.training_batch(codes, labels, generator)
        logits, _ = model(**batch.inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(),
                               label_smoothing=self.label_smooth)

    # -- sampling ---------------------------------------------------------------------------------

    def decoding_steps(self, model: nn.Module, steps: int | None = None) -> int:
        return len(model.config.patch_nums)

    @torch.no_grad()
    def generate(self, model: VAR, labels: torch.Tensor, *, cfg_scale: float = 1.0,
                 cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, steps: int | None = None,
                 generator: Generator | None = None,
                 record_logits: list | None = None, more_smooth: bool | None = None) -> torch.Tensor:
        """Sample the concatenated per-scale ids (B, L) for labels (B,); see `sample`."""
        tokens, _ = self.sample(model, labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                                temperature=temperature, top_k=top_k, top_p=top_p, steps=steps,
                                generator=generator, record_logits=record_logits, more_smooth=more_smooth)
        return tokens

    def generate_for_decoding(self, model: VAR, labels: torch.Tensor, **kwargs: Any) -> Generation:
        """`sample`; with `more_smooth` the soft f_hat travels with the ids, for `decode_generation`."""
        tokens, f_hat = self.sample(model, labels, **kwargs)
        smooth = kwargs.get("more_smooth")
        return Generation(tokens, f_hat if (self.more_smooth if smooth is None else smooth) else None)

    def decode_generation(self, vq: nn.Module, generation: Generation, grid: int) -> torch.Tensor:
        """The soft f_hat of a `more_smooth` generation decodes as it is (official
        `fhat_to_img`); otherwise the ids."""
        if generation.latent is not None:
            return vq.fhat_to_img(generation.latent.to(next(vq.parameters()).device))
        return self.decode_tokens(vq, generation.tokens, grid)

    @torch.no_grad()
    def sample(self, model: VAR, labels: torch.Tensor, *, cfg_scale: float = 1.0, cfg_interval: float = -1,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, steps: int | None = None,
               generator: Generator | None = None, record_logits: list | None = None,
               more_smooth: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-scale sampling: one `decode_step` per scale through `decode_in_groups`.

        Returns (ids (B, L) int64, the final f_hat (B, Cvae, h, w) float32 that decodes to the image).
        Args:
            cfg_scale: guidance at the last scale (1 = off); scale si is guided with
                1 + (cfg_scale - 1) si / (SN - 1), the first scale not at all (official ramp).
            temperature: 1 = the official sampling (0 = greedy argmax, no draws); top_k 0 /
                top_p 1.0 = no filtering; the official greedy is top_k=1 (still one draw per token).
            steps: None or the number of scales.
            generator: a torch.Generator (the official `g_seed` stream: one multinomial per scale,
                then with `more_smooth` the Gumbel noise of that scale) or a per-row sampler.
            record_logits: if a list, receives per scale the (B, pn^2, V) guided logits.
            more_smooth: None = the `--more-smooth` flag.
        """
        cfg = model.config
        self.check_call(model, labels, cfg.num_classes, cfg_scale, temperature, require_generator=False)
        if cfg_interval != -1:
            raise ValueError("VAR ramps the guidance over the scales; cfg_interval must be -1")
        smooth = self.more_smooth if more_smooth is None else more_smooth
        if (temperature > 0 or smooth) and generator is None:
            raise ValueError("sampling needs an explicit generator (temperature 0 without more_smooth is greedy)")
        self.check_fits(model)
        pns, sn = cfg.patch_nums, len(cfg.patch_nums)
        if steps is not None and steps != sn:
            raise ValueError(f"VAR takes one step per scale: steps must be {sn} (patch_nums {pns}), got {steps}")
        device = model.head.weight.device
        quant = self._quantizer(device)
        labels = labels.to(device)
        b = labels.shape[0]
        guided = cfg_enabled(cfg_scale)
        reps = 2 if guided else 1
        cond_labels = cfg_labels(labels, cfg.num_classes, cfg_scale)  # (B', ) [labels ; null]
        run = self.runner
        cache = run.cache(model, cond_labels.shape[0])
        f_hat = torch.zeros(b, cfg.Cvae, pns[-1], pns[-1], device=device)
        logits_seen: list[torch.Tensor] = []

        def code_map(si: int, ids: torch.Tensor) -> torch.Tensor:
            """Scale si's sampled ids (B, pn^2) -> its code map (B, Cvae, pn, pn)."""
            if not smooth:
                return quant.lookup(ids, pns[si])
            ratio = si / max(sn - 1, 1)
            logits = logits_seen[si].float() / max(temperature, 1e-5)
            if top_k > 0 or top_p < 1.0:
                logits = top_k_top_p_filter(logits, top_k, top_p)
            tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
            soft = ((logits * (1 + ratio) + self._gumbel(logits, generator)) / tau).softmax(-1)  # (B, G, V)
            h = soft @ quant.embedding.weight.unsqueeze(0)  # (B, G, Cvae)
            return h.transpose(1, 2).reshape(b, cfg.Cvae, pns[si], pns[si])

        def step(g: int, prev_tokens, prev_pos, next_pos) -> torch.Tensor:
            nonlocal f_hat
            x = None
            if g > 0:
                f_hat, nxt = quant.next_autoregressive_input(g - 1, f_hat, code_map(g - 1, prev_tokens[:b]))
                x = nxt.flatten(2).transpose(1, 2).repeat(reps, 1, 1)  # (B', pn_g^2, Cvae)
            return run(model.decode_step, cond_labels, x, cache.upto(model.begin_ends[g][1]),
                       model.scale_positions(g, device))  # (B', pn_g^2, V)

        def scale_at(g: int, pos, idx) -> float | None:
            return None if g == 0 else 1 + (cfg_scale - 1) * g / (sn - 1)

        tokens = decode_in_groups(step, torch.arange(cfg.L, device=device), [p * p for p in pns], b,
                                  cfg_scale=cfg_scale, cfg_scale_at=scale_at if guided else None,
                                  temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                  record_logits=logits_seen)
        last = tokens[:, cfg.L - pns[-1] ** 2:]
        f_hat, _ = quant.next_autoregressive_input(sn - 1, f_hat, code_map(sn - 1, last))
        if record_logits is not None:
            record_logits.extend(logits_seen)
        return tokens, f_hat

    @staticmethod
    def _gumbel(logits: torch.Tensor, generator: Generator) -> torch.Tensor:
        """Gumbel noise -log(E), E ~ Exp(1), shaped like logits (B, G, V) (official draw)."""
        if isinstance(generator, torch.Generator):
            return -torch.empty_like(logits).exponential_(generator=generator).log()
        u = generator.uniform(tuple(logits.shape[1:]))  # (B, G, V) float64, one stream per image
        return -(-torch.log1p(-u)).log().to(logits.dtype)

    # -- zero-shot editing ------------------------------------------------------------------------

    @staticmethod
    def known_per_scale(known_mask: torch.Tensor, patch_nums: tuple[int, ...]) -> torch.Tensor:
        """The finest scale's known cells (pn_K^2,) or (pn_K, pn_K) -> known tokens of every scale,
        concatenated (L,); a mask of L entries is taken as it is.

        A token of a coarser scale is regenerated only when its whole cell (the area-pooled window of
        the finest grid, as the quantiser downsamples) lies in the region to regenerate; a token that
        touches the known region keeps the image's id. The residual quantisation spreads every
        coarse token over the image (bicubic upsampling), so the known region stays as encoded only
        if the coarse tokens it depends on are kept.
        """
        side, total = patch_nums[-1], sum(p * p for p in patch_nums)
        if known_mask.dtype != torch.bool or known_mask.numel() not in (side * side, total):
            raise ValueError(f"the known mask must be a boolean tensor of the finest scale's {side * side} cells "
                             f"({side} x {side}) or of all {total} tokens of patch_nums {patch_nums}, got "
                             f"{known_mask.dtype} of shape {tuple(known_mask.shape)}")
        if known_mask.numel() == total:
            return known_mask.reshape(total)
        regen = (~known_mask).reshape(1, 1, side, side).float()
        parts = [F.interpolate(regen, size=(pn, pn), mode="area").reshape(pn * pn) < 1 - 1e-6 for pn in patch_nums]
        return torch.cat(parts)  # (L,) True = keep

    @torch.no_grad()
    def edit(self, model: VAR, labels: torch.Tensor, known_tokens: torch.Tensor, known_mask: torch.Tensor, *,
             cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             steps: int | None = None, generator: Generator | None = None,
             record_logits: list | None = None) -> torch.Tensor:
        """Zero-shot in-painting, out-painting and class-conditional editing (VAR paper, sec. 5):
        next-scale sampling with masked teacher forcing.

        `known_tokens` (B, L) are the image's per-scale ids (`encode_to_indices`), `known_mask` the
        known cells of the finest scale (see `known_per_scale`) or of all L tokens. At every scale the
        known tokens are the image's and only the others are drawn (same CFG ramp, top-k / top-p
        and generator streams as `generate`); the next scale's input is built from the merged map.
        Returns the ids (B, L); known positions equal `known_tokens`. `steps` is None or the
        number of scales; `more_smooth` does not apply (the ids are decoded as they are).
        """
        cfg = model.config
        self.check_call(model, labels, cfg.num_classes, cfg_scale, temperature, generator, what="edit")
        self.check_fits(model)
        pns, sn, total = cfg.patch_nums, len(cfg.patch_nums), cfg.L
        if steps is not None and steps != sn:
            raise ValueError(f"VAR takes one step per scale: steps must be {sn} (patch_nums {pns}), got {steps}")
        b = labels.shape[0]
        if known_tokens.shape != (b, total):
            raise ValueError(f"known_tokens must be (B, L) = ({b}, {total}) per-scale ids, got {tuple(known_tokens.shape)}")
        device = model.head.weight.device
        quant = self._quantizer(device)
        self.tokenizer.split_ids(known_tokens)  # refuses ids outside the vocabulary
        keep = self.known_per_scale(known_mask, pns).to(device)  # (L,)
        if bool(keep.all()):
            raise ValueError("the mask leaves nothing to generate: every token is known")
        ids = known_tokens.to(device).clone()  # (B, L): the image's ids, the drawn ones written in
        labels = labels.to(device)
        guided = cfg_enabled(cfg_scale)
        reps = 2 if guided else 1
        cond_labels = cfg_labels(labels, cfg.num_classes, cfg_scale)
        run = self.runner
        cache = run.cache(model, cond_labels.shape[0])
        f_hat = torch.zeros(b, cfg.Cvae, pns[-1], pns[-1], device=device)
        scale_of = [si for si, (be, en) in enumerate(model.begin_ends) if not bool(keep[be:en].all())]
        order = (~keep).nonzero().squeeze(1)  # (N_u,) scale after scale
        sizes = [int((~keep[be:en]).sum()) for be, en in (model.begin_ends[si] for si in scale_of)]
        next_scale = [0]  # the first scale not yet run through the model

        def step(g: int, prev_tokens, prev_pos, next_pos) -> torch.Tensor:
            nonlocal f_hat
            if g > 0:
                ids[:, prev_pos] = prev_tokens[:b]
            logits = None
            for si in range(next_scale[0], scale_of[g] + 1):  # fully known scales run as context
                x = None
                if si > 0:
                    be, en = model.begin_ends[si - 1]
                    f_hat, nxt = quant.next_autoregressive_input(si - 1, f_hat, quant.lookup(ids[:, be:en], pns[si - 1]))
                    x = nxt.flatten(2).transpose(1, 2).repeat(reps, 1, 1)  # (B', pn_si^2, Cvae)
                logits = run(model.decode_step, cond_labels, x, cache.upto(model.begin_ends[si][1]),
                             model.scale_positions(si, device))
            next_scale[0] = scale_of[g] + 1
            return logits[:, next_pos - model.begin_ends[scale_of[g]][0]]  # (B', G_g, V)

        def scale_at(g: int, pos, idx) -> float | None:
            return None if scale_of[g] == 0 else 1 + (cfg_scale - 1) * scale_of[g] / (sn - 1)

        drawn = decode_in_groups(step, order, sizes, b, cfg_scale=cfg_scale,
                                 cfg_scale_at=scale_at if guided else None, temperature=temperature,
                                 top_k=top_k, top_p=top_p, generator=generator, record_logits=record_logits,
                                 num_tokens=total)
        return torch.where(keep, known_tokens.to(device), drawn)


__all__ = ["VarStrategy", "draw_labels", "lr_wd_factors"]
