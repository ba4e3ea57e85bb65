"""PCam download against a local HTTP server (127.0.0.1) serving tiny files in the official names."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import fixtures_layouts as fx
import pytest
from trainkit import free_port

from histodist import shard
from histodist.ingest import download


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with `Range: bytes=N-` support; records the Range headers it saw."""

    ranges: list[str | None] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        if start >= len(data) and rng:
            self.send_error(416)
            return
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def mirror(tmp_path, pcam_jpeg, monkeypatch):
    """(URL base, served folder): the official file names, tiny contents; MD5 table patched."""
    served = fx.make_pcam_h5(tmp_path / "served", pcam_jpeg, gz=True)
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    assert set(sums) == set(download.PCAM_FILES)  # every official name, nothing else
    monkeypatch.setattr(download, "PCAM_FILES", sums)
    RangeHandler.ranges = []
    handler = lambda *a, **kw: RangeHandler(*a, directory=str(served), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


def test_download_then_shard(tmp_path, mirror):
    base, served = mirror
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = [
        "--dataset",
        "pcam",
        "--download",
        "--cache-dir",
        cache,
        "--url-base",
        base,
        "--workers",
        1,
    ]
    assert shard.main([str(a) for a in [*args, "--out", out]]) == 0
    for p in served.iterdir():
        assert (cache / p.name).read_bytes() == p.read_bytes()
    m = json.loads((out / "manifest.json").read_text())
    assert {s: v["num_samples"] for s, v in m["splits"].items()} == {
        "train": 8,
        "valid": 4,
        "test": 4,
    }
    n = len(RangeHandler.ranges)
    assert download.fetch_pcam(cache, base) == cache  # all present and verified: no request
    assert len(RangeHandler.ranges) == n


def test_resumes_a_partial_download(tmp_path, mirror):
    base, served = mirror
    name = "camelyonpatch_level_2_split_train_x.h5.gz"
    data = (served / name).read_bytes()
    part = tmp_path / f"{name}.part"
    part.write_bytes(data[:1000])
    download.download(f"{base}/{name}", tmp_path / name, download.PCAM_FILES[name])
    assert (tmp_path / name).read_bytes() == data and not part.exists()
    assert RangeHandler.ranges == ["bytes=1000-"]


def test_checksum_mismatch_deletes_the_file(tmp_path, mirror, monkeypatch, capsys):
    base, _ = mirror
    name = "camelyonpatch_level_2_split_valid_y.h5.gz"
    monkeypatch.setitem(download.PCAM_FILES, name, "0" * 32)
    rc = shard.main(
        [
            "--dataset",
            "pcam",
            "--download",
            "--cache-dir",
            str(tmp_path / "c"),
            "--url-base",
            base,
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("histodist.shard: error: ") and name in err and "MD5" in err
    assert not (tmp_path / "c" / name).exists() and not (tmp_path / "c" / f"{name}.part").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_offline_fails_at_once_and_says_where_to_put_files(tmp_path, capsys):
    port = free_port()  # nobody listens: connection refused, like offline
    rc = shard.main(
        [
            "--dataset",
            "pcam",
            "--download",
            "--cache-dir",
            str(tmp_path / "c"),
            "--url-base",
            f"http://127.0.0.1:{port}",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "by hand" in err and str(tmp_path / "c") in err
