"""The LlamaGen VQ tokenizer (VQ-16 / VQ-8), with the official state_dict key names.

A convolutional VQGAN-style autoencoder: image (B,3,H,W) in [-1,1] -> code grid (B, H/f, W/f) of
indices into a 16384 x 8 codebook of l2-normalised vectors (f = 16 for VQ-16, 8 for VQ-8).
Written from the official code (FoundationVision/LlamaGen
`tokenizer/tokenizer_image/vq_model.py`), so `vq_ds16_c2i.pt` / `vq_ds8_c2i.pt` load as published.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.blocks import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample, swish


@dataclass
class VQConfig:
    """Constructor arguments, with the official `ModelArgs` names (plus `ch`, `num_res_blocks`,
    which the official code hard-codes to 128 and 2)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2

    @property
    def downsample(self) -> int:
        """Image pixels per code along one side: 2^(levels - 1)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)


# ---------------------------------------------------------------------------------------------
# Encoder / decoder (blocks: tokenizer/blocks.py)
# ---------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """conv_in -> levels (res blocks, attention at the last level, downsample) -> mid -> conv_out."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int,
                 dropout: float, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.conv_blocks = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            c_in, c_out = ch * in_mult[i], ch * mult
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                res.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
                if i == len(ch_mult) - 1:
                    attn.append(AttnBlock(c_out))
            level.res, level.attn = res, attn
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c_out)
            self.conv_blocks.append(level)
        c = ch * ch_mult[-1]
        self.mid = nn.ModuleList([ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)])
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            for j, block in enumerate(level.res):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in -> mid -> levels from the lowest resolution up (res x3, attention at the first,
    upsample) -> conv_out."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int,
                 dropout: float, out_channels: int = 3):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)])
        self.conv_blocks = nn.ModuleList()
        c_in = c
        for j, mult in enumerate(reversed(ch_mult)):
            level = nn.Module()
            c_out = ch * mult
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                res.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
                if j == 0:
                    attn.append(AttnBlock(c_out))
            level.res, level.attn = res, attn
            if j != len(ch_mult) - 1:
                level.upsample = Upsample(c_out)
            self.conv_blocks.append(level)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, 1, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight differentiates against."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            for j, block in enumerate(level.res):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# Quantiser
# ---------------------------------------------------------------------------------------------


