"""Slides end to end: `embed --slides` (tissue, tiles and vectors straight from the slide files),
an ABMIL head trained on them, evaluated, drawn over a slide (`explain --slide`) and run on a
folder of slide files (`predict --slides`). The slides are pyramidal TIFFs of real PCam patches
(tests/cohortkit.py: positive slides hold a few class-1 patches among class-0 ones, held-out
slides only patches of PCam's valid split), embedded with a tiny ViT from a local folder."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from cohortkit import FAST, cohort
from hubkit import save_hub_folder
from PIL import Image

from histodist import embed, evaluate, explain, predict, shard, train

pytest.importorskip("openslide", reason="the wsi extra (openslide) is not installed")
COUNTS = {"train": 12, "valid": 4, "test": 8}
RUN = ["--no-progress", "--workers", "1", "--batch-size", "16", "--precision", "fp32"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory, pcam_jpeg):
    """(folder, labels CSV, CohortSlides, the tiny ViT's local-dir: model name)."""
    from slidekit import make_slide

    d = tmp_path_factory.mktemp("cohort")
    labels, specs = cohort(d / "slides", pcam_jpeg, COUNTS)
    make_slide(d / "slides" / "white.tif", pcam_jpeg, cols=4, rows=4, tissue={})  # no tissue
    with open(labels, "a") as f:
        f.write("white,normal,p-white,test\n")
    return d, labels, specs, f"local-dir:{save_hub_folder(d / 'vit', 'virchow2')}"


def _embed_args(slides, out: Path) -> list[str]:
    d, labels, _, model = slides
    return ["--model", model, "--slides", str(d / "slides"), "--labels", str(labels), *FAST,
            "--out", str(out), "--batch-size", "16", "--no-progress", "--workers", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def emb(slides):
    """The cohort embedded from its slide files in one process."""
    out = slides[0] / "emb"
    assert embed.main(_embed_args(slides, out)) == 0
    return out


def members(folder: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member extension: bytes} of every sample of the set's shards."""
    m = json.loads((folder / "manifest.json").read_text())
    out: dict[str, dict[str, bytes]] = {}
    for s in m["splits"].values():
        for sh in s["shards"]:
            with tarfile.open(folder / sh["name"]) as tar:
                for mem in tar:
                    key, ext = mem.name.split(".", 1)
                    out.setdefault(key, {})[ext] = tar.extractfile(mem).read()
    return out


def _vec(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw)).astype(np.float32)


def _shards(folder: Path) -> dict[str, str]:
    m = json.loads((folder / "manifest.json").read_text())
    return {sh["name"]: sh["sha256"] for s in m["splits"].values() for sh in s["shards"]}


# ----------------------------------------------------------------------------- embedding
def test_slides_give_the_embeddings_of_their_tile_shards(slides, emb, tmp_path):
    """The same slides tiled by `shard --dataset wsi` (lossless PNG tiles) and embedded, and
    embedded straight from the files: the same tiles, tile JSON, labels, splits, slide index,
    and vectors equal within float16 rounding."""
    d, labels, specs, model = slides
    tiles, via = tmp_path / "tiles", tmp_path / "via-tiles"
    assert shard.main(["--dataset", "wsi", "--src", str(d / "slides"), "--labels", str(labels),
                       *FAST, "--encoding", "png", "--workers", "1", "--out", str(tiles)]) == 0  # fmt: skip
    assert embed.main(["--model", model, "--shards", str(tiles), "--out", str(via),
                       "--batch-size", "16", "--workers", "0"]) == 0  # fmt: skip
    a, b = members(via), members(emb)
    assert a.keys() == b.keys() and len(a) == sum(len(s.cells) for s in specs)  # a tile a cell
    worst = 0.0
    for key in a:
        assert json.loads(a[key]["json"]) == json.loads(b[key]["json"])
        assert a[key].get("cls") == b[key].get("cls")
        va, vb = _vec(a[key]["emb.npy"]), _vec(b[key]["emb.npy"])
        worst = max(worst, float(np.abs(va - vb).max() / np.abs(va).max()))
    assert worst <= 2e-3, worst  # float16 keeps 11 bits: 1e-3 relative per value
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (via, emb))
    skip = ("shards",)  # the same tiles, in shards of other names
    assert {s: {k: v for k, v in e.items() if k not in skip} for s, e in ma["slides"].items()} == {
        s: {k: v for k, v in e.items() if k not in skip} for s, e in mb["slides"].items()
    }
    for split, s in ma["splits"].items():
        assert {k: s[k] for k in ("num_samples", "class_counts", "num_groups")} == {
            k: mb["splits"][split][k] for k in ("num_samples", "class_counts", "num_groups")
        }
    splits = {s.name: s.split for s in specs}
    assert {**splits, "white": None} == {k: e["split"] for k, e in mb["slides"].items()}
    assert (mb["slides"]["white"]["tiles"], mb["slides"]["white"]["shards"]) == (0, [])
    assert mb["tiling"] == json.loads((tiles / "manifest.json").read_text())["tiling"]
    assert mb["embedding"]["weights_sha256"] == ma["embedding"]["weights_sha256"]
    t = mb["throughput"]
    assert t["tiles"] == len(b) and t["tiles_per_s"] > 0 and t["processes"] == 1
    assert {"model_s", "read_s", "wait_s", "write_s"} <= t.keys()
    assert (d / "emb" / "qc" / "train-000.jpg").is_file()  # the tiler's QC picture, per slide

    # a re-run reuses every slide and rewrites nothing
    before = _shards(emb)
    assert embed.main(_embed_args(slides, emb)) == 0
    again = json.loads((emb / "manifest.json").read_text())
    assert _shards(emb) == before and again["throughput"]["reused"] == len(b)
    assert again["throughput"]["tiles"] == 0


