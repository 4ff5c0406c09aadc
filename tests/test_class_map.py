"""`--class-map FILE` for class-folder data sets: the file's checks (every folder named, ids unique
and 0..n-1), renamed folders that keep their class ids through extraction, and the tokenizer
trainer's checkpoints that record the map and refuse a resume with another one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive.train.extract_codes_c2i import main as extract
from dataset.build import build_image_dataset
from dataset.codes import META_FILE
from dataset.image_folder import DatasetError, class_map_for, load_class_map
from tests.extract_helpers import extract_args, make_image_folder, make_vq_ckpt, read_extracted
from tokenizer.train_vq import get_parser as vq_parser, main as train_vq
from utils.checkpoint import load_checkpoint

RENAMED = {"0": "zero", "1": "one", "2": "two"}  # sorted, the new names give other ids: one 0, two 1, zero 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """`digits/` (folders 0, 1, 2), the same images with the folders renamed, and a tokenizer."""
    d = tmp_path_factory.mktemp("class_map")
    make_image_folder(d / "digits", classes=3, per_class=3, cache=d / "all")
    shutil.copytree(d / "digits", d / "renamed")
    for old, new in RENAMED.items():
        (d / "renamed" / old).rename(d / "renamed" / new)
    (d / "map.json").write_text(json.dumps({new: int(old) for old, new in RENAMED.items()}))
    make_vq_ckpt(d / "vq.pt")
    return d


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, says", [
    ('{"zero": 0, "one": 1', "not valid JSON"),
    ('["zero", "one", "two"]', "non-empty JSON object"),
    ("{}", "non-empty JSON object"),
    ('{"zero": 0, "one": "1", "two": 2}', "must be integers, but 'one' has '1'"),
    ('{"zero": 0, "one": true, "two": 2}', "must be integers"),
    ('{"zero": 0, "one": 0, "two": 1}', "must be unique, but 'zero', 'one' all have id 0"),
    ('{"zero": 0, "one": 1, "two": 3}', "must be 0..2 without gaps, but it has [3] and lacks [2]"),
    ('{"zero": 0, "one": 1, "zero": 2}', "names the folder 'zero' twice"),
])
def test_a_malformed_class_map_names_the_file_and_the_problem(tmp_path, text, says):
    path = write(tmp_path / "bad.json", text)
    with pytest.raises(DatasetError) as e:
        load_class_map(path)
    assert str(path) in str(e.value) and says in str(e.value), str(e.value)


def test_the_map_must_name_every_folder_and_only_folders(folders, tmp_path):
    assert class_map_for(folders / "renamed", folders / "map.json") == {"zero": 0, "one": 1, "two": 2}
    with pytest.raises(DatasetError, match=r"does not name 1 class folder\(s\) of .*\['two'\]"):
        class_map_for(folders / "renamed", write(tmp_path / "two_missing.json", '{"zero": 0, "one": 1}'))
    with pytest.raises(DatasetError, match=r"names 1 class\(es\) that .* has no folder for: \['three'\]"):
        class_map_for(folders / "renamed",
                      write(tmp_path / "extra.json", '{"zero": 0, "one": 1, "two": 2, "three": 3}'))
    with pytest.raises(DatasetError, match="no such file"):
        class_map_for(folders / "renamed", tmp_path / "nope.json")
    with pytest.raises(ValueError, match="not --dataset digits"):
        build_image_dataset("digits", None, None, 32, class_map=str(folders / "map.json"))


def test_renamed_folders_with_a_class_map_keep_codes_labels_and_ids(folders, tmp_path):
    """The same images under new folder names: with `--class-map` every image keeps its index, codes
    and label; without it the sorted new names would give other labels."""
    extract(extract_args(folders / "digits", tmp_path / "before", folders / "vq.pt"))
    extract(extract_args(folders / "renamed", tmp_path / "after", folders / "vq.pt", "--class-map",
                         str(folders / "map.json")))
    extract(extract_args(folders / "renamed", tmp_path / "sorted", folders / "vq.pt"))
    before, after, by_sorted_names = (read_extracted(tmp_path / p) for p in ("before", "after", "sorted"))
    assert len(before) == 9 and sorted(before) == sorted(after)
    for k, (codes, label) in before.items():
        assert np.array_equal(after[k][0], codes) and after[k][1] == label, k
    assert sorted(y for _, y in before.values()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    label_of = {c.tobytes(): y for c, y in before.values()}  # each image (by its codes) -> its label
    assert {c.tobytes(): y for c, y in by_sorted_names.values()} != label_of  # without the map: other ids
    home = tmp_path / "after" / "folder32_shards"
    assert json.loads((home / META_FILE).read_text())["class_to_idx"] == {"zero": 0, "one": 1, "two": 2}
    assert json.loads((home / "class_to_idx.json").read_text()) == {"zero": 0, "one": 1, "two": 2}


def test_extraction_refuses_a_bad_map_before_writing(folders, tmp_path):
    bad = write(tmp_path / "bad.json", '{"zero": 0, "one": 1}')
    with pytest.raises(DatasetError, match="does not name"):
        extract(extract_args(folders / "renamed", tmp_path / "codes", folders / "vq.pt", "--class-map", str(bad)))
    assert not (tmp_path / "codes").exists()


def vq_run(folders: Path, results: Path, *extra: str) -> None:
    parser = vq_parser()
    args = parser.parse_args(["--vq-model", "VQ-debug", "--codebook-size", "64", "--image-size", "32",
                              "--num-workers", "0", "--perceptual-weight", "0", "--device", "cpu",
                              "--mixed-precision", "none", "--dataset", "folder", "--global-batch-size", "3",
                              "--max-steps", "1", "--results-dir", str(results), *extra])
    train_vq(args, {k: parser.get_default(k) for k in vars(args)})


def test_tokenizer_checkpoints_record_the_map_and_a_resume_must_match(folders, tmp_path):
    torch.set_num_threads(1)
    data = ["--data-path", str(folders / "renamed"), "--class-map", str(folders / "map.json")]
    vq_run(folders, tmp_path, *data)
    run_dir = next(tmp_path.iterdir())
    ckpt = load_checkpoint(run_dir / "checkpoints" / "0000001.pt")
    assert ckpt["class_to_idx"] == {"zero": 0, "one": 1, "two": 2}
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    # the renamed folders without their map: the sorted names give other ids, so another image order
    with pytest.raises(DatasetError, match="class map mismatch.*pass the --class-map the run was started with"):
        vq_run(folders, tmp_path, "--data-path", str(folders / "renamed"), "--max-steps", "2",
               "--resume", str(run_dir))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    vq_run(folders, tmp_path, *data, "--max-steps", "2", "--resume", str(run_dir))  # the same map resumes
    assert (run_dir / "checkpoints" / "0000002.pt").is_file()


def test_reconstructions_record_the_map_and_refuse_a_folder_of_another(folders, tmp_path):
    """The reconstructions are in class-id order: a folder made with one map is not resumed without it."""
    from tokenizer.reconstruction_vq_ddp import get_parser, main as reconstruct
    from utils.shards import SettingsMismatch

    argv = ["--vq-ckpt", str(folders / "vq.pt"), "--vq-model", "VQ-debug", "--codebook-size", "64", "--dataset",
            "folder", "--data-path", str(folders / "renamed"), "--image-size", "32", "--image-size-eval", "32",
            "--sample-dir", str(tmp_path), "--num-workers", "0", "--device", "cpu"]
    reconstruct(get_parser().parse_args(argv + ["--class-map", str(folders / "map.json")]))
    settings = json.loads(next(tmp_path.glob("*/shards/settings.json")).read_text())
    assert settings["class_to_idx"] == {"zero": 0, "one": 1, "two": 2}
    with pytest.raises(SettingsMismatch, match="class_to_idx"):
        reconstruct(get_parser().parse_args(argv))
