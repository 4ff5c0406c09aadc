"""The training-side code reader: the three layouts (packed shards, per-image files, RandAR folders), gaps, seeded view choice, the ten_crop_105 sibling
rule, and refusing codes of another tokenizer, image size, codebook or class map."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from autoregressive.train.extract_codes_c2i import main
from dataset.code_shards import num_shards, shard_range, write_code_shard
from dataset.codes import META_FILE, CodeDataset, CodesError, check_codes_compatible, ten_crop_sibling
from dataset.image_folder import DatasetError, write_class_index
from tests.extract_helpers import extract_args, make_image_folder, make_vq_ckpt
from tokenizer.loading import load_vq, tokenizer_identity
from utils.training import ResumableDistributedSampler

N = 64  # tokens per view in the hand-made folders


def write_llamagen(code_path: Path, num_images: int, num_aug: int, offset: int = 0, name: str = "imagenet32",
                   skip: tuple[int, ...] = ()) -> Path:
    """Hand-made official layout: view v of image k is filled with offset + v, label k % 5."""
    for kind in ("codes", "labels"):
        (code_path / f"{name}_{kind}").mkdir(parents=True, exist_ok=True)
    for k in range(num_images):
        if k in skip:
            continue
        views = (offset + np.arange(num_aug, dtype=np.int64))[None, :, None].repeat(N, axis=2)  # (1, A, N)
        np.save(code_path / f"{name}_codes" / f"{k}.npy", views)
        np.save(code_path / f"{name}_labels" / f"{k}.npy", np.array([k % 5], dtype=np.int64))
    return code_path


def items(data: CodeDataset) -> list[tuple[list[int], int]]:
    return [(c.tolist(), int(y)) for c, y in (data[i] for i in range(len(data)))]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    d = tmp_path_factory.mktemp("codes")
    make_vq_ckpt(d / "vq.pt", seed=0)
    make_image_folder(d / "imgs", classes=2, per_class=4)
    main(extract_args(d / "imgs", d / "codes", d / "vq.pt", "--layout", "official"))
    main(extract_args(d / "imgs", d / "packed", d / "vq.pt", "--shard-size", "3", "--batch-size", "2"))
    return d


def write_packed(code_path: Path, num_images: int, num_aug: int, offset: int = 0, name: str = "imagenet32",
                 skip: tuple[int, ...] = (), shard_size: int = 16) -> Path:
    """Hand-made packed layout with the values of `write_llamagen` (no metadata, as a bare copy)."""
    folder = code_path / f"{name}_shards"
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(num_shards(num_images, shard_size)):
        ks = [k for k in shard_range(j, shard_size, num_images) if k not in skip]
        codes = (offset + np.arange(num_aug, dtype=np.uint16))[None, :, None].repeat(N, axis=2).repeat(len(ks), 0)
        write_code_shard(folder, j, codes, np.array([k % 5 for k in ks]), np.array(ks), {"shard": j})
    return code_path


def test_reads_our_extraction(extracted):
    data = CodeDataset(extracted / "codes", dataset="folder", image_size=32)
    assert data.layout == "llamagen" and len(data) == 8 and (data.num_aug, data.num_tokens) == (2, 64)
    assert data.class_to_idx == {"0": 0, "1": 1}
    for i in range(len(data)):
        codes, label = data[i]
        assert codes.shape == (64,) and codes.dtype == torch.int64 and label.shape == () and label.dtype == torch.int64
        views = np.load(extracted / "codes" / "folder32_codes" / f"{i}.npy")[0]
        assert any(np.array_equal(codes.numpy(), v) for v in views)
        assert int(label) == (0 if i < 4 else 1)
    desc = data.describe()
    assert desc["has_metadata"] and desc["image_size"] == 32 and desc["codebook_size"] == 64
    with pytest.raises(CodesError, match="folder64_codes"):
        CodeDataset(extracted / "codes", dataset="folder", image_size=64)


def test_reads_packed_extraction_as_the_per_image_one(extracted):
    """Same items, labels and seeded views from either layout; whole batches equal item-by-item reads."""
    packed = CodeDataset(extracted / "packed", dataset="folder", image_size=32, seed=7)
    files = CodeDataset(extracted / "codes", dataset="folder", image_size=32, seed=7)
    assert packed.layout == "packed" and len(packed) == len(files) == 8 and packed.num_aug == 2
    assert packed.describe()["num_shards"] == 3 and packed.class_to_idx == files.class_to_idx
    assert [packed.image_index(i) for i in range(8)] == [files.image_index(i) for i in range(8)]
    for epoch in (0, 1):
        packed.set_epoch(epoch)
        files.set_epoch(epoch)
        got = items(packed)
        assert got == items(files)
        batch = packed.__getitems__([5, 0, 7, 3])
        assert [(c.tolist(), int(y)) for c, y in batch] == [got[i] for i in (5, 0, 7, 3)]
        assert all(c.dtype == torch.int64 for c, _ in batch)
    vq = load_vq(extracted / "vq.pt", "VQ-debug", 64)
    ok = check_codes_compatible(extracted / "packed", "folder", 32, tokenizer_identity=tokenizer_identity(vq),
                                codebook_size=64, num_tokens=64, class_to_idx={"0": 0, "1": 1})
    assert ok["layout"] == "packed" and "warning" not in ok


def test_both_layouts_give_the_same_training_batches(extracted):
    """What the trainer's loader delivers (seeded shuffle, 2 ranks, workers) is layout-independent."""
    def batches(path: str, rank: int) -> list:
        data = CodeDataset(extracted / path, dataset="folder", image_size=32, seed=3)
        sampler = ResumableDistributedSampler(len(data), rank, 2, 2, seed=3)
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            data.set_epoch(epoch)
            out += [(c.tolist(), y.tolist()) for c, y in DataLoader(data, batch_size=2, sampler=sampler, num_workers=2)]
        return out
    for rank in (0, 1):
        assert batches("packed", rank) == batches("codes", rank)


