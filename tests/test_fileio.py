"""histodist.fileio: whole-or-nothing writes, digests, the one list of image extensions."""

import hashlib
import os

import pytest

from histodist import fileio
from histodist.ingest import outdir


def test_atomic_write_replaces_whole_with_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "a.json"
    fileio.atomic_write(path, "old")
    fileio.atomic_write(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_atomic_path_error_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.tar"
    path.write_text("complete")
    with pytest.raises(RuntimeError), fileio.atomic_path(path) as tmp:
        tmp.write_text("half")
        assert tmp.parent == path.parent and fileio.temp_of("x.tar").fullmatch(tmp.name)
        raise RuntimeError("writer failed")
    assert path.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["x.tar"]


def test_file_digest_matches_hashlib_across_chunks(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(10_000)
    path.write_bytes(data)
    for algo in ("sha256", "md5"):
        want = hashlib.new(algo, data).hexdigest()
        assert fileio.file_digest(path, algo, bufsize=4096) == want


def test_remove_stale_deletes_the_writers_temporaries_and_old_shards_only(tmp_path):
    names = ["train-000000.tar", "train-000001.tar", ".train-000002.tar.k2x_9.tmp", "notes.txt",
             "backup-000001.tar", ".manifest.json.a1b2.tmp"]  # fmt: skip
    for n in names:
        (tmp_path / n).write_text("x")
    fileio.atomic_write(tmp_path / ".shardinfo" / "train-000001.tar.json", "{}")
    fileio.atomic_write(tmp_path / ".shardinfo" / "train-000000.tar.json", "{}")
    found = outdir.survey(tmp_path)
    assert found.foreign == ["backup-000001.tar", "notes.txt"]
    outdir.remove_stale(found, {"train-000000.tar"})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".shardinfo", "backup-000001.tar", "notes.txt", "train-000000.tar"]
    assert [p.name for p in (tmp_path / ".shardinfo").iterdir()] == ["train-000000.tar.json"]


def test_image_extensions_are_shared():
    from histodist.data import loader as data
    from histodist.inference import core as inference
    from histodist.ingest import sources

    assert set(fileio.IMAGE_EXTENSIONS) <= set(inference.IMAGE_SUFFIXES)
    assert {e[1:] for e in fileio.IMAGE_EXTENSIONS} <= set(data.IMAGE_EXTS)
    assert sources.IMAGE_EXTENSIONS is fileio.IMAGE_EXTENSIONS
