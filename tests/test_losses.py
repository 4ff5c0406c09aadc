"""Tokenizer losses: LPIPS and PatchGAN structure, weight loading, GAN formulas, adaptive weight, EMA."""
import math

import pytest
import torch
import torch.nn.functional as F

from tokenizer.losses import (LPIPS, LPIPS_LIN_MD5, LPIPS_LIN_URL, VGG16_URL, LossConfig, NLayerDiscriminator,
                              PerceptualWeightsMissing, VQLoss, adaptive_weight, disc_weight_at, hinge_d_loss,
                              hinge_gen_loss, load_lpips, non_saturating_d_loss, non_saturating_gen_loss,
                              vanilla_d_loss)
from utils.checkpoint import CheckpointError
from utils.ema import make_ema, update_ema


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random stand-ins for vgg.pth (lin layers) and torchvision's vgg16 file (features only)."""
    d = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    ref = LPIPS()
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, d / "vgg.pth")
    vgg = {f"features.{n.split('.', 1)[1]}": t for n, t in ref.net.state_dict().items()}
    torch.save(vgg, d / "vgg16-397923af.pth")
    return d / "vgg.pth", d / "vgg16-397923af.pth", lin, vgg


def test_lpips_shapes_keys_and_zero_distance():
    torch.manual_seed(0)
    net = LPIPS().eval()
    keys = set(net.state_dict())
    assert {f"lin{k}.model.1.weight" for k in range(5)} <= keys
    assert "net.slice1.0.weight" in keys and "net.slice5.28.bias" in keys
    assert all(not p.requires_grad for p in net.parameters())
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d = net(x, y)
    assert d.shape == (2, 1, 1, 1)
    assert torch.allclose(net(x, x), torch.zeros(2, 1, 1, 1))
    y.requires_grad_(True)
    net(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_lpips_loads_weight_files(lpips_files):
    lin_path, vgg_path, lin, vgg = lpips_files
    net = load_lpips(lin_path, vgg_path, check_hash=False)
    assert torch.equal(net.lin3.model[1].weight, lin["lin3.model.1.weight"])
    assert torch.equal(net.net.slice4[5].weight, vgg["features.21.weight"])  # slice4 = features[16:23]
    # The published checksum is enforced by default: a stand-in file is refused with the reason.
    with pytest.raises(CheckpointError, match=LPIPS_LIN_MD5):
        load_lpips(lin_path, vgg_path)


def test_lpips_refuses_wrong_keys(tmp_path, lpips_files):
    _, vgg_path, lin, _ = lpips_files
    bad = dict(lin)
    bad["lin5.model.1.weight"] = bad.pop("lin4.model.1.weight")
    torch.save(bad, tmp_path / "vgg.pth")
    with pytest.raises(CheckpointError, match="lin4.model.1.weight"):
        load_lpips(tmp_path / "vgg.pth", vgg_path, check_hash=False)


def test_missing_lpips_weights_say_what_to_download(tmp_path):
    lin, vgg = tmp_path / "pm" / "vgg.pth", tmp_path / "pm" / "vgg16-397923af.pth"
    with pytest.raises(PerceptualWeightsMissing) as e:
        load_lpips(lin, vgg)
    msg = str(e.value)
    for part in (LPIPS_LIN_URL, LPIPS_LIN_MD5, str(lin), VGG16_URL, str(vgg), "--perceptual-weight 0"):
        assert part in msg


def test_patchgan_keys_shapes_and_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    convs = {k.split(".")[1] for k in d.state_dict() if k.endswith(".weight") and d.state_dict()[k].dim() == 4}
    norms = {k.split(".")[1] for k in d.state_dict() if k.endswith("running_mean")}
    assert convs == {"0", "2", "5", "8", "11"} and norms == {"3", "6", "9"}
    assert "main.2.bias" not in d.state_dict() and "main.0.bias" in d.state_dict()
    assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert abs(d.main[5].weight.std().item() - 0.02) < 2e-3
    assert abs(d.main[6].weight.mean().item() - 1.0) < 5e-3 and torch.all(d.main[6].bias == 0)


def test_gan_losses_match_hand_computations():
    r, f = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 3.0])
    # hinge: 0.5 * (mean(relu(1 - r)) + mean(relu(1 + f)))
    assert math.isclose(hinge_d_loss(r, f).item(), 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 4) / 3), rel_tol=1e-6)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731 softplus
    vanilla = 0.5 * ((sp(-2) + sp(-0.5) + sp(1)) / 3 + (sp(-2) + sp(0) + sp(3)) / 3)
    assert math.isclose(vanilla_d_loss(r, f).item(), vanilla, rel_tol=1e-6)
    # The non-saturating discriminator loss is BCE against 1/0: the same value as vanilla.
    assert math.isclose(non_saturating_d_loss(r, f).item(), vanilla, rel_tol=1e-6)
    assert math.isclose(hinge_gen_loss(f).item(), -1 / 3, rel_tol=1e-6)
    assert math.isclose(non_saturating_gen_loss(f).item(), (sp(2) + sp(0) + sp(-3)) / 3, rel_tol=1e-6)
    # The official swapped call is a different function (documented in losses.py).
    swapped = F.binary_cross_entropy_with_logits(torch.ones_like(f), f).item()
    assert not math.isclose(swapped, non_saturating_gen_loss(f).item(), rel_tol=1e-3)


