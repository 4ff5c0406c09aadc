"""utils/npz_stream.py: streamed members equal np.savez's arrays, members map read-only without
loading, and a stream left short is an error."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from utils.npz_stream import ArrayStream, NpzWriter, npz_member_memmap


def record_stream_chunks(monkeypatch) -> list[int]:
    """The bytes of every chunk streamed into an `.npz` member from now on (for the packers' tests)."""
    chunks: list[int] = []
    write = ArrayStream.write

    def spy(self, chunk):
        chunks.append(np.asarray(chunk).nbytes)
        return write(self, chunk)

    monkeypatch.setattr(ArrayStream, "write", spy)
    return chunks


def test_streamed_npz_reads_as_savez(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, size=(37, 5, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, size=37)
    with open(tmp_path / "a.npz", "wb") as f, NpzWriter(f) as w:
        with w.stream("arr_0", big.shape, np.uint8) as s:
            for start in range(0, 37, 10):  # uneven chunks
                s.write(big[start:start + 10])
        w.add("labels", labels)
    np.savez(tmp_path / "b.npz", arr_0=big, labels=labels)
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert sorted(a.files) == sorted(b.files) == ["arr_0", "labels"]
        for k in a.files:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])
    with zipfile.ZipFile(tmp_path / "a.npz") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())


def test_member_memmap(tmp_path):
    codes = np.arange(6 * 2 * 7, dtype=np.uint16).reshape(6, 2, 7)
    np.savez(tmp_path / "s.npz", codes=codes, labels=np.arange(6, dtype=np.int32), empty=np.zeros((0, 3)))
    m = npz_member_memmap(tmp_path / "s.npz", "codes")
    assert isinstance(m, np.memmap) and m.dtype == np.uint16 and np.array_equal(m, codes)
    assert np.array_equal(npz_member_memmap(tmp_path / "s.npz", "labels"), np.arange(6))
    assert npz_member_memmap(tmp_path / "s.npz", "empty").shape == (0, 3)
    with pytest.raises(ValueError, match="read-only"):
        m[0, 0, 0] = 1
    np.savez_compressed(tmp_path / "c.npz", codes=codes)
    with pytest.raises(ValueError, match="compressed"):
        npz_member_memmap(tmp_path / "c.npz", "codes")
    with pytest.raises(KeyError):
        npz_member_memmap(tmp_path / "s.npz", "nope")


def test_short_stream_is_an_error(tmp_path):
    with open(tmp_path / "a.npz", "wb") as f, NpzWriter(f) as w:
        with pytest.raises(ValueError, match="4 of 8"):
            with w.stream("arr_0", (2, 4), np.int8) as s:
                s.write(np.zeros((1, 4), np.int8))
        with w.stream("x", (1, 2), np.int8) as s:
            with pytest.raises(TypeError):
                s.write(np.zeros((1, 2), np.int64))
            with pytest.raises(ValueError, match="more data"):
                s.write(np.zeros((2, 2), np.int8))
            s.write(np.zeros((1, 2), np.int8))
