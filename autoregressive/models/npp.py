"""Next-patch prediction (NPP) over the LlamaGen GPT: patch tokens, coarse RoPE, multi-token loss.

Written from the official code (PKU-YuanGroup/Next-Patch-Prediction
`utils/patchify.py` and the training branch of `autoregressive/models/gpt.py`). The model is the
LlamaGen `Transformer` with the same weights; only the training forward differs:

- the G x G code grid is cut into k x k blocks (patch size P = k^2); patch j = R * g + C (raster
  over the coarse g x g grid, g = G / k) covers the tokens (R*k + a, C*k + b), a, b < k;
- the P token embeddings of a patch are averaged (plain mean) into one patch token;
- the sequence `[class ; patch_0 .. patch_{n-2}]` (n = N / P) runs with the 2-D RoPE angles of the
  coarse cells (integer coarse coordinates, not scaled by k; zero rotation for the class token);
- logit row j predicts every one of the P codes of patch j with one shared distribution, and the
  loss is the mean cross-entropy over all B * n * P (row, code) pairs.

P = 1 is exactly LlamaGen's teacher-forced training, so sampling stays raster next-token decoding
(`prefill` / `decode_step`, inherited unchanged).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from autoregressive.models.gpt import GPT_SIZES, GPTConfig, Transformer

#: the patch sides the official code can build (k = 1, 2, 4, 8; P = 1, 4, 16, 64).
PATCH_SIDES = (1, 2, 4, 8)


def patch_side(patch_size: int, grid: int) -> int:
    """k = sqrt(P), checked: P must be a square k^2 with k in PATCH_SIDES and k dividing the grid."""
    k = math.isqrt(patch_size)
    if k * k != patch_size or k not in PATCH_SIDES:
        raise ValueError(f"patch size {patch_size} is not one of {[s * s for s in PATCH_SIDES]}")
    if grid % k:
        raise ValueError(f"patches of {k}x{k} tokens (patch size {patch_size}) do not divide the "
                         f"{grid}x{grid} token grid")
    return k


def patchify_embeddings(emb: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the token embeddings over each k x k block: (B, G*G, D) -> (B, (G/k)^2, D).

    Raster token r * G + c; output row R * g + C averages the tokens (R*k + a, C*k + b). Computed
    in float32 (the official `tensor_patchify` averages the unfolded float32 embeddings).
    """
    b, n, d = emb.shape
    grid = math.isqrt(n)
    g = grid // k
    blocks = emb.float().view(b, g, k, g, k, d)  # (B, R, a, C, b, D)
    return blocks.mean(dim=(2, 4)).reshape(b, g * g, d)  # (B, n, D)


def patchify_targets(codes: torch.Tensor, k: int) -> torch.Tensor:
    """The codes of each k x k block: (B, G*G) -> (B, (G/k)^2, k*k), within-patch index a*k + b.

    A reshape (exact for any dtype); the official `target_patchify` runs `F.unfold` on the int64
    codes, which has no Long kernel and only works under `torch.compile` (on by default in its
    `train_c2i.py`).
    """
    b, n = codes.shape
    grid = math.isqrt(n)
    g = grid // k
    blocks = codes.view(b, g, k, g, k).permute(0, 1, 3, 2, 4)  # (B, R, C, a, b)
    return blocks.reshape(b, g * g, k * k)  # (B, n, P)


def coarse_rope_rows(grid: int, k: int, cls_token_num: int = 1,
                     device: torch.device | None = None) -> torch.Tensor:
    """Rows of the fine (grid x grid) RoPE table holding the angles of the coarse cells, (n,) int64.

    The 2-D RoPE angle of a cell depends only on its integer (row, column), so coarse cell (R, C)
    of the g x g grid has the angles of fine row `cls_token_num + R * grid + C`: the official
    per-stage table `precompute_freqs_cis_2d(grid // k, ...)` is these rows of the full table.
    """
    g = grid // k
    r = torch.arange(g, device=device)
    return cls_token_num + (r[:, None] * grid + r[None, :]).flatten()  # (g*g,)


def multi_target_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over (B, n, P) of CE(logits[b, j], targets[b, j, t]): logits (B, n, V), targets (B, n, P).

    The same value as the official loss over the P-times repeated logits, without the repeat.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, n, V)
    return -logp.gather(-1, targets).mean()


class NppTransformer(Transformer):
    """The LlamaGen GPT whose `forward` is the NPP training forward at a given patch size.

    Same parameters and state-dict keys as `Transformer`; `prefill` / `decode_step` (raster
    sampling) are inherited unchanged. `forward` takes the whole grid and a patch size instead of
    the parent's `(idx = z[:, :-1], cond, ...)`: it is the only training call, and it has to be
    `forward` so that DDP / FSDP / torch.compile wrap it.
    """

    def patch_inputs(self, codes: torch.Tensor, cond: torch.Tensor,
                     patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence entering block 0 and its RoPE rows.

        codes (B, N) raster, cond (B,) -> h (B, n, D) = `[class ; patch_0 .. patch_{n-2}]` before
        token dropout, rope (n, hd/2, 2). Label dropout applies in training mode (LabelEmbedder).
        """
        grid = self.config.grid_size
        k = patch_side(patch_size, grid)
        emb = self.tok_embeddings(codes)  # (B, N, D)
        patches = patchify_embeddings(emb, k).to(emb.dtype) if k > 1 else emb  # (B, n, D)
        h = torch.cat([self.cls_embedding(cond), patches[:, :-1]], dim=1)  # (B, n, D)
        cells = coarse_rope_rows(grid, k, self.cls_token_num, device=codes.device)  # (n,)
        pos = torch.cat([torch.arange(self.cls_token_num, device=codes.device), cells[:-1]])  # (n,)
        return h, self.freqs_cis[pos]

    def forward(self, codes: torch.Tensor, cond: torch.Tensor, patch_size: int = 1,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The NPP teacher-forced pass at patch size P (1 = LlamaGen next-token training).

        Args:
            codes: (B, N) the whole raster code grid (the last patch is dropped after averaging).
            cond: (B,) class labels (`num_classes` = the null class).
            patch_size: P = k^2 with k in 1, 2, 4, 8 dividing the grid.
            targets: (B, N) the codes to predict (= codes); the loss is computed only when given.
        Returns:
            (logits (B, n, V) float32, row j predicting every code of patch j; loss or None).
        """
        h, rope = self.patch_inputs(codes, cond, patch_size)
        h = self.tok_dropout(h)
        logits = self.forward_embeddings(h, rope, is_causal=True)  # (B, n, V)
        loss = None
        if targets is not None:
            k = math.isqrt(patch_size)
            loss = multi_target_loss(logits, patchify_targets(targets, k))
        return logits, loss


def build_npp_gpt(gpt_model: str, **kwargs) -> NppTransformer:
    """A fresh NPP GPT of a named LlamaGen size; `kwargs` are `GPTConfig` fields."""
    if gpt_model not in GPT_SIZES:
        raise ValueError(f"unknown --gpt-model {gpt_model!r}; known: {', '.join(GPT_SIZES)}")
    return NppTransformer(GPTConfig(**{**GPT_SIZES[gpt_model], **kwargs}))
