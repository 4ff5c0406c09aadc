"""Code extraction: 2 ranks equal 1 rank; a killed run resumes with only what was missing; bad input is
one clear error or one counted skip with nothing written half; ten-crop files and metadata."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive.train.extract_codes_c2i import ExtractError, main
from dataset.codes import META_FILE, MANIFEST_FILE
from dataset.image_folder import DatasetError, ImageFolderSafe
from dataset.transforms import center_crop_tensor, ten_crop_tensor, with_flip
from tests.extract_helpers import ROOT, extract_args, extract_flags, make_image_folder, make_vq_ckpt
from tests.torchrun import torchrun
from tokenizer.loading import load_vq, tokenizer_identity
from utils.checkpoint import CheckpointError, save_checkpoint

N_IMAGES = 48  # 3 classes x 16 digits


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("extract")
    make_vq_ckpt(d / "vq.pt", seed=0)
    make_vq_ckpt(d / "vq_other.pt", seed=1)
    make_image_folder(d / "imgs", classes=3, per_class=16, cache=d / "all")
    make_image_folder(d / "small", classes=2, per_class=3, cache=d / "all")
    main(extract_args(d / "imgs", d / "ref", d / "vq.pt"))  # the uninterrupted single-process reference
    return d


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def code_files(code_path: Path, name: str = "folder32") -> dict[str, np.ndarray]:
    out = {}
    for kind in ("codes", "labels"):
        for p in (code_path / f"{name}_{kind}").glob("*.npy"):
            out[f"{kind}/{p.name}"] = np.load(p)
    return out


def assert_same_files(a: Path, b: Path) -> None:
    fa, fb = code_files(a), code_files(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == np.int64 and fa[k].shape == fb[k].shape and np.array_equal(fa[k], fb[k]), k


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Layout, DDP equality, resume
# ---------------------------------------------------------------------------------------------


def test_reference_layout_and_codes(env):
    files = code_files(env / "ref")
    assert len(files) == 2 * N_IMAGES
    assert all(files[f"codes/{k}.npy"].shape == (1, 2, 64) for k in range(N_IMAGES))
    data = ImageFolderSafe(env / "imgs")
    vq = load_vq(env / "vq.pt", "VQ-debug", 64)
    for k in (0, 17, N_IMAGES - 1):  # [x, flip(x)] of the ADM centre crop, label = class index
        img, label, _ = data[k]
        expect = vq.encode_to_indices(with_flip(center_crop_tensor(img, 32))).reshape(1, 2, 64)
        assert np.array_equal(files[f"codes/{k}.npy"], expect.numpy())
        assert files[f"labels/{k}.npy"].tolist() == [label]
    manifest = json.loads((env / "ref" / "folder32_codes" / MANIFEST_FILE).read_text())
    assert manifest["complete"] and manifest["codes_present"] == N_IMAGES and manifest["skipped"] == []


def test_torchrun_two_ranks_equal_one_process(env):
    out = env / "ddp"
    cmd = [*torchrun(2), "autoregressive/train/extract_codes_c2i.py", *extract_flags(env / "imgs", out, env / "vq.pt")]
    res = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_files(env / "ref", out)  # exactly N_IMAGES files each: no padding duplicates
    manifest = json.loads((out / "folder32_codes" / MANIFEST_FILE).read_text())
    assert manifest["world_size"] == 2 and manifest["written_this_run"] == N_IMAGES and manifest["complete"]


def test_killed_run_resumes_only_what_was_missing(env):
    out = env / "killed"
    labels = out / "folder32_labels"
    cmd = [sys.executable, "autoregressive/train/extract_codes_c2i.py",
           *extract_flags(env / "imgs", out, env / "vq.pt")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while proc.poll() is None:  # no wall-clock limit: a slow machine only waits longer
            if labels.is_dir() and len(list(labels.glob("*.npy"))) >= 4:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(labels.glob("*.npy")))
    assert 4 <= done < N_IMAGES, f"the run was not interrupted midway ({done} of {N_IMAGES} finished)"
    assert not (out / "folder32_codes" / MANIFEST_FILE).exists()
    before = {k: v for k, v in stamps(out).items() if k.endswith(".npy") and (out / "folder32_labels" /
              Path(k).name).exists()}

    manifest = main(extract_args(env / "imgs", out, env / "vq.pt"))
    assert manifest["already_present"] == done and manifest["written_this_run"] == N_IMAGES - done
    after = stamps(out)
    assert all(after[k] == v for k, v in before.items()), "a finished file was rewritten"
    assert not [k for k in after if k.endswith(".tmp")]
    assert_same_files(env / "ref", out)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error or one counted skip, nothing written half
# ---------------------------------------------------------------------------------------------


def test_corrupt_image_is_counted_and_skipped(env, tmp_path):
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=3, cache=env / "all")
    (data / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    manifest = main(extract_args(data, tmp_path / "codes", env / "vq.pt"))
    bad = [{"index": 6, "path": str(data / "1" / "broken.png")}]  # class 1 sorts after 00xxx.png
    assert manifest["skipped"] == bad and manifest["codes_present"] == 6 and manifest["complete"]
    written = sorted(p.name for p in (tmp_path / "codes" / "folder32_labels").glob("*.npy"))
    assert written == [f"{k}.npy" for k in range(6)]
    meta = json.loads((tmp_path / "codes" / "folder32_codes" / META_FILE).read_text())
    assert meta["skipped"] == bad and meta["num_images"] == 7


@pytest.mark.parametrize("layout", ["empty", "no-images", "missing"])
def test_empty_folder_is_refused(env, tmp_path, layout):
    data = tmp_path / "data"
    if layout != "missing":
        data.mkdir()
    if layout == "no-images":
        (data / "cat").mkdir()
        (data / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no class sub-folders|no images|not a folder"):
        main(extract_args(data, tmp_path / "codes", env / "vq.pt"))
    assert not (tmp_path / "codes").exists()


def test_checkpoint_of_another_model_or_size_is_refused(env, tmp_path):
    with pytest.raises(CheckpointError, match="VQ-debug tokenizer, but --vq-model VQ-16"):
        main(extract_args(env / "small", tmp_path / "codes", env / "vq.pt", "--vq-model", "VQ-16"))
    save_checkpoint({"model": {"garbage": torch.zeros(3)}, "step": 1}, tmp_path / "garbage.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        main(extract_args(env / "small", tmp_path / "codes", tmp_path / "garbage.pt", "--vq-model", "VQ-16"))
    save_checkpoint({"hello": "world"}, tmp_path / "nodict.pt")
    with pytest.raises(CheckpointError, match="no weights found"):
        main(extract_args(env / "small", tmp_path / "codes", tmp_path / "nodict.pt"))
    with pytest.raises(CheckpointError, match="--codebook-size 512"):
        main(extract_args(env / "small", tmp_path / "codes", env / "vq.pt", "--codebook-size", "512"))
    assert not (tmp_path / "codes").exists()


def test_wrong_image_size_is_refused_from_the_command_line(env, tmp_path):
    flags = extract_flags(env / "small", tmp_path / "codes", env / "vq.pt")
    flags[flags.index("--image-size") + 1] = "30"  # VQ-debug downsamples by 4
    res = subprocess.run([sys.executable, "autoregressive/train/extract_codes_c2i.py", *flags], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True)
    assert res.returncode == 2
    assert "error: --image-size 30 is not a multiple of the tokenizer's downsampling factor 4" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "codes").exists()


def test_codes_of_another_tokenizer_or_setting_are_refused(env, tmp_path):
    out = tmp_path / "codes"
    main(extract_args(env / "small", out, env / "vq.pt"))
    before = stamps(out)
    with pytest.raises(ExtractError, match="refusing to add codes.*\n.*tokenizer: there weights sha256"):
        main(extract_args(env / "small", out, env / "vq_other.pt"))
    with pytest.raises(ExtractError, match="ten_crop: there False; this run True"):
        main(extract_args(env / "small", out, env / "vq.pt", "--ten-crop"))
    with pytest.raises(ExtractError, match="image_size: there 32; this run 64"):
        main(extract_args(env / "small", out, env / "vq.pt", "--image-size", "64"))
    with pytest.raises(ExtractError, match="num_images: there 6; this run 48"):
        main(extract_args(env / "imgs", out, env / "vq.pt"))
    assert stamps(out) == before and sorted(p.name for p in out.iterdir()) == ["folder32_codes", "folder32_labels"]
    # Codes that carry no record of their tokenizer (e.g. the official extraction's) are not added to.
    (out / "folder32_codes" / META_FILE).unlink()
    with pytest.raises(ExtractError, match="without codes_meta.json"):
        main(extract_args(env / "small", out, env / "vq.pt"))


# ---------------------------------------------------------------------------------------------
# Ten-crop
# ---------------------------------------------------------------------------------------------


def test_ten_crop_files_and_metadata(env, tmp_path):
    out = tmp_path / "codes_ten_crop"
    manifest = main(extract_args(env / "small", out, env / "vq.pt", "--ten-crop", "--crop-range", "1.1"))
    assert manifest["complete"] and manifest["codes_present"] == 6
    codes = np.load(out / "folder32_codes" / "4.npy")
    assert codes.shape == (1, 10, 64) and codes.dtype == np.int64
    vq = load_vq(env / "vq.pt", "VQ-debug", 64)
    img, label, _ = ImageFolderSafe(env / "small")[4]
    assert np.array_equal(codes, vq.encode_to_indices(ten_crop_tensor(img, 32, 1.1)).reshape(1, 10, 64).numpy())
    assert np.load(out / "folder32_labels" / "4.npy").tolist() == [label] == [1]
    meta = json.loads((out / "folder32_codes" / META_FILE).read_text())
    assert meta["ten_crop"] is True and meta["crop_range"] == 1.1 and meta["num_aug"] == 10
    assert meta["num_tokens"] == 64 and meta["image_size"] == 32 and meta["num_images"] == 6
    assert meta["class_to_idx"] == {"0": 0, "1": 1}
    assert json.loads((out / "folder32_codes" / "class_to_idx.json").read_text()) == {"0": 0, "1": 1}
    ident = tokenizer_identity(vq, "vq.pt")
    assert meta["tokenizer"]["weights_sha256"] == ident["weights_sha256"]
    assert meta["tokenizer"]["config"] == json.loads(json.dumps(ident["config"]))
    with pytest.raises(ExtractError, match="crop_range: there 1.1; this run 1.05"):
        main(extract_args(env / "small", out, env / "vq.pt", "--ten-crop", "--crop-range", "1.05"))


def test_no_flip_encodes_the_views_as_they_are(env, tmp_path):
    """--no-flip (digits: a mirror changes the shape) halves the views and is recorded and checked."""
    out = tmp_path / "codes_no_flip"
    main(extract_args(env / "small", out, env / "vq.pt", "--no-flip"))
    codes = np.load(out / "folder32_codes" / "4.npy")
    assert codes.shape == (1, 1, 64)
    vq = load_vq(env / "vq.pt", "VQ-debug", 64)
    img, _, _ = ImageFolderSafe(env / "small")[4]
    assert np.array_equal(codes[0], vq.encode_to_indices(center_crop_tensor(img, 32)).numpy())
    meta = json.loads((out / "folder32_codes" / META_FILE).read_text())
    assert meta["flip"] is False and meta["num_aug"] == 1
    with pytest.raises(ExtractError, match="flip: there False; this run True"):
        main(extract_args(env / "small", out, env / "vq.pt"))
    ten = main(extract_args(env / "small", tmp_path / "ten", env / "vq.pt", "--ten-crop", "--no-flip"))
    assert ten["complete"] and np.load(tmp_path / "ten" / "folder32_codes" / "4.npy").shape == (1, 5, 64)