def test_the_next_slide_is_read_while_the_current_one_is_embedded():
    """TileStream: the reading thread opens slide b while slide a's batches still wait to be
    embedded; batches never mix slides; a slide that fails mid-way gives SlideFailed after
    its batches; other reader errors reach the consumer."""
    from histodist.inference.tile_stream import SlideFailed, TileStream
    from histodist.ingest.slides.reader import SlideError
    from histodist.ingest.sources import Item, Reader

    class Fake(Reader):
        def __init__(self):
            self.opened = {k: threading.Event() for k in "abcd"}

        def read(self, items):
            seg = items[0]
            self.opened[seg.key].set()
            for i in range(seg.extra["stop"]):
                if seg.key == "c" and i == 3:
                    yield seg, SlideError("c.tif: cannot read level 0 at (0, 0)")
                    return
                if seg.key == "d":
                    raise RuntimeError("a bug")
                yield Item(f"{seg.key}{i}", "", None, None, {}), np.full((4, 4, 3), i, np.uint8)

    def seg(key: str, n: int):
        return key, Item(key, f"{key}.tif", None, None, {"stop": n}), n

    fake = Fake()
    events = iter(TileStream(fake, [seg("a", 5), seg("b", 3), seg("c", 6)], batch_size=2))
    first = next(events)
    assert (first.key, len(first.items), first.last) == ("a", 2, False)
    assert fake.opened["b"].wait(30), "slide b was not read while a's batches waited"
    rest = list(events)
    shape = [(e.key, len(e.items), e.last) for e in rest if not isinstance(e, SlideFailed)]
    assert shape == [("a", 2, False), ("a", 1, True), ("b", 2, False), ("b", 1, True),
                     ("c", 2, False)]  # fmt: skip
    assert isinstance(rest[-1], SlideFailed) and "cannot read level 0" in rest[-1].reason
    assert first.pixels.shape == (2, 3, 4, 4) and rest[0].pixels[:, 0, 0, 0].tolist() == [2, 3]
    with pytest.raises(RuntimeError, match="a bug"):
        list(TileStream(Fake(), [seg("a", 1), seg("d", 2)], batch_size=2))


def test_a_slide_failing_while_read_is_left_out_and_stays_out(slides, tmp_path, pcam_jpeg):
    """A level-0 tile of garbage (as in test_shard_wsi): the slide is listed in
    rejected_slides with the reader's reason, the other slide is embedded, and a re-run keeps
    the failure (the file did not change) without reading it again."""
    import tifffile
    from slidekit import block, make_slide

    src = tmp_path / "slides"
    for name in ("a", "b"):
        make_slide(src / f"{name}.tif", pcam_jpeg, cols=16, rows=4,
                   tissue=block(range(1, 3), range(1, 3)))  # fmt: skip
    with tifffile.TiffFile(src / "b.tif") as tf:
        page = tf.pages[0]
        k = 1 * page.chunked[1] + 2
        offset, count = page.dataoffsets[k], page.databytecounts[k]
    with open(src / "b.tif", "r+b") as f:
        f.seek(offset + 2)
        f.write(b"\xff" * (count - 2))
    out = tmp_path / "emb"
    argv = ["--model", slides[3], "--slides", str(src), "--mpp", "0.5", "--tile-size", "64",
            "--out", str(out), "--no-progress", "--workers", "1", "--batch-size", "4"]  # fmt: skip
    for _ in range(2):
        assert embed.main(argv) == 0
        m = json.loads((out / "manifest.json").read_text())
        assert [r["path"] for r in m["rejected_slides"]] == ["b.tif"]
        assert "cannot read level 0" in m["rejected_slides"][0]["reason"]
        assert m["slides"]["a"]["tiles"] == 16 and "b" not in m["slides"]
        assert m["splits"]["test"]["num_samples"] == 16 and not (out / "b.tar").exists()
    assert m["throughput"]["tiles"] == 0  # the re-run read nothing


