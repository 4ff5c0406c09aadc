"""Sample folder names and class names in the samplers.

Names: every preset of `pretrained_models/presets.json` gets its own name unless two presets agree
in every setting that changes the images; every flag that changes the images changes the name;
VAR names its own tokenizer. Classes: `--classes` takes ids or the names of the checkpoint's class
map, defaults to the checkpoint's classes, and `--num-classes` to the checkpoint's."""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive import reproduce
from autoregressive.sample import sample_c2i, sample_c2i_ddp
from autoregressive.sample.common import IMAGENET_GRID_CLASSES, CheckpointClasses
from autoregressive.strategies import flag_owners, get_strategy, parse_driver_args
from tokenizer.vq_model import VQ_models
from utils.checkpoint import save_checkpoint

DIGITS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9}


def sampling_rows() -> list[dict]:
    """The presets that sample with a GPT (reconstruction rows of the tokenizer are not samples)."""
    return [r for r in reproduce.load_presets() if "strategy" in r and r.get("kind", "gpt") != "vq"]


def preset_args(row: dict) -> argparse.Namespace:
    """The sampler's flags for a preset, built as `reproduce` builds them (no file is read)."""
    names = [row["sample_flags"][f] for f in reproduce.FILE_FLAGS] + [row["reference"]]
    files = {n: Path("/models") / n for n in names}
    argv = reproduce.sample_argv(row, files, "/samples", 32, 50000)
    return sample_c2i_ddp.build_parser().parse_args(argv)


def image_setting_values(row: dict) -> dict:
    """What determines a preset's images: the recorded settings, the checkpoint files for their contents."""
    settings = sample_c2i_ddp.image_settings(preset_args(row), rank=1)  # rank 1: no checkpoint hashing
    return {**settings, "gpt_file": row["sample_flags"]["gpt-ckpt"], "vq_file": row["sample_flags"]["vq-ckpt"]}


def test_presets_share_a_name_only_when_every_image_setting_agrees():
    rows = sampling_rows()
    assert len(rows) >= 30
    names = {(r["method"], r["name"]): sample_c2i_ddp.run_name(preset_args(r)) for r in rows}
    for a, b in itertools.combinations(rows, 2):
        if names[a["method"], a["name"]] == names[b["method"], b["name"]]:
            assert image_setting_values(a) == image_setting_values(b), (a["name"], b["name"])
    assert len(set(names.values())) == len(rows)  # the presets all differ, so do their names
    for name in names.values():
        assert "/" not in name and len(name) <= sample_c2i_ddp.MAX_NAME


def test_the_official_name_is_the_backbone_and_par_var_say_what_they_ran():
    by_name = {r["name"]: sample_c2i_ddp.run_name(preset_args(r)) for r in sampling_rows()}
    assert by_name["GPT-XL-384"] == ("raster-GPT-XL-c2i_XL_384-size-384-size-256-VQ-16-topk-0-topp-1.0-temperature-1.0"
                                     "-cfg-1.75-seed-0")
    assert by_name["PAR-3B-4x"].endswith("-seed-0-spe-token-num-3-ar-token-num-4")
    assert by_name["PAR-3B-16x"].endswith("-seed-0-spe-token-num-15-ar-token-num-16")
    assert "-MSVQ-" in by_name["VAR-d16"] and "VQ-16" not in by_name["VAR-d16"]
    assert "steps-64-sample-schedule-arccos" in by_name["ARPG-L-arccos"]


def other_value(action: argparse.Action):
    """A valid value of a flag other than its default, or None when it has no other."""
    d, t = action.default, action.type
    if action.nargs == 0:
        return action.const if action.const != d else not d
    if action.choices:
        return next((c for c in action.choices if c != d), None)
    if d is None:
        return {int: 7, float: 0.25, str: "x", None: "x"}.get(t, t("1") if callable(t) else "x")
    if isinstance(d, bool):
        return not d
    return d + 1 if isinstance(d, int) else d + 0.5 if isinstance(d, float) else f"{d}x"


def test_every_flag_that_changes_the_images_changes_the_name():
    """Derived from the parser, not a list: each flag but those that do not change the images
    (and the run size, which a rerun may grow) gives another name at another value, for its strategy."""
    parser = sample_c2i_ddp.build_parser()
    owners = flag_owners()
    skip = {*sample_c2i_ddp.NOT_IMAGE_SETTINGS, *sample_c2i_ddp.MAY_CHANGE, "help"}
    checked = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip:
            continue
        value = other_value(action)
        if value is None:  # a flag with one choice (--gpt-type c2i)
            continue
        strategy = owners.get(action.dest, ("raster",))[0]
        base = parser.parse_args(["--gpt-ckpt", "g.pt", "--vq-ckpt", "v.pt", "--strategy", strategy])
        changed = argparse.Namespace(**{**vars(base), action.dest: value})
        assert sample_c2i_ddp.run_name(changed) != sample_c2i_ddp.run_name(base), action.dest
        checked.append(action.dest)
    assert {"cfg_interval", "cfg_schedule", "labels", "num_classes", "precision", "spe_token_num", "steps",
            "sample_schedule", "more_smooth", "order"} <= set(checked)


