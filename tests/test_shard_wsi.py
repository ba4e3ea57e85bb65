"""`python -m histodist.shard --dataset wsi`: real slides and pyramids of real PCam patches."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import SHARED_DATA
from PIL import Image
from slidekit import CELL, asap_xml, block, geojson_rect, make_cohort, make_slide

from histodist import shard
from histodist.ingest.slides import ranks
from histodist.ingest.slides.sharding import pack

pytest.importorskip("openslide", reason="the wsi extra (openslide) is not installed")
WSI = SHARED_DATA / "wsi"
CMU = WSI / "CMU-1-Small-Region.svs"
TCGA = WSI / "TCGA-CR-7395-01A-01-TS1.svs"
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"  # data README
TILE_FIELDS = {"group", "slide", "x", "y", "level", "mpp", "tissue", "extent"}
# 1 µm/px, 64 px tiles on the 0.25 µm/px fixtures: one tile per 256 px cell, read from the 4x level
FAST = ["--mpp", "1.0", "--tile-size", "64", "--workers", "1"]


def run(*args) -> int:
    """histodist.shard's exit code (argparse's own errors raise SystemExit)."""
    try:
        return shard.main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real slide absent: {path}")
    return path


def read_tiles(out: Path) -> dict[str, list[dict]]:
    """split -> samples in shard order: {key, json, cls, image (uint8 array), shard, index}."""
    m = json.loads((out / "manifest.json").read_text())
    splits = {}
    for split, s in m["splits"].items():
        rows = []
        for sh in s["shards"]:
            members: dict[str, dict] = {}
            with tarfile.open(out / sh["name"]) as tar:
                for mem in tar:
                    key, ext = mem.name.split(".", 1)
                    members.setdefault(key, {})[ext] = tar.extractfile(mem).read()
            for i, (key, mem) in enumerate(members.items()):
                img = np.asarray(Image.open(io.BytesIO(mem.get("jpg") or mem["png"])))
                rows.append({"key": key, "json": json.loads(mem["json"]), "image": img,
                             "cls": int(mem["cls"]) if "cls" in mem else None,
                             "shard": sh["name"], "index": i})  # fmt: skip
        splits[split] = rows
    return splits


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, pcam_jpeg):
    """6 slides of 4 patients (two layouts, tissue blocks of 4-15 cells), labels by patient."""
    d = tmp_path_factory.mktemp("cohort")
    return d, make_cohort(d, pcam_jpeg)


def test_real_cmu_slide_tiles_json_manifest_and_qc(tmp_path, capsys):
    out = tmp_path / "cmu"
    assert run("--dataset", "wsi", "--src", _need(CMU), "--out", out, "--workers", 1) == 0
    # One shard of 47 tiles: no --samples-per-shard of at least 256 tiles gives more: no advice
    assert "shards per split" not in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    rec = m["slides"]["CMU-1-Small-Region"]
    assert rec["sha256"] == CMU_SHA256 and rec["bytes"] == CMU.stat().st_size
    assert (rec["width"], rec["height"], rec["mpp"], rec["mpp_source"]) == (
        2220,
        2967,
        0.499,
        "metadata",
    )
    assert rec["levels"] == [[2220, 2967, 1.0]] and rec["split"] == "test" and rec["label"] is None
    assert 0.3 < rec["tissue_area_mm2"] < 1.2  # 6.6 mm2 of glass, the strip of skin in it
    tiles = read_tiles(out)["test"]
    assert len(tiles) == rec["tiles"] == m["splits"]["test"]["num_samples"] > 20
    assert rec["shards"] == [{"name": "test-000000.tar", "start": 0, "count": len(tiles)}]
    for t in tiles:
        j = t["json"]
        assert set(j) >= TILE_FIELDS and t["key"] == f"CMU-1-Small-Region_x{j['x']}_y{j['y']}"
        assert (j["group"], j["slide"], j["level"], j["mpp"], j["extent"]) == (
            "CMU-1-Small-Region", "CMU-1-Small-Region", 0, 0.5, 224)  # fmt: skip
        assert j["tissue"] >= 0.5 and t["image"].shape == (224, 224, 3) and t["cls"] is None
    assert [(t["json"]["y"], t["json"]["x"]) for t in tiles] == sorted(
        (t["json"]["y"], t["json"]["x"]) for t in tiles
    )
    assert m["tiling"]["mpp"] == 0.5 and m["tiling"]["reader"] == "openslide"
    assert m["encoding"] == "jpeg" and m["image"] == {"height": 224, "width": 224, "mode": "RGB"}
    qc = Image.open(out / "qc" / "CMU-1-Small-Region.jpg")
    assert max(qc.size) >= 1024
    assert shard.main(["--verify", str(out)]) == 0


def test_real_tcga_slide_without_mpp_stops_before_writing(tmp_path, capsys):
    out = tmp_path / "tcga"
    assert run("--dataset", "wsi", "--src", _need(TCGA), "--out", out, *FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TCGA-CR-7395-01A-01-TS1.svs" in err[0] and "--assume-mpp" in err[0]
    assert not out.exists()
    args = ["--dataset", "wsi", "--src", TCGA, "--out", out, "--mpp", 1, "--tile-size", 128]
    assert run(*args, "--assume-mpp", 0.5, "--workers", 1) == 0
    m = json.loads((out / "manifest.json").read_text())
    rec = m["slides"]["TCGA-CR-7395-01A-01-TS1"]
    # 1 µm/px of a 0.5 µm/px slide: its 2.0005x level (0.03% coarser than 2x), 128 px there
    assert (rec["mpp"], rec["mpp_source"], rec["level"], rec["read_size"], rec["extent"]) == (
        0.5, "assumed", 1, 128, 256)  # fmt: skip
    assert rec["tiles"] > 100 and m["tiling"]["assume_mpp"] == 0.5


def test_labels_patient_splits_and_contiguous_slides(cohort, tmp_path):
    d, cells = cohort
    out = tmp_path / "out"
    args = ["--dataset", "wsi", "--src", d / "slides", "--labels", d / "slides.csv", "--out", out]
    assert (
        run(*args, *FAST, "--samples-per-shard", 10, "--val-fraction", 0.2, "--test-fraction", 0)
        == 0
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"] == ["normal", "tumor"] and m["group_by"] == "patient"
    split_of_patient = {}
    for sid, rec in m["slides"].items():
        assert rec["tiles"] == cells[sid]  # every planted cell, one tile each
        assert split_of_patient.setdefault(rec["patient"], rec["split"]) == rec["split"]
    assert set(split_of_patient.values()) == {"train", "valid"}
    for split, tiles in read_tiles(out).items():
        seen = []  # a slide's tiles are contiguous and ordered by (y, x)
        for t in tiles:
            j = t["json"]
            rec = m["slides"][j["slide"]]
            assert (
                rec["split"] == split and t["cls"] == rec["label"] and j["group"] == rec["patient"]
            )
            if not seen or seen[-1] != j["slide"]:
                assert j["slide"] not in seen
                seen.append(j["slide"])
        for sid in seen:
            mine = [t for t in tiles if t["json"]["slide"] == sid]
            assert [(t["json"]["y"], t["json"]["x"]) for t in mine] == sorted(
                (t["json"]["y"], t["json"]["x"]) for t in mine
            )
            got = {}
            for t in mine:
                got.setdefault(t["shard"], []).append(t["index"])
            want = {s["name"]: list(range(s["start"], s["start"] + s["count"]))
                    for s in m["slides"][sid]["shards"]}  # fmt: skip
            assert got == want
    assert len(m["slides"]["p3-a"]["shards"]) == 2  # 15 tiles, at most 10 per shard
    per_shard = {}
    for sid, rec in m["slides"].items():
        for sh in rec["shards"]:
            per_shard.setdefault(sh["name"], []).append(sid)
    assert max(len(v) for v in per_shard.values()) >= 2  # small slides share a shard


def test_annotations_label_tiles_by_covered_area(tmp_path, pcam_jpeg):
    """GeoJSON: a rectangle over 2 x 2 planted tumour cells plus half of the next cell; ASAP
    XML: a tumour rectangle with an exclusion group cut out of it."""
    src, notes = tmp_path / "slides", tmp_path / "notes"
    tissue = {**block(range(1, 6), range(1, 4)), **block(range(3, 5), range(1, 3), 1)}
    for name in ("a", "b", "c"):
        make_slide(src / f"{name}.tif", pcam_jpeg, cols=7, rows=5, tissue=tissue)
    geojson_rect(notes / "a.geojson", 2.5 * CELL, 1 * CELL, 5 * CELL, 3 * CELL)
    square = lambda x0, y0, x1, y1: [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]  # noqa: E731
    asap_xml(notes / "b.xml", [("_0", square(1 * CELL, 1 * CELL, 5 * CELL, 4 * CELL)),
                               ("_2", square(2 * CELL, 2 * CELL, 4 * CELL, 3 * CELL))])  # fmt: skip
    out = tmp_path / "out"
    base = ["--dataset", "wsi", "--src", src, "--annotations", notes, *FAST, "--test-fraction", 0]
    assert run(*base, "--out", out, "--val-fraction", 0, "--label-coverage", 0.5) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"] == ["normal", "tumor"] and m["tiling"]["label_coverage"] == 0.5
    assert {s: r["label"] for s, r in m["slides"].items()} == {"a": 1, "b": 1, "c": 0}
    cell = lambda t: (t["json"]["x"] // CELL, t["json"]["y"] // CELL)  # noqa: E731
    tiles = {(t["json"]["slide"], *cell(t)): t for t in read_tiles(out)["train"]}
    assert len(tiles) == 3 * 15
    expect_a = {(2, 1): 0.5, (2, 2): 0.5, (3, 1): 1, (4, 1): 1, (3, 2): 1, (4, 2): 1}
    expect_b = {(c, r): 1.0 for c in range(1, 5) for r in range(1, 4)}
    expect_b.update({(c, 2): 0.0 for c in (2, 3)})  # the exclusion cut
    for (sid, c, r), t in tiles.items():
        want = {"a": expect_a, "b": expect_b, "c": {}}[sid].get((c, r), 0.0)
        assert t["json"]["annotated"] == pytest.approx(want, abs=1e-6), (sid, c, r)
        assert t["cls"] == int(want >= 0.5)
    out2 = tmp_path / "out2"
    assert run(*base, "--out", out2, "--val-fraction", 0, "--label-coverage", 0.75) == 0
    half = [t for t in read_tiles(out2)["train"] if t["json"]["annotated"] == 0.5]
    assert len(half) == 2 and all(t["cls"] == 0 for t in half)


def test_bad_slides_are_rejected_and_the_others_tiled(tmp_path, pcam_jpeg, capsys):
    src = tmp_path / "slides"
    good = make_slide(
        src / "good.tif", pcam_jpeg, cols=4, rows=4, tissue=block(range(1, 3), range(1, 3))
    )
    make_slide(src / "white.tif", pcam_jpeg, cols=4, rows=4, tissue={})
    data = good.read_bytes()
    (src / "cut.tif").write_bytes(data[:-100])  # a partial copy: openslide's open fails
    (src / "past.tif").write_bytes(data)  # a level-0 tile past the end: opens, then is caught
    with tifffile.TiffFile(src / "past.tif", mode="r+b") as tf:
        tag = tf.pages[0].tags["TileOffsets"]
        tag.overwrite([*tag.value[:-1], len(data) + 10])
    (src / "junk.svs").write_bytes(np.random.default_rng(0).bytes(50_000))
    out = tmp_path / "out"
    assert run("--dataset", "wsi", "--src", src, "--out", out, *FAST) == 0
    err = capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    rejected = {r["path"]: r["reason"] for r in m["rejected_slides"]}
    assert set(rejected) == {"cut.tif", "past.tif", "junk.svs"}
    assert "Short read" in rejected["cut.tif"] and "cannot open" in rejected["junk.svs"]
    assert rejected["past.tif"].startswith("truncated: image 0 has data up to byte")
    assert m["slides"]["good"]["tiles"] == 4 and m["slides"]["white"]["tiles"] == 0
    assert "white.tif: no tissue found" in err and "rejected slide junk.svs" in err


def test_bad_annotations_and_flags_are_one_line_errors(tmp_path, pcam_jpeg, capsys):
    src, notes = tmp_path / "slides", tmp_path / "notes"
    make_slide(src / "a.tif", pcam_jpeg, cols=4, rows=4, tissue=block(range(1, 3), range(1, 3)))
    geojson_rect(notes / "other.geojson", 0, 0, 10, 10)  # a slide not in --src: a warning
    (notes / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon",
         "coordinates": [[[0, 0], [5, 5], [0, 0]]]}}]}))  # fmt: skip
    base = ["--dataset", "wsi", "--src", src, "--out", tmp_path / "o", *FAST]
    assert run(*base, "--annotations", notes) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "other.geojson: annotations for a slide not in --src" in err[0]
    assert len(err) == 2 and "a.geojson: feature 0" in err[1] and "3 distinct points" in err[1]
    assert not (tmp_path / "o").exists()
    for bad in (["--magnification", "20", "--mpp", "0.5"], ["--label-coverage", "0.5"],
                ["--magnification", "twenty"], ["--magnification", "inf"],
                ["--label-coverage", "3", "--annotations", notes]):  # fmt: skip
        assert run("--dataset", "wsi", "--src", src, "--out", tmp_path / "o", *bad) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert run("--dataset", "wsi", "--src", src, "--out", tmp_path / "o", "--min-tissue", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()  # argparse: its usage, then the line
    assert err[-1].endswith("error: argument --min-tissue: 2: must be in [0, 1]"), err
    assert not (tmp_path / "o").exists()
    assert run("--dataset", "folder", "--src", src, "--out", tmp_path / "o", "--mpp", "0.5") == 2
    assert "--mpp is only for --dataset wsi" in capsys.readouterr().err
    assert run(*base[:-6], "--magnification", "10x", "--tile-size", "64") == 0  # 1.0 µm/px
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert (m["tiling"]["mpp"], m["tiling"]["magnification"]) == (1.0, 10.0)


def test_ranks_from_launcher_environments_and_balanced_share():
    assert ranks.from_env({}) == ranks.Rank(0, 1, False)
    assert ranks.from_env({"RANK": "1", "WORLD_SIZE": "4"}) == ranks.Rank(1, 4, True)
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert ranks.from_env(slurm) == ranks.Rank(2, 3, False)
    assert ranks.from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == ranks.Rank(1, 2, True)
    with pytest.raises(ValueError, match="outside"):
        ranks.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    # --array=3,7 as Slurm 22.05 describes it to task 7: a list has no positions
    listed = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_MAX": "7",
              "SLURM_ARRAY_TASK_STEP": "1", "SLURM_ARRAY_TASK_COUNT": "2"}  # fmt: skip
    with pytest.raises(ValueError, match="as a range, --array=0-N"):
        ranks.from_env(listed)
    stepped = {**listed, "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_STEP": "2",
               "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}  # fmt: skip
    assert ranks.from_env(stepped) == ranks.Rank(2, 3, False)  # --array=1-5:2
    weights = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    owner = ranks.share(weights, 3)
    loads = [sum(w for w, o in zip(weights, owner, strict=True) if o == r) for r in range(3)]
    assert sorted(loads) == [18, 18, 19]


def test_few_shards_advice_for_slides_is_what_the_shard_command_then_makes(
    cohort, tmp_path, monkeypatch
):
    """Scaled down (4 readers, shards of >= 5 tiles: the cohort at FAST has 47 tiles in 6
    slides), the advised --samples-per-shard, given to the shard command, makes the shards it
    announced, whole slides where they fit; where no such value gives more shards, no line."""
    d, cells = cohort
    args = ["--dataset", "wsi", "--src", d / "slides", "--labels", d / "slides.csv", *FAST,
            "--val-fraction", 0.2, "--test-fraction", 0]  # fmt: skip
    assert run(*args, "--out", tmp_path / "a") == 0
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    monkeypatch.setattr(shard, "NODE_READERS", 4)
    monkeypatch.setattr(shard, "MIN_SAMPLES_PER_SHARD", 5)
    warning = shard.few_shards_warning(m)
    advice = re.search(
        r"--samples-per-shard (\d+) gives (\w+) (\d+) shards \(whole slides", warning
    )
    per_shard, split, count = int(advice[1]), advice[2], int(advice[3])
    assert per_shard >= 5 and count > len(m["splits"][split]["shards"])
    assert run(*args, "--samples-per-shard", per_shard, "--out", tmp_path / "b") == 0
    m2 = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert len(m2["splits"][split]["shards"]) == count
    for name, rec in m2["slides"].items():
        assert rec["tiles"] == cells[name]
        assert len(rec["shards"]) == (
            1 if rec["tiles"] <= per_shard else -(-rec["tiles"] // per_shard)
        )
    monkeypatch.setattr(shard, "MIN_SAMPLES_PER_SHARD", 48)  # one shard holds every slide
    assert shard.few_shards_warning(m) is None


def test_pack_keeps_slides_whole_and_splits_only_large_ones():
    shards = pack([30, 50, 20, 250, 10], 100)
    assert shards == [[(0, 0, 30), (1, 0, 50), (2, 0, 20)], [(3, 0, 84)], [(3, 84, 167)],
                      [(3, 167, 250)], [(4, 0, 10)]]  # fmt: skip


def test_slide_failing_while_read_is_left_out_of_its_shard(tmp_path, pcam_jpeg):
    """A level-0 tile whose compressed bytes are garbage: the survey (thumbnails from the 4x
    level) passes, reading tiles from level 0 fails after 2 good tiles: the slide is left out
    whole, listed with the reason, and the slide sharing its shard keeps all its tiles."""
    src = tmp_path / "slides"
    tissue = block(range(1, 3), range(1, 3))
    for name in ("a", "b"):  # 16 cells wide: even the QC picture reads the 4x level
        make_slide(src / f"{name}.tif", pcam_jpeg, cols=16, rows=4, tissue=tissue)
    with tifffile.TiffFile(src / "b.tif") as tf:
        page = tf.pages[0]
        k = 1 * page.chunked[1] + 2  # the TIFF tile at (512, 256): b's 3rd and 4th tiles
        offset, count = page.dataoffsets[k], page.databytecounts[k]
    with open(src / "b.tif", "r+b") as f:
        f.seek(offset + 2)
        f.write(b"\xff" * (count - 2))
    out = tmp_path / "out"
    args = ["--dataset", "wsi", "--src", src, "--out", out, "--mpp", 0.5, "--tile-size", 64]
    assert run(*args, "--workers", 1) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["slides"]) == {"a"} and m["slides"]["a"]["tiles"] == 16  # 2 x 2 cells, 4 each
    assert [r["path"] for r in m["rejected_slides"]] == ["b.tif"]
    assert "cannot read level 0" in m["rejected_slides"][0]["reason"]
    tiles = read_tiles(out)["test"]
    assert len(tiles) == 16 and {t["json"]["slide"] for t in tiles} == {"a"}
    assert shard.main(["--verify", str(out)]) == 0


def _shards(out: Path) -> dict[str, str]:
    m = json.loads((out / "manifest.json").read_text())
    return {sh["name"]: sh["sha256"] for s in m["splits"].values() for sh in s["shards"]}


@pytest.fixture(scope="module")
def big_cohort(cohort, tmp_path_factory):
    """The cohort tiled at 0.25 µm/px (16 tiles per cell, ~750 tiles) in one process: the
    reference for the multi-process and interrupted runs."""
    d, _ = cohort
    out = tmp_path_factory.mktemp("ref") / "out"
    args = ["--dataset", "wsi", "--src", d / "slides", "--labels", d / "slides.csv"]
    args += ["--mpp", 0.25, "--tile-size", 64, "--samples-per-shard", 100, "--workers", 1]
    args += ["--val-fraction", 0.2, "--test-fraction", 0]  # 4 patients: 2 of them to valid
    assert run(*args, "--out", out) == 0
    return [str(a) for a in args], out


def _subprocess(
    args: list[str],
    extra_env: dict | None = None,
    prefix: list[str] | None = None,
    module: str = "histodist.shard",
):
    import subprocess
    import sys

    from trainkit import env

    cmd = [sys.executable, *(prefix or ["-m"]), module, *args]
    return subprocess.Popen(cmd, env=env(**(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_two_ranks_write_every_tile_once(big_cohort, tmp_path):
    """A real 2-process `accelerate launch`, then a Slurm array run one task after the other:
    the same shards, byte for byte, as one process; every tile once."""
    from trainkit import free_port

    args, ref = big_cohort
    out = tmp_path / "acc"
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(free_port()), "-m"]  # fmt: skip
    p = _subprocess([*args, "--out", str(out)], {"ACCELERATE_USE_CPU": "true"}, launch)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert "rank 1 of 2: shards written" in stdout  # a second rank ran, rank 0 wrote the manifest
    assert _shards(out) == _shards(ref)
    keys = [t["key"] for tiles in read_tiles(out).values() for t in tiles]
    assert len(keys) == len(set(keys)) == sum(r["tiles"] for r in
                                              json.loads((ref / "manifest.json").read_text())["slides"].values())  # fmt: skip
    arr = tmp_path / "array"
    for task in ("1", "0"):  # task 1 first: it finds task 0's shards missing and leaves
        env = {
            "SLURM_ARRAY_TASK_ID": task,
            "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_COUNT": "2",
        }
        p = _subprocess([*args, "--out", str(arr)], env)
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        assert (arr / "manifest.json").is_file() == (task == "0")
    assert _shards(arr) == _shards(ref)


@pytest.mark.slow
def test_kill_then_rerun_gives_the_shards_of_an_uninterrupted_run(big_cohort, tmp_path):
    import signal
    import time

    args, ref = big_cohort
    out = tmp_path / "out"
    p = _subprocess([*args, "--out", str(out)])
    deadline = time.monotonic() + 120
    while not list(out.glob(".parts/*/.shardinfo/*.json")) and not list(out.glob("*.tar")):
        assert p.poll() is None and time.monotonic() < deadline, "no part was written"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert not (out / "manifest.json").exists()
    workers = args.index("--workers") + 1
    p = _subprocess([*args[:workers], "2", *args[workers + 1 :], "--out", str(out)])
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert "were finished by an earlier run: reused" in stderr or "shards reused" in stdout
    assert _shards(out) == _shards(ref)
    assert not (out / ".parts").exists()
    assert shard.main(["--verify", str(out)]) == 0


@pytest.mark.slow
def test_train_and_evaluate_read_tile_shards_unchanged(cohort, tmp_path):
    from trainkit import TINY, train_cmd
    from trainkit import run as run_train

    from histodist import evaluate

    d, _ = cohort
    shards = tmp_path / "shards"
    assert run("--dataset", "wsi", "--src", d / "slides", "--labels", d / "slides.csv", *FAST,
               "--val-fraction", 0.2, "--test-fraction", 0, "--out", shards) == 0  # fmt: skip
    flags = ["--shards", str(shards), "--runs-dir", str(tmp_path), "--run-name", "t",
             "--wandb", "disabled", *TINY, "--epochs", "1"]  # fmt: skip
    res = run_train(train_cmd(*flags))
    assert res.returncode == 0, res.stderr[-3000:]
    assert evaluate.main(["--run", str(tmp_path / "t"), "--split", "valid", "--workers", "0",
                          "--bootstrap", "20", "--no-progress"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "t" / "eval-valid" / "metrics.json").read_text())
    m = json.loads((shards / "manifest.json").read_text())
    assert metrics["patch"]["n"] == m["splits"]["valid"]["num_samples"]
    assert 0.0 <= metrics["patch"]["auc"] <= 1.0


def _same_manifest(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        del m["created"], m["command"]
    assert ma == mb


@pytest.mark.slow
def test_array_tasks_finishing_together_write_the_manifest_once(big_cohort, tmp_path):
    """Two Slurm array tasks that finish their shards at the same moment (tests/shard_probe.py
    holds each until both have): one of them writes the manifest, once, and it equals the
    one-process run's."""
    args, ref = big_cohort
    out, log = tmp_path / "out", tmp_path / "writes.log"
    probe = {"PROBE_BARRIER": str(tmp_path / "barrier"), "PROBE_BARRIER_N": "2",
             "PROBE_LOG": str(log), "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "2"}  # fmt: skip
    procs = [_subprocess([*args, "--out", str(out)], {**probe, "SLURM_ARRAY_TASK_ID": task},
                         module="shard_probe") for task in ("0", "1")]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    writes = log.read_text().splitlines() if log.is_file() else []
    assert len(writes) == 1, (writes, [o[0] for o in outputs])
    assert sum("samples in" in stdout for stdout, _ in outputs) == 1  # one summary: the writer's
    assert _shards(out) == _shards(ref)
    _same_manifest(out, ref)
    assert shard.main(["--verify", str(out)]) == 0
    # Task 1 runs again (a requeue after it finished): the manifest stays, untouched.
    before = (out / "manifest.json").stat()
    p = _subprocess([*args, "--out", str(out)], {**probe, "PROBE_BARRIER_N": "1",
                    "SLURM_ARRAY_TASK_ID": "1"}, module="shard_probe")  # fmt: skip
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert "the manifest is already written" in stdout
    assert log.read_text().splitlines() == writes
    after = (out / "manifest.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
