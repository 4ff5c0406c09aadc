"""Code extraction at batch B gives exactly the codes of the official one-image forward
(FoundationVision/LlamaGen autoregressive/train/extract_codes_c2i.py encodes one image's views per
forward): for the demo digits with a random VQ-debug tokenizer, and for the official tokenizer's
golden fixture. A differing id is reported with its token and distance margin (`encode_with_margins`).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from autoregressive.train.extract_codes_c2i import encode_image, encode_images, extraction_transform
from dataset.digits import DigitsDataset
from dataset.transforms import with_flip
from tests.extract_helpers import make_vq_ckpt
from tests.golden import golden_dir, load_fixture
from tokenizer.registry import encode, encode_with_margins, get_kind, has_margins, load_tokenizer
from tokenizer.vq_model import VQConfig, VQModel
from utils.checkpoint import load_state_dict_strict

N_IMAGES = 11  # a prime: the batch sizes below other than 1 and 11 do not divide it
BATCH_SIZES = (1, 2, 3, 4, N_IMAGES)
#: (ten_crop, flip) of each extraction setting
VIEWS = {"centre_flip": (False, True), "ten_crop": (True, True), "no_flip": (False, False),
         "ten_crop_no_flip": (True, False)}


# ---------------------------------------------------------------------------------------------
# Comparison with a report of the differing tokens
# ---------------------------------------------------------------------------------------------


def encoded_views(views: torch.Tensor, ten_crop: bool, flip: bool) -> torch.Tensor:
    """(B,V,3,S,S) -> (B*num_aug,3,S,S): the images `encode_images` feeds the tokenizer."""
    if not ten_crop and flip:
        views = torch.stack([with_flip(v) for v in views])
    return views.flatten(0, 1)


def differences(ref: np.ndarray, out: np.ndarray, margins: np.ndarray | None) -> list[str]:
    """One line per token whose id differs: (image, view, token), both ids and that token's margin."""
    lines = []
    for i, v, t in zip(*np.nonzero(ref != out)):
        m = f"{margins[i, v, t]:.3g}" if margins is not None else "n/a"
        lines.append(f"image {i} view {v} token {t}: id {ref[i, v, t]} at batch 1, {out[i, v, t]} batched, margin {m}")
    return lines


def assert_same_codes(vq: torch.nn.Module, views: torch.Tensor, ten_crop: bool, flip: bool, ref: np.ndarray,
                      out: np.ndarray, what: str) -> None:
    """Exact equality of token ids; on a difference the margins (from one forward over all views) say
    whether it is a near-tie that float noise flipped or a real bug."""
    assert out.dtype == np.int64 and out.shape == ref.shape, f"{what}: {out.dtype} {out.shape} != int64 {ref.shape}"
    if np.array_equal(ref, out):
        return
    margins = None
    if has_margins(vq):
        with torch.no_grad():
            _, m = encode_with_margins(vq, encoded_views(views, ten_crop, flip))
        margins = m.reshape(ref.shape).float().numpy()
    lines = differences(ref, out, margins)
    pytest.fail(f"{what}: {len(lines)} token id(s) differ between batch 1 and batched:\n  " + "\n  ".join(lines[:20]))


def one_at_a_time(vq: torch.nn.Module, views: torch.Tensor, ten_crop: bool, flip: bool) -> np.ndarray:
    return np.concatenate([encode_image(vq, v, ten_crop, flip) for v in views])


def batched(vq: torch.nn.Module, views: torch.Tensor, ten_crop: bool, flip: bool, b: int) -> np.ndarray:
    return np.concatenate([encode_images(vq, views[i:i + b], ten_crop, flip) for i in range(0, len(views), b)])


def test_differences_name_the_token_and_its_margin():
    """The failure report is not vacuous: a changed id is located and its margin printed."""
    ref = np.zeros((2, 3, 4), dtype=np.int64)
    out = ref.copy()
    out[1, 2, 3] = 7
    margins = np.full(ref.shape, 0.5, dtype=np.float32)
    margins[1, 2, 3] = 2.5e-7
    assert differences(ref, out, margins) == ["image 1 view 2 token 3: id 0 at batch 1, 7 batched, margin 2.5e-07"]
    assert differences(ref, ref, margins) == []


# ---------------------------------------------------------------------------------------------
# The demo digits, a random VQ-debug tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vq_debug(tmp_path_factory):
    path = make_vq_ckpt(tmp_path_factory.mktemp("bex") / "vq.pt", seed=0)
    return load_tokenizer(path, "VQ-debug", codebook_size=64)


@pytest.fixture(scope="module")
def digits():
    data = DigitsDataset("train", image_size=32)
    return [data[i][0] for i in range(N_IMAGES)]


