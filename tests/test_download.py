"""Downloads without the network: a local HTTP server with Range support, a faked Hub, the registry.

The server (`http.server` in a thread) serves one payload at `/file.bin` and answers `Range:
bytes=N-` with 206; `/norange.bin` ignores ranges, `/flaky.bin` drops the connection half-way on
its first request. The Hub path is tested with `hf_hub_download` replaced by a fake, and with
`HF_HUB_OFFLINE` on (the real function then fails fast, without touching the network).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants

from tests.golden import ROOT, golden_dir, official_key_files, official_keys
from utils.download import (
    NO_CHECKSUM, REGISTRY, DownloadError, download_checkpoint, download_url, entry_checksums,
    get_checkpoint, list_checkpoints, registry_markdown,
)

PAYLOAD = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


# ------------------------------------------------------------------------------------------------
# A local HTTP server with Range support
# ------------------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if self.path not in ("/file.bin", "/norange.bin", "/flaky.bin"):
            self.send_error(404)
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and self.path != "/norange.bin":
            start = int(m.group(1))
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/flaky.bin" and not srv.flaked:
            srv.flaked = True
            self.wfile.write(body[: len(body) // 2])  # then close: the client sees a short read
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)
        srv.bytes_sent += len(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str | None]] = []
        self.bytes_sent = 0
        self.flaked = False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def closed_port_url() -> str:
    """A URL on a local port nobody listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.bin"


# ------------------------------------------------------------------------------------------------
# download_url
# ------------------------------------------------------------------------------------------------

def test_download_fresh_with_checksums(server, tmp_path):
    dest = download_url(server.url("/file.bin"), tmp_path / "a" / "f.bin", sha256=SHA256, md5=MD5,
                        progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "a" / "f.bin.part").exists()
    assert server.requests == [("/file.bin", None)]