def test_packed_shards_of_other_settings_are_refused(extracted, tmp_path):
    import shutil
    copy = tmp_path / "packed"
    shutil.copytree(extracted / "packed", copy)
    meta = json.loads((copy / "folder32_shards" / META_FILE).read_text())
    meta["num_aug"] = 10
    (copy / "folder32_shards" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="shard_000000.npz was made with other settings \\(num_aug\\)"):
        CodeDataset(copy, dataset="folder", image_size=32)


def test_reads_the_files_present_with_gaps(tmp_path):
    write_llamagen(tmp_path, 6, 2, skip=(2,))
    (tmp_path / "imagenet32_labels" / "4.npy").unlink()  # an interrupted write: code without label
    data = CodeDataset(tmp_path, dataset="imagenet", image_size=32)
    assert len(data) == 4 and [data.image_index(i) for i in range(4)] == [0, 1, 3, 5]
    assert [y for _, y in items(data)] == [0, 1, 3, 0]
    assert not data.describe()["has_metadata"]


def test_reads_the_randar_class_folder_layout(tmp_path):
    for cls, n in (("0", 3), ("7", 2), ("12", 1)):
        (tmp_path / cls).mkdir()
        for j in range(n):
            views = np.stack([np.full(N, 10 * int(cls) + v, dtype=np.int64) for v in range(2)])  # (num_aug, N)
            np.save(tmp_path / cls / f"img{j}.npy", views)
    data = CodeDataset(tmp_path)
    assert data.layout == "class-folders" and len(data) == 6 and (data.num_aug, data.num_tokens) == (2, N)
    got = items(data)
    assert [y for _, y in got] == [0, 0, 0, 7, 7, 12]
    assert all(c[0] in (10 * y, 10 * y + 1) and len(set(c)) == 1 for c, y in got)
    assert data.class_to_idx is None and data.describe()["layout"] == "class-folders"


def test_no_codes_is_a_clear_error(tmp_path):
    with pytest.raises(CodesError, match="imagenet256_codes/ and imagenet256_labels/.*RandAR"):
        CodeDataset(tmp_path)


def test_random_view_is_seeded_per_item_and_epoch(tmp_path):
    write_llamagen(tmp_path, 64, 10)
    data = CodeDataset(tmp_path, image_size=32, seed=3)
    views = lambda d: [c[0] for c, _ in items(d)]  # noqa: E731 - the view index is the code value
    first = views(data)
    assert len(set(first)) > 5  # views really vary
    assert views(data) == first  # reading again gives the same views
    again = CodeDataset(tmp_path, image_size=32, seed=3)
    assert views(again) == first  # a fresh data set (a resumed run) too
    loader = DataLoader(again, batch_size=8, num_workers=2, shuffle=False)
    assert torch.cat([c for c, _ in loader])[:, 0].tolist() == first  # and any worker
    data.set_epoch(1)
    assert views(data) != first
    data.set_epoch(0)
    assert views(data) == first
    assert views(CodeDataset(tmp_path, image_size=32, seed=4)) != first


def test_packed_gaps_and_ten_crop_105_sibling(tmp_path):
    main_path = write_packed(tmp_path / "imagenet_code_c2i_flip_ten_crop", 40, 10, skip=(5,), shard_size=16)
    files_path = write_llamagen(tmp_path / "files_ten_crop", 40, 10, skip=(5,))
    data = CodeDataset(main_path, image_size=32)
    assert data.layout == "packed" and len(data) == 39 and data.image_index(5) == 6
    assert items(data) == items(CodeDataset(files_path, image_size=32))
    write_packed(tmp_path / "imagenet_code_c2i_flip_ten_crop_105", 40, 10, offset=100, skip=(0, 1, 2, 3))
    data = CodeDataset(main_path, image_size=32)
    got = [c[0] for c, _ in items(data)]
    assert 8 < sum(v >= 100 for v in got) < 30 and not any(v >= 100 for v in got[:4])
    assert data.describe()["ten_crop_sibling_files"] == 35