@pytest.mark.parametrize("setting", list(VIEWS))
def test_digits_batched_equals_one_image_at_a_time(vq_debug, digits, setting):
    ten_crop, flip = VIEWS[setting]
    views = torch.stack([extraction_transform(img, 32, ten_crop, 1.1, flip) for img in digits])
    ref = one_at_a_time(vq_debug, views, ten_crop, flip)
    assert ref.shape == (N_IMAGES, (10 if ten_crop else 2) // (1 if flip else 2), 64)
    for b in BATCH_SIZES:
        assert_same_codes(vq_debug, views, ten_crop, flip, ref, batched(vq_debug, views, ten_crop, flip, b),
                          f"{setting}, batch {b}")


def test_margins_helper(vq_debug, digits):
    """Codes as `encode` gives them; margins >= 0 and equal to the gap between the two nearest
    codes computed independently (torch.cdist on the normalised latent and codebook)."""
    x = torch.stack([extraction_transform(img, 32, False, 1.1) for img in digits]).flatten(0, 1)
    with torch.no_grad():
        idx, margins = encode_with_margins(vq_debug, x)
        assert torch.equal(idx, encode(vq_debug, x))
        z = torch.nn.functional.normalize(vq_debug.latent(x).permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
        d = torch.cdist(z.double(), vq_debug.quantize.codebook().double()) ** 2
    two = d.topk(2, dim=1, largest=False).values
    assert margins.shape == idx.shape == (N_IMAGES, 64) and margins.dtype == torch.float32
    assert (margins >= 0).all()
    torch.testing.assert_close(margins.flatten().double(), two[:, 1] - two[:, 0], atol=2e-6, rtol=0)


def test_margins_only_for_single_scale_vq():
    assert get_kind("vq").has_margins and not get_kind("msvq").has_margins
    with pytest.raises(NotImplementedError, match="LlamaGen VQ"):
        get_kind("msvq").encode_with_margins(torch.nn.Module(), torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------
# The official tokenizer's golden fixture (FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py)
# ---------------------------------------------------------------------------------------------


def vq_fixture_files() -> list:
    files = sorted((golden_dir() / "llamagen_vq").glob("*.pt"))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no fixtures under {golden_dir() / 'llamagen_vq'}"))]
    return [pytest.param(str(f), id=f.stem) for f in files]


def fixture_model(fx: dict) -> VQModel:
    model = VQModel(VQConfig(**fx["config"]))
    load_state_dict_strict(model, fx["state_dict"], what="fixture")
    return model.eval()


@pytest.mark.parametrize("path", vq_fixture_files())
def test_golden_batched_equals_one_image_at_a_time(path):
    fx = load_fixture(path)
    cases = {c["name"]: c for c in fx["cases"]}
    vq = fixture_model(fx)
    margin_views = []

    # Centre crop + flip, and no flip: the fixture's normalised images (the flip case's first).
    x = torch.cat([cases["extract_codes_flip"]["inputs"]["x"], cases["encode"]["inputs"]["x"]])[:, None]
    for ten_crop, flip in ((False, True), (False, False)):
        ref = one_at_a_time(vq, x, ten_crop, flip)
        assert_same_codes(vq, x, ten_crop, flip, ref, encode_images(vq, x, ten_crop, flip),
                          f"fixture images, flip={flip}, batch {len(x)}")
        margin_views.append(encoded_views(x, ten_crop, flip))
        if flip:  # the official loop's (1, 2, N) file of the flip case's image
            assert np.array_equal(ref[:1], cases["extract_codes_flip"]["outputs"]["codes"].numpy())
        else:  # model.encode of the encode case's two images
            assert np.array_equal(ref[1:].reshape(-1), cases["encode"]["outputs"]["indices"].numpy())

    # Ten-crop from the fixture's uint8 image, plus two rearrangements of it to make a batch of 3.
    inp = cases["extract_codes_ten_crop"]["inputs"]
    img = Image.fromarray(inp["image_hwc_uint8"].numpy())
    imgs = [img, img.transpose(Image.Transpose.ROTATE_90), img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    crops = torch.stack([extraction_transform(im, inp["image_size"], True, inp["crop_range"]) for im in imgs])
    ref = one_at_a_time(vq, crops, True, True)
    for b in (2, 3):
        assert_same_codes(vq, crops, True, True, ref, batched(vq, crops, True, True, b), f"fixture ten-crop, batch {b}")
    assert np.array_equal(ref[:1], cases["extract_codes_ten_crop"]["outputs"]["codes"].numpy())
    margin_views.append(crops[0])

    # The helper's margins agree with the fixture's own record of its smallest margin (all cases' positions).
    notes = fx.get("notes", {})
    if "min_nearest_code_margin" in notes:
        _, m = encode_with_margins(vq, torch.cat(margin_views))
        assert m.min().item() == pytest.approx(notes["min_nearest_code_margin"], rel=1e-3)
