"""Code extraction: both layouts (packed shards, the official per-image files); batches of images give the
codes of one image per forward; 2 ranks equal 1 rank; a killed run resumes with only what was missing; bad
input is one clear error or one counted skip with nothing written half; ten-crop files and metadata."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive.train.extract_codes_c2i import ExtractError, main
from dataset.codes import META_FILE, MANIFEST_FILE
from dataset.image_folder import DatasetError, ImageFolderSafe
from dataset.transforms import center_crop_tensor, ten_crop_tensor, with_flip
from tests.extract_helpers import ROOT, extract_args, extract_flags, make_image_folder, make_vq_ckpt, read_extracted
from tests.torchrun import torchrun
from tokenizer.loading import load_vq, tokenizer_identity
from utils.checkpoint import CheckpointError, save_checkpoint

N_IMAGES = 48  # 3 classes x 16 digits
OFFICIAL = ("--layout", "official", "--batch-size", "1")  # what LlamaGen's extraction does
PACKED = ("--shard-size", "10")  # 5 shards of the 48 images, the last one short


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("extract")
    make_vq_ckpt(d / "vq.pt", seed=0)
    make_vq_ckpt(d / "vq_other.pt", seed=1)
    make_image_folder(d / "imgs", classes=3, per_class=16, cache=d / "all")
    make_image_folder(d / "small", classes=2, per_class=3, cache=d / "all")
    # The uninterrupted single-process references: one image per forward, and packed batches of 8.
    main(extract_args(d / "imgs", d / "ref_official", d / "vq.pt", *OFFICIAL))
    main(extract_args(d / "imgs", d / "ref", d / "vq.pt", *PACKED))
    return d


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def shard_members(code_path: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted((code_path / "folder32_shards").glob("shard_*.npz")):
        with np.load(p) as f:
            out.update({f"{p.name}/{k}": f[k] for k in f.files})
    return out


def assert_same_extraction(a: Path, b: Path) -> None:
    ca, cb = read_extracted(a), read_extracted(b)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        assert ca[k][1] == cb[k][1] and np.array_equal(ca[k][0], cb[k][0]), k


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Layouts, batching, DDP equality, resume
# ---------------------------------------------------------------------------------------------


def test_official_layout_and_codes(env):
    codes = read_extracted(env / "ref_official")
    assert len(codes) == N_IMAGES and all(c.shape == (2, 64) for c, _ in codes.values())
    assert np.load(env / "ref_official" / "folder32_codes" / "0.npy").shape == (1, 2, 64)
    data = ImageFolderSafe(env / "imgs")
    vq = load_vq(env / "vq.pt", "VQ-debug", 64)
    for k in (0, 17, N_IMAGES - 1):  # [x, flip(x)] of the ADM centre crop, label = class index
        img, label, _ = data[k]
        expect = vq.encode_to_indices(with_flip(center_crop_tensor(img, 32))).reshape(2, 64)
        assert np.array_equal(codes[k][0], expect.numpy()) and codes[k][1] == label
    manifest = json.loads((env / "ref_official" / "folder32_codes" / MANIFEST_FILE).read_text())
    assert manifest["complete"] and manifest["codes_present"] == N_IMAGES and manifest["skipped"] == []


def test_packed_layout_holds_the_codes_of_one_image_per_forward(env):
    """Batches of 8 images (16 views) per forward give exactly the official batch-1 codes."""
    assert_same_extraction(env / "ref", env / "ref_official")
    folder = env / "ref" / "folder32_shards"
    shards = sorted(p.name for p in folder.glob("shard_*.npz"))
    assert shards == [f"shard_{j:06d}.npz" for j in range(5)]
    with np.load(folder / "shard_000004.npz") as f:
        assert f["codes"].dtype == np.uint8 and f["codes"].shape == (8, 2, 64)  # 64 codes fit a byte
        assert f["indices"].tolist() == list(range(40, 48)) and f["labels"].dtype == np.int64
        settings = json.loads(str(f["settings"]))
    assert (settings["shard"], settings["start"], settings["stop"], settings["skipped"]) == (4, 40, 48, [])
    assert settings["tokenizer_sha256"] == tokenizer_identity(load_vq(env / "vq.pt", "VQ-debug", 64))["weights_sha256"]
    with zipfile.ZipFile(folder / "shard_000000.npz") as z:  # stored, so the reader can memory-map codes
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["complete"] and manifest["layout"] == "packed" and manifest["shards"] == shards
    assert manifest["codes_present"] == N_IMAGES and manifest["missing"] == []
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["layout"] == "packed" and meta["shard_size"] == 10
    assert sorted(p.name for p in (env / "ref").iterdir()) == ["folder32_shards"]


@pytest.mark.parametrize("layout", ["packed", "official"])
def test_torchrun_two_ranks_equal_one_process(env, layout):
    out = env / f"ddp_{layout}"
    flags = PACKED if layout == "packed" else OFFICIAL
    cmd = [*torchrun(2), "autoregressive/train/extract_codes_c2i.py",
           *extract_flags(env / "imgs", out, env / "vq.pt", *flags)]
    res = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    if layout == "packed":  # the same shard files, member for member, whatever the number of ranks
        a, b = shard_members(env / "ref"), shard_members(out)
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
        home = out / "folder32_shards"
    else:
        assert_same_extraction(env / "ref_official", out)  # exactly N_IMAGES images: no padding duplicates
        home = out / "folder32_codes"
    manifest = json.loads((home / MANIFEST_FILE).read_text())
    assert manifest["world_size"] == 2 and manifest["written_this_run"] == N_IMAGES and manifest["complete"]


@pytest.mark.parametrize("layout", ["packed", "official"])
def test_killed_batched_run_resumes_only_what_was_missing(env, layout):
    """kill -9 in the middle of a batched run; the rerun loses nothing and duplicates nothing."""
    out = env / f"killed_{layout}"
    flags = ("--batch-size", "2", *(("--shard-size", "4") if layout == "packed" else ("--layout", "official")))
    finished_dir = out / ("folder32_shards" if layout == "packed" else "folder32_labels")
    pattern, units, need = ("shard_*.npz", N_IMAGES // 4, 2) if layout == "packed" else ("*.npy", N_IMAGES, 4)
    cmd = [sys.executable, "autoregressive/train/extract_codes_c2i.py",
           *extract_flags(env / "imgs", out, env / "vq.pt", *flags)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while proc.poll() is None:  # no wall-clock limit: a slow machine only waits longer
            if finished_dir.is_dir() and len(list(finished_dir.glob(pattern))) >= need:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(finished_dir.glob(pattern)))
    assert need <= done < units, f"the run was not interrupted midway ({done} of {units} finished)"
    home = out / ("folder32_shards" if layout == "packed" else "folder32_codes")
    assert not (home / MANIFEST_FILE).exists()
    if layout == "packed":
        before = {k: v for k, v in stamps(out).items() if k.endswith(".npz")}
        images_done = sum(len(np.load(out / k)["indices"]) for k in before)
    else:
        before = {k: v for k, v in stamps(out).items() if k.endswith(".npy") and (out / "folder32_labels" /
                  Path(k).name).exists()}
        images_done = done

    manifest = main(extract_args(env / "imgs", out, env / "vq.pt", *flags))
    assert manifest["already_present"] == images_done and manifest["written_this_run"] == N_IMAGES - images_done
    after = stamps(out)
    assert all(after[k] == v for k, v in before.items()), "a finished file was rewritten"
    assert not [k for k in after if k.endswith(".tmp")]
    assert_same_extraction(env / "ref_official", out)  # read_extracted also refuses an image in two shards
    assert manifest["complete"] and manifest["codes_present"] == N_IMAGES


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error or one counted skip, nothing written half
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["packed", "official"])
def test_corrupt_image_is_counted_and_skipped(env, tmp_path, layout):
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=3, cache=env / "all")
    (data / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    flags = ("--layout", layout, "--batch-size", "3", "--shard-size", "4")
    manifest = main(extract_args(data, tmp_path / "codes", env / "vq.pt", *flags))
    bad = [{"index": 6, "path": str(data / "1" / "broken.png")}]  # class 1 sorts after 00xxx.png
    assert manifest["skipped"] == bad and manifest["codes_present"] == 6 and manifest["complete"]
    assert sorted(read_extracted(tmp_path / "codes")) == list(range(6))
    home = tmp_path / "codes" / ("folder32_shards" if layout == "packed" else "folder32_codes")
    meta = json.loads((home / META_FILE).read_text())
    assert meta["skipped"] == bad and meta["num_images"] == 7
    again = main(extract_args(data, tmp_path / "codes", env / "vq.pt", *flags))  # a rerun keeps the record
    assert again["skipped"] == bad and again["written_this_run"] == 0 and again["complete"]


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
    with pytest.raises(ExtractError, match="shard_size: there 4096; this run 2"):
        main(extract_args(env / "small", out, env / "vq.pt", "--shard-size", "2"))
    # The official layout beside the packed one must agree with it too.
    with pytest.raises(ExtractError, match="folder32_shards was extracted with other settings.*\n.*ten_crop"):
        main(extract_args(env / "small", out, env / "vq.pt", "--layout", "official", "--ten-crop"))
    assert stamps(out) == before and sorted(p.name for p in out.iterdir()) == ["folder32_shards"]
    # Codes that carry no record of their tokenizer (e.g. the official extraction's) are not added to.
    (out / "folder32_shards" / META_FILE).unlink()
    with pytest.raises(ExtractError, match="without codes_meta.json"):
        main(extract_args(env / "small", out, env / "vq.pt"))
    official = tmp_path / "official"
    main(extract_args(env / "small", official, env / "vq.pt", "--layout", "official"))
    (official / "folder32_codes" / META_FILE).unlink()
    with pytest.raises(ExtractError, match="without codes_meta.json"):
        main(extract_args(env / "small", official, env / "vq.pt", "--layout", "official"))


# ---------------------------------------------------------------------------------------------
# Ten-crop
# ---------------------------------------------------------------------------------------------


def test_ten_crop_files_and_metadata(env, tmp_path):
    out = tmp_path / "codes_ten_crop"
    manifest = main(extract_args(env / "small", out, env / "vq.pt", "--ten-crop", "--crop-range", "1.1"))
    assert manifest["complete"] and manifest["codes_present"] == 6
    codes, got_label = read_extracted(out)[4]
    assert codes.shape == (10, 64)
    vq = load_vq(env / "vq.pt", "VQ-debug", 64)
    img, label, _ = ImageFolderSafe(env / "small")[4]
    assert np.array_equal(codes, vq.encode_to_indices(ten_crop_tensor(img, 32, 1.1)).reshape(10, 64).numpy())
    assert got_label == label == 1
    meta = json.loads((out / "folder32_shards" / META_FILE).read_text())
    assert meta["ten_crop"] is True and meta["crop_range"] == 1.1 and meta["num_aug"] == 10
    assert meta["num_tokens"] == 64 and meta["image_size"] == 32 and meta["num_images"] == 6
    assert meta["class_to_idx"] == {"0": 0, "1": 1}
    assert json.loads((out / "folder32_shards" / "class_to_idx.json").read_text()) == {"0": 0, "1": 1}
    ident = tokenizer_identity(vq, "vq.pt")
    assert meta["tokenizer"]["weights_sha256"] == ident["weights_sha256"]
    assert meta["tokenizer"]["config"] == json.loads(json.dumps(ident["config"]))
    with pytest.raises(ExtractError, match="crop_range: there 1.1; this run 1.05"):
        main(extract_args(env / "small", out, env / "vq.pt", "--ten-crop", "--crop-range", "1.05"))


def test_no_flip_encodes_the_views_as_they_are(env, tmp_path):
    """--no-flip (digits: a mirror changes the shape) halves the views and is recorded and checked."""
    out = tmp_path / "codes_no_flip"
    main(extract_args(env / "small", out, env / "vq.pt", "--no-flip"))
    codes = read_extracted(out)[4][0]
    assert codes.shape == (1, 64)
    vq = load_vq(env / "vq.pt", "VQ-debug", 64)
    img, _, _ = ImageFolderSafe(env / "small")[4]
    assert np.array_equal(codes, vq.encode_to_indices(center_crop_tensor(img, 32)).numpy())
    meta = json.loads((out / "folder32_shards" / META_FILE).read_text())
    assert meta["flip"] is False and meta["num_aug"] == 1
    with pytest.raises(ExtractError, match="flip: there False; this run True"):
        main(extract_args(env / "small", out, env / "vq.pt"))
    ten = main(extract_args(env / "small", tmp_path / "ten", env / "vq.pt", "--ten-crop", "--no-flip"))
    assert ten["complete"] and read_extracted(tmp_path / "ten")[4][0].shape == (5, 64)
