"""The tokenizer registry (`tokenizer/registry.py`): each kind builds, round-trips a checkpoint through
`load_tokenizer`, reports its identity and code length, encodes and decodes, and refuses a checkpoint
of the other kind with the `--vq-model` to pass; a third kind registered in the dict reaches every
driver's `--vq-model` choices and runs through code extraction without a driver change."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset.codes import CodesError
from tokenizer import registry
from tokenizer.kind import TokenizerKind
from utils.checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict, save_checkpoint, state_dict_sha256

#: A tiny tokenizer of each kind: (kind, size, build options, image size, codes per image).
TINY = {
    "vq": ("VQ-debug", dict(codebook_size=32, codebook_embed_dim=4), 32, 64),
    "msvq": ("MSVQ-debug", dict(codebook_size=32, codebook_embed_dim=4, patch_nums="1_2_4_8"), 32, 1 + 4 + 16 + 64),
}


def tiny(kind_name: str, tmp_path: Path, seed: int = 0) -> tuple[nn.Module, Path]:
    """A fresh tiny tokenizer of a kind, saved as our tokenizer training saves it."""
    size, opts, image_size, _ = TINY[kind_name]
    kind = registry.get_kind(kind_name)
    torch.manual_seed(seed)
    model = kind.build(size, image_size=image_size, **opts).eval()
    path = save_checkpoint({"model": model.state_dict(), "vq_model": size, kind.config_key: kind.config(model)},
                           tmp_path / f"{kind_name}-{seed}.pt")
    return model, path


@pytest.mark.parametrize("kind_name", sorted(TINY))
def test_each_kind_builds_round_trips_and_reports_its_codes(kind_name, tmp_path):
    size, opts, image_size, length = TINY[kind_name]
    kind = registry.get_kind(kind_name)
    model, path = tiny(kind_name, tmp_path)
    assert registry.kind_of_size(size) is kind and registry.kind_of_model(model) is kind
    assert registry.detect_kind(load_checkpoint(path)) is kind

    for loaded in (registry.load_tokenizer(path, size), registry.load_tokenizer(path)):  # by size, by detection
        assert type(loaded) is type(model) and not loaded.training
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
        assert registry.identity(loaded, "x.pt") == registry.identity(model, "x.pt")
    ident = registry.identity(model, "x.pt")
    assert ident["weights_sha256"] == kind.identity(model, "x.pt")["weights_sha256"] and ident["source"] == "x.pt"
    assert json.loads(json.dumps(ident["config"])) == ident["config"]  # stored as JSON beside the codes
    assert registry.codebook(model) == (opts["codebook_size"], opts["codebook_embed_dim"])

    x = torch.rand(2, 3, image_size, image_size) * 2 - 1
    codes = registry.encode(model, x)
    assert codes.shape == (2, length) == (2, registry.code_length(model, image_size)) and codes.dtype == torch.int64
    assert int(codes.max()) < opts["codebook_size"]
    side = image_size // model.downsample
    assert registry.decode(model, codes, (side, side)).shape == x.shape

    # What training records under config_key stands for the flags it was built with.
    flags = kind.recorded_flags(load_checkpoint(path))
    assert flags["vq_model"] == size and flags["codebook_size"] == opts["codebook_size"]
    assert flags["codebook_embed_dim"] == opts["codebook_embed_dim"] and set(flags) == {"vq_model", *kind.arch_flags}
    rebuilt = kind.build_recorded(load_checkpoint(path)[kind.config_key], image_size=image_size)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("kind_name,other", [("vq", "msvq"), ("msvq", "vq")])
def test_a_checkpoint_of_the_other_kind_is_refused_clearly(kind_name, other, tmp_path):
    _, path = tiny(other, tmp_path)
    found = registry.get_kind(other)
    with pytest.raises(CheckpointError, match=f"is {found.title}, not a {TINY[kind_name][0]}: pass --vq-model "
                                              f"{' or '.join(found.sizes)}"):
        registry.load_tokenizer(path, TINY[kind_name][0])
    with pytest.raises(CheckpointError):  # a strategy's kind: the kind's own refusal
        registry.load_tokenizer(path, kind=kind_name)
    with pytest.raises(ValueError, match="is not a size of"):
        registry.load_tokenizer(path, TINY[other][0], kind=kind_name)


def test_unknown_names_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="known kinds: vq, msvq"):
        registry.get_kind("nope")
    with pytest.raises(ValueError, match="unknown --vq-model"):
        registry.kind_of_size("VQ-1")
    save_checkpoint({"model": {"w": torch.zeros(2)}}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="no tokenizer of a known kind"):
        registry.load_tokenizer(tmp_path / "odd.pt")
    model, path = tiny("vq", tmp_path)
    with pytest.raises(ValueError, match="downsamples by 4, but --downsample-size is 16"):
        registry.load_tokenizer(path, "VQ-debug", downsample=16)


def test_codes_of_another_tokenizer_are_refused(tmp_path):
    model, _ = tiny("msvq", tmp_path)
    other, _ = tiny("msvq", tmp_path, seed=1)
    codes_dir = tmp_path / "folder32_codes"
    registry.check_codes(model, codes_dir)  # no folder: nothing to check
    codes_dir.mkdir()
    (codes_dir / "codes_meta.json").write_text(json.dumps({"tokenizer": registry.identity(model, "a.pt")}))
    registry.check_codes(model, codes_dir, "a.pt")
    with pytest.raises(CodesError, match="made by another tokenizer"):
        registry.check_codes(other, codes_dir, "b.pt")


def test_every_strategy_names_a_registered_kind():
    from autoregressive.strategies import STRATEGIES

    for name, cls in STRATEGIES.items():
        assert registry.get_kind(cls.tokenizer_kind).name == cls.tokenizer_kind, name


# ---------------------------------------------------------------------------------------------
# A third kind: one class and one dict entry, no driver change
# ---------------------------------------------------------------------------------------------


class PoolTokenizer(nn.Module):
    """Codes = the grey level of each 4x4 cell, quantised to `levels` steps (a learnable offset)."""

    downsample = 4

    def __init__(self, levels: int = 8):
        super().__init__()
        self.levels = levels
        self.offset = nn.Parameter(torch.zeros(()))

    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        grey = F.avg_pool2d(x.mean(1, keepdim=True), self.downsample) + self.offset  # (B, 1, h, w) in [-1, 1]
        return ((grey + 1) / 2 * self.levels).long().clamp(0, self.levels - 1).flatten(1)

    def decode_indices(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        side = int(codes.shape[1] ** 0.5)
        grey = (codes.float() + 0.5) / self.levels * 2 - 1 - self.offset
        return F.interpolate(grey.reshape(-1, 1, side, side), scale_factor=self.downsample).repeat(1, 3, 1, 1)


class PoolKind(TokenizerKind):
    name, title, model_class, config_key = "pool", "a pooling tokenizer", PoolTokenizer, "pool_config"
    sizes = {"POOL-8": 8}
    arch_flags = ("codebook_size",)

    def build(self, size, *, codebook_size, codebook_embed_dim, image_size, **options):
        return PoolTokenizer(codebook_size)

    def build_recorded(self, config, *, image_size, **options):
        return PoolTokenizer(config["levels"])

    def build_release(self, codebook_size, patch_nums=None):
        return PoolTokenizer(codebook_size)

    def config(self, model):
        return {"levels": model.levels}

    def flags_from_config(self, config):
        return {"codebook_size": config["levels"]}

    def recognises(self, ckpt):
        return isinstance(ckpt, dict) and self.config_key in ckpt

    def load(self, path, size=None, **options):
        ckpt = load_checkpoint(path)
        model = self.build_recorded(ckpt[self.config_key], image_size=None)
        load_state_dict_strict(model, ckpt["model"], what=str(path))
        return model

    def identity(self, model, source=""):
        return {"config": {**self.config(model), "codebook_size": model.levels},
                "weights_sha256": state_dict_sha256(model), "source": source}

    def codebook(self, model):
        return model.levels, 1

    def code_length(self, model, image_size):
        return (image_size // model.downsample) ** 2


def vq_model_choices(parser: argparse.ArgumentParser) -> list[str]:
    return next(a for a in parser._actions if a.dest == "vq_model").choices


def test_a_third_kind_reaches_the_drivers_without_touching_them(tmp_path, monkeypatch):
    from autoregressive.sample.common import add_sampling_args
    from autoregressive.train import extract_codes_c2i
    from dataset.digits import digit_to_pil, load_digits_arrays
    from tokenizer import reconstruction_vq_ddp, train_vq

    monkeypatch.setitem(registry.TOKENIZER_KINDS, "pool", PoolKind())
    sampling = argparse.ArgumentParser()
    add_sampling_args(sampling)
    for parser in (train_vq.get_parser(), extract_codes_c2i.build_parser(), reconstruction_vq_ddp.get_parser(),
                   sampling):
        assert "POOL-8" in vq_model_choices(parser) and "VQ-16" in vq_model_choices(parser)
    assert "codebook_size" in registry.arch_flags() and registry.kind_of_size("POOL-8").name == "pool"

    # Code extraction with it: files, length and identity come from the kind.
    images, labels = load_digits_arrays("train")
    folder = tmp_path / "folder"
    for i in range(4):
        (folder / str(labels[i])).mkdir(parents=True, exist_ok=True)
        digit_to_pil(images[i], 32).save(folder / str(labels[i]) / f"{i}.png")
    model = PoolTokenizer(8)
    save_checkpoint({"model": model.state_dict(), "pool_config": {"levels": 8}}, tmp_path / "pool.pt")
    argv = ["--dataset", "folder", "--data-path", str(folder), "--image-size", "32", "--vq-model", "POOL-8",
            "--vq-ckpt", str(tmp_path / "pool.pt"), "--codebook-size", "8", "--codebook-embed-dim", "1",
            "--code-path", str(tmp_path / "codes"), "--num-workers", "0", "--device", "cpu", "--no-flip"]
    manifest = extract_codes_c2i.main(extract_codes_c2i.build_parser().parse_args(argv))
    assert manifest["complete"] and manifest["codes_present"] == 4
    from tests.extract_helpers import read_extracted
    codes = read_extracted(tmp_path / "codes")[0][0]
    assert codes.shape == (1, 64) and codes.max() < 8
    meta = json.loads((tmp_path / "codes" / "folder32_shards" / "codes_meta.json").read_text())
    assert meta["tokenizer"] == registry.identity(model, "pool.pt") and meta["num_tokens"] == 64
