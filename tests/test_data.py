"""histodist.data.loader in one process: counts, splits, determinism, bad input, no unpickling.

Shards are built from real pcam-jpeg patches with uneven sizes (10, 8, 6 samples). The real
multi-process launch (2 ranks x 2 workers) is in test_data_multiprocess.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from shardkit import pcam_images, write_shards

from histodist.data import loader as data
from histodist.data.remote import ShardError

# torchvision 0.29 deprecates its image decoders (histodist.data.loader silences it outside pytest)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

SIZES = [10, 8, 6]


@pytest.fixture(scope="module", autouse=True)
def _no_workers_left():
    """After a loader error with workers, torch's shutdown may lose the stop message a worker
    waits for and falls back to terminate(): SIGTERM, which loader workers ignore (so that
    Slurm or `timeout` cannot kill them before a checkpoint). Such a worker stays until its
    parent ends, and at interpreter exit multiprocessing joins it for ever: the pytest process
    would never exit. Kill what this module's loaders left behind."""
    yield
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:  # DataLoader workers; nothing else here starts daemonic processes
            child.kill()
            child.join(10)


@pytest.fixture(scope="module")
def images(pcam_jpeg):
    return {
        "train": pcam_images(pcam_jpeg, "train", 12),
        "valid": pcam_images(pcam_jpeg, "valid", 12),
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory, images) -> str:
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, images, SIZES)
    return str(out)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def all_keys(shards: str, split: str) -> set[str]:
    keys = set()
    for entry in data.load_manifest(shards)["splits"][split]["shards"]:
        with tarfile.open(f"{shards}/{entry['name']}") as tf:
            keys |= {m.name.split(".")[0] for m in tf.getmembers()}
    return keys


def test_manifest_and_steps(shards):
    m = data.load_manifest(shards)
    assert m["splits"]["train"]["num_samples"] == 24
    assert data.steps_per_epoch(24, 2, 4) == 3
    assert data.steps_per_epoch(24, 2, 5) == 2
    assert data.steps_per_epoch(3, 2, 4) == 1  # never zero steps
    with pytest.raises(ShardError, match="no split 'test'"):
        data.train_loader(shards, "test", batch_size=4, rank=0, world_size=1)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resample", [True, False])
def test_train_yields_exactly_len_full_batches(shards, workers, resample):
    for rank in range(2):
        loader = data.train_loader(
            shards,
            batch_size=4,
            rank=rank,
            world_size=2,
            workers=workers,
            shuffle_buffer=8,
            resample=resample,
        )
        batches = list(loader)
        assert len(loader) == len(batches) == data.steps_per_epoch(24, 2, 4)
        for b in batches:
            assert b["image"].dtype == torch.uint8 and b["image"].shape == (4, 3, 96, 96)
            assert b["image"].is_contiguous(memory_format=torch.channels_last)
            assert b["label"].dtype == torch.int64 and set(b["label"].tolist()) <= {0, 1}
            assert len(b["key"]) == 4 and b["group"] == [f"g{v}" for v in b["label"].tolist()]
        assert loader.stats() == {"decode_errors": 0, "bad_shards": 0}


def test_train_is_deterministic_by_seed_and_epoch(shards):
    def run(seed, epoch, workers=2):
        loader = data.train_loader(
            shards,
            batch_size=4,
            rank=0,
            world_size=1,
            seed=seed,
            workers=workers,
            shuffle_buffer=12,
        )
        loader.set_epoch(epoch)
        return keys_of(loader)

    first = run(0, 0)
    assert run(0, 0) == first
    assert run(0, 1) != first
    assert run(1, 0) != first


