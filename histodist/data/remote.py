"""Open shards and manifests wherever they live: local paths, file://, http(s):// and pipe: commands.

Everything returns a binary file-like object that streams (a shard is never read into memory):

- a local path or ``file://`` URL is opened directly;
- ``http(s)://`` is streamed with urllib; transient failures (connection refused / reset,
  timeouts, HTTP 408/425/429/5xx, a connection dropped mid-body) are retried with exponential
  backoff and jitter, resuming from the byte already delivered with an HTTP Range request, so a
  reader sees one uninterrupted stream. 4xx errors (404, 403, ...) fail at once;
- ``pipe:<shell command>`` streams the command's stdout (``pipe:aws s3 cp s3://b/pcam/x.tar -``,
  ``pipe:gsutil cat gs://b/pcam/x.tar``). A non-zero exit is retried by running the command
  again and skipping the bytes already delivered (object-store copies are deterministic), then
  fails with a ShardError naming the command and its last stderr line.

With ``cache_dir`` a remote shard is downloaded once into that folder and every later open
reads the local copy. Downloads go to a temporary name and are renamed atomically under an
``fcntl`` lock, so several ranks of one node sharing the folder download each shard once and
never see a partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import random
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from histodist.errors import HistodistError
from histodist.fileio import atomic_path

try:  # POSIX only; elsewhere the atomic rename alone keeps the cache consistent.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["ShardError", "open_url", "read_text", "join_url", "plain_name_problem"]

# First retry waits about BACKOFF_S seconds, then 2x, 4x ... capped at BACKOFF_MAX_S; each wait is
# scaled by a random factor in [0.5, 1.5) so that hundreds of ranks hitting one failing server do
# not retry in lockstep. Module-level so that tests can shorten it.
BACKOFF_S = 1.0
BACKOFF_MAX_S = 30.0

# HTTP statuses worth retrying: timeouts, rate limits and server-side failures.
_TRANSIENT_STATUS = {408, 425, 429}
# Errors that a later attempt may not hit: socket errors (refused, reset, timeout) are OSError,
# a body cut short by the server is http.client.IncompleteRead (an HTTPException).
_TRANSIENT_ERRORS = (OSError, http.client.HTTPException)
_CHUNK = 1 << 20


class ShardError(HistodistError, RuntimeError):
    """A shard or manifest cannot be read; the message names the URL / path and the fix."""


class _Retryable(OSError):
    """A failure that another attempt may not hit (short body, failed pipe command)."""


def _backoff(attempt: int) -> float:
    return min(BACKOFF_S * 2**attempt, BACKOFF_MAX_S) * (0.5 + random.random())


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _local_path(url: str) -> str:
    if url.startswith("file://"):
        return urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
    return url


class _ResumableStream(io.RawIOBase):
    """A read-only byte stream that reconnects on transient errors and resumes at `self._pos`.

    Subclasses implement `_connect(offset)` (returns an object with `readinto`) and `_at_eof()`
    (raises `_Retryable` when the stream ended too early or the source reports a failure).
    """

    def __init__(self, name: str, retries: int) -> None:
        super().__init__()
        self.name = name
        self._retries = retries
        self._pos = 0
        self._stream = None
        self._retrying(self._ensure_connected)  # fail now, not at the first read, on a bad URL

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:
        return self._retrying(self._readinto_once, b)

    def _ensure_connected(self) -> None:
        if self._stream is None:
            self._stream = self._connect(self._pos)

    def _readinto_once(self, b) -> int:
        self._ensure_connected()
        n = self._stream.readinto(b)
        if not n:
            self._at_eof()
        self._pos += n
        return n

    def _retrying(self, fn, *args):
        """Call fn; on a transient error back off, drop the connection and call it again."""
        for attempt in range(self._retries + 1):
            try:
                return fn(*args)
            except _TRANSIENT_ERRORS as exc:
                error = exc
                self._disconnect()
                if attempt < self._retries:
                    time.sleep(_backoff(attempt))
        raise ShardError(
            f"{self.name}: failed after {self._retries + 1} attempts "
            f"(at byte {self._pos}): {error}; check that the source is reachable from this node"
        ) from error

    def _disconnect(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(_TRANSIENT_ERRORS):
                stream.close()

    def close(self) -> None:
        if not self.closed:
            self._disconnect()
        super().close()

    def _connect(self, offset: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _at_eof(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _skip(stream, n: int) -> None:
    """Read and drop n bytes: resuming a source that cannot seek."""
    while n > 0:
        chunk = stream.read(min(n, _CHUNK))
        if not chunk:
            raise _Retryable(f"stream ended while skipping to byte offset {n}")
        n -= len(chunk)


class _HttpStream(_ResumableStream):
    def __init__(self, url: str, retries: int, timeout: float) -> None:
        self._timeout = timeout
        self._size: int | None = None  # total bytes, from Content-Length / Content-Range
        super().__init__(url, retries)

    def _connect(self, offset: int):
        from histodist.version import version_string

        headers = {"User-Agent": f"histodist/{version_string()}", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(self.name, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=self._timeout)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code in _TRANSIENT_STATUS:
                raise _Retryable(f"HTTP {exc.code} {exc.reason}") from exc
            raise ShardError(
                f"{self.name}: HTTP {exc.code} {exc.reason}; check the URL base and that the "
                "shard exists and is readable"
            ) from exc
        if offset and response.status == 206:
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit():
                self._size = int(total)
        else:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit():
                self._size = int(length)
            if offset:  # the server ignored the Range header and sent the whole body again
                _skip(response, offset)
        return response

    def _at_eof(self) -> None:
        # http.client returns b"" when the server closes before Content-Length bytes arrived.
        if self._size is not None and self._pos < self._size:
            raise _Retryable(f"connection closed at byte {self._pos} of {self._size}")


class _PipeStream(_ResumableStream):
    def __init__(self, url: str, retries: int) -> None:
        self._cmd = url[len("pipe:") :]
        self._proc: subprocess.Popen | None = None
        super().__init__(url, retries)

    def _connect(self, offset: int):
        # stderr goes to a file, not a pipe: a chatty command cannot block on a full pipe.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _disconnect
        self._proc = subprocess.Popen(
            self._cmd,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        _skip(self._proc.stdout, offset)
        return self._proc.stdout

    def _at_eof(self) -> None:
        code = self._proc.wait()
        if code != 0:
            self._stderr.seek(0)
            lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""
            raise _Retryable(f"command exited with status {code}{detail}")

    def _disconnect(self) -> None:
        super()._disconnect()
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:  # closed before the end: do not leave the command running
                proc.kill()
            proc.wait()
            self._stderr.close()


def _cache_name(url: str) -> str:
    """A stable file name for url: a hash (unique) plus the shard's base name (readable)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    if _is_http(url):
        base = urllib.parse.unquote(urllib.parse.urlsplit(url).path).rsplit("/", 1)[-1]
    else:  # pipe: the last word that looks like a path, e.g. s3://bucket/pcam/train-000000.tar
        words = [w for w in shlex.split(url[len("pipe:") :]) if "/" in w or "." in w] or ["pipe"]
        base = words[-1].rstrip("/").rsplit("/", 1)[-1]
    return f"{digest}-{re.sub(r'[^A-Za-z0-9._-]', '_', base)[-80:]}"


