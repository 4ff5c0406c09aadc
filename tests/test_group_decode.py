"""The shared group decoding loop: schedule checks, raster write-back, CFG halves, per-token scales."""
import pytest
import torch

from autoregressive.decoding.group_decode import check_schedule, decode_in_groups


def test_check_schedule_refuses_bad_orders():
    check_schedule(torch.tensor([2, 0, 1, 3]), [1, 3], 4)
    with pytest.raises(ValueError, match="distinct"):
        check_schedule(torch.tensor([0, 0, 1, 3]), [1, 3], 4)
    with pytest.raises(ValueError, match="sum to 3"):
        check_schedule(torch.tensor([2, 0, 1, 3]), [1, 2], 4)
    with pytest.raises(ValueError, match="positive"):
        check_schedule(torch.tensor([2, 0, 1, 3]), [0, 4], 4)
    with pytest.raises(ValueError, match="distinct"):
        check_schedule(torch.tensor([2, 0, 1, 4]), [4], 4)


def test_decode_writes_back_in_raster_layout_with_cfg():
    v, n, b = 11, 6, 3
    order = torch.tensor([4, 1, 5, 0, 3, 2])
    seen = []

    def step(g, prev, prev_pos, pos):
        seen.append((g, None if prev is None else prev.clone(), pos.clone()))
        logits = torch.zeros(2 * b, pos.shape[-1], v)
        # cond half prefers token = position, uncond half prefers token = position + 1
        logits[:b].scatter_(2, pos.expand(b, -1)[..., None], 5.0)
        logits[b:].scatter_(2, (pos + 1).expand(b, -1)[..., None], 1.0)
        return logits

    tokens = decode_in_groups(step, order, [1, 2, 3], b, cfg_scale=2.0, temperature=0)
    assert torch.equal(tokens, torch.arange(n).expand(b, n))
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1] is None
    assert seen[1][1].shape == (2 * b, 1) and torch.equal(seen[2][1], torch.tensor([[1, 5]]).repeat(2 * b, 1))


def test_per_token_scale_and_per_row_orders():
    b, v = 2, 4
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    rec = []

    def step(g, prev, prev_pos, pos):
        assert pos.shape == (2 * b, 2)
        logits = torch.zeros(2 * b, 2, v)
        logits[:b, :, 1] = 1.0
        return logits

    decode_in_groups(step, order, [2, 2], b, cfg_scale=3.0,
                     cfg_scale_at=lambda g, pos, idx: 1 + idx.float(), temperature=0, record_logits=rec)
    assert torch.allclose(rec[0][:, :, 1], torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    assert torch.allclose(rec[1][:, :, 1], torch.tensor([[3.0, 4.0], [3.0, 4.0]]))
