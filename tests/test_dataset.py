"""dataset/: corrupt images skipped and counted across DataLoader workers, empty folders refused, the
digits split sizes and class balance, class-map checks, the --dataset registry."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from dataset.build import build_image_dataset
from dataset.digits import DigitsDataset, load_digits_arrays
from dataset.image_folder import (DatasetError, ImageFolderSafe, SkipCounter, check_class_index,
                                  collate_skip_corrupt, read_class_index, write_class_index)
from dataset.transforms import center_crop_tensor


def make_folder(root, per_class=5):
    rng = np.random.RandomState(0)
    for cls in ("bird", "cat"):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.randint(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{j}.png")
    return root


def test_corrupt_images_are_skipped_and_counted_across_workers(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "bird" / "9_garbage.jpg").write_bytes(b"definitely not a jpeg")
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "9_truncated.png").write_bytes(good[: len(good) // 2])
    data = ImageFolderSafe(root, transform=lambda im: center_crop_tensor(im, 16)[0])
    assert len(data) == 12 and data.class_to_idx == {"bird": 0, "cat": 1}
    loader = DataLoader(data, batch_size=3, num_workers=2, collate_fn=collate_skip_corrupt)
    skips, seen, labels = SkipCounter(), [], []
    for batch in loader:
        skips.add(batch["skipped"])
        if "images" in batch:
            assert batch["images"].shape[1:] == (3, 16, 16)
            seen += batch["indices"].tolist()
            labels += batch["labels"].tolist()
    assert len(skips) == 2
    assert sorted(skips.paths) == sorted([str(root / "bird" / "9_garbage.jpg"), str(root / "cat" / "9_truncated.png")])
    assert sorted(seen) == [i for i in range(12) if i not in (5, 11)]
    assert labels.count(0) == 5 and labels.count(1) == 5
    assert "skipped 2 corrupt or unreadable image(s)" in skips.report()


def test_corrupt_item_reports_its_index(tmp_path):
    root = make_folder(tmp_path / "data", per_class=1)
    (root / "cat" / "0.png").write_bytes(b"broken")
    batch = collate_skip_corrupt([ImageFolderSafe(root)[1]])
    assert batch["skipped"] == [str(root / "cat" / "0.png")] and batch["skipped_indices"] == [1]
    assert "images" not in batch


def test_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no class sub-folders"):
        ImageFolderSafe(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        ImageFolderSafe(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        ImageFolderSafe(tmp_path / "absent")


def test_digits_split_sizes_and_class_balance():
    _, all_labels = load_digits_arrays("all")
    _, train = load_digits_arrays("train")
    _, held = load_digits_arrays("heldout")
    assert (len(all_labels), len(train), len(held)) == (1797, 1438, 359)
    full, tr, he = (np.bincount(y, minlength=10) for y in (all_labels, train, held))
    assert (tr + he == full).all()
    assert (np.abs(he - np.round(full * 0.2)) == 0).all()  # stratified: 20% of every class held out
    assert tr.max() - tr.min() <= 7 and he.max() - he.min() <= 2  # balanced classes
    ds = DigitsDataset("heldout", image_size=32)
    img, label, idx = ds[7]
    assert img.size == (32, 32) and img.mode == "RGB" and label == int(held[7]) and idx == 7
    assert np.array_equal(load_digits_arrays("heldout")[0], load_digits_arrays("heldout")[0])  # fixed split


def test_class_map_written_read_and_checked(tmp_path):
    cmap = {"bird": 0, "cat": 1}
    write_class_index(tmp_path, cmap)
    assert read_class_index(tmp_path) == cmap and read_class_index(tmp_path / "none") is None
    check_class_index(cmap, read_class_index(tmp_path), "codes")
    check_class_index(cmap, None, "codes")  # nothing recorded: nothing to compare
    with pytest.raises(DatasetError, match="class map mismatch at checkpoint.*different ids: \\['bird', 'cat'\\]"):
        check_class_index(cmap, {"bird": 1, "cat": 0}, "checkpoint")
    with pytest.raises(DatasetError, match="only in one: \\['cat'\\], only in the other: \\['dog'\\]"):
        check_class_index(cmap, {"bird": 0, "dog": 1}, "labels")


def test_build_image_dataset(tmp_path):
    root = make_folder(tmp_path / "data", per_class=2)
    assert len(build_image_dataset("folder", str(root), None, 32)) == 4
    assert len(build_image_dataset("digits", None, None, 32)) == 1438
    with pytest.raises(ValueError, match="needs --data-path"):
        build_image_dataset("imagenet", None, None, 32)
    with pytest.raises(ValueError, match="unknown --dataset"):
        build_image_dataset("cifar", None, None, 32)
