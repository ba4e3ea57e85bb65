"""The real samples in examples/, the test fixtures' fall-back to them, and a newcomer's first
commands: `train` without shards names both ways forward, `accelerate launch` after
`accelerate config default` prints histodist's error alone."""

from __future__ import annotations

import csv
import hashlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from datakit import EXAMPLES, SHARED_DATA, first_patches, real_data
from PIL import Image
from trainkit import env

from histodist import samples

PCAM_MINI = {("train", "0"): 400, ("train", "1"): 400, ("valid", "0"): 100, ("valid", "1"): 100}


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_pcam_mini_is_balanced_real_patches_under_10_mb():
    root = EXAMPLES / "pcam-mini"
    assert samples.find("pcam-mini") == root
    counts = {(s.name, c.name): len(list(c.glob("*.jpg"))) for s in root.iterdir() if s.is_dir()
              for c in s.iterdir()}  # fmt: skip
    assert counts == PCAM_MINI
    digests = set()
    for path in root.rglob("*.jpg"):
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (96, 96)), path
            im.load()  # decodes whole
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == sum(PCAM_MINI.values())  # no byte-identical copies
    assert sum(p.stat().st_size for p in _files(root)) < 10e6
    assert "CC0 1.0" in (root / "README.md").read_text()


def test_kaggle_mini_is_its_labelled_tifs():
    root = EXAMPLES / "kaggle-hcd-mini"
    with open(root / "train_labels.csv", newline="") as f:
        labels = {r["id"]: r["label"] for r in csv.DictReader(f)}
    assert {p.stem for p in (root / "train").glob("*.tif")} == set(labels)
    assert sorted(labels.values()).count("1") == 5 and len(labels) == 15
    for p in (root / "train").glob("*.tif"):
        with Image.open(p) as im:
            assert (im.mode, im.size) == ("RGB", (96, 96))
    assert "CC0 1.0" in (root / "README.md").read_text()


@pytest.mark.parametrize("shared, sample", [("pcam-jpeg", "pcam-mini"),
                                            ("kaggle-hcd-mini", "kaggle-hcd-mini")])  # fmt: skip
def test_samples_are_byte_copies_of_the_start_of_the_full_copies(shared, sample):
    """pcam-mini = the first 400 train / 100 valid patches of each class of pcam-jpeg by name,
    so a test taking the first N of a class sees the same images from either."""
    full = SHARED_DATA / shared
    if not full.is_dir():
        pytest.skip(f"compares with the full copy {full}, absent here")
    mini = EXAMPLES / sample
    for (split, label), n in PCAM_MINI.items() if sample == "pcam-mini" else ():
        names = [p.name for p in sorted((full / split / label).glob("*.jpg"))[:n]]
        assert [p.name for p in sorted((mini / split / label).glob("*.jpg"))] == names
    for path in _files(mini):
        rel = path.relative_to(mini)
        if rel.name != "README.md":
            assert path.read_bytes() == (full / rel).read_bytes(), rel


def test_fixtures_fall_back_to_the_samples(tmp_path, monkeypatch):
    monkeypatch.delenv("HISTODIST_TEST_DATA", raising=False)
    assert real_data("pcam-jpeg", "pcam-mini", shared=tmp_path) == EXAMPLES / "pcam-mini"
    (tmp_path / "pcam-jpeg").mkdir()
    assert real_data("pcam-jpeg", "pcam-mini", shared=tmp_path) == tmp_path / "pcam-jpeg"
    monkeypatch.setenv("HISTODIST_TEST_DATA", "sample")
    assert real_data("pcam-jpeg", "pcam-mini", shared=tmp_path) == EXAMPLES / "pcam-mini"
    with pytest.raises(pytest.skip.Exception, match="needs 101 images .* holds 100"):
        first_patches(EXAMPLES / "pcam-mini", "valid", 1, 101)


