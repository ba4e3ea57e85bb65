"""histodist.data.tarstream against Python's tarfile on ustar, GNU and pax archives."""

from __future__ import annotations

import io
import tarfile

import pytest

from histodist.data.tarstream import TarStreamError, _locate_blocks, iter_tar, locate


def make_tar(fmt: int, names: list[str], with_dir: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        if with_dir:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
        for i, name in enumerate(names):
            payload = bytes(range(256)) * i + name.encode()  # sizes around block boundaries
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("alink")
        link.type, link.linkname = tarfile.SYMTYPE, names[0]
        tf.addfile(link)
    return buf.getvalue()


def reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isreg()]


LONG = "d" * 120 + "/sample_with_a_very_long_name_" + "x" * 80 + ".jpg"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_tarfile(fmt):
    names = ["a.jpg", "a.cls", "b.json", "dir/c.png", "e.npy"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append(LONG)
    data = make_tar(fmt, names)
    got = list(iter_tar(io.BytesIO(data)))
    assert got == reference(data) and len(got) == len(names)


def test_truncated_stream_raises():
    data = make_tar(tarfile.GNU_FORMAT, ["a.jpg", "b.jpg", "c.jpg"])
    for cut in (700, 1100, 2200, 3000):  # in a header, padding, member data
        with pytest.raises(TarStreamError, match="unexpected end"):
            list(iter_tar(io.BytesIO(data[:cut])))


def test_damaged_header_raises():
    data = bytearray(make_tar(tarfile.GNU_FORMAT, ["a.jpg", "b.jpg"], with_dir=False))
    data[10] ^= 0xFF  # a byte of the first member's name
    with pytest.raises(TarStreamError, match="checksum"):
        list(iter_tar(io.BytesIO(bytes(data))))


class _Counting(io.RawIOBase):
    """A stream over bytes that counts what is read; seekable or not."""

    def __init__(self, data: bytes, seekable: bool):
        self.buf, self.can_seek, self.read_bytes = io.BytesIO(data), seekable, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.can_seek

    def seek(self, offset: int, whence: int = 0) -> int:
        assert self.can_seek
        return self.buf.seek(offset, whence)

    def readinto(self, b) -> int:
        n = self.buf.readinto(b)
        self.read_bytes += n
        return n


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("seekable", [True, False])
def test_skipped_members_are_passed_over(fmt, seekable):
    names = [f"s{i:02d}.bin" for i in range(12)] + ([LONG] if fmt != tarfile.USTAR_FORMAT else [])
    data = make_tar(fmt, names)
    whole = _Counting(data, seekable)
    assert list(iter_tar(whole)) == reference(data)
    stream = _Counting(data, seekable)
    got = list(iter_tar(stream, skip=lambda name: name < "s10"))
    assert got == [m for m in reference(data) if m[0] >= "s10"]
    if seekable:  # the skipped payloads (~12 KB of the archive) were seeked over, not read
        assert stream.read_bytes < whole.read_bytes - 11_000
    else:  # streamed through and dropped
        assert stream.read_bytes == whole.read_bytes


def located(data: bytes, suffixes: tuple[str, ...]) -> dict[str, list[tuple[int, int]]]:
    """tarfile's (content offset, size) of the regular members ending with each suffix."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        regs = [m for m in tf.getmembers() if m.isreg()]
    return {x: [(m.offset_data, m.size) for m in regs if m.name.endswith(x)] for x in suffixes}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("extras", [False, True])  # a directory, a link and a long name
def test_locate_finds_what_tarfile_finds(fmt, extras):
    names = ["a.jpg", "a.cls", "b.json", "dir/c.jpg", "e.npy", "f.emb.npy", "g.json"]
    if extras and fmt != tarfile.USTAR_FORMAT:
        names.append(LONG)
    data = make_tar(fmt, names, with_dir=extras) if extras else _plain_tar(fmt, names)
    want = located(data, (".jpg", ".json", ".emb.npy"))
    assert locate(data, (".jpg", ".json", ".emb.npy")) == want
    assert len(want[".jpg"]) == 2 + extras * (fmt != tarfile.USTAR_FORMAT)
    fast = _locate_blocks(data, (".jpg",))
    assert (fast is None) == extras  # the general walk for directories, links, long names


def _plain_tar(fmt: int, names: list[str], payloads: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i, name in enumerate(names):
            payload = (payloads or {}).get(name, bytes(range(256)) * i + name.encode())
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_locate_on_a_run_of_members_and_on_lookalike_payloads():
    names = ["a.json", "b.emb.npy", "c.json", "d.emb.npy"]
    data = _plain_tar(tarfile.GNU_FORMAT, names)
    # a run of whole members cut out of the archive, as a slide's byte range is
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        ms = tf.getmembers()
    cut = data[ms[1].offset : ms[3].offset_data + -(-ms[3].size // 512) * 512]
    base = ms[1].offset
    want = [(m.offset_data - base, m.size) for m in (ms[1], ms[3])]
    assert locate(cut, (".emb.npy",))[".emb.npy"] == want
    assert _locate_blocks(cut, (".emb.npy",)) is not None
    # a payload holding a whole tar (header-like blocks at block boundaries) is not parsed
    inner = _plain_tar(tarfile.GNU_FORMAT, ["x.emb.npy", "y.json"])
    data = _plain_tar(tarfile.GNU_FORMAT, ["a.json", "b.bin", "c.emb.npy"], {"b.bin": inner})
    assert locate(data, (".emb.npy", ".json")) == located(data, (".emb.npy", ".json"))
    assert _locate_blocks(data, (".json",)) is None  # the inner headers broke the chain
    damaged = bytearray(data)
    damaged[5] ^= 0xFF
    with pytest.raises(TarStreamError, match="checksum"):
        locate(bytes(damaged), (".json",))
