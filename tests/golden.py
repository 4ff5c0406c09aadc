"""Collect golden fixtures from `$GOLDEN_DIR` (default `../shared/golden` beside the project).

Each parity test module calls `fixture_cases(method)` at collection time, so a new `*.pt` file under
`<GOLDEN_DIR>/<method>/` is picked up without a code change. Test ids are
`<method>-<file stem>-<case name>`; a missing method folder yields one skipped test with the reason.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    return Path(os.environ.get("GOLDEN_DIR", ROOT.parent / "shared" / "golden"))


@lru_cache(maxsize=None)
def load_fixture(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def fixture_cases(method: str) -> list:
    """pytest params `(path, case_name)` for every case of every `*.pt` under the method folder."""
    folder = golden_dir() / method
    files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    if not files:
        return [pytest.param(None, None, id=f"{method}-absent",
                             marks=pytest.mark.skip(reason=f"no golden fixtures under {folder}"))]
    params = []
    for f in files:
        for case in load_fixture(str(f))["cases"]:
            params.append(pytest.param(str(f), case["name"], id=f"{method}-{f.stem}-{case['name']}"))
    return params


def get_case(path: str, name: str) -> tuple[dict, dict]:
    fx = load_fixture(path)
    return fx, next(c for c in fx["cases"] if c["name"] == name)


def official_key_files(prefix: str) -> list:
    """pytest params for every `official_keys/<prefix>*.json`."""
    folder = golden_dir() / "official_keys"
    files = sorted(folder.glob(f"{prefix}*.json")) if folder.is_dir() else []
    if not files:
        return [pytest.param(None, id=f"{prefix}-absent",
                             marks=pytest.mark.skip(reason=f"no {prefix}*.json under {folder}"))]
    return [pytest.param(str(f), id=f.stem) for f in files]


def official_keys(path: str) -> dict:
    return json.loads(Path(path).read_text())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str) -> None:
    """Floats within the fixture tolerance, integers exactly."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.dtype.is_floating_point:
        torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"], rtol=tol["rtol"],
                                   msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(actual.long(), expected.long()), f"{what}: integer outputs differ"


def assert_official_keys_exact(model: torch.nn.Module, spec: dict, drop: str, extra: str, reshape: str) -> None:
    """`model` (built on the meta device) has exactly the official keys, shapes and parameter count,
    and the strict check refuses a perturbed list, naming the missing, unexpected and mis-shaped keys."""
    from utils.checkpoint import CheckpointError, check_state_dict

    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v) for k, v in spec["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"]
    fake = {k: torch.empty(v, device="meta") for k, v in spec["keys"].items()}
    check_state_dict(fake, ours, "official")
    bad = dict(fake)
    bad.pop(drop)
    bad[extra] = torch.empty(1, device="meta")
    bad[reshape] = torch.empty(3, 3, 1, 1, device="meta")
    with pytest.raises(CheckpointError) as e:
        check_state_dict(bad, ours, "official")
    msg = str(e.value)
    assert drop in msg and extra in msg and reshape in msg


def kv_cached_logits(model, inp: dict):
    """A fixture's `kv_cache` case through `prefill` + one `decode_step` per token -> (B, 1 + T, V)."""
    import torch

    cache = model.new_cache(inp["max_batch_size"], max_len=inp["max_seq_length"])
    assert int(inp["prefill_input_pos"][0]) == 0
    steps = [model.prefill(inp["cond_idx"], cache)]
    for t in range(inp["idx"].shape[1]):
        pos = inp["decode_input_pos"][t:t + 1].long()
        steps.append(model.decode_step(inp["idx"][:, t:t + 1], cache, pos))
    return torch.cat(steps, dim=1)