def test_single_view_codes_are_returned_as_they_are(tmp_path):
    write_llamagen(tmp_path, 3, 1, offset=5)
    data = CodeDataset(tmp_path, image_size=32)
    assert data.num_aug == 1 and all(c == [5] * N for c, _ in items(data))


def test_ten_crop_105_sibling_rule(tmp_path):
    main_path = write_llamagen(tmp_path / "imagenet_code_c2i_flip_ten_crop", 64, 10, offset=0)
    sibling = tmp_path / "imagenet_code_c2i_flip_ten_crop_105" / "imagenet32_codes"
    assert ten_crop_sibling(main_path / "imagenet32_codes") == sibling
    alone = [c[0] for c, _ in items(CodeDataset(main_path, image_size=32))]
    assert max(alone) < 10  # no sibling yet: only the primary folder

    write_llamagen(tmp_path / "imagenet_code_c2i_flip_ten_crop_105", 64, 10, offset=100, skip=(0, 1, 2, 3))
    data = CodeDataset(str(main_path) + "/", image_size=32)  # a trailing slash finds it too
    got = [c[0] for c, _ in items(data)]
    from_sibling = [v >= 100 for v in got]
    assert 15 < sum(from_sibling) < 50  # about half, drawn per item
    assert not any(from_sibling[:4])  # images the sibling lacks come from the primary folder
    assert [c[0] for c, _ in items(CodeDataset(main_path, image_size=32))] == got  # seeded
    assert data.describe()["ten_crop_sibling_files"] == 60
    # Only the official `ten_crop/` -> `ten_crop_105/` rule: other names have no sibling.
    other = write_llamagen(tmp_path / "codes_tencrop", 4, 10)
    assert CodeDataset(other, image_size=32).sibling is None


def test_compatibility_refusals(extracted, tmp_path):
    path = extracted / "codes"
    vq = load_vq(extracted / "vq.pt", "VQ-debug", 64)
    ok = check_codes_compatible(path, "folder", 32, tokenizer_identity=tokenizer_identity(vq), codebook_size=64,
                                num_tokens=64, class_to_idx={"0": 0, "1": 1})
    assert ok["layout"] == "llamagen" and "warning" not in ok
    other = load_vq(make_vq_ckpt(tmp_path / "other.pt", seed=5), "VQ-debug", 64)
    with pytest.raises(CodesError, match="made by another tokenizer"):
        check_codes_compatible(path, "folder", 32, tokenizer_identity=tokenizer_identity(other))
    with pytest.raises(CodesError, match="codebook of 64 entries, but 16384"):
        check_codes_compatible(path, "folder", 32, codebook_size=16384)
    with pytest.raises(CodesError, match="64 tokens per image, but 256"):
        check_codes_compatible(path, "folder", 32, num_tokens=256)
    with pytest.raises(CodesError, match="no codes found"):
        check_codes_compatible(path, "folder", 256)
    with pytest.raises(DatasetError, match="class map mismatch"):
        check_codes_compatible(path, "folder", 32, class_to_idx={"cat": 0, "dog": 1})
    # Folders without metadata: the code range and shapes are still checked; the tokenizer is not.
    bare = write_llamagen(tmp_path / "official", 4, 2, offset=300)
    with pytest.raises(CodesError, match="index 301, outside a codebook of 64"):
        check_codes_compatible(bare, "imagenet", 32, codebook_size=64)
    warn = check_codes_compatible(bare, "imagenet", 32, tokenizer_identity=tokenizer_identity(vq), codebook_size=512)
    assert "cannot be verified" in warn["warning"]
    # A class map written beside a RandAR archive is checked too.
    (tmp_path / "randar" / "0").mkdir(parents=True)
    np.save(tmp_path / "randar" / "0" / "a.npy", np.zeros((2, N), dtype=np.int64))
    write_class_index(tmp_path / "randar", {"n01440764": 0})
    with pytest.raises(DatasetError, match="class map mismatch"):
        check_codes_compatible(tmp_path / "randar", class_to_idx={"goldfish": 0})


def test_recorded_image_size_must_match(tmp_path):
    write_llamagen(tmp_path, 2, 2)
    (tmp_path / "imagenet32_codes" / META_FILE).write_text(json.dumps({"image_size": 64}))
    with pytest.raises(CodesError, match="records image size 64, not 32"):
        CodeDataset(tmp_path, image_size=32)
