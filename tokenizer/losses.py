"""Tokenizer training losses: reconstruction, LPIPS perceptual, PatchGAN discriminator, GAN losses.

Written from the official code (LlamaGen `tokenizer/tokenizer_image/
vq_loss.py`, `lpips.py`, `discriminator_patchgan.py`, themselves after taming-transformers and
richzhang/PerceptualSimilarity). The generator objective is

    rec_w * rec(x, x_hat) + perc_w * mean(LPIPS(x, x_hat)) + a * w_d(step) * L_gen(D(x_hat))
        + vq_loss + commit_loss + entropy_loss

and the discriminator's is w_d(step) * L_disc(D(x), D(x_hat)), with w_d(step) = disc_weight once
step >= disc_start and 0 before (the official hard switch), and a = 1 or, with the adaptive weight,
||grad rec-part|| / (||grad L_gen|| + 1e-4) on `decoder.last_layer`, clamped to [0, 1e4].
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.checkpoint import CheckpointError, check_state_dict, load_checkpoint

# ---------------------------------------------------------------------------------------------
# LPIPS (VGG16) perceptual distance
# ---------------------------------------------------------------------------------------------

# The learned lin layers ("v0.1" LPIPS weights as LlamaGen ships them) and torchvision's ImageNet
# VGG16. Default locations follow pretrained_models/checkpoints.json.
LPIPS_LIN_URL = ("https://raw.githubusercontent.com/FoundationVision/LlamaGen/"
                 "ce98ec41803a74a90ce68c40ababa9eaeffeb4ec/tokenizer/tokenizer_image/cache/vgg.pth")
LPIPS_LIN_MD5 = "d507d7349b931f0638a25a48a722f98a"
LPIPS_LIN_DEFAULT = Path("pretrained_models/vgg.pth")
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_SHA256_PREFIX = "397923af"  # torchvision's convention: the file name carries the hash prefix
VGG16_FILE = "vgg16-397923af.pth"
VGG16_DEFAULT = Path("pretrained_models") / VGG16_FILE

LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# torchvision vgg16().features indices of each slice, ending at relu1_2, relu2_2, relu3_3, relu4_3,
# relu5_3.
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
# Keys of the torchvision file LPIPS does not use (the classifier head); dropped by name.
VGG16_CLASSIFIER_KEYS = tuple(f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias"))


class PerceptualWeightsMissing(FileNotFoundError):
    """The LPIPS weights are not on disk; the message says what to download and where to put it."""


class ScalingLayer(nn.Module):
    """[-1,1] images -> the input statistics the LPIPS VGG expects (official constants)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGG16Features(nn.Module):
    """torchvision's VGG16 `features`, cut into the five LPIPS slices (keys `slice{k}.{i}.*`)."""

    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16(weights=None).features
        for k, (a, b) in enumerate(VGG_SLICES, start=1):
            s = nn.Sequential()
            for i in range(a, b):
                s.add_module(str(i), features[i])
            setattr(self, f"slice{k}", s)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            outs.append(x)
        return outs


class NetLinLayer(nn.Module):
    """Dropout(0.5) then a 1x1 conv C -> 1 without bias (key `model.1.weight`, as the official)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(channels, 1, 1, 1, 0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise each feature vector over channels: x / (||x||_2 + eps)."""
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance (VGG16 variant). forward(x, y) in [-1,1] -> (B,1,1,1).

    The weights come from `load_lpips`; a bare `LPIPS()` has random weights (for tests). Parameters
    are frozen; gradients flow to the inputs only. In train mode the lin-layer dropout is active
    (the official tokenizer training runs it so; see `--perceptual-dropout`).
    """

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for k, c in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(c))
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0.0
        for k in range(len(LPIPS_CHANNELS)):
            diff = (normalize_channels(fx[k]) - normalize_channels(fy[k])) ** 2  # (B, C_k, h, w)
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(2, 3), keepdim=True)  # (B,1,1,1)
        return total


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def default_vgg16_path() -> Path:
    """`pretrained_models/vgg16-397923af.pth` when present, else torchvision's own cache file."""
    if VGG16_DEFAULT.is_file():
        return VGG16_DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    return cached if cached.is_file() else VGG16_DEFAULT


def missing_weights_message(lin_path: Path, vgg_path: Path) -> str:
    """What to download, from where, and where to put it (or how to train without LPIPS)."""
    lines = ["the perceptual (LPIPS) loss needs two weight files that are not on disk:"]
    if not lin_path.is_file():
        lines += [f"  - LPIPS lin layers: {LPIPS_LIN_URL}",
                  f"    (7,289 bytes, md5 {LPIPS_LIN_MD5}; LlamaGen's tokenizer/tokenizer_image/cache/vgg.pth)",
                  f"    save it as {lin_path} (or pass --perceptual-ckpt PATH)"]
    if not vgg_path.is_file():
        lines += [f"  - torchvision VGG16 ImageNet weights: {VGG16_URL}",
                  f"    (528 MB, sha256 starting {VGG16_SHA256_PREFIX})",
                  f"    save it as {vgg_path} or in torchvision's cache "
                  f"{Path(torch.hub.get_dir()) / 'checkpoints' / VGG16_FILE}"
                  f" (or pass --perceptual-vgg-ckpt PATH)"]
    lines += ["Or rerun with --download-perceptual to fetch them, or with --perceptual-weight 0 to train "
              "without the perceptual loss (not the official recipe)."]
    return "\n".join(lines)


