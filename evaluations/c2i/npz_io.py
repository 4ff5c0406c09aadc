"""Read the images of an ADM-format `.npz` batch in chunks, with clear errors for bad input.

A batch is `np.savez(path, arr_0=images)` with `images` uint8 [N, H, W, 3] (NHWC, 0..255), as
the LlamaGen-family samplers and the ADM reference batches write it. Like the official
`open_npz_array`, the zip member `arr_0.npy` is read in chunks straight from the file (npy header
v1/v2), so 50,000 images never sit in memory at once; Fortran-ordered arrays fall back to a full
load. Unlike the official reader, the array is checked first: a float, NCHW or grey batch would
otherwise be cast to float32 and give a meaningless number without a word.
"""
from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARRAY_KEY = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class BatchFormatError(ValueError):
    """An `.npz` batch the evaluator cannot use; the message says how to fix it."""


@dataclass(frozen=True)
class BatchInfo:
    path: Path
    num_images: int
    height: int
    width: int


def _check_images(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype != np.uint8:
        raise BatchFormatError(
            f"{path}: {ARRAY_KEY} has dtype {dtype}, expected uint8 images with values 0..255 "
            f"(the ADM evaluator's input). Convert float images in [0,1] with "
            f"`(x * 255).round().clip(0, 255).astype(np.uint8)`, or in [-1,1] with "
            f"`(127.5 * x + 128).clip(0, 255).astype(np.uint8)`.")
    if len(shape) != 4:
        raise BatchFormatError(f"{path}: {ARRAY_KEY} has shape {shape}, expected [N, H, W, 3] (NHWC)")
    if shape[-1] != 3:
        hint = (" It looks like NCHW: save `x.transpose(0, 2, 3, 1)` instead."
                if shape[1] == 3 else "")
        raise BatchFormatError(
            f"{path}: {ARRAY_KEY} has shape {shape}; expected NHWC RGB images [N, H, W, 3].{hint}")


def _open_member(zf: zipfile.ZipFile, path: Path):
    name = f"{ARRAY_KEY}.npy"
    if name not in zf.namelist():
        keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
        raise BatchFormatError(
            f"{path}: no '{ARRAY_KEY}' array (found keys {keys}). The evaluator reads the images "
            f"from '{ARRAY_KEY}': save them with `np.savez(path, arr_0=images)`.")
    return zf.open(name, "r")


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def batch_info(path: str | Path) -> BatchInfo:
    """Number and size of the images in `arr_0`, validated (uint8, NHWC, 3 channels)."""
    path = Path(path)
    if not path.is_file():
        raise BatchFormatError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as zf, _open_member(zf, path) as f:
            header = _read_header(f)
    except zipfile.BadZipFile as e:
        raise BatchFormatError(f"{path}: not an .npz file ({e})") from e
    if header is None:  # npy v3 headers: read the whole array (rare)
        with np.load(path) as z:
            shape, dtype = z[ARRAY_KEY].shape, z[ARRAY_KEY].dtype
    else:
        shape, _, dtype = header
    _check_images(path, tuple(shape), np.dtype(dtype))
    return BatchInfo(path, int(shape[0]), int(shape[1]), int(shape[2]))


def iter_images(path: str | Path, batch_size: int) -> Iterator[np.ndarray]:
    """Yield uint8 [B, H, W, 3] chunks of `arr_0` in file order."""
    info = batch_info(path)
    frame = info.height * info.width * 3
    with zipfile.ZipFile(info.path) as zf, _open_member(zf, info.path) as f:
        header = _read_header(f)
        if header is None or header[1]:  # Fortran order (or unknown header): load whole
            with np.load(info.path) as z:
                arr = z[ARRAY_KEY]
            for i in range(0, len(arr), batch_size):
                yield np.ascontiguousarray(arr[i: i + batch_size])
            return
        for start in range(0, info.num_images, batch_size):
            n = min(batch_size, info.num_images - start)
            data = f.read(n * frame)
            if len(data) != n * frame:
                raise BatchFormatError(
                    f"{info.path}: {ARRAY_KEY} is truncated (expected {info.num_images} images, "
                    f"the data ends in image {start + len(data) // frame}); write the file again")
            yield np.frombuffer(data, dtype=np.uint8).reshape(n, info.height, info.width, 3)


def read_stored_statistics(path: str | Path) -> dict[str, np.ndarray] | None:
    """`mu, sigma, mu_s, sigma_s` of a reference batch that stores them (official
    `read_statistics`: key `mu` present -> all four are used), else None."""
    with np.load(path) as z:
        if "mu" not in z.files:
            return None
        missing = [k for k in STAT_KEYS if k not in z.files]
        if missing:
            raise BatchFormatError(f"{path}: has 'mu' but lacks {missing}; a reference batch with "
                                   f"statistics must store all of {list(STAT_KEYS)}")
        return {k: z[k] for k in STAT_KEYS}
