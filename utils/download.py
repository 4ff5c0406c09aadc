"""Download official checkpoints and evaluation assets: resumable, checksum-checked, atomic.

`pretrained_models/checkpoints.json` lists every file the project loads (name, method, published
URL, checksum where the publisher gives one, the flags that use it, the published metric).
`download_checkpoint(name)` fetches one of them: Hub files through `huggingface_hub.hf_hub_download`
(which resumes its own `.incomplete` files), everything else through `download_url`.

`download_url` streams into `<dest>.part`, resumes an existing `.part` with an HTTP Range request,
checks the checksum before `os.replace` moves the file under its final name, and raises
`DownloadError` naming the URL when the network is unreachable, the server refuses, or the
checksum does not match. A file under its final name is therefore always complete (and verified
when a checksum is known), so an existing file is never downloaded again.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import socket
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Any

from tqdm import tqdm

from utils.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "pretrained_models" / "checkpoints.json"
NO_CHECKSUM = "none published"
CHUNK = 1 << 20  # bytes read per network call and per hashing step
TIMEOUT_S = 60  # socket timeout of one request (connect and each read)

log = logging.getLogger(__name__)


class DownloadError(UserError, RuntimeError):
    """A download that cannot complete: no network, HTTP error, truncated stream or bad checksum."""


# ------------------------------------------------------------------------------------------------
# Checksums
# ------------------------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike, algo: str) -> str:
    """Hex digest (`'sha256'`, `'md5'`, ...) of a file, read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def checksum_problem(path: str | os.PathLike, sha256: str | None, md5: str | None) -> str | None:
    """None when `path` matches every given checksum, else a sentence saying which one differs.

    `sha256` may be the full 64-digit digest or a leading prefix of it (torch.hub's convention,
    e.g. the `397923af` in `vgg16-397923af.pth`).
    """
    if sha256 is not None:
        actual = file_digest(path, "sha256")
        if not actual.startswith(sha256.lower()):
            return f"sha256 {actual} does not match the published {sha256}"
    if md5 is not None:
        actual = file_digest(path, "md5")
        if actual != md5.lower():
            return f"md5 {actual} does not match the published {md5}"
    return None


# ------------------------------------------------------------------------------------------------
# Plain URLs
# ------------------------------------------------------------------------------------------------

def _unreachable(url: str, dest: Path, reason: object) -> DownloadError:
    return DownloadError(
        f"cannot download {url}: the network is unreachable or the server refused the connection "
        f"({reason}). Download the file on a machine with network access and put it at {dest}."
    )