def test_resume_from_part(server, tmp_path):
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:3000])
    download_url(server.url("/file.bin"), dest, sha256=SHA256, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/file.bin", "bytes=3000-")]
    assert server.bytes_sent == len(PAYLOAD) - 3000  # only the missing bytes crossed the wire


def test_resume_when_server_ignores_range(server, tmp_path):
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"x" * 3000)  # garbage: must be overwritten, not kept
    download_url(server.url("/norange.bin"), dest, sha256=SHA256, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_is_finished_without_body(server, tmp_path):
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD)
    download_url(server.url("/file.bin"), dest, md5=MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD and server.bytes_sent == 0


def test_interrupted_download_resumes_on_rerun(server, tmp_path):
    dest, part = tmp_path / "f.bin", tmp_path / "f.bin.part"
    with pytest.raises(DownloadError, match="run again to resume"):
        download_url(server.url("/flaky.bin"), dest, sha256=SHA256, progress=False)
    assert not dest.exists()
    assert 0 < part.stat().st_size < len(PAYLOAD)
    kept = part.stat().st_size
    download_url(server.url("/flaky.bin"), dest, sha256=SHA256, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/flaky.bin", f"bytes={kept}-")


@pytest.mark.parametrize("kind", ["sha256", "md5"])
def test_checksum_mismatch_is_refused(server, tmp_path, kind):
    dest = tmp_path / "f.bin"
    wrong = {"sha256": "0" * 64} if kind == "sha256" else {"md5": "0" * 32}
    with pytest.raises(DownloadError, match=f"{kind} .* does not match") as err:
        download_url(server.url("/file.bin"), dest, progress=False, **wrong)
    assert server.url("/file.bin") in str(err.value)
    assert not dest.exists() and not (tmp_path / "f.bin.part").exists()


def test_sha256_prefix_is_accepted(server, tmp_path):
    dest = download_url(server.url("/file.bin"), tmp_path / "f.bin", sha256=SHA256[:8], progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_existing_verified_file_is_not_downloaded_again(tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(PAYLOAD)
    # A closed port: any network access would raise.
    assert download_url(closed_port_url(), dest, sha256=SHA256, progress=False) == dest


def test_existing_file_with_wrong_checksum_is_replaced(server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"stale")
    download_url(server.url("/file.bin"), dest, sha256=SHA256, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_unreachable_network_message(tmp_path):
    url = closed_port_url()
    with pytest.raises(DownloadError) as err:
        download_url(url, tmp_path / "f.bin", progress=False)
    msg = str(err.value)
    assert url in msg and "network is unreachable" in msg and str(tmp_path / "f.bin") in msg
    assert not (tmp_path / "f.bin").exists()


def test_http_error_names_url_and_status(server, tmp_path):
    with pytest.raises(DownloadError, match=r"missing\.bin: HTTP 404"):
        download_url(server.url("/missing.bin"), tmp_path / "f.bin", progress=False)


# ------------------------------------------------------------------------------------------------
# download_checkpoint: registry look-up, plain URLs, the Hub
# ------------------------------------------------------------------------------------------------

def _registry(tmp_path: Path, url: str, checksum) -> Path:
    path = tmp_path / "registry.json"
    entry = dict(name="thing.bin", method="aux", strategy=None, model="-", params=None, file="thing.bin",
                 local_path="sub/thing.bin", hf_repo=None, hf_filename=None, url=url, published_url=url,
                 checksum=checksum, flags="-", metric="-", tokenizer=None, notes="", source="test")
    path.write_text(json.dumps({"checkpoints": [entry]}))
    return path


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown checkpoint 'c2i_Q_999.pt'") as err:
        download_checkpoint("c2i_Q_999.pt")
    for name in ("vq_ds16_c2i.pt", "c2i_L_384.pt", "PAR-3B-16x.pt", "var_d36.pth", "vgg.pth"):
        assert name in str(err.value)


def test_plain_url_checkpoint_checks_published_md5(server, tmp_path):
    good = _registry(tmp_path, server.url("/file.bin"), {"md5": MD5, "source": "test"})
    path = download_checkpoint("thing.bin", tmp_path / "out", registry=good)
    assert path == tmp_path / "out" / "sub" / "thing.bin" and path.read_bytes() == PAYLOAD
    (tmp_path / "bad").mkdir()
    bad = _registry(tmp_path / "bad", server.url("/file.bin"), {"md5": "f" * 32, "source": "test"})
    with pytest.raises(DownloadError, match="md5"):
        download_checkpoint("thing.bin", tmp_path / "out2", registry=bad)
    assert not (tmp_path / "out2" / "sub" / "thing.bin").exists()


def test_hub_checkpoint_goes_through_hf_hub_download(monkeypatch, tmp_path):
    calls = []

    def fake_hf_hub_download(repo_id, filename, *, local_dir, **kw):
        calls.append((repo_id, filename, Path(local_dir)))
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(PAYLOAD)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    path = download_checkpoint("npp_c2i_B_256.pt", tmp_path)
    assert calls == [("pytttttt/LlamaGen-NPP", "c2i_B_256.pt", tmp_path / "npp")]
    assert path == tmp_path / "npp" / "c2i_B_256.pt"
    # Already there (no checksum published): returned without asking the Hub again.
    assert download_checkpoint("npp_c2i_B_256.pt", tmp_path) == path and len(calls) == 1
    download_checkpoint("vq_ds16_c2i.pt", tmp_path)
    assert calls[-1] == ("FoundationVision/LlamaGen", "vq_ds16_c2i.pt", tmp_path)


def test_hub_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError) as err:
        download_checkpoint("c2i_L_384.pt", tmp_path)
    msg = str(err.value)
    assert "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/c2i_L_384.pt" in msg
    assert "HF_HUB_OFFLINE=1" in msg and str(tmp_path / "c2i_L_384.pt") in msg


def test_cli_reports_offline_failure_and_lists(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = str(ROOT / "scripts" / "download_models.py")
    r = subprocess.run([sys.executable, script, "vq_ds16_c2i.pt", "--dest", str(tmp_path)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "HF_HUB_OFFLINE=1 is set" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, script, "--list", "--method", "par"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 4 and "PAR-3B-16x.pt" in r.stdout


# ------------------------------------------------------------------------------------------------
# The registry itself
# ------------------------------------------------------------------------------------------------

FIELDS = {"name", "method", "strategy", "model", "params", "file", "local_path", "hf_repo",
          "hf_filename", "url", "published_url", "checksum", "flags", "metric", "tokenizer",
          "notes", "source"}
METHODS = {"llamagen_vq", "llamagen_gpt", "par", "npp", "arpg", "lpd", "var_vqvae", "var", "aux"}


def test_registry_schema():
    entries = list_checkpoints()
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), "names must be unique"
    paths = [e["local_path"] for e in entries]
    assert len(paths) == len(set(paths)), "two entries would download to the same file"
    for e in entries:
        assert set(e) == FIELDS, e["name"]
        assert e["method"] in METHODS, e["name"]
        assert e["local_path"].endswith(e["file"]) and e["flags"] and e["metric"], e["name"]
        assert e["tokenizer"] is None or e["tokenizer"] in names, e["name"]
        if e["hf_repo"] is not None:
            assert e["url"] == f"https://huggingface.co/{e['hf_repo']}/resolve/main/{e['hf_filename']}"
            assert e["hf_filename"] == e["file"]
        c = e["checksum"]
        if c != NO_CHECKSUM:
            assert set(c) <= {"md5", "sha256", "sha256_prefix", "size_bytes", "source"} and c["source"]
            sha, md5 = entry_checksums(e)
            assert sha is None or re.fullmatch(r"[0-9a-f]{8,64}", sha)
            assert md5 is None or re.fullmatch(r"[0-9a-f]{32}", md5)
    by_method = {m: sum(e["method"] == m for e in entries) for m in METHODS}
    assert by_method == {"llamagen_vq": 2, "llamagen_gpt": 7, "par": 4, "npp": 4, "arpg": 3,
                         "lpd": 5, "var_vqvae": 1, "var": 5, "aux": 6}


def _published_files(d: dict) -> list[tuple[str, str]]:
    """(file name, URL) of every checkpoint an official_keys JSON names, tokenizers included."""
    out = [(f["name"], f["url"]) for f in d.get("files", [])]
    for key in ("checkpoint", "tokenizer"):
        if key in d:
            out.append((d[key]["file"], d[key].get("url") or d[key]["download"]))
    if "file" in d:
        out.append((d["file"], d["url"]))
    return out


@pytest.mark.parametrize("path", official_key_files(""))
def test_official_release_is_in_registry(path):
    d = official_keys(path)
    published = _published_files(d)
    assert published, f"{path}: no file listed"
    entries = list_checkpoints()
    for file, url in published:
        hits = [e for e in entries if e["file"] == file and e["published_url"] == url]
        assert hits, f"{Path(path).name}: {file} ({url}) is not in pretrained_models/checkpoints.json"


def test_every_hub_entry_comes_from_official_keys():
    folder = golden_dir() / "official_keys"
    if not folder.is_dir():
        pytest.skip(f"no official_keys under {folder}")
    urls = {url for f in folder.glob("*.json") for _, url in _published_files(json.loads(f.read_text()))}
    for e in list_checkpoints():
        if e["hf_repo"] is not None:
            assert e["published_url"] in urls, f"{e['name']}: {e['published_url']} is not an official URL"


def test_auxiliary_entries_match_their_sources():
    torchvision = pytest.importorskip("torchvision")
    vgg16 = get_checkpoint("vgg16-397923af.pth")
    assert vgg16["url"] == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    assert entry_checksums(vgg16) == ("397923af", None)
    lpips = get_checkpoint("vgg.pth")
    assert entry_checksums(lpips) == (None, "d507d7349b931f0638a25a48a722f98a")
    specs = golden_dir().parent / "specs"
    if not specs.is_dir():
        pytest.skip(f"no specs under {specs}")
    text = "\n".join(p.read_text() for p in specs.glob("*.md"))
    assert "d507d7349b931f0638a25a48a722f98a" in text
    for name in ("classify_image_graph_def.pb", "pt_inception-2015-12-05-6726825d.pth"):
        assert get_checkpoint(name)["url"] in text, name
    assert entry_checksums(get_checkpoint("pt_inception-2015-12-05-6726825d.pth")) == ("6726825d", None)
    for name in ("VIRTUAL_imagenet256_labeled.npz", "VIRTUAL_imagenet512.npz"):
        tail = get_checkpoint(name)["url"].split("/ref_batches/")[1]
        assert f"ref_batches/{tail}" in text, name


def test_readme_agrees_with_registry():
    readme = (REGISTRY.parent / "README.md").read_text()
    for e in list_checkpoints():
        for field in ("name", "file", "url", "published_url"):
            assert e[field] in readme, f"README lacks {field} of {e['name']}: {e[field]}"
    block = readme.split("<!-- table:begin")[1].split("-->", 1)[1].split("<!-- table:end -->")[0]
    assert block.strip() == registry_markdown().strip(), (
        "pretrained_models/README.md is out of date: paste `python scripts/download_models.py --markdown`")