def test_train_labels_match_the_images(shards, images):
    """Decoded pixels and labels belong together (compare with PIL decoding of the file)."""
    from PIL import Image

    by_key = {p.stem: (p, label) for p, label in images["train"]}
    batch = next(iter(data.train_loader(shards, batch_size=4, rank=0, world_size=1, workers=0)))
    for img, label, key in zip(batch["image"], batch["label"], batch["key"], strict=True):
        path, true_label = by_key[key]
        ref = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert int(label) == true_label
        assert (img.int() - ref.int()).abs().float().mean() < 2.0  # libjpeg IDCT differences


def test_persistent_workers_follow_set_epoch(shards):
    loader = data.train_loader(
        shards,
        batch_size=4,
        rank=0,
        world_size=1,
        workers=2,
        shuffle_buffer=12,
        persistent_workers=True,
    )
    loader.set_epoch(0)
    e0 = keys_of(loader)
    loader.set_epoch(1)
    e1 = keys_of(loader)
    loader.set_epoch(0)
    assert keys_of(loader) == e0 != e1


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_reads_every_sample_exactly_once(shards, workers, world):
    keys = []
    for rank in range(world):
        loader = data.eval_loader(
            shards, "train", batch_size=4, rank=rank, world_size=world, workers=workers
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        keys += keys_of(batches)
    assert len(keys) == 24 and not [k for k, n in Counter(keys).items() if n > 1]
    assert set(keys) == all_keys(shards, "train")


def test_encodings_decode_to_the_same_pixels(tmp_path, images):
    items = {"valid": images["valid"][:6]}
    out = {}
    for enc in ("png", "raw", "jpeg"):
        write_shards(tmp_path / enc, items, 6, encoding=enc)
        batch = next(
            iter(
                data.eval_loader(
                    str(tmp_path / enc), "valid", batch_size=6, rank=0, world_size=1, workers=0
                )
            )
        )
        out[enc] = batch["image"]
    assert torch.equal(out["png"], out["raw"])  # both lossless copies of PIL's decoding
    assert (out["jpeg"].int() - out["png"].int()).abs().float().mean() < 2.0


def test_image_size_resizes_in_workers(shards):
    loader = data.eval_loader(
        shards, "valid", batch_size=4, rank=0, world_size=1, workers=0, image_size=(64, 64)
    )
    assert next(iter(loader))["image"].shape == (4, 3, 64, 64)


def _copy_with(src: str, dst, edit) -> None:
    """Copy a shard folder, passing the member list of train-000001.tar through edit()."""
    import shutil

    shutil.copytree(src, dst)
    path = dst / "train-000001.tar"
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:
        for m, payload in edit(members):
            m.size = len(payload)
            tf.addfile(m, io.BytesIO(payload))


@pytest.mark.filterwarnings("ignore:skipping")
def test_undecodable_sample_is_skipped_and_counted(shards, tmp_path, caplog):
    def corrupt_two(members):
        jpgs = [m.name for m, _ in members if m.name.endswith(".jpg")][:2]
        return [(m, b"not a jpeg" if m.name in jpgs else p) for m, p in members]

    _copy_with(shards, tmp_path / "s", corrupt_two)
    for workers in (0, 2):
        loader = data.eval_loader(
            str(tmp_path / "s"), "train", batch_size=4, rank=0, world_size=1, workers=workers
        )
        assert len(keys_of(loader)) == 22
        assert loader.stats() == {"decode_errors": 2, "bad_shards": 0}
        assert "2 samples failed to decode" in caplog.text  # reported at the end of the epoch


@pytest.mark.filterwarnings("ignore:skipping")
def test_truncated_or_missing_shard_fails_naming_it(shards, tmp_path):
    import shutil

    shutil.copytree(shards, tmp_path / "t")
    bad = tmp_path / "t" / "train-000001.tar"
    bad.write_bytes(bad.read_bytes()[:5000])
    for workers in (0, 2):
        loader = data.eval_loader(
            str(tmp_path / "t"), "train", batch_size=4, rank=0, world_size=1, workers=workers
        )
        with pytest.raises(Exception, match="train-000001.tar"):
            list(loader)
        loader = data.eval_loader(
            str(tmp_path / "t"),
            "train",
            batch_size=4,
            rank=0,
            world_size=1,
            workers=workers,
            skip_bad_shards=True,
        )
        n = len(keys_of(loader))
        assert 16 <= n < 24 and loader.stats()["bad_shards"] == 1
    bad.unlink()
    with pytest.raises(Exception, match="train-000001.tar"):
        list(
            data.train_loader(
                str(tmp_path / "t"), batch_size=4, rank=0, world_size=1, workers=0, resample=False
            )
        )
    for workers in (0, 2):  # met by the plan and again by the passes that make up its samples
        loader = data.train_loader(str(tmp_path / "t"), batch_size=4, rank=0, world_size=1,
                                   workers=workers, skip_bad_shards=True)  # fmt: skip
        assert len(list(loader)) == len(loader) == 6
        assert loader.stats()["bad_shards"] == 1  # one shard, counted once


class _Boom:
    """Unpickling this would create the marker file (as a malicious member could)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_members_are_never_unpickled(shards, tmp_path, images):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Boom(str(marker)))
    key = images["valid"][0][0].stem
    extra = {key: {"pickle": payload, "pth": payload, "pyd": payload}}
    write_shards(tmp_path / "p", {"valid": images["valid"][:4]}, 4, extra_members=extra)
    batches = list(
        data.eval_loader(
            str(tmp_path / "p"), "valid", batch_size=4, rank=0, world_size=1, workers=0
        )
    )
    assert keys_of(batches)[0] == key and len(keys_of(batches)) == 4
    assert not marker.exists()
    assert set(batches[0]) == {"image", "label", "key", "group", "meta"}
    meta = batches[0]["meta"][0]  # the sample's whole .json, whatever fields it holds
    assert meta["group"] == batches[0]["group"][0] and meta["source"].endswith(f"{key}.jpg")


def test_to_device_keeps_lists(shards):
    batch = next(
        iter(data.eval_loader(shards, "valid", batch_size=4, rank=0, world_size=1, workers=0))
    )
    moved = data.to_device(batch, "cpu")
    assert torch.equal(moved["image"], batch["image"]) and moved["key"] == batch["key"]


def test_manifest_errors_name_the_file(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ShardError, match="manifest.json"):
        data.load_manifest(str(tmp_path))
    with pytest.raises(ShardError, match="nowhere"):
        data.load_manifest(str(tmp_path / "nowhere"))


def test_missing_manifest_says_how_to_make_shards(tmp_path):
    with pytest.raises(ShardError, match=r"histodist.shard --dataset pcam --download --out"):
        data.load_manifest(str(tmp_path / "pcam"))
    with pytest.raises(ShardError, match=r"--dataset idc --src RAW_FOLDER --out .*idc`"):
        data.load_manifest(str(tmp_path / "idc"))


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda m: [m], "top level is a list"),
        (lambda m: m.pop("classes"), "'classes' must be a list"),
        (lambda m: m.update(classes=[]), "'classes' is empty but split 'train' has class counts"),
        (lambda m: m["splits"]["train"].update(num_samples="64"), "train.num_samples"),
        (lambda m: m["splits"]["valid"]["shards"][0].pop("name"), r"valid.shards\[0\] needs"),
        (lambda m: m["splits"]["train"]["shards"][1].update(num_samples=-1), r"shards\[1\]"),
        (lambda m: m["splits"]["train"].update(class_counts=[1]), "one count per class"),
        (lambda m: m["splits"].update(train=[]), "splits.train needs a 'shards' list"),
        (
            lambda m: m["splits"]["valid"]["shards"][0].update(num_samples=1),
            r"splits.valid.num_samples is \d+, its shards hold \d+",
        ),
    ],
)
def test_manifest_of_the_wrong_schema_is_one_clear_error(shards, tmp_path, breakage, expected):
    m = json.loads((Path(shards) / "manifest.json").read_text())
    out = breakage(m)
    (tmp_path / "manifest.json").write_text(json.dumps(out if out == [m] else m))
    with pytest.raises(
        ShardError, match=f"manifest.json: not a histodist shard manifest.*{expected}"
    ):
        data.load_manifest(str(tmp_path))


def test_a_set_without_labels_loads(shards, tmp_path):
    """Unlabelled splits (class_counts null: Kaggle's test folder, slide tiles for prediction)
    load, in a set with classes and in one without any (whole slides tiled without labels)."""
    m = json.loads((Path(shards) / "manifest.json").read_text())
    m["splits"]["valid"]["class_counts"] = None
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert data.load_manifest(str(tmp_path))["splits"]["valid"]["class_counts"] is None
    m["classes"] = []
    m["splits"] = {"test": m["splits"]["valid"]}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert data.load_manifest(str(tmp_path))["classes"] == []


@pytest.mark.filterwarnings("ignore:skipping")
def test_object_npy_is_rejected_not_unpickled(tmp_path, images):
    """A .npy holding a pickled object array fails to decode (allow_pickle=False): counted."""
    marker = tmp_path / "unpickled"
    arr = np.empty(1, dtype=object)
    arr[0] = _Boom(str(marker))
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    items = images["valid"][:4]
    write_shards(tmp_path / "n", {"valid": items}, 4, encoding="raw")
    # replace the first sample's image by the object array
    path = tmp_path / "n" / "valid-000000.tar"
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:
        for m, payload in members:
            payload = buf.getvalue() if m.name == f"{items[0][0].stem}.npy" else payload
            m.size = len(payload)
            tf.addfile(m, io.BytesIO(payload))
    loader = data.eval_loader(str(tmp_path / "n"), "valid", batch_size=4, rank=0, world_size=1,
                              workers=0)  # fmt: skip
    assert len(keys_of(loader)) == 3 and loader.stats()["decode_errors"] == 1
    assert not marker.exists()


def test_pipe_url_base_and_brace_patterns(shards):
    """Shards behind a `pipe:` command (as on an object store) and named by a brace pattern."""
    base = f"pipe:cat {shards}/{{}}"
    loader = data.eval_loader(base, "train", batch_size=4, rank=0, world_size=1, workers=2)
    keys = keys_of(loader)
    assert sorted(keys) == sorted(all_keys(shards, "train"))
    pattern = f"{shards}/train-{{000000..000002}}.tar"
    loader = data.from_urls(pattern, batch_size=4, rank=1, world_size=2, num_samples=24,
                            workers=0, shuffle_buffer=8)  # fmt: skip
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert set(keys_of(batches)) <= all_keys(shards, "train")
    evaluated = [
        keys_of(
            data.from_urls(
                pattern, batch_size=4, rank=r, world_size=2, num_samples=24, train=False, workers=0
            )
        )  # fmt: skip
        for r in range(2)
    ]
    assert sorted(evaluated[0] + evaluated[1]) == sorted(all_keys(shards, "train"))


def test_no_resample_reads_each_sample_once_when_shards_divide_evenly(tmp_path, images):
    """4 shards of 6 over 2 ranks x 2 workers, batch 3: every sample exactly once per epoch."""
    write_shards(tmp_path / "even", {"train": images["train"]}, 6)
    for epoch in range(2):
        keys = []
        for rank in range(2):
            loader = data.train_loader(str(tmp_path / "even"), batch_size=3, rank=rank,
                                       world_size=2, workers=2, shuffle_buffer=8,
                                       resample=False)  # fmt: skip
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 4
            keys += keys_of(batches)
        assert sorted(keys) == sorted(all_keys(str(tmp_path / "even"), "train"))


@pytest.mark.filterwarnings("ignore:skipping bad shard")
def test_verify_shards_finds_bytes_flipped_inside_a_jpeg(tmp_path, images):
    """Flipped bytes inside an image member still decode; only the manifest's sha256, checked
    while the shard streams (verify_shards), finds them: an error, or a skipped shard."""
    write_shards(tmp_path, images, SIZES)
    intact = data.eval_loader(str(tmp_path), "valid", batch_size=4, rank=0, world_size=1,
                              workers=0, verify_shards=True)  # fmt: skip
    assert len(keys_of(intact)) == 24 and intact.stats()["bad_shards"] == 0
    path = tmp_path / "valid-000001.tar"
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\xff\xda") + 200  # inside the first JPEG's entropy-coded data
    raw[at : at + 4] = bytes(b ^ 0x55 for b in raw[at : at + 4])
    path.write_bytes(bytes(raw))

    def read(**kw):
        loader = data.eval_loader(str(tmp_path), "valid", batch_size=4, rank=0, world_size=1,
                                  workers=0, **kw)  # fmt: skip
        return keys_of(loader), loader.stats()

    keys, stats = read()
    assert len(keys) == 24 and stats == {"decode_errors": 0, "bad_shards": 0}  # silent
    with pytest.raises(ShardError, match="valid-000001.tar: sha256 differs"):
        read(verify_shards=True)
    keys, stats = read(verify_shards=True, skip_bad_shards=True)
    assert stats["bad_shards"] == 1 and len(keys) == 24  # its samples were read before the end


@pytest.mark.filterwarnings("ignore:skipping bad shard")
def test_verify_shards_in_training_checks_shards_cut_between_workers(tmp_path, images):
    """Training workers read shards by sample ranges; the worker whose range ends a shard reads
    on to its end, so every shard's digest is still checked (here with two worker processes)."""
    write_shards(tmp_path, images, SIZES)
    path = tmp_path / "train-000001.tar"
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\xff\xda") + 200
    raw[at : at + 4] = bytes(b ^ 0x55 for b in raw[at : at + 4])
    path.write_bytes(bytes(raw))

    def read(**kw):
        loader = data.train_loader(str(tmp_path), "train", batch_size=4, rank=0, world_size=1,
                                   workers=2, shuffle_buffer=0, **kw)  # fmt: skip
        return keys_of(loader), loader.stats()

    keys, stats = read()
    assert len(keys) == 24 and stats["bad_shards"] == 0  # flipped bytes decode silently
    with pytest.raises(ShardError, match="train-000001.tar: sha256 differs"):
        read(verify_shards=True)
    keys, stats = read(verify_shards=True, skip_bad_shards=True)
    assert stats["bad_shards"] == 1 and len(keys) == 24


def test_loader_options_are_one_declaration():
    """train_loader / eval_loader / from_urls take the same LoaderOptions fields; a misspelt
    one is an error before any shard is opened."""
    names = {f.name for f in dataclasses.fields(data.LoaderOptions)}
    assert {"batch_size", "rank", "world_size", "workers", "cache_dir", "verify_shards"} <= names
    for make in (lambda **k: data.train_loader("nowhere", **k),
                 lambda **k: data.eval_loader("nowhere", "valid", **k),
                 lambda **k: data.from_urls(["a.tar"], num_samples=1, **k)):  # fmt: skip
        with pytest.raises(TypeError, match="shufle_buffer"):
            make(batch_size=2, rank=0, world_size=1, shufle_buffer=10)


def test_package_forwards_loader_names_and_its_light_modules_import_no_torch():
    """`from histodist import data; data.train_loader(...)` reaches the loader, while
    histodist.data.remote / tarstream / epoch_plan alone (the CLIs' --help path) load no torch."""
    import histodist.data as package

    assert package.train_loader is data.train_loader and package.LoaderOptions is data.LoaderOptions
    with pytest.raises(AttributeError):
        package._STATS  # noqa: B018  (private names are not forwarded)
    code = (
        "import sys\n"
        "from histodist.data import epoch_plan, remote, tarstream\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    root = Path(__file__).resolve().parent.parent  # this checkout's package first
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip() == "NO-TORCH", proc.stdout + proc.stderr


def _planted(shards: str, out: Path, name: str) -> Path:
    """A copy of the shards whose manifest names its first train shard `name`."""
    import shutil

    shutil.copytree(shards, out)
    m = json.loads((out / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["name"] = name
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def _hostile_names(shards: str, marker: Path) -> list[str]:
    real = f"{shards}/train-000000.tar"
    return [f"pipe:touch {marker}; cat {real}", real, "../shards/train-000000.tar",
            f"file://{real}", "http://127.0.0.1:9/train-000000.tar", "..", "a\\b.tar"]  # fmt: skip


def test_manifest_shard_names_never_run_a_command_or_leave_the_folder(shards, tmp_path):
    """A manifest travels with its shards; a shard name that is a command, a URL or a path
    is refused before any shard is read, by the manifest check every command goes through."""
    marker = tmp_path / "PWNED"
    for i, name in enumerate(_hostile_names(shards, marker)):
        planted = _planted(shards, tmp_path / f"p{i}", name)
        with pytest.raises(ShardError, match=r"train.shards\[0\].name .* not a file name"):
            data.load_manifest(str(planted))
        with pytest.raises(ShardError, match="not a file name"):
            data.train_loader(str(planted), batch_size=4, rank=0, world_size=1, workers=0)
    assert not marker.exists()
    base = f"pipe:cat {shards}/{{}}"  # the user's own --shards may still be a command
    assert len(data.load_manifest(base)["splits"]["train"]["shards"]) == 3


def _planted_cli(cmd: str, planted: Path, tmp_path: Path) -> list[str]:
    from runkit import untrained_run

    tiny = ["--model", "small-cnn", "--image-size", "32", "--workers", "0", "--wandb",
            "disabled", "--runs-dir", str(tmp_path / "runs"), "--no-progress"]  # fmt: skip
    if cmd == "train":
        return ["--shards", str(planted), *tiny]
    if cmd == "lr_find":
        return ["--shards", str(planted), *tiny, "--out", str(tmp_path / "lr.png")]
    run = str(untrained_run(tmp_path / "run", ["0", "1"]))
    if cmd == "evaluate":
        return ["--run", run, "--shards", str(planted), "--split", "train"]
    if cmd == "predict":
        out = str(tmp_path / "p.csv")
        return ["--run", run, "--input", str(planted), "--split", "train", "--out", out]
    if cmd == "embed":
        return ["--model", "small-cnn", "--shards", str(planted), "--out", str(tmp_path / "e")]
    return ["--verify", str(planted)]


@pytest.mark.parametrize("cmd", ["train", "lr_find", "evaluate", "predict", "embed", "shard"])
def test_every_command_refuses_a_manifest_that_names_a_command(cmd, shards, tmp_path, capsys):
    import importlib

    marker = tmp_path / "PWNED"
    planted = _planted(shards, tmp_path / "planted", _hostile_names(shards, marker)[0])
    argv = _planted_cli(cmd, planted, tmp_path)
    assert importlib.import_module(f"histodist.{cmd}").main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"histodist.{cmd}: error: ") and "not a file name" in err[-1]
    assert not marker.exists()


def test_manifest_that_undercounts_a_shard_is_refused_while_reading(shards, tmp_path):
    """train-000000.tar holds 10 samples, the manifest says 6 (and the split 20, so that the
    manifest agrees with itself): the epoch used to leave 4 unread and repeat 4 others; the
    reader now stops, naming it."""
    import shutil

    shutil.copytree(shards, tmp_path / "u")
    m = json.loads((tmp_path / "u" / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["num_samples"] = 6
    m["splits"]["train"]["num_samples"] -= 4
    (tmp_path / "u" / "manifest.json").write_text(json.dumps(m))
    expected = "train-000000.tar: holds more samples than the 6 manifest.json says"
    for seed in (0, 1, 2):  # other seeds cut the shard into other pieces
        loader = data.train_loader(str(tmp_path / "u"), batch_size=4, rank=0, world_size=1,
                                   workers=0, seed=seed, shuffle_buffer=0)  # fmt: skip
        with pytest.raises(ShardError, match=expected):
            list(loader)
    loader = data.eval_loader(str(tmp_path / "u"), "train", batch_size=4, rank=0, world_size=1,
                              workers=0)  # fmt: skip
    with pytest.raises(ShardError, match=expected):
        list(loader)


def test_label_outside_the_classes_stops_every_loader(shards, tmp_path, images):
    key = images["train"][5][0].stem
    write_shards(tmp_path, {"train": images["train"]}, SIZES, extra_members={key: {"cls": b"7"}})
    for loader in (
        data.train_loader(str(tmp_path), batch_size=4, rank=0, world_size=1, workers=0),
        data.eval_loader(str(tmp_path), "train", batch_size=4, rank=0, world_size=1, workers=0),
    ):
        with pytest.raises(data.DataError, match=rf"train-000000.tar: sample {key}: .cls 7 ") as e:
            list(loader)
        assert "\n" not in str(e.value)


def _jpeg_claiming(path: Path, width: int, height: int) -> bytes:
    """A real JPEG whose start-of-frame header claims width x height."""
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\xff\xc0")  # baseline SOF0: length (2), precision (1), height, width
    raw[at + 5 : at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(raw)


def test_image_bombs_are_refused_on_their_header_before_decoding(tmp_path, images, monkeypatch):
    """A valid 30000 x 30000 PNG (2.6 MB, 2.7 GB of pixels) and a JPEG whose header claims
    40000 x 40000 reach no decoder: skipped and counted, as the shard writer refuses them, by
    the same limit; also as image files (predict / evaluate --input)."""
    from PIL import Image
    from shardkit import png_bomb

    from histodist import fileio
    from histodist.inference.core import ImageFiles, InputItem
    from histodist.ingest import imageio

    png = png_bomb(30000, 30000)
    valid = images["valid"][:4]
    jpeg = _jpeg_claiming(valid[2][0], 40000, 40000)
    bombs = {"png": (valid[1][0].stem, png), "jpeg": (valid[2][0].stem, jpeg)}
    real, seen = data._torchvision_decoder(), []

    def spy(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.numel())
        if t.numel() in (len(b) for _, b in bombs.values()):
            raise RuntimeError("a bomb reached the decoder")  # instead of allocating GBs
        return real(t)

    monkeypatch.setattr(data, "_torchvision_decoder", lambda: spy)
    for enc, (key, bomb) in bombs.items():
        ext = "png" if enc == "png" else "jpg"
        write_shards(
            tmp_path / enc, {"valid": valid}, 4, encoding=enc, extra_members={key: {ext: bomb}}
        )
        loader = data.eval_loader(str(tmp_path / enc), "valid", batch_size=4, rank=0,
                                  world_size=1, workers=0)  # fmt: skip
        with pytest.warns(UserWarning, match=f"{key}: image of .* pixels, over the limit"):
            keys = keys_of(loader)
        assert sorted(keys) == sorted(p.stem for p, _ in valid if p.stem != key)
        assert loader.stats()["decode_errors"] == 1
    assert len(seen) == 6 and not set(seen) & {len(b) for _, b in bombs.values()}
    (tmp_path / "bomb.png").write_bytes(png)
    item = ImageFiles([InputItem("bomb", str(tmp_path / "bomb.png"))], (32, 32))[0]
    assert not item["ok"] and "over the limit" in item["error"]
    assert fileio.MAX_IMAGE_PIXELS == 2 * Image.MAX_IMAGE_PIXELS  # the writer's (PIL's) limit
    with pytest.raises(imageio.DecodeError, match="exceeds limit of 178956970"):
        imageio.prepare(png)
