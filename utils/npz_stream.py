"""`.npz` files written one piece at a time and read without loading: stored (uncompressed) members.

An `.npz` is a zip of `.npy` members; `np.savez` stores them uncompressed. Written here:
- `NpzWriter.add(name, array)`: a whole (small) array, as `np.savez` would write it;
- `NpzWriter.stream(name, shape, dtype)`: a member whose header is written first and whose data
  arrives in chunks (`write(chunk)`), so an array larger than memory can be written one shard at a
  time. The result is an ordinary `.npz`: `np.load(path)["arr_0"]` and the ADM evaluator read it.
Read here: `npz_member_memmap(path, name)` maps one stored member read-only (`np.load` ignores
`mmap_mode` for `.npz`), so a reader touches only the rows it asks for.
"""
from __future__ import annotations

import math
import os
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the zip local file header (30 bytes)


class ArrayStream:
    """The open data section of one streamed member: `write` rows in order until `shape` is full."""

    def __init__(self, member: BinaryIO, shape: tuple[int, ...], dtype: np.dtype):
        self._member, self.shape, self.dtype = member, shape, dtype
        self.expected = math.prod(shape)
        self.written = 0

    def write(self, chunk: np.ndarray) -> None:
        """Append `chunk` (any shape whose trailing dimensions match; its dtype must be the member's)."""
        chunk = np.asarray(chunk)
        if chunk.dtype != self.dtype:
            raise TypeError(f"chunk dtype {chunk.dtype} differs from the member's {self.dtype}")
        if chunk.shape[1:] != self.shape[1:] and chunk.size:
            raise ValueError(f"chunk of shape {chunk.shape} does not fit rows of shape {self.shape[1:]}")
        if self.written + chunk.size > self.expected:
            raise ValueError(f"more data than the declared shape {self.shape}")
        self._member.write(np.ascontiguousarray(chunk).data)
        self.written += chunk.size


class NpzWriter:
    """Write an `.npz` (stored members, zip64) into an open binary file, member by member."""

    def __init__(self, f: BinaryIO):
        self._zip = zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def add(self, name: str, array: np.ndarray) -> None:
        """One whole array as member `<name>.npy` (what `np.savez(f, name=array)` writes)."""
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as m:
            np.lib.format.write_array(m, np.asanyarray(array), allow_pickle=False)

    @contextmanager
    def stream(self, name: str, shape: tuple[int, ...], dtype: np.dtype | str) -> Iterator[ArrayStream]:
        """Member `<name>.npy` of `shape` and `dtype`, filled through the yielded `ArrayStream`;
        leaving the block before every element was written is an error (the file is not finished)."""
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as m:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(m, header)
            s = ArrayStream(m, shape, dtype)
            yield s
            if s.written != s.expected:
                raise ValueError(f"member {name!r}: {s.written} of {s.expected} elements were written")

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def npz_member_memmap(path: str | os.PathLike, name: str) -> np.ndarray:
    """Member `<name>.npy` of the `.npz` at `path`, memory-mapped read-only (it must be stored,
    not compressed: `np.savez` and `NpzWriter` store; `np.savez_compressed` does not)."""
    path = Path(path)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: member {name!r} is compressed and cannot be memory-mapped")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if fields[0] != b"PK\x03\x04":
            raise ValueError(f"{path}: member {name!r} has no zip local header where the directory says")
        name_len, extra_len = fields[-2], fields[-1]
        f.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if math.prod(shape) == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