def download_lpips_weights(lin_path: Path, vgg_path: Path) -> None:
    """Fetch whichever of the two files is missing, checksum-checked (needs the network)."""
    from utils.download import download_url

    if not lin_path.is_file():
        download_url(LPIPS_LIN_URL, lin_path, md5=LPIPS_LIN_MD5)
    if not vgg_path.is_file():
        download_url(VGG16_URL, vgg_path)
        if not _sha256(vgg_path).startswith(VGG16_SHA256_PREFIX):
            vgg_path.unlink()
            raise CheckpointError(f"{VGG16_URL} did not match its sha256 prefix {VGG16_SHA256_PREFIX}")


def load_lpips(lin_path: str | Path = LPIPS_LIN_DEFAULT, vgg_path: str | Path | None = None,
               check_hash: bool = True) -> LPIPS:
    """LPIPS with the published weights: lin layers from `vgg.pth`, backbone from torchvision's file.

    Raises `PerceptualWeightsMissing` (with the download instructions) when a file is absent and
    `CheckpointError` when a file has the wrong checksum, keys or shapes. `check_hash=False` skips
    the checksums only (tests use random stand-in files); keys and shapes are always checked.
    """
    lin_path = Path(lin_path)
    vgg_path = Path(vgg_path) if vgg_path is not None else default_vgg16_path()
    if not (lin_path.is_file() and vgg_path.is_file()):
        raise PerceptualWeightsMissing(missing_weights_message(lin_path, vgg_path))
    if check_hash:
        if _md5(lin_path) != LPIPS_LIN_MD5:
            raise CheckpointError(f"{lin_path} has md5 {_md5(lin_path)}, expected {LPIPS_LIN_MD5}: "
                                  f"download it again from {LPIPS_LIN_URL}")
        if not _sha256(vgg_path).startswith(VGG16_SHA256_PREFIX):
            raise CheckpointError(f"{vgg_path} does not have the sha256 prefix {VGG16_SHA256_PREFIX}: "
                                  f"download it again from {VGG16_URL}")
    model = LPIPS()
    # The lin layers: exactly lin{0..4}.model.1.weight (1, C, 1, 1).
    lin_sd = load_checkpoint(lin_path)
    lin_expected = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(LPIPS_CHANNELS)}
    check_state_dict(lin_sd, lin_expected, what=f"LPIPS lin weights {lin_path}")
    # The backbone: torchvision's `features.{i}.*`, mapped onto our slices; the classifier keys
    # (when present) are the only others allowed, and are dropped.
    vgg_sd = load_checkpoint(vgg_path)
    slice_of = {i: k for k, (a, b) in enumerate(VGG_SLICES, start=1) for i in range(a, b)}
    ours = {n: tuple(t.shape) for n, t in model.net.state_dict().items()}
    expected = {f"features.{n.split('.', 1)[1]}": s for n, s in ours.items()}
    expected.update({k: tuple(vgg_sd[k].shape) for k in VGG16_CLASSIFIER_KEYS if k in vgg_sd})
    check_state_dict(vgg_sd, expected, what=f"torchvision VGG16 weights {vgg_path}")
    net_sd = {}
    for key, t in vgg_sd.items():
        if key in VGG16_CLASSIFIER_KEYS:
            continue
        _, idx, param = key.split(".")
        net_sd[f"slice{slice_of[int(idx)]}.{idx}.{param}"] = t
    model.net.load_state_dict(net_sd, strict=True)
    for k in range(len(LPIPS_CHANNELS)):
        getattr(model, f"lin{k}").model[1].weight.data.copy_(lin_sd[f"lin{k}.model.1.weight"])
    return model


# ---------------------------------------------------------------------------------------------
# PatchGAN discriminator
# ---------------------------------------------------------------------------------------------