def _cached(url: str, cache_dir: str, open_remote) -> BinaryIO:
    """Return the cached copy of url, downloading it first under a per-file lock."""
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / _cache_name(url)
    if final.exists():
        return open(final, "rb")
    with open(f"{final}.lock", "a+b") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # others wait here, then find the finished file
        if not final.exists():  # atomic: readers see no file or the whole file
            with (
                atomic_path(final, fsync=True) as tmp,
                open_remote() as src,
                open(tmp, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, _CHUNK)
    return open(final, "rb")


def open_url(
    url: str, *, retries: int = 3, timeout: float = 60.0, cache_dir: str | None = None
) -> BinaryIO:
    """Open a shard for streaming reads; returns a binary file-like object (read / readinto).

    url: a local path, ``file://``, ``http(s)://`` or ``pipe:<shell command>``.
    retries: extra attempts after a transient failure (per read that makes no progress).
    timeout: seconds a connection or a socket read may block before it counts as a failure.
    cache_dir: when set, remote shards (http, pipe) are downloaded there once and read locally
    afterwards; local paths are never copied.
    Raises ShardError naming the URL when the shard cannot be opened or read.
    """
    if url.startswith("pipe:"):
        remote = lambda: io.BufferedReader(_PipeStream(url, retries), _CHUNK)  # noqa: E731
    elif _is_http(url):
        remote = lambda: io.BufferedReader(_HttpStream(url, retries, timeout), _CHUNK)  # noqa: E731
    else:
        path = _local_path(url)
        try:
            return open(path, "rb")
        except OSError as exc:
            raise ShardError(f"{path}: {exc.strerror}; check --shards and the manifest") from exc
    if cache_dir:
        try:
            return _cached(url, cache_dir, remote)
        except OSError as exc:
            raise ShardError(f"{url}: cannot cache in {cache_dir}: {exc}") from exc
    return remote()


def read_text(url: str, **kw) -> str:
    """The whole content of url (a manifest, _info.json) decoded as UTF-8; kw go to open_url."""
    with open_url(url, **kw) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShardError(f"{url}: not UTF-8 text ({exc}); is this the manifest?") from exc


def plain_name_problem(name: str) -> str | None:
    """Why `name` is not a plain file name of a shard folder, or None when it is.

    A manifest names its shards by file name only (``train-000000.tar``): no path separator,
    no ``..``, no ``:`` (so no ``pipe:`` command, no URL scheme, no drive letter), no control
    character. A manifest travels with the shards (a collaborator's folder, an http server),
    so a name it holds must never run a command or reach outside the folder; ``pipe:`` and
    URLs belong only to the ``--shards`` base the user typed.
    """
    if not name or name in (".", ".."):
        return "not a file name"
    bad = next((c for c in name if c in "/\\:" or ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"holds {bad!r}"
    return None


def join_url(base: str, name: str) -> str:
    """The location of `name` (e.g. ``train-000000.tar``) relative to a shard base.

    base: a folder, ``file://`` or ``http(s)://`` URL (a query string such as a signed token is
    kept), or a ``pipe:`` template where ``{}`` stands for the name
    (``pipe:aws s3 cp s3://bucket/pcam/{} -``). `name` must be a plain file name of that folder
    (see `plain_name_problem`): a URL, ``pipe:`` command or path raises ShardError.
    """
    problem = plain_name_problem(name)
    if problem is not None:
        raise ShardError(
            f"shard name {name!r} is not a file name of the shard folder ({problem}); "
            "pipe: commands and URLs go in --shards only"
        )
    if base.startswith("pipe:"):
        if "{}" not in base:
            raise ShardError(
                f"{base}: a pipe: shard base needs '{{}}' where the shard name goes, "
                "e.g. 'pipe:aws s3 cp s3://bucket/pcam/{} -'"
            )
        return base.replace("{}", shlex.quote(name))
    if "://" in base:
        parts = urllib.parse.urlsplit(base)
        path = parts.path.rstrip("/") + "/" + urllib.parse.quote(name)
        return urllib.parse.urlunsplit(parts._replace(path=path))
    return os.path.join(base, name)