def test_adaptive_weight_is_grad_norm_ratio_clamped():
    w = torch.nn.Parameter(torch.ones(4))
    a, b = torch.tensor([3.0, 4.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])
    got = adaptive_weight((w * a).sum(), (w * b).sum(), w)
    assert math.isclose(got.item(), 5.0 / (1.0 + 1e-4), rel_tol=1e-6) and not got.requires_grad
    assert adaptive_weight((w * a).sum(), (w * 0).sum(), w).item() == 1e4  # clamped


class _Raises(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("the discriminator must not run before disc_start")


class _Const(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3), keepdim=True) + 1.0


def test_disc_start_is_a_hard_switch_and_loss_composition():
    assert disc_weight_at(19999, 20000, 0.5) == 0.0 and disc_weight_at(20000, 20000, 0.5) == 0.5
    x, x_hat = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5)
    cb = (torch.tensor(0.1), torch.tensor(0.2), torch.tensor(0.3), 0.9)
    cfg = LossConfig(perceptual_weight=0.0, reconstruction_weight=2.0, disc_start=5, disc_weight=0.5)
    before, terms = VQLoss(cfg, _Raises(), None).generator_loss(x, x_hat, cb, step=4)
    assert math.isclose(before.item(), 2.0 * 0.25 + 0.6, rel_tol=1e-6) and terms["gen_adv"].item() == 0.0
    after, terms = VQLoss(cfg, _Const(), None).generator_loss(x, x_hat, cb, step=5)
    # hinge generator loss -mean(D(x_hat)) = -1.5, times a = 1 and w_d = 0.5
    assert math.isclose(after.item(), 2.0 * 0.25 + 0.6 + 0.5 * -1.5, rel_tol=1e-6)
    d_loss, _ = VQLoss(cfg, _Const(), None).discriminator_loss(x, x_hat, step=4)
    assert d_loss.item() == 0.0
    d_loss, _ = VQLoss(cfg, _Const(), None).discriminator_loss(x, x_hat, step=5)
    assert math.isclose(d_loss.item(), 0.5 * hinge_d_loss(torch.ones(1), torch.full((1,), 1.5)).item())


def test_ema_update():
    model = torch.nn.Linear(3, 2)
    ema = make_ema(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.weight.clone()
    update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight)
    update_ema(ema, model, decay=0.0)
    assert torch.equal(ema.weight, model.weight) and not ema.weight.requires_grad and not ema.training
