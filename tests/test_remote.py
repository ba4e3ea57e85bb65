"""histodist.data.remote against a real HTTP server on 127.0.0.1 and real shell commands."""

from __future__ import annotations

import re
import shlex
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from trainkit import free_port

from histodist.data import remote
from histodist.data.remote import ShardError, join_url, open_url, read_text


class _Handler(BaseHTTPRequestHandler):
    """Serves server.files[name] with Range support; server.faults[name] lists one-shot faults."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        srv = self.server
        with srv.lock:
            srv.requests.append((name, self.headers.get("Range")))
            fault = srv.faults[name].pop(0) if srv.faults.get(name) else None
        if fault in (500, 503):
            return self._status(fault)
        if name not in srv.files:
            return self._status(404)
        data = srv.files[name]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and fault != "ignore-range":
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault in ("truncate", "reset"):
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            if fault == "reset":  # RST instead of FIN: the client sees ECONNRESET
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            self.close_connection = True
            self.connection.close()
            return
        for i in range(0, len(body), 64 * 1024):
            self.wfile.write(body[i : i + 64 * 1024])
            time.sleep(srv.delay)

    def _status(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.faults, srv.requests = {}, {}, []
    srv.lock, srv.delay = threading.Lock(), 0.0
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


@pytest.fixture
def shard_bytes(pcam_jpeg) -> bytes:
    """About 300 kB of real PCam JPEG bytes: big enough to span many reads."""
    files = sorted((pcam_jpeg / "train" / "1").glob("*.jpg"))[:100]
    return b"".join(f.read_bytes() for f in files)


def test_http_reads_whole_file(server, shard_bytes):
    server.files["train-000000.tar"] = shard_bytes
    with open_url(join_url(server.base, "train-000000.tar")) as f:
        assert f.read() == shard_bytes


@pytest.mark.parametrize("fault", ["truncate", "reset", "ignore-range"])
def test_http_resumes_connection_dropped_mid_file(server, shard_bytes, fault):
    server.files["s.tar"] = shard_bytes
    # "ignore-range": the drop is followed by a server that answers the Range request with 200.
    server.faults["s.tar"] = ["truncate", "ignore-range"] if fault == "ignore-range" else [fault]
    with open_url(f"{server.base}/s.tar") as f:
        got = b"".join(iter(lambda: f.read(10_000), b""))
    assert got == shard_bytes
    ranges = [r for name, r in server.requests if name == "s.tar"]
    assert len(ranges) == 2 and ranges[0] is None
    if fault != "reset":  # an RST may also discard bytes already in the client's socket buffer
        assert ranges[1] == f"bytes={len(shard_bytes) // 3}-"


def test_http_retries_server_errors(server, shard_bytes):
    server.files["s.tar"] = shard_bytes
    server.faults["s.tar"] = [503, 500]
    with open_url(f"{server.base}/s.tar", retries=2) as f:
        assert f.read() == shard_bytes
    assert len(server.requests) == 3


def test_http_gives_up_after_retries(server):
    server.files["s.tar"] = b"x"
    server.faults["s.tar"] = [503] * 5
    with pytest.raises(ShardError, match=re.escape(f"{server.base}/s.tar")):
        open_url(f"{server.base}/s.tar", retries=2)
    assert len(server.requests) == 3


def test_http_404_fails_at_once_naming_the_url(server):
    url = join_url(server.base + "/pcam/", "train-000007.tar")
    with pytest.raises(ShardError, match=re.escape(url) + ".*404"):
        open_url(url, retries=3)
    assert len(server.requests) == 1


def test_connection_refused_is_retried_then_names_url():
    port = free_port()  # nobody listens there
    url = f"http://127.0.0.1:{port}/s.tar"
    with pytest.raises(ShardError, match=re.escape(url) + ".*after 2 attempts"):
        open_url(url, retries=1, timeout=5)


def test_read_text_manifest_from_url_base(server):
    server.files["pcam/manifest.json"] = '{"dataset": "pcam", "é": 1}'.encode()
    assert '"dataset": "pcam"' in read_text(join_url(server.base + "/pcam", "manifest.json"))


def test_local_path_and_file_url(tmp_path, shard_bytes):
    path = tmp_path / "a b.tar"
    path.write_bytes(shard_bytes)
    with open_url(str(path)) as f:
        assert f.read() == shard_bytes
    with open_url(path.as_uri()) as f:
        assert f.read() == shard_bytes
    with pytest.raises(ShardError, match=re.escape(str(tmp_path / "missing.tar"))):
        open_url(join_url(str(tmp_path), "missing.tar"))


def test_pipe_streams_stdout(tmp_path, shard_bytes):
    (tmp_path / "train-000000.tar").write_bytes(shard_bytes)
    url = join_url(f"pipe:cat {shlex.quote(str(tmp_path))}/{{}}", "train-000000.tar")
    with open_url(url) as f:
        assert f.read() == shard_bytes


def test_pipe_failure_names_the_command(tmp_path):
    url = "pipe:echo partial; echo 'NoSuchKey: s3://bucket/x.tar' >&2; exit 3"
    with pytest.raises(ShardError) as info, open_url(url, retries=1) as f:
        f.read()
    message = str(info.value)
    assert url in message and "status 3" in message and "NoSuchKey" in message


def test_pipe_failing_once_is_rerun_and_resumed(tmp_path, shard_bytes):
    src, marker = tmp_path / "s.tar", tmp_path / "failed-once"
    src.write_bytes(shard_bytes)
    script = (
        f"if [ -e {marker} ]; then cat {src}; else touch {marker}; head -c 1000 {src}; exit 1; fi"
    )
    with open_url(f"pipe:{script}") as f:
        assert f.read() == shard_bytes


def test_pipe_closed_early_stops_the_command(tmp_path):
    with open_url("pipe:yes histodist") as f:
        assert f.read(9) == b"histodist"
    # close() killed `yes`; reaching here (instead of hanging) is the check.


def test_join_url():
    assert join_url("/data/pcam", "train-000000.tar") == "/data/pcam/train-000000.tar"
    assert join_url("https://h/pcam/", "manifest.json") == "https://h/pcam/manifest.json"
    assert join_url("https://h/pcam?sig=a%2Fb", "x.tar") == "https://h/pcam/x.tar?sig=a%2Fb"
    assert join_url("file:///d", "x y.tar") == "file:///d/x%20y.tar"
    assert (
        join_url("pipe:gsutil cat gs://b/pcam/{}", "x.tar") == "pipe:gsutil cat gs://b/pcam/x.tar"
    )
    with pytest.raises(ShardError, match=r"\{\}"):
        join_url("pipe:cat", "x.tar")


@pytest.mark.parametrize(
    "name", ["pipe:touch x", "http://h/x.tar", "/data/x.tar", "../x.tar", "a/b.tar", "..", "a\tb"]
)
def test_join_url_takes_only_file_names_of_the_folder(tmp_path, name):
    """A name from a manifest is never a command, a URL or a path out of the base."""
    for base in (str(tmp_path), "https://h/pcam", f"pipe:cat {tmp_path}/{{}}"):
        with pytest.raises(ShardError, match="not a file name"):
            join_url(base, name)


def test_cache_shared_by_concurrent_readers(server, tmp_path, shard_bytes):
    server.files["pcam/train-000003.tar"] = shard_bytes
    server.delay = 0.01  # a slow download, so that the readers overlap
    url = f"{server.base}/pcam/train-000003.tar"
    cache = tmp_path / "cache"

    def read() -> bytes:
        with open_url(url, cache_dir=str(cache)) as f:
            return f.read()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: read(), range(4)))
    assert all(r == shard_bytes for r in results)
    assert len(server.requests) == 1  # one download, three readers waited for it
    files = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert len(files) == 1 and files[0].endswith("-train-000003.tar")  # no partial file left
    assert read() == shard_bytes and len(server.requests) == 1  # later opens read the cache


def test_cache_never_exposes_a_failed_download(server, tmp_path, shard_bytes):
    server.files["s.tar"] = shard_bytes
    server.faults["s.tar"] = ["truncate", 503, 503]
    cache = tmp_path / "cache"
    with pytest.raises(ShardError):
        open_url(f"{server.base}/s.tar", retries=2, cache_dir=str(cache))
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    with open_url(f"{server.base}/s.tar", cache_dir=str(cache)) as f:
        assert f.read() == shard_bytes


def test_cache_across_processes(server, tmp_path, shard_bytes):
    """Two processes (ranks of one node) share the cache: identical complete files."""
    import multiprocessing as mp

    server.files["s.tar"] = shard_bytes
    server.delay = 0.01
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        outs = pool.starmap(
            _read_to,
            [
                (f"{server.base}/s.tar", str(tmp_path / "cache"), str(tmp_path / f"{i}"))
                for i in range(2)
            ],
        )
    assert outs == [len(shard_bytes)] * 2
    assert (tmp_path / "0").read_bytes() == (tmp_path / "1").read_bytes() == shard_bytes
    assert len(server.requests) == 1


def _read_to(url: str, cache: str, out: str) -> int:
    with open_url(url, cache_dir=cache) as f:
        data = f.read()
    Path(out).write_bytes(data)
    return len(data)
