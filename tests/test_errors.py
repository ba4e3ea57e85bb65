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