def compute_entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Mean per-sample entropy minus the entropy of the mean assignment (official formula,
    including its `+ 1e-5` inside `log_softmax` and `log`)."""
    flat = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(flat, dim=-1)
    log_probs = F.log_softmax(flat + 1e-5, dim=-1)
    avg_probs = probs.mean(dim=0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser over l2-normalised codes, with the official usage buffer."""

    def __init__(self, n_e: int, e_dim: int, beta: float, entropy_loss_ratio: float,
                 l2_norm: bool, show_usage: bool):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.entropy_loss_ratio, self.l2_norm, self.show_usage = entropy_loss_ratio, l2_norm, show_usage
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        """The code vectors as used: normalised at use time (stored rows need not be unit norm)."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def nearest(self, z_flat: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (N, n_e) by the official expanded formula, and argmin indices (N,)."""
        d = (
            torch.sum(z_flat**2, dim=1, keepdim=True)
            + torch.sum(embedding**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", z_flat, embedding.t())
        )
        return d, torch.argmin(d, dim=1)

    def distances(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B,C,h,w) -> (z channel-last and l2-normalised (B,h,w,C), the codebook as used,
        distances (B*h*w, n_e), argmin indices (B*h*w,)): the forward's nearest-code search."""
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, C)
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        embedding = self.codebook()
        d, idx = self.nearest(z.reshape(-1, self.e_dim), embedding)
        return z, embedding, d, idx

    def indices_and_margins(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B,C,h,w) -> (indices (B*h*w,), margins (B*h*w,)): each position's code, as the forward
        picks it, and its second-smallest minus smallest distance in the forward's own distances (how
        far the choice is from a tie; a float difference below it cannot change the code)."""
        _, _, d, idx = self.distances(z)
        if d.shape[1] < 2:  # a one-code codebook: no second choice
            return idx, torch.full(idx.shape, float("inf"), dtype=d.dtype, device=d.device)
        two = torch.topk(d, 2, dim=1, largest=False).values
        return idx, two[:, 1] - two[:, 0]

    def forward(self, z: torch.Tensor):
        """z (B,C,h,w) -> (quant (B,C,h,w), (vq_loss, commit_loss, entropy_loss, usage), (None, None, idx))."""
        z, embedding, d, idx = self.distances(z)
        z_q = embedding[idx].view(z.shape)
        vq_loss = commit_loss = entropy_loss = None
        usage = 0
        if self.training:
            if self.show_usage:
                n = idx.shape[0]
                self.codebook_used[:-n] = self.codebook_used[n:].clone()
                self.codebook_used[-n:] = idx.to(self.codebook_used.dtype)
                usage = len(torch.unique(self.codebook_used)) / self.n_e
            vq_loss = torch.mean((z_q - z.detach()) ** 2)
            commit_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)
            entropy_loss = self.entropy_loss_ratio * compute_entropy_loss(-d)
        z_q = z + (z_q - z).detach()  # straight-through
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)
        return z_q, (vq_loss, commit_loss, entropy_loss, usage), (None, None, idx)

    def get_codebook_entry(self, indices: torch.Tensor, shape: list[int] | None = None,
                           channel_first: bool = True) -> torch.Tensor:
        """Code vectors for `indices`; with `shape` = (B, C, h, w) reshaped (and channel-first)."""
        z_q = self.codebook()[indices.long()]
        if shape is not None:
            b, c, h, w = shape
            z_q = z_q.reshape(b, h, w, c)
            if channel_first:
                z_q = z_q.permute(0, 3, 1, 2).contiguous()
        return z_q


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.ch, list(config.encoder_ch_mult), config.num_res_blocks,
                               config.z_channels, config.dropout_p)
        self.decoder = Decoder(config.ch, list(config.decoder_ch_mult), config.num_res_blocks,
                               config.z_channels, config.dropout_p)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim,
                                        config.commit_loss_beta, config.entropy_loss_ratio,
                                        config.codebook_l2_norm, config.codebook_show_usage)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B,3,H,W) in [-1,1] -> the pre-quantisation latent (B, codebook_embed_dim, h, w)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor):
        """Image (B,3,H,W) in [-1,1] -> (quant, losses, (None, None, idx flattened (B*h*w,)))."""
        return self.quantize(self.latent(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor, shape: list[int] | None = None,
                    channel_first: bool = True) -> torch.Tensor:
        return self.decode(self.quantize.get_codebook_entry(code_b, shape, channel_first))

    def forward(self, x: torch.Tensor):
        quant, losses, _ = self.encode(x)
        return self.decode(quant), losses

    # Convenience wrappers with plain shapes, used by the drivers.
    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B,3,H,W) in [-1,1] -> code indices (B, H/f * W/f), raster order."""
        idx = self.encode(x)[2][2]
        return idx.reshape(x.shape[0], -1)

    @torch.no_grad()
    def encode_to_indices_and_margins(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B,3,H,W) in [-1,1] -> (code indices (B, h*w) as `encode_to_indices`, distance
        margins (B, h*w) float32: second-smallest minus smallest squared distance to the codebook)."""
        idx, margin = self.quantize.indices_and_margins(self.latent(x))
        return idx.reshape(x.shape[0], -1), margin.reshape(x.shape[0], -1)

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Code indices (B, h*w) in raster order -> image (B,3,h*f,w*f) in about [-1,1]."""
        b, n = indices.shape
        if grid is None:
            side = int(round(n**0.5))
            if side * side != n:
                raise ValueError(f"{n} codes per image is not a square grid; pass grid=(h, w)")
            grid = (side, side)
        shape = [b, self.config.codebook_embed_dim, grid[0], grid[1]]
        return self.decode_code(indices, shape)


def VQ_16(**kwargs) -> VQModel:
    return VQModel(VQConfig(encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4], **kwargs))


def VQ_8(**kwargs) -> VQModel:
    return VQModel(VQConfig(encoder_ch_mult=[1, 2, 2, 4], decoder_ch_mult=[1, 2, 2, 4], **kwargs))


# A small tokenizer for the embedded demo and the tests: 32 px digits -> 8x8 codes.
def VQ_debug(**kwargs) -> VQModel:
    cfg = dict(codebook_size=512, codebook_embed_dim=8, encoder_ch_mult=[1, 2, 2],
               decoder_ch_mult=[1, 2, 2], z_channels=64, ch=32, num_res_blocks=1)
    cfg.update(kwargs)
    return VQModel(VQConfig(**cfg))


VQ_models = {"VQ-16": VQ_16, "VQ-8": VQ_8, "VQ-debug": VQ_debug}


def config_dict(model: VQModel) -> dict:
    """The constructor arguments as a plain dict (stored in checkpoints and beside codes)."""
    return asdict(model.config)