def _open(url: str, start: int, dest: Path):
    """Open `url`, asking for bytes `start..` when resuming; network failures become DownloadError."""
    headers = {"User-Agent": "llamagen-family-download/1"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # nothing left to send: the .part may already be the whole file
            return e
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:  # DNS failure, refused, unreachable, timeout
        raise _unreachable(url, dest, getattr(e, "reason", e)) from e


def download_url(url: str, dest: str | Path, sha256: str | None = None, md5: str | None = None,
                 progress: bool = True) -> Path:
    """Download `url` to `dest` and return `dest`.

    Resumes from `<dest>.part` when one exists (HTTP Range; a server that ignores the range
    restarts from zero). The checksum (`sha256`, full or prefix, and/or `md5`) is checked before
    the rename to `dest`; on a mismatch the `.part` is deleted and `DownloadError` is raised, so
    nothing is left under the final name. An existing `dest` that passes the given checksums (or
    any existing `dest` when none is given) is returned without touching the network.
    """
    dest = Path(dest)
    if dest.is_file():
        problem = checksum_problem(dest, sha256, md5)
        if problem is None:
            return dest
        log.warning("%s exists but %s; downloading it again", dest, problem)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0

    resp = _open(url, start, dest)
    with resp:
        status = resp.getcode()
        if status == 416:
            # The range starts at or past the end: complete if the server's size equals ours.
            total = resp.headers.get("Content-Range", "").rpartition("/")[2]
            if not (total.isdigit() and int(total) == start):
                part.unlink(missing_ok=True)
                raise DownloadError(
                    f"cannot resume {url}: {part} ({start} bytes) is larger than the file the "
                    f"server has ({total or 'unknown'} bytes); deleted it, run again to restart"
                )
            expected = start
        else:
            if status == 206:
                first = resp.headers.get("Content-Range", "").split(" ")[-1].split("-")[0]
                if first != str(start):
                    raise DownloadError(f"cannot resume {url}: asked for byte {start}, the server "
                                        f"answered {resp.headers.get('Content-Range')!r}")
            else:  # 200: the server sends the whole file, so start over
                start = 0
            length = resp.headers.get("Content-Length")
            expected = start + int(length) if length is not None and length.isdigit() else None
            _stream(resp, part, start, expected, url, dest, progress)

    size = part.stat().st_size
    if expected is not None and size != expected:
        raise DownloadError(f"download of {url} stopped at {size} of {expected} bytes; "
                            f"run again to resume from {part}")
    problem = checksum_problem(part, sha256, md5)
    if problem is not None:
        part.unlink()
        raise DownloadError(f"refusing {url}: {problem}. Deleted {part}; nothing was written to {dest}")
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    return dest


def _stream(resp, part: Path, start: int, expected: int | None, url: str, dest: Path,
            progress: bool) -> None:
    """Append the response body to `part` (truncating it first when `start` is 0)."""
    bar = tqdm(total=expected, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
               desc=dest.name, disable=not progress)
    try:
        with open(part, "ab" if start > 0 else "wb") as f:
            while block := resp.read(CHUNK):
                f.write(block)
                bar.update(len(block))
    except (OSError, http.client.HTTPException, socket.timeout) as e:
        raise DownloadError(f"download of {url} was interrupted ({e}); run again to resume from "
                            f"{part}") from e
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------------
# The registry: pretrained_models/checkpoints.json
# ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _read_registry(path: str) -> tuple[dict[str, Any], ...]:
    entries = json.loads(Path(path).read_text())["checkpoints"]
    return tuple(entries)


def list_checkpoints(method: str | None = None, registry: str | Path = REGISTRY) -> list[dict[str, Any]]:
    """Registry entries, optionally only those of one method (`par`) or method family (`llamagen`)."""
    entries = [dict(e) for e in _read_registry(str(registry))]
    if method is None:
        return entries
    return [e for e in entries if e["method"] == method or e["method"].split("_")[0] == method]


def get_checkpoint(name: str, registry: str | Path = REGISTRY) -> dict[str, Any]:
    """The registry entry called `name`; an unknown name raises a ValueError listing the known ones."""
    for e in _read_registry(str(registry)):
        if e["name"] == name:
            return dict(e)
    known = ", ".join(e["name"] for e in _read_registry(str(registry)))
    raise ValueError(f"unknown checkpoint {name!r}; known names: {known}")


def entry_checksums(entry: dict[str, Any]) -> tuple[str | None, str | None]:
    """(sha256 or its published prefix, md5) of a registry entry; (None, None) when none is published."""
    c = entry["checksum"]
    if c == NO_CHECKSUM:
        return None, None
    return c.get("sha256") or c.get("sha256_prefix"), c.get("md5")


def download_checkpoint(name: str, dest_dir: str | Path = "pretrained_models",
                        registry: str | Path = REGISTRY) -> Path:
    """Download the registry file `name` to `<dest_dir>/<local_path>` and return that path.

    Hub files go through `huggingface_hub.hf_hub_download(..., local_dir=...)` (resumable),
    others through `download_url`; the published checksum, where there is one, is checked either
    way. A file already in place that passes its checksum (or has none published) is returned
    without any network access.
    """
    entry = get_checkpoint(name, registry)
    target = Path(dest_dir) / entry["local_path"]
    sha256, md5 = entry_checksums(entry)
    if target.is_file():
        problem = checksum_problem(target, sha256, md5)
        if problem is None:
            return target
        log.warning("%s exists but %s; downloading it again", target, problem)
    if entry["hf_repo"] is None:
        return download_url(entry["url"], target, sha256=sha256, md5=md5)
    path = Path(_hub_download(entry, target))
    problem = checksum_problem(path, sha256, md5)
    if problem is not None:
        path.unlink()
        raise DownloadError(f"refusing {entry['url']}: {problem}; deleted {path}")
    return path


def _hub_download(entry: dict[str, Any], target: Path) -> str:
    """`hf_hub_download` into `target.parent`, with Hub and network errors turned into DownloadError."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id=entry["hf_repo"], filename=entry["hf_filename"],
                               local_dir=target.parent)
    except LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE=1 is set" if constants.is_offline_mode()
               else "the network is unreachable")
        raise DownloadError(
            f"cannot download {entry['name']} from the Hugging Face Hub ({entry['url']}): {why}. "
            f"Download it on a machine with network access and put it at {target}."
        ) from e
    except HfHubHTTPError as e:
        raise DownloadError(f"cannot download {entry['name']} from {entry['url']}: {e}") from e


# ------------------------------------------------------------------------------------------------
# The README table
# ------------------------------------------------------------------------------------------------

def registry_markdown(registry: str | Path = REGISTRY) -> str:
    """The table of `pretrained_models/README.md`, one row per registry entry."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|")

    rows = ["| name | method | model | params | URL | checksum | flags | published metric |",
            "|---|---|---|---|---|---|---|---|"]
    for e in list_checkpoints(registry=registry):
        params = f"{e['params']:,}" if e["params"] else "-"
        c = e["checksum"]
        checksum = c if c == NO_CHECKSUM else ", ".join(
            f"{k} {v}" for k, v in c.items() if k in ("md5", "sha256", "sha256_prefix"))
        where = f"`{e['local_path']}`" if e["local_path"] != e["name"] else ""
        url = e["url"] if e["published_url"] == e["url"] else (
            f"{e['url']} (published as {e['published_url']})")
        rows.append("| " + " | ".join([
            f"`{e['name']}`" + (f" ({where})" if where else ""),
            e["method"], cell(e["model"]), params, url, cell(checksum),
            f"`{cell(e['flags'])}`", cell(e["metric"]),
        ]) + " |")
    return "\n".join(rows) + "\n"
