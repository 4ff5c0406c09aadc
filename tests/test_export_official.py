"""scripts/export_official.py: our checkpoints written in each method's official release layout.

Every export loads with plain `torch.load(weights_only=True)`, has the official layout of its
method (`{"model": ...}` or flat), the official key names and shapes (against the key lists of the
releases and the official implementation's own tiny state dicts, the golden fixtures), and our own
loaders read it back to the very weights exported. ARPG-debug's learned absolute positions, which
the official ARPG has no parameter for, are refused with the reason (exit 2)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoregressive import export
from autoregressive.models.arpg import ARPG_SIZES
from autoregressive.strategies import get_strategy
from autoregressive.train import train_c2i
from tests.golden import golden_dir, load_fixture, official_key_files, official_keys
from tests.test_parity_arpg import build_fixture_model as arpg_fixture
from tests.test_parity_gpt import build_fixture_model as gpt_fixture
from tests.test_parity_lpd import build_fixture_model as lpd_fixture
from tests.test_parity_npp import build_fixture_model as npp_fixture
from tests.test_parity_par import build_fixture_model as par_fixture
from tests.test_parity_var import build_fixture as var_fixture
from tests.test_parity_var_vqvae import build_fixture_vqvae
from tests.test_parity_vq import build_fixture_model as vq_fixture
from tokenizer.msvq import MSVQConfig, MultiScaleVQVAE, build_msvq_named, load_msvq_weights, msvq_checkpoint
from tokenizer.registry import get_kind, load_tokenizer
from tokenizer.vq_model import VQ_models
from utils.checkpoint import CheckpointError, save_checkpoint
from utils.run import given_flags

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--image-size", "16", "--downsample-size", "4", "--vocab-size", "64", "--num-classes", "10"]


def randomize(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every float parameter random (the official inits zero some heads), buffers as built."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_like(path: Path, strategy: str, *flags: str, ema: bool = True) -> dict:
    """A checkpoint as train_c2i.py writes it: the model built from the parsed, resolved training flags
    as `build_state` builds it, `args = vars(args)`, and (with `ema`) an EMA that differs from it."""
    parser = train_c2i.build_parser()
    args = parser.parse_args(["--code-path", "unused", "--strategy", strategy, *flags])
    train_c2i.resolve_flags(args, given_flags(parser, args=args))
    s = get_strategy(strategy)
    s.configure(args, training=True)
    train_c2i.hand_over_tokenizer(s, args)
    model = s.build_model(args.gpt_model, **train_c2i.model_kwargs(args), **s.model_config(args))
    ckpt = {"model": randomize(model, 0), "steps": 7, "data_pos": 7, "epoch": 1.0, "args": vars(args),
            "optimizer": {"state": {}, "param_groups": []}}
    if ema:
        ckpt["ema"] = randomize(model, 1)
    save_checkpoint(ckpt, path)
    return ckpt


def vq_trained_like(path: Path, model: torch.nn.Module, size: str) -> dict:
    """A checkpoint as tokenizer/train_vq.py writes it (weights, EMA, size, the kind's config)."""
    kind = get_kind("msvq" if isinstance(model, MultiScaleVQVAE) else "vq")
    ckpt = {"model": randomize(model, 0), "ema": randomize(model, 1), "vq_model": size,
            kind.config_key: kind.config(model), "steps": 3, "args": {"vq_model": size}}
    save_checkpoint(ckpt, path)
    return ckpt


def read_export(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def template(keys) -> set[str]:
    """Key names with every block index replaced by '#': the naming scheme, whatever the depth."""
    return {re.sub(r"\.\d+(?=\.)", ".#", k) for k in keys}


def fixture(method: str, stem: str) -> dict:
    path = golden_dir() / method / f"{stem}.pt"
    if not path.is_file():
        pytest.skip(f"no golden fixture {path}")
    return load_fixture(str(path))


# ---------------------------------------------------------------------------------------------
# The inverse of loading: on the official implementation's own state dicts
# ---------------------------------------------------------------------------------------------

FIXTURES = {  # name -> (method folder, file stem, builder, plugin, state-dict key of the fixture)
    "llamagen_gpt": ("llamagen_gpt", "gpt_tiny", gpt_fixture, lambda: get_strategy("raster"), "state_dict"),
    "par": ("par", "par_tiny", par_fixture, lambda: get_strategy("par"), "state_dict"),
    "npp": ("npp", "npp_tiny", npp_fixture, lambda: get_strategy("npp"), "state_dict"),
    "arpg": ("arpg", "forward", arpg_fixture, lambda: get_strategy("arpg"), "state_dict"),
    "lpd": ("lpd", "forward", lpd_fixture, lambda: get_strategy("lpd"), "state_dict"),
    "var": ("var", "var_tiny", lambda fx: var_fixture(fx)[0], lambda: get_strategy("var"), "state_dict"),
    "llamagen_vq": ("llamagen_vq", "vq_tiny", vq_fixture, lambda: get_kind("vq"), "state_dict"),
    "var_vqvae": ("var_vqvae", "var_vqvae_tiny", build_fixture_vqvae, lambda: get_kind("msvq"), "state_dict"),
}


@pytest.mark.parametrize("name", FIXTURES)
def test_export_of_an_official_state_dict_is_that_state_dict(name):
    """Loaded with `load_official` and exported again, the official tiny state dict comes back key for
    key, shape for shape and value for value (the export is the inverse of loading)."""
    method, stem, build, plugin, key = FIXTURES[name]
    fx = fixture(method, stem)
    out = plugin().official_state_dict(build(fx))
    want = fx[key]
    assert out.keys() == want.keys()
    for k, v in want.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype and torch.equal(out[k], v.contiguous()), k


# ---------------------------------------------------------------------------------------------
# Released sizes: the key lists of the official files
# ---------------------------------------------------------------------------------------------


def release_model(spec: dict):
    """(plugin, meta-device model) of an official_keys file."""
    from autoregressive.models.lpd import LPDConfig
    from autoregressive.strategies.lpd import OFFICIAL_MODELS
    from tokenizer.msvq import build_msvq

    cfg, stem = spec.get("config"), spec["release"]
    gpt = dict(vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1)
    npp = {"c2i_B_256": "GPT-B", "c2i_L_256": "GPT-L", "c2i_XL_256": "GPT-XL", "c2i_XXL_256": "GPT-XXL"}
    with torch.device("meta"):
        method = spec.get("method")
        if method in ("llamagen_gpt", "npp"):
            s = get_strategy("raster" if method == "llamagen_gpt" else "npp")
            return s, s.build_model(npp.get(stem, stem), **gpt)
        if method == "par":
            s = get_strategy("par")
            return s, s.build_model(spec["constructor"].split("'")[1], **{**gpt, "block_size": cfg["block_size"]},
                                    spe_token_num=cfg["spe_token_num"], ar_token_num=cfg["ar_token_num"])
        if method == "arpg":
            s = get_strategy("arpg")
            return s, s.build_model(spec["gpt_model"], **gpt)
        if method == "lpd":
            s, c = get_strategy("lpd"), LPDConfig.from_official(cfg)
            return s, s.build_model(OFFICIAL_MODELS[spec["factory"].rsplit(".", 1)[1]], vocab_size=c.vocab_size,
                                    block_size=c.block_size, num_classes=c.num_classes)
        if method == "llamagen_vq":
            name = "VQ-16" if cfg["encoder_ch_mult"] == [1, 1, 2, 2, 4] else "VQ-8"
            return get_kind("vq"), VQ_models[name](codebook_size=16384, codebook_embed_dim=8)
        if stem.startswith("var_d"):
            s, vae = get_strategy("var"), spec["vae_config"]
            return s, s.build_model(stem.replace("var_d", "VAR-d"), shared_aln=cfg["shared_aln"],
                                    patch_nums=cfg["patch_nums"], vocab_size=vae["vocab_size"], Cvae=vae["z_channels"])
        if stem == "vae_ch160v4096z32":
            c = MSVQConfig.from_official(spec["config"])
            return get_kind("msvq"), build_msvq(vocab_size=c.vocab_size, z_channels=c.z_channels, ch=c.ch,
                                                v_patch_nums=c.v_patch_nums)
    raise AssertionError(f"no builder for {stem}")


@pytest.mark.parametrize("path", [p for prefix in ("llamagen", "par_", "npp_", "arpg_", "lpd_", "var_d", "vae_")
                                  for p in official_key_files(prefix)])
def test_export_at_every_released_size_has_the_official_keys_and_layout(path):
    spec = official_keys(path)
    plugin, model = release_model(spec)
    out = plugin.official_state_dict(model)
    assert {k: list(v.shape) for k, v in out.items()} == spec["keys"]
    flat = spec["release"].startswith(("var_d", "vae_"))  # VAR's releases are bare state dicts
    assert plugin.official_layout == ("flat" if flat else "model")


# ---------------------------------------------------------------------------------------------
# End to end: our training checkpoints -> official files
# ---------------------------------------------------------------------------------------------


def export_cli(ckpt: Path, out: Path, *flags: str) -> export.Exported:
    return export.main(export.build_parser().parse_args([str(ckpt), "--out", str(out), *flags]))


GPT_CASES = {  # strategy, size, flags; the golden fixture whose key naming the export must follow
    "raster": ("GPT-debug", [], ("llamagen_gpt", "gpt_tiny")),
    "par": ("GPT-debug", [], ("par", "par_tiny")),
    "npp": ("GPT-debug", [], ("npp", "npp_tiny")),
    "lpd": ("LPD-debug", [], ("lpd", "forward")),
}


@pytest.mark.parametrize("strategy", GPT_CASES)
def test_gpt_debug_exports_load_officially_and_back(strategy, tmp_path, capsys):
    size, flags, (method, stem) = GPT_CASES[strategy]
    src = trained_like(tmp_path / "ckpt.pt", strategy, "--gpt-model", size, *SMALL, *flags)
    for use_ema in (False, True):
        out = tmp_path / f"export-{use_ema}.pt"
        done = export_cli(tmp_path / "ckpt.pt", out, *(["--ema"] if use_ema else []))
        assert done.weights == ("ema" if use_ema else "model") and done.layout == "model"
        obj = read_export(out)
        assert list(obj) == ["model"]  # the official layout: {"model": state_dict}, nothing else
        want = src["ema" if use_ema else "model"]
        assert_same_weights(obj["model"], want)
        # the official naming scheme (the official implementation's tiny state dict), and our loader
        assert template(obj["model"]) == template(fixture(method, stem)["state_dict"])
        s = get_strategy(strategy)
        back = s.load_model(out, size, vocab_size=64, block_size=16, num_classes=10, **(
            dict(spe_token_num=3, ar_token_num=4) if strategy == "par" else {}))
        assert_same_weights(back.state_dict(), want)
    assert "official reader" in capsys.readouterr().out


def test_arpg_at_the_released_width_exports_the_official_keys(tmp_path, monkeypatch):
    """ARPG-L's width, vocabulary and classes at depth 2: every key and shape of the released
    arpg_300m.pt's list for the blocks it has, and nothing else."""
    spec_path = golden_dir() / "official_keys" / "arpg_l.json"
    if not spec_path.is_file():
        pytest.skip(f"no {spec_path}")
    spec = json.loads(spec_path.read_text())
    monkeypatch.setitem(ARPG_SIZES, "ARPG-L-depth2", {**ARPG_SIZES["ARPG-L"], "n_layer": 2})
    src = trained_like(tmp_path / "ckpt.pt", "arpg", "--gpt-model", "ARPG-L-depth2", "--image-size", "256",
                       "--downsample-size", "16", "--vocab-size", "16384", "--num-classes", "1000", ema=False)
    export_cli(tmp_path / "ckpt.pt", tmp_path / "arpg.pt")
    obj = read_export(tmp_path / "arpg.pt")
    assert list(obj) == ["model"]
    kept = {k: v for k, v in spec["keys"].items() if not re.search(r"_dec\.[1-9]\d*\.", k)}
    assert {k: list(v.shape) for k, v in obj["model"].items()} == kept
    assert_same_weights(obj["model"], src["model"])
    back = get_strategy("arpg").load_model(tmp_path / "arpg.pt", "ARPG-L-depth2", vocab_size=16384, block_size=256,
                                           num_classes=1000)
    assert_same_weights(back.state_dict(), src["model"])


@pytest.fixture
def msvq_ckpt(tmp_path) -> tuple[Path, dict, MultiScaleVQVAE]:
    torch.manual_seed(0)
    model = build_msvq_named("MSVQ-debug", 64, 8, 32, "1_2_4_8")
    src = vq_trained_like(tmp_path / "vae.pt", model, "MSVQ-debug")
    return tmp_path / "vae.pt", src, model


def test_var_debug_exports_a_flat_state_dict(tmp_path, msvq_ckpt):
    vae_path, _, _ = msvq_ckpt
    src = trained_like(tmp_path / "var.pt", "var", "--gpt-model", "VAR-debug", "--image-size", "32",
                       "--downsample-size", "4", "--vocab-size", "64", "--num-classes", "10", "--pn", "1_2_4_8",
                       "--vae-ckpt", str(vae_path))
    for use_ema in (False, True):
        out = tmp_path / f"var_d-{use_ema}.pth"
        assert export_cli(tmp_path / "var.pt", out, *(["--ema"] if use_ema else [])).layout == "flat"
        obj = read_export(out)
        want = src["ema" if use_ema else "model"]
        assert_same_weights(obj, want)  # flat: the keys are the weights, no wrapper
        assert template(obj) == template(fixture("var", "var_tiny")["state_dict"])
        s = get_strategy("var")
        s.use_tokenizer(load_tokenizer(vae_path, kind="msvq"))
        assert_same_weights(s.load_model(out, "VAR-debug", num_classes=10).state_dict(), want)


def test_var_vqvae_export_is_a_flat_state_dict_with_notes(tmp_path, msvq_ckpt, capsys):
    vae_path, src, model = msvq_ckpt
    done = export_cli(vae_path, tmp_path / "vae_ch32.pth", "--ema")
    obj = read_export(tmp_path / "vae_ch32.pth")
    assert done.layout == "flat" and all(isinstance(v, torch.Tensor) for v in obj.values())
    assert_same_weights(obj, src["ema"])
    assert template(obj) <= template(fixture("var_vqvae", "var_vqvae_tiny")["state_dict"])
    again = MultiScaleVQVAE(MSVQConfig(**{**src["msvq_config"], "v_patch_nums": tuple(src["msvq_config"]["v_patch_nums"])}))
    load_msvq_weights(again, obj, what="export")  # strict
    assert_same_weights(again.state_dict(), src["ema"])
    # MSVQ-debug is smaller than the official VQVAE's hard-coded layout: said, not hidden
    assert "note: ch_mult=(1, 2, 2)" in capsys.readouterr().out


def test_llamagen_vq_export_is_under_model(tmp_path):
    torch.manual_seed(0)
    model = VQ_models["VQ-debug"](codebook_size=64)
    src = vq_trained_like(tmp_path / "vq.pt", model, "VQ-debug")
    done = export_cli(tmp_path / "vq.pt", tmp_path / "vq_debug.pt")
    obj = read_export(tmp_path / "vq_debug.pt")
    assert done.layout == "model" and list(obj) == ["model"]
    assert_same_weights(obj["model"], src["model"])
    assert template(obj["model"]) <= template(json.loads(
        (golden_dir() / "official_keys" / "llamagen_vq_ds16_c2i.json").read_text())["keys"]) | template(
        fixture("llamagen_vq", "vq_tiny")["state_dict"])
    back = load_tokenizer(tmp_path / "vq_debug.pt", "VQ-debug", codebook_size=64, codebook_embed_dim=8)
    assert_same_weights(back.state_dict(), src["model"])


def test_arpg_debug_is_refused_with_the_reason(tmp_path):
    trained_like(tmp_path / "arpg.pt", "arpg", "--gpt-model", "ARPG-debug", *SMALL, ema=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("AR_DEBUG", None)
    res = subprocess.run([sys.executable, "scripts/export_official.py", str(tmp_path / "arpg.pt"), "--out",
                          str(tmp_path / "out.pt")], cwd=ROOT, env=env, capture_output=True, text=True)
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "pos_embed" in errors[0] and "hp-l33/ARPG" in errors[0]
    assert not (tmp_path / "out.pt").exists()


def test_no_ema_and_foreign_files_are_refused(tmp_path):
    trained_like(tmp_path / "gpt.pt", "raster", "--gpt-model", "GPT-debug", *SMALL, ema=False)
    with pytest.raises(CheckpointError, match="no EMA"):
        export.export_official(tmp_path / "gpt.pt", tmp_path / "out.pt", ema=True)
    with pytest.raises(ValueError, match="the checkpoint being exported"):
        export.export_official(tmp_path / "gpt.pt", tmp_path / "gpt.pt")
    save_checkpoint({"model": {"w": torch.zeros(1)}}, tmp_path / "release.pt")  # an official-style file
    with pytest.raises(CheckpointError, match="train_c2i.py"):
        export.export_official(tmp_path / "release.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