def test_bad_slide_flags_are_one_line_errors(slides, tmp_path, capsys):
    d, labels, _, model = slides
    out = tmp_path / "o"
    cases = [
        (["--shards", str(d), "--mpp", "0.5"], "--mpp is for --slides"),
        (["--slides", str(d / "slides"), "--split", "train"], "--split is for --shards"),
    ]
    for more, why in cases:
        assert embed.main(["--model", model, "--out", str(out), *more]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err
    with pytest.raises(SystemExit) as stop:  # argparse: its usage, then the line, exit 2
        embed.main(["--model", model, "--out", str(out), "--slides", str(d), "--min-tissue", "2"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith("argument --min-tissue: 2: must be in [0, 1]")
    tcga = Path(__file__).resolve().parents[2] / "shared/data/wsi/TCGA-CR-7395-01A-01-TS1.svs"
    if tcga.is_file():  # a real slide without µm/px: exit 2 before anything is written
        assert embed.main(["--model", model, "--out", str(out), "--slides", str(tcga)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--assume-mpp" in err[0] and not out.exists()


# ----------------------------------------------------------------------------- the head
@pytest.fixture(scope="module")
def run_dir(slides, emb):
    """An ABMIL head trained on the embedded slides (validation picks the best state)."""
    runs = slides[0] / "runs"
    flags = ["--shards", str(emb), "--model", "abmil", "--runs-dir", str(runs), "--run-name",
             "abmil", "--wandb", "disabled", "--no-progress", "--workers", "0", "--threads", "1",
             "--mil-dim", "32", "--epochs", "12", "--lr", "3e-3", "--warmup-epochs", "0.5",
             "--precision", "no", "--log-every", "50"]  # fmt: skip
    assert train.main(flags) == 0
    return runs / "abmil"


def test_abmil_on_slides_evaluates_explains_and_predicts_a_folder(slides, emb, run_dir, tmp_path,
                                                                  pcam_jpeg):  # fmt: skip
    d, _, specs, _ = slides
    ev = tmp_path / "eval"
    assert evaluate.main(["--run", str(run_dir), "--split", "test", "--out", str(ev),
                          "--bootstrap", "50", "--wandb", "disabled", *RUN]) == 0  # fmt: skip
    report = json.loads((ev / "metrics.json").read_text())["slide"]
    assert report["n"] == COUNTS["test"] and 0.0 <= report["auc"] <= 1.0
    print(
        f"held-out slide AUC {report['auc']:.3f} ({COUNTS['test']} slides, half positive; "
        f"trained on {COUNTS['train']}, {COUNTS['valid']} to pick the state)"
    )
    with open(ev / "predictions.csv") as f:
        want = {r["key"]: float(r["prob_tumor"]) for r in csv.DictReader(f)}

    # predict on a folder of slide files, end to end: the held-out slides, a file that is no
    # slide, a slide without tissue; one row each
    from slidekit import make_slide

    folder = tmp_path / "new"
    folder.mkdir()
    for s in specs:
        if s.split == "test":
            (folder / f"{s.name}.tif").symlink_to(d / "slides" / f"{s.name}.tif")
    (folder / "junk.svs").write_bytes(b"\0" * 4096)
    make_slide(folder / "white.tif", pcam_jpeg, cols=4, rows=4, tissue={})
    out = tmp_path / "slides.csv"
    assert predict.main(["--run", str(run_dir), "--slides", str(folder), "--out", str(out),
                         *RUN]) == 0  # fmt: skip
    with open(out) as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert list(next(iter(rows.values()))) == ["slide", "path", "prob_normal", "prob_tumor",
                                               "pred", "tiles", "error"]  # fmt: skip
    assert set(rows) == {*want, "junk", "white"}
    for sid, p in want.items():  # the same tiles and vectors: the probabilities of evaluate
        r = rows[sid]
        assert float(r["prob_tumor"]) == pytest.approx(p, abs=1e-5) and not r["error"]
        assert int(r["tiles"]) == len(next(s for s in specs if s.name == sid).cells)
        assert r["pred"] == ("tumor" if p >= 0.5 else "normal")
    assert "cannot open" in rows["junk"]["error"] and rows["junk"]["prob_tumor"] == ""
    assert rows["white"]["error"] == "no tissue found" and rows["white"]["tiles"] == "0"

    # the heatmap of a slide file, and of the same slide by its id in the embedding set
    pos = next(s for s in specs if s.split == "test" and s.label == 1)
    pngs = [tmp_path / "file.png", tmp_path / "id.png"]
    assert explain.main(["--run", str(run_dir), "--slide", str(d / "slides" / f"{pos.name}.tif"),
                         "--out", str(pngs[0]), *RUN]) == 0  # fmt: skip
    assert explain.main(["--run", str(run_dir), "--slide", pos.name, "--out", str(pngs[1]),
                         *RUN]) == 0  # fmt: skip
    for png in pngs:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 1000 and im.height >= 600
    assert explain.main(["--run", str(run_dir), "--slide", "nope", *RUN]) == 2


def test_a_backbone_that_cannot_be_built_again_is_refused(slides, run_dir, tmp_path, capsys):
    d = slides[0]
    for change, why in (({"weights_sha256": "0" * 64}, "other weights"),
                        ({"source": None, "model": "synthetic"}, "cannot build again")):  # fmt: skip
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(run_dir, bad, symlinks=True)
        m = json.loads((bad / "manifest.json").read_text())
        m["embedding"].update(change)
        (bad / "manifest.json").write_text(json.dumps(m))
        argv = ["--run", str(bad), "--slides", str(d / "slides"), "--out", str(tmp_path / "p.csv")]
        assert predict.main([*argv, *RUN]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
        assert len(err) == 1 and err[0].startswith("histodist.predict: error:") and why in err[0]
    assert not (tmp_path / "p.csv").exists()


# ----------------------------------------------------------------------------- processes
def _subprocess(args: list[str], command: tuple[str, ...] = ("-m", "histodist.embed"), **env: str):
    """`python <command> <args>` with the test environment."""
    import subprocess
    import sys

    from trainkit import env as run_env

    cmd = [sys.executable, *command, *args]
    return subprocess.Popen(cmd, env=run_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_two_processes_embed_every_tile_once(slides, emb, tmp_path):
    """A real 2-process `accelerate launch`: each rank embeds its share, rank 0 writes the
    manifest; then a 2-task Slurm array run one task after the other. The shards are byte for
    byte those of one process, every tile once."""
    from trainkit import free_port

    out = tmp_path / "two"
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(free_port()), "-m",
              "histodist.embed"]  # fmt: skip
    p = _subprocess(_embed_args(slides, out), tuple(launch), ACCELERATE_USE_CPU="true")
    stdout, stderr = p.communicate(timeout=400)
    assert p.returncode == 0, stderr[-3000:]
    assert "rank 1 of 2: slides embedded" in stdout and "rank 0: embedded" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["throughput"]["processes"] == 2
    ranks = [json.loads(p.read_text()) for p in sorted((out / ".ranks").glob("*-of-2.json"))]
    assert len(ranks) == 2 and all(r["tiles"] > 0 for r in ranks)  # both ranks embedded
    assert _shards(out) == _shards(emb)
    keys = list(members(out))
    assert len(keys) == len(set(keys)) == sum(e["tiles"] for e in m["slides"].values())

    # a Slurm array whose tasks run one after the other (the surveys cached by the launch)
    for p in [out / "manifest.json", *out.glob("*.tar"), *out.glob(".shardinfo/*"),
              *out.glob(".ranks/*")]:  # fmt: skip
        p.unlink()
    for task in ("1", "0"):  # task 1 first: it leaves the manifest to the last task
        p = _subprocess(_embed_args(slides, out), SLURM_ARRAY_TASK_ID=task,
                        SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_COUNT="2")  # fmt: skip
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        assert (out / "manifest.json").is_file() == (task == "0"), stdout
    assert _shards(out) == _shards(emb)


@pytest.mark.slow
def test_kill_then_rerun_resumes_per_slide(slides, emb, tmp_path):
    """SIGKILL after two slides are finished (tests/scripts/slow_slides.py reads 0.1 s per
    batch, so 22 slides are still to come), then the same command: the finished slides are
    reused, the others embedded, the shards byte for byte those of an uninterrupted run."""
    import signal
    import time

    out = tmp_path / "out"
    script = str(Path(__file__).parent / "scripts" / "slow_slides.py")
    p = _subprocess(_embed_args(slides, out), (script,))
    deadline = time.monotonic() + 300
    while len(list(out.glob(".shardinfo/*.json"))) < 2:
        assert p.poll() is None and time.monotonic() < deadline, "no slide was finished"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert not (out / "manifest.json").exists()
    done = len(list(out.glob(".shardinfo/*.json")))
    p = _subprocess(_embed_args(slides, out))
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["throughput"]["reused"] > 0 and done < len(m["slides"])
    assert _shards(out) == _shards(emb)  # as an uninterrupted run, byte for byte
    assert not list(out.glob(".*.tmp"))


def test_a_backbone_is_built_again_from_its_record(tmp_path):
    """embed's record of a backbone with a --weights checkpoint folder builds the same weights
    (sha256 checked) from anywhere; a weights file that is gone, or other weights, are refused."""
    import timm
    import torch
    from safetensors.torch import save_file

    from histodist.data.embeddings import EmbeddingError
    from histodist.inference.backbone import Backbone, BuildArgs

    torch.manual_seed(1)
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=2)
    (tmp_path / "ckpt").mkdir()
    save_file(net.state_dict(), str(tmp_path / "ckpt" / "model.safetensors"))
    args = BuildArgs("vit_tiny_patch16_224", image_size=32, weights=str(tmp_path / "ckpt"))
    first = Backbone.build(args)
    emb = {**first.identity, "build": first.build_args}
    again = Backbone.rebuild(emb, "runs/x")
    assert again.identity == first.identity
    assert torch.equal(again.model.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight)
    with pytest.raises(EmbeddingError, match="other weights"):
        Backbone.rebuild({**emb, "build": {**emb["build"], "weights": None}}, "runs/x")
    (tmp_path / "ckpt" / "model.safetensors").rename(tmp_path / "gone.safetensors")
    (tmp_path / "ckpt").rmdir()
    with pytest.raises(EmbeddingError, match="is gone"):
        Backbone.rebuild(emb, "runs/x")


def test_the_tilers_warnings_name_the_command_that_runs_it(slides, tmp_path):
    """embed --slides runs the shard command's tiler: its warnings say histodist.embed."""
    import subprocess
    import sys

    d, _, _, model = slides
    argv = [sys.executable, "-m", "histodist.embed", "--model", model, "--slides",
            str(d / "slides" / "white.tif"), "--out", str(tmp_path / "o"), *FAST]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("histodist")]  # no progress bars
    assert lines[0] == "histodist.embed: warning: white.tif: no tissue found, no tiles", lines
    assert lines[-1].startswith("histodist.embed: error: ") and "no tiles" in lines[-1], lines


def test_a_rerun_on_fewer_slides_removes_only_its_own_shards(slides, tmp_path):
    """embed --slides into a folder that also holds the user's files: a re-run on fewer
    slides removes the shard (and record) of the slide it dropped, never a user's `.tar` (it
    used to delete every *.tar not in its plan)."""
    d, _, _, model = slides
    src = tmp_path / "src"
    src.mkdir()
    names = sorted(p.name for p in (d / "slides").glob("*.tif") if p.stem != "white")[:2]
    for n in names:
        (src / n).symlink_to(d / "slides" / n)
    out = tmp_path / "o"
    out.mkdir()
    (out / "backup-000001.tar").write_bytes(b"the user's archive")
    argv = ["--model", model, "--slides", str(src), "--out", str(out), *FAST,
            "--batch-size", "16", "--no-progress", "--workers", "1"]  # fmt: skip
    assert embed.main(argv) == 0
    assert {p.name for p in out.glob("*.tar")} == {"backup-000001.tar"} | {
        Path(n).stem + ".tar" for n in names}  # fmt: skip
    (src / names[1]).unlink()
    assert embed.main(argv) == 0
    dropped = Path(names[1]).stem + ".tar"
    assert not (out / dropped).exists() and not (out / ".shardinfo" / f"{dropped}.json").exists()
    assert (out / "backup-000001.tar").read_bytes() == b"the user's archive"
