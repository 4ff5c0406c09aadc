"""A PyTorch implementation of the ADM Inception graph (`classify_image_graph_def.pb`, 2015-12-05).

It computes the tensors the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`) reads
from the TensorFlow graph:

- input: uint8 NHWC images 0..255 fed where the graph's `ExpandDims:0` is (after its JPEG decode);
- `ResizeBilinear` to 299x299 with TF1 semantics (`align_corners=False`, no half-pixel centres,
  `resize_bilinear_tf1`; `F.interpolate` differs by up to ~60 grey levels), then `(x - 128) / 128`;
- `pool_3:0`: global average of the last block (`Mixed_7c`), 2048-d;
- `mixed_6/conv:0`: the 1x1 branch of `Mixed_6d` (conv -> batch norm -> ReLU, 192 x 17 x 17);
  ADM keeps channels 0..6 *channels last* and flattens: `spatial_features`, 2023-d;
- `softmax/logits/MatMul`: `pool @ W` without the bias (the official Inception Score ignores
  `softmax/biases`).

Module and parameter names are torchvision's (`Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch_pool.bn
.running_var`, `fc.weight` [1008, 2048]), the layout of the pytorch-fid and torch-fidelity weight
files, so those load unchanged and `convert.py` writes the same keys from the `.pb`. Every conv
knows its TensorFlow scope (`mixed_6/conv`, `mixed_10/tower_1/mixed/conv_1`, ...), which is the
converter's table. Differences from torchvision's Inception3 that the 2015 graph has: average-pool
branches exclude the padding (TF `SAME` pooling), `Mixed_7c` uses a max-pool branch, 1008 classes,
batch-norm eps 1e-3, no auxiliary head.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM keeps `mixed_6/conv:0[..., :7]`
BN_EPS = 1e-3  # BatchNormWithGlobalNormalization variance_epsilon in the graph


# ------------------------------------------------------------------------------------------------
# Input pipeline of the graph: TF1 bilinear resize and scaling
# ------------------------------------------------------------------------------------------------

def _tf1_axis(in_size: int, out_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (lo, hi) and fractions of TF1 `resize_bilinear` along one axis (float32)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = torch.floor(src)
    frac = src - lo
    lo = lo.long()
    hi = torch.clamp(lo + 1, max=in_size - 1)
    return lo.to(device), hi.to(device), frac.to(device)


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1 `resize_bilinear(align_corners=False, half_pixel_centers=False)` of NCHW float32.

    For output index o: `s = o * in/out`, `lo = floor(s)`, `hi = min(lo + 1, in - 1)`, `f = s - lo`;
    columns are interpolated on rows `lo` and `hi`, then the rows, as TF's CPU kernel does.
    """
    h_lo, h_hi, h_f = _tf1_axis(x.shape[-2], size[0], x.device)
    w_lo, w_hi, w_f = _tf1_axis(x.shape[-1], size[1], x.device)
    w_f = w_f.view(1, 1, 1, -1)
    h_f = h_f.view(1, 1, -1, 1)
    top_rows, bot_rows = x[:, :, h_lo, :], x[:, :, h_hi, :]  # (N, C, H_out, W_in)
    top = top_rows[..., w_lo] + (top_rows[..., w_hi] - top_rows[..., w_lo]) * w_f
    bot = bot_rows[..., w_lo] + (bot_rows[..., w_hi] - bot_rows[..., w_lo]) * w_f
    return top + (bot - top) * h_f


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0..255) NHWC -> the graph's `Mul:0` input, NCHW float32 299x299 in [-1, 1)."""
    x = images.float().permute(0, 3, 1, 2)  # (N, 3, H, W)
    x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
    return (x - 128.0) * 0.0078125


def spatial_features(mixed_6_conv_nhwc: torch.Tensor) -> torch.Tensor:
    """ADM's sFID vector: `mixed_6/conv:0[..., :7]` flattened in NHWC order, (h*W + w)*7 + c."""
    return mixed_6_conv_nhwc[..., :SPATIAL_CHANNELS].reshape(mixed_6_conv_nhwc.shape[0], -1)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

