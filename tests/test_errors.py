"""One base error, one runner, the documented exit codes (docs/architecture.md)."""

import importlib
from pathlib import Path

import pytest

from histodist import errors
from histodist.errors import EXIT_FAILURE, EXIT_USAGE, HistodistError, UsageError, run_cli

ERRORS = {  # module: (class, exit code)
    "histodist.config": ("ConfigError", EXIT_USAGE),
    "histodist.data.embeddings": ("EmbeddingError", EXIT_USAGE),
    "histodist.training.build": ("TrainError", EXIT_USAGE),
    "histodist.augment": ("AugmentError", EXIT_USAGE),
    "histodist.data.remote": ("ShardError", EXIT_FAILURE),
    "histodist.data.loader": ("DataError", EXIT_FAILURE),
    "histodist.training.checkpoint": ("CheckpointError", EXIT_FAILURE),
    "histodist.hub": ("HubError", EXIT_FAILURE),
    "histodist.models": ("WeightsError", EXIT_FAILURE),
    "histodist.inference.core": ("InputError", EXIT_FAILURE),
    "histodist.export": ("ExportError", EXIT_FAILURE),
    "histodist.ingest.sources": ("SourceError", EXIT_FAILURE),
    "histodist.ingest.download": ("DownloadError", EXIT_FAILURE),
    "histodist.ingest.imageio": ("DecodeError", EXIT_FAILURE),
    "histodist.data.tarstream": ("TarStreamError", EXIT_FAILURE),
}


@pytest.mark.parametrize("module", sorted(ERRORS))
def test_every_expected_error_has_the_base_and_its_exit_code(module, capsys):
    name, code = ERRORS[module]
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, HistodistError) and issubclass(cls, UsageError) == (code == 2)

    def body():
        raise cls("x.json: bad\n  value; pass --fix")

    assert run_cli("cmd", body) == code
    assert capsys.readouterr().err == "histodist.cmd: error: x.json: bad value; pass --fix\n"


def test_one_shard_error():
    from histodist import shard
    from histodist.data import loader as data
    from histodist.data import remote

    assert shard.ShardError is remote.ShardError is data.ShardError


def test_run_cli_passes_results_and_bugs_through():
    assert run_cli("cmd", lambda a: a + 1, 1) == 2
    with pytest.raises(KeyError):
        run_cli("cmd", lambda: {}["bug"])  # a bug keeps its traceback
    assert run_cli("cmd", lambda: Path("/nonexistent/x").read_text(), extra=(OSError,)) == 1


def test_usage_and_runtime_errors_exit_2_and_1(tmp_path, capsys):
    from histodist import shard, train

    assert train.main(["--epochs", "0", "--runs-dir", str(tmp_path)]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("histodist.train: error: --epochs 0")
    assert shard.main(["--verify", str(tmp_path / "none")]) == EXIT_FAILURE
    assert "histodist.shard: error:" in capsys.readouterr().err
    assert errors.EXIT_DIVERGED == train.EXIT_NAN == 3


def test_a_label_outside_the_classes_is_one_line_in_train_and_evaluate(tmp_path, pcam_jpeg, capsys):
    """A `.cls` of 7 in a 2-class set: one line naming the shard and the key, exit 1, in
    training (an IndexError in the loss before) and in evaluation."""
    from runkit import untrained_run
    from shardkit import pcam_images, write_shards
    from trainkit import run_flags

    from histodist import evaluate, train

    images = {
        "train": pcam_images(pcam_jpeg, "train", 8),
        "valid": pcam_images(pcam_jpeg, "valid", 4),
    }
    bad = {split: items[3][0].stem for split, items in images.items()}
    extra = {key: {"cls": b"7"} for key in bad.values()}
    write_shards(tmp_path / "s", images, 8, extra_members=extra)
    flags = [*run_flags(tmp_path / "s", tmp_path / "runs", "r"), "--epochs", "1"]
    assert train.main(flags) == EXIT_FAILURE
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("histodist.train: error: ") and "train-000000.tar" in err, err
    assert f"sample {bad['train']}: .cls 7" in err and "2 (0..1)" in err
    run = untrained_run(tmp_path / "run", ["0", "1"])
    argv = ["--run", str(run), "--shards", str(tmp_path / "s"), "--split", "valid",
            "--workers", "0", "--no-progress"]  # fmt: skip
    assert evaluate.main(argv) == EXIT_FAILURE
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("histodist.evaluate: error: ") and "valid-000000.tar" in err, err
    assert f"sample {bad['valid']}: .cls 7" in err


BAD_VALUES = [  # (command, its required flags, a bad flag and value)
    ("evaluate", ["--run", "r"], ["--batch-size", "0"]),
    ("evaluate", ["--run", "r"], ["--workers", "-1"]),
    ("evaluate", ["--run", "r"], ["--bootstrap", "-5"]),
    ("evaluate", ["--run", "r"], ["--knn", "two"]),
    ("predict", ["--run", "r", "--out", "p.csv"], ["--batch-size", "-3"]),
    ("predict", ["--run", "r", "--out", "p.csv"], ["--assume-mpp", "nan"]),
    ("explain", ["--run", "r"], ["--top-losses", "0"]),
    ("explain", ["--run", "r"], ["--top", "0"]),
    ("explain", ["--run", "r"], ["--assume-mpp", "-0.5"]),
    ("export", ["--run", "r", "--format", "onnx"], ["--batch", "0"]),
    ("embed", ["--model", "m", "--shards", "s", "--out", "o"], ["--batch-size", "0"]),
    ("embed", ["--model", "m", "--shards", "s", "--out", "o"], ["--crop-pct", "inf"]),
    ("embed", ["--model", "m", "--slides", "s", "--out", "o"], ["--read-threads", "0"]),
    ("embed", ["--model", "m", "--slides", "s", "--out", "o"], ["--min-tissue", "1.5"]),
    ("shard", ["--dataset", "folder", "--src", "s", "--out", "o"], ["--workers", "-2"]),
    ("shard", ["--dataset", "folder", "--src", "s", "--out", "o"], ["--jpeg-quality", "500"]),
    ("shard", ["--dataset", "folder", "--src", "s", "--out", "o"], ["--val-fraction", "nan"]),
    ("shard", ["--dataset", "wsi", "--src", "s", "--out", "o"], ["--mpp", "0"]),
    ("shard", ["--dataset", "wsi", "--src", "s", "--out", "o"], ["--tile-size", "4"]),
]


@pytest.mark.parametrize(("command", "required", "bad"), BAD_VALUES, ids=lambda v: str(v))
def test_a_value_out_of_range_is_one_usage_line_before_any_work(command, required, bad, capsys):
    """Every command's numeric options are checked as they are parsed: argparse's one line
    naming the flag, exit 2, before any file is read (`--mpp 0` used to tile at 0.5 µm/px)."""
    main = importlib.import_module(f"histodist.{command}").main
    with pytest.raises(SystemExit) as stop:
        main([*required, *bad])
    assert stop.value.code == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: argument {bad[0]}: " in err and bad[1] in err, err