class NLayerDiscriminator(nn.Module):
    """Pix2Pix PatchGAN (official keys `main.{0,2,3,5,6,8,9,11}`): 256 px -> (B,1,30,30) logits.

    conv4x4 s2 (bias) + LReLU(0.2); (n_layers - 1) x [conv4x4 s2 (no bias) + BatchNorm + LReLU];
    conv4x4 s1 (no bias) + BatchNorm + LReLU; conv4x4 s1 -> 1 (bias). Plain BatchNorm2d, per-rank
    statistics, as the official code.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Official init: conv weights N(0, 0.02) (conv biases keep PyTorch's default), BatchNorm
        # weight N(1, 0.02) and bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


DISCRIMINATORS = {"patchgan": NLayerDiscriminator}


# ---------------------------------------------------------------------------------------------
# GAN losses
# ---------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """BCE of D(x) against 1 and D(x_hat) against 0 (equal to `vanilla_d_loss`).

    The official code calls `binary_cross_entropy_with_logits(ones_like(logits), logits)`: the
    arguments swapped, so the constant is taken as the logit and the logits as targets. We write
    the intended loss."""
    return 0.5 * (F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
                  + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake)))


def hinge_gen_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def non_saturating_gen_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(D(x_hat)) = softplus(-D(x_hat)) (the official one has the BCE arguments swapped)."""
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss, "non-saturating": non_saturating_d_loss}
GEN_LOSSES = {"hinge": hinge_gen_loss, "non-saturating": non_saturating_gen_loss}
RECONSTRUCTION_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


def disc_weight_at(step: int, disc_start: int, disc_weight: float) -> float:
    """w_d(step): 0 before `disc_start`, `disc_weight` from it on (official hard switch, no ramp).
    The official driver passes step = steps done + 1."""
    return disc_weight if step >= disc_start else 0.0


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d nll / d last_layer|| / (||d g / d last_layer|| + 1e-4), clamped to [0, 1e4], detached."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, 1e4).detach()


# ---------------------------------------------------------------------------------------------
# The two objectives
# ---------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    reconstruction_loss: str = "l2"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 20000
    disc_loss: str = "hinge"
    gen_loss: str = "hinge"
    disc_adaptive_weight: bool = False
    codebook_weight: float = 1.0


class VQLoss(nn.Module):
    """Holds the discriminator and the (frozen) LPIPS net; `generator_loss` and
    `discriminator_loss` are the two objectives (separate methods, not one `forward` switched by an
    index). `perceptual` is None when the perceptual weight is 0."""

    def __init__(self, cfg: LossConfig, discriminator: nn.Module, perceptual: LPIPS | None):
        super().__init__()
        for name, table, value in (("--reconstruction-loss", RECONSTRUCTION_LOSSES, cfg.reconstruction_loss),
                                   ("--disc-loss", DISC_LOSSES, cfg.disc_loss),
                                   ("--gen-loss", GEN_LOSSES, cfg.gen_loss)):
            if value not in table:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(table)}")
        if cfg.perceptual_weight > 0 and perceptual is None:
            raise ValueError("a perceptual weight > 0 needs the LPIPS network")
        self.cfg = cfg
        self.discriminator = discriminator
        self.perceptual = perceptual

    def generator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, codebook_losses, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator objective at training step `step` (official: steps done + 1).

        `codebook_losses` = (vq_loss, commit_loss, entropy_loss, ...) from the quantiser; they are
        added with weight `codebook_weight` (1.0 officially, where the flag is ignored).
        Returns (loss, detached terms for logging, each already multiplied by its weight).
        """
        cfg = self.cfg
        rec = cfg.reconstruction_weight * RECONSTRUCTION_LOSSES[cfg.reconstruction_loss](x_hat, x)
        if self.perceptual is not None:
            perc = cfg.perceptual_weight * self.perceptual(x, x_hat).mean()
        else:
            perc = torch.zeros((), device=x.device)
        w_d = disc_weight_at(step, cfg.disc_start, cfg.disc_weight)
        a = torch.ones((), device=x.device)
        if w_d > 0:
            g = GEN_LOSSES[cfg.gen_loss](self.discriminator(x_hat))
            if cfg.disc_adaptive_weight:
                if last_layer is None:
                    raise ValueError("the adaptive GAN weight needs the decoder's last layer")
                a = adaptive_weight(rec + perc, g, last_layer)
            adv = a * w_d * g
        else:
            # Before disc_start the term has weight 0: skipping D's forward changes no gradient
            # (only the BatchNorm running statistics, which training never reads).
            adv = torch.zeros((), device=x.device)
        vq, commit, entropy = codebook_losses[0], codebook_losses[1], codebook_losses[2]
        codebook = cfg.codebook_weight * (vq + commit + entropy)
        loss = rec + perc + adv + codebook
        terms = {"rec": rec, "perceptual": perc, "gen_adv": adv, "adaptive_w": a,
                 "vq": vq, "commit": commit, "entropy": entropy}
        return loss, {k: v.detach().float() for k, v in terms.items()}

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, step: int
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """w_d(step) * L_disc(D(x), D(x_hat)) on detached inputs (two forwards, as the official)."""
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_hat.detach())
        w_d = disc_weight_at(step, self.cfg.disc_start, self.cfg.disc_weight)
        loss = w_d * DISC_LOSSES[self.cfg.disc_loss](logits_real, logits_fake)
        terms = {"disc": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {k: v.detach().float() for k, v in terms.items()}