def _run(cmd: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env(**extra), capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_train_without_shards_names_both_ways_and_the_sample_way_works(
    tmp_path, monkeypatch, capsys
):
    from histodist import shard, train

    monkeypatch.chdir(tmp_path)
    assert train.main(["--dataset", "pcam"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("histodist.train: error: shards/pcam/manifest.json: no such file")
    assert "`python -m histodist.shard --dataset pcam --download --out shards/pcam`" in err
    sample_cmd, then = re.findall(r"`([^`]*)`", err)[1:]
    assert then == "--shards shards/pcam-mini"
    argv = shlex.split(sample_cmd)
    assert argv[:3] == ["python", "-m", "histodist.shard"]
    assert shard.main([*argv[3:], "--workers", "1"]) == 0
    manifest = (tmp_path / "shards" / "pcam-mini" / "manifest.json").read_text()
    assert '"num_samples": 800' in manifest and '"num_samples": 200' in manifest


def _accelerate(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """`accelerate ARGS` as a newcomer runs it: HOME with nothing in it, no thread settings."""
    e = env(HOME=str(home))
    for name in ("HF_HOME", "XDG_CACHE_HOME", "OMP_NUM_THREADS", "ACCELERATE_USE_CPU"):
        e.pop(name, None)
    accelerate = Path(sys.executable).with_name("accelerate")
    return subprocess.run([str(accelerate), *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


# What `accelerate launch` may print before the script's output with a config file: on a
# machine without a GPU, the CPU threads per process it picked (histodist sets its own).
CPU_THREADS_NOTE = (
    "The following values were not passed to `accelerate launch`",
    "\t`--num_cpu_threads_per_process` was set to",
    "To avoid this warning",
)


@pytest.mark.slow
def test_accelerate_launch_after_accelerate_config_default_shows_the_error_alone(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    launch = ["launch", "-q", "-m", "histodist.train", "--dataset", "pcam"]
    # The README's install step, then its launch command.
    r = _accelerate(["config", "default"], work, home)
    assert r.returncode == 0, r.stderr
    assert (home / ".cache/huggingface/accelerate/default_config.yaml").is_file()
    r = _accelerate(launch, work, home)
    assert r.returncode == 1
    *before, last = r.stderr.splitlines()
    assert last.startswith("histodist.train: error: shards/pcam/manifest.json: no such file")
    assert "--out shards/pcam-mini`" in last
    assert all(line.startswith(CPU_THREADS_NOTE) for line in before), r.stderr


def readme_block(marker: str) -> list[str]:
    """The command lines of the README's code block after `<!-- ci:MARKER -->`."""
    lines = (EXAMPLES.parent / "README.md").read_text().splitlines()
    start = lines.index(f"<!-- ci:{marker} -->") + 2  # past the marker and the ``` line
    end = lines.index("```", start)
    return [line for line in lines[start:end] if line.strip()]


# Flags appended to the quick start's training line (later flags win): a small model for one
# epoch, so the test checks every command and path as written in seconds, not minutes.
QUICK = ["--model", "small-cnn", "--image-size", "32", "--epochs", "1", "--workers", "0",
         "--wandb", "disabled", "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "examples").symlink_to(EXAMPLES)  # the commands' paths are the checkout's
    bins = {
        "python": sys.executable,
        "accelerate": str(Path(sys.executable).with_name("accelerate")),
    }
    commands = readme_block("quickstart")
    assert len(commands) == 6
    for line in commands:
        argv = shlex.split(line)
        argv = [bins[argv[0]], *argv[1:], *(QUICK if "histodist.train" in argv else [])]
        # one CPU process whatever this machine has; an empty HOME: no accelerate config
        r = _run(argv, tmp_path, HOME=str(tmp_path / "home"), CUDA_VISIBLE_DEVICES="")
        assert r.returncode == 0, (line, r.stderr[-3000:])
    run = tmp_path / "runs" / "pcam-mini"
    assert '"n": 200' in (run / "eval-valid" / "metrics.json").read_text()
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 1 + 15
    assert (run / "explain-valid-top-losses.png").is_file()
    assert (run / "export" / "model.onnx").is_file()


def test_benchmarks_default_to_the_team_copy_else_the_sample(tmp_path, monkeypatch):
    """`python -m histodist.bench ...` without --data runs on a fresh clone: the sample."""
    from histodist import samples

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert Path(samples.bench_images()).resolve() == EXAMPLES / "pcam-mini"
    assert Path(samples.bench_images("train")).resolve() == EXAMPLES / "pcam-mini" / "train"
    (tmp_path / "shared" / "data" / "pcam-jpeg" / "train").mkdir(parents=True)
    assert samples.bench_images("train") == "../shared/data/pcam-jpeg/train"
