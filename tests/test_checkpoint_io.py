"""Checkpoint I/O: atomic writes, weights_only loads, the Namespace allow-list, strict key checks."""
from __future__ import annotations

import argparse
import os
import pickle

import numpy as np
import pytest
import torch

from utils.checkpoint import (CheckpointError, extract_weights, load_checkpoint, load_state_dict_strict,
                              save_checkpoint, save_npz)


class _RunsCode:
    """An object whose unpickling would run code (os.system) under weights_only=False."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_round_trip_and_no_temporary_files_left(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "steps": 7, "args": {"lr": 1e-4}}
    path = save_checkpoint(obj, tmp_path / "sub" / "0000007.pt")
    back = load_checkpoint(path)
    assert back["steps"] == 7 and torch.equal(back["model"]["w"], obj["model"]["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["0000007.pt"]


def test_failed_write_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"v": torch.tensor(1)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"v": Boom()}, path)
    assert load_checkpoint(path)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)


def test_official_namespace_args_load_through_allow_list(tmp_path):
    path = tmp_path / "official.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(gpt_model="GPT-B", lr=1e-4)}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["args"].gpt_model == "GPT-B"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_extract_weights_layouts():
    sd = {"a": torch.zeros(1)}
    ema = {"a": torch.ones(1)}
    assert extract_weights({"model": sd, "ema": ema})["a"].item() == 0
    assert extract_weights({"model": sd, "ema": ema}, prefer_ema=True)["a"].item() == 1
    assert extract_weights({"module": sd})["a"].item() == 0
    assert extract_weights({"state_dict": sd})["a"].item() == 0
    assert extract_weights(sd)["a"].item() == 0
    with pytest.raises(CheckpointError, match="no weights found"):
        extract_weights({"steps": 3, "notes": "x"})


def test_strict_load_names_keys():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(model, {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}, "tiny")
    msg = str(e.value)
    assert "missing keys" in msg and "bias" in msg
    assert "unexpected keys" in msg and "extra" in msg
    assert "mis-shaped" in msg and "(2, 4)" in msg


def test_save_npz_atomic(tmp_path):
    arr = np.random.RandomState(0).randint(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    path = save_npz(tmp_path / "samples.npz", arr_0=arr)
    assert path.name == "samples.npz"
    with np.load(path) as f:
        assert f["arr_0"].dtype == np.uint8 and np.array_equal(f["arr_0"], arr)