class FrozenBatchNorm(nn.Module):
    """Inference batch norm holding exactly the four tensors of the graph's batchnorm op."""

    def __init__(self, channels: int):
        super().__init__()
        for name, init in (("weight", torch.ones), ("bias", torch.zeros),
                           ("running_mean", torch.zeros), ("running_var", torch.ones)):
            self.register_buffer(name, init(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=BN_EPS)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm -> ReLU; `tf_scope` is the graph's name for it (`mixed_6/conv`)."""

    def __init__(self, tf_scope: str, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.tf_scope = tf_scope
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """TF `SAME` 3x3 average pool: padded positions are not counted."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # mixed, mixed_1, mixed_2 (35x35)
    def __init__(self, s: str, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(f"{s}/conv", cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(f"{s}/tower/conv", cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(f"{s}/tower/conv_1", 48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(f"{s}/tower_1/conv", cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(f"{s}/tower_1/conv_1", 64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(f"{s}/tower_1/conv_2", 96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(f"{s}/tower_2/conv", cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_same(x))], 1)


class InceptionB(nn.Module):  # mixed_3: 35x35 -> 17x17
    def __init__(self, s: str, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(f"{s}/conv", cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(f"{s}/tower/conv", cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(f"{s}/tower/conv_1", 64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(f"{s}/tower/conv_2", 96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # mixed_4 .. mixed_7 (17x17); mixed_6/conv is Mixed_6d.branch1x1
    def __init__(self, s: str, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(f"{s}/conv", cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(f"{s}/tower/conv", cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(f"{s}/tower/conv_1", c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(f"{s}/tower/conv_2", c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(f"{s}/tower_1/conv", cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(f"{s}/tower_1/conv_1", c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(f"{s}/tower_1/conv_2", c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(f"{s}/tower_1/conv_3", c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(f"{s}/tower_1/conv_4", c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(f"{s}/tower_2/conv", cin, 192, 1)

    def forward_with_1x1(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """(block output, output of the 1x1 branch)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg_pool_same(x))], 1), b1

    def forward(self, x):
        return self.forward_with_1x1(x)[0]


class InceptionD(nn.Module):  # mixed_8: 17x17 -> 8x8
    def __init__(self, s: str, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(f"{s}/tower/conv", cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(f"{s}/tower/conv_1", 192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(f"{s}/tower_1/conv", cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(f"{s}/tower_1/conv_1", 192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(f"{s}/tower_1/conv_2", 192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(f"{s}/tower_1/conv_3", 192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # mixed_9 (average-pool branch), mixed_10 (max-pool branch), 8x8
    def __init__(self, s: str, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(f"{s}/conv", cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(f"{s}/tower/conv", cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(f"{s}/tower/mixed/conv", 384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(f"{s}/tower/mixed/conv_1", 384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(f"{s}/tower_1/conv", cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(f"{s}/tower_1/conv_1", 448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(f"{s}/tower_1/mixed/conv", 384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(f"{s}/tower_1/mixed/conv_1", 384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(f"{s}/tower_2/conv", cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        # The 2015 graph's last block pools with max, not average (kept by every faithful port).
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool_same(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------

class InceptionV3ADM(nn.Module):
    """The 2015 Inception graph up to `pool_3`, `mixed_6/conv` and the bias-free logits."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d("conv", 3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d("conv_1", 32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d("conv_2", 32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d("conv_3", 64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d("conv_4", 80, 192, 3)
        self.Mixed_5b = InceptionA("mixed", 192, 32)
        self.Mixed_5c = InceptionA("mixed_1", 256, 64)
        self.Mixed_5d = InceptionA("mixed_2", 288, 64)
        self.Mixed_6a = InceptionB("mixed_3", 288)
        self.Mixed_6b = InceptionC("mixed_4", 768, 128)
        self.Mixed_6c = InceptionC("mixed_5", 768, 160)
        self.Mixed_6d = InceptionC("mixed_6", 768, 160)
        self.Mixed_6e = InceptionC("mixed_7", 768, 192)
        self.Mixed_7a = InceptionD("mixed_8", 768)
        self.Mixed_7b = InceptionE("mixed_9", 1280, pool="avg")
        self.Mixed_7c = InceptionE("mixed_10", 2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)  # softmax/weights (transposed), softmax/biases

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 NHWC images -> (pool_3 (N, 2048), mixed_6/conv NHWC (N, 17, 17, 192),
        bias-free logits (N, 1008))."""
        x = preprocess(images)  # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # pool: (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # pool_1: (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        x, mixed_6_conv = self.Mixed_6d.forward_with_1x1(x)  # mixed_6/conv: (N, 192, 17, 17)
        x = self.Mixed_7a(self.Mixed_6e(x))  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # pool_3: 8x8 VALID average, (N, 2048)
        logits = pool @ self.fc.weight.T  # softmax/logits/MatMul (no bias, as ADM)
        return pool, mixed_6_conv.permute(0, 2, 3, 1), logits


def tf_scope_table(model: InceptionV3ADM) -> dict[str, str]:
    """{torch module prefix: TensorFlow scope} for every conv block, in module order."""
    return {name: m.tf_scope for name, m in model.named_modules() if isinstance(m, BasicConv2d)}