def test_checkpoint_names_of_our_runs_keep_the_run_folder():
    assert sample_c2i_ddp.checkpoint_name("pretrained_models/c2i_XL_384.pt") == "c2i_XL_384"
    assert sample_c2i_ddp.checkpoint_name("results/003-GPT-B-par/checkpoints/0005000.pt") == "003-GPT-B-par-0005000"
    assert sample_c2i_ddp.checkpoint_name("ckpts/run7/consolidated.pth", from_fsdp=True) == "run7"


# ---------------------------------------------------------------------------------------------
# Class names and default classes
# ---------------------------------------------------------------------------------------------


def test_class_items_are_ids_or_names_of_the_map():
    ours = CheckpointClasses("gpt.pt", 10, DIGITS)
    assert [ours.class_id(c, 10) for c in ("3", "seven", 0)] == [3, 7, 0]
    with pytest.raises(ValueError, match=r"--classes 'sevn' is no class .*'zero' = 0, .*did you mean 'seven'"):
        ours.class_id("sevn", 10)
    with pytest.raises(ValueError, match=r"--classes 10: class ids must lie in \[0, --num-classes 10\)"):
        ours.class_id("10", 10)
    official = CheckpointClasses("c2i_XL_384.pt")
    assert official.class_id("207", 1000) == 207
    with pytest.raises(ValueError, match="c2i_XL_384.pt carries no class map"):
        official.class_id("dog", 1000, "--class-id")
    partial = CheckpointClasses("gpt.pt", 16, {"a": 0, "b": 1})
    with pytest.raises(ValueError, match="has no class with this id"):
        partial.class_id("5", 16)


def test_default_grid_classes_follow_the_checkpoint():
    assert CheckpointClasses("x").grid_classes(1000) == IMAGENET_GRID_CLASSES
    assert CheckpointClasses("x", 10, DIGITS).grid_classes(10) == list(range(10))
    assert CheckpointClasses("x").grid_classes(40) == list(range(8))
    assert CheckpointClasses("x", 16, {"a": 0, "b": 1}).grid_classes(16) == [0, 1]


def test_num_classes_comes_from_the_checkpoint_unless_given():
    args = argparse.Namespace(num_classes=1000)
    CheckpointClasses("x", 10, DIGITS).resolve(args, given=set())
    assert args.num_classes == 10
    args = argparse.Namespace(num_classes=1000)
    CheckpointClasses("x").resolve(args, given=set())  # an official file records nothing
    assert args.num_classes == 1000
    with pytest.raises(ValueError, match="--num-classes 5 does not cover the class map"):
        CheckpointClasses("x", 10, DIGITS).resolve(argparse.Namespace(num_classes=5), given={"num_classes"})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny tokenizer, and GPTs of 10 class embeddings with the digits' names, or a 3-class map."""
    d = tmp_path_factory.mktemp("named")
    torch.manual_seed(0)
    vq = VQ_models["VQ-debug"](codebook_size=64)
    save_checkpoint({"model": vq.state_dict(), "vq_model": "VQ-debug", "vq_config": vq.config.__dict__}, d / "vq.pt")
    gpt = get_strategy("raster").build_model("GPT-debug", vocab_size=64, block_size=16, num_classes=10)
    args = {"strategy": "raster", "gpt_model": "GPT-debug", "image_size": 16, "downsample_size": 4,
            "vocab_size": 64, "num_classes": 10, "cls_token_num": 1}
    save_checkpoint({"model": gpt.state_dict(), "args": args, "class_to_idx": DIGITS}, d / "digits.pt")
    save_checkpoint({"model": gpt.state_dict(), "args": args, "class_to_idx": {"a": 0, "b": 1, "c": 2}}, d / "abc.pt")
    return d


def flags(models: Path, gpt: str) -> list[str]:
    return ["--gpt-ckpt", str(models / gpt), "--vq-ckpt", str(models / "vq.pt"), "--vq-model", "VQ-debug",
            "--codebook-size", "64", "--image-size", "16", "--image-size-eval", "16", "--downsample-size", "4",
            "--cfg-scale", "1.5", "--top-k", "0", "--device", "cpu"]


def test_the_grid_takes_names_and_defaults_to_the_checkpoints_classes(models, tmp_path, capsys):
    """No --num-classes, no --classes: the 10 classes of the checkpoint; names mix with ids."""
    torch.set_num_threads(1)
    for extra, shown in ((["--classes", "two", "5"], "classes: 2 (two), 5 (five)"),
                         ([], "classes: 0 (zero), 1 (one), 2 (two), 3 (three), 4 (four), 5 (five), 6 (six)")):
        argv = flags(models, "digits.pt") + ["--out", str(tmp_path / "grid.png"), *extra]
        sample_c2i.main(*parse_driver_args(sample_c2i.build_parser(), argv))
        assert shown in capsys.readouterr().out


def test_the_ddp_sampler_samples_the_classes_of_the_map(models, tmp_path):
    """A model of 10 class embeddings trained on a 3-class map: balanced labels over those 3 only;
    --num-classes defaults to the checkpoint's 10 (and the name says so); the .json has the map."""
    torch.set_num_threads(1)
    argv = flags(models, "abc.pt") + ["--num-fid-samples", "6", "--per-proc-batch-size", "3",
                                      "--sample-dir", str(tmp_path)]
    args, given = parse_driver_args(sample_c2i_ddp.build_parser(), argv)
    out = sample_c2i_ddp.main(args, given)
    assert "-num-classes-10" in out.name and "-codebook-size-64" in out.name
    with np.load(out) as f:
        assert f["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert '"a": 0' in out.with_suffix(".json").read_text()
