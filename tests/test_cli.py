"""The run-folder commands declare their shared options once (inference.add_run_flags)."""

import importlib

import pytest

from histodist.config import WANDB_MODES
from histodist.errors import EXIT_USAGE

REQUIRED = {"evaluate": [], "predict": ["--input", "a", "--out", "b"], "explain": [],
            "export": ["--format", "onnx"]}  # fmt: skip


@pytest.mark.parametrize("cmd", sorted(REQUIRED))
def test_run_folder_commands_share_run_options(cmd):
    parser = importlib.import_module(f"histodist.{cmd}").build_parser()
    args = parser.parse_args(["--run", "r", *REQUIRED[cmd]])
    assert (args.run, args.checkpoint) == ("r", "best")
    flags = {a.dest: a for a in parser._actions}
    if "wandb" in flags:
        assert tuple(flags["wandb"].choices) == WANDB_MODES and args.wandb is None
    if "workers" in flags:
        assert (args.workers, args.precision, args.no_progress) == (2, "auto", False)
    with pytest.raises(SystemExit):
        parser.parse_args(REQUIRED[cmd])  # --run is required


@pytest.mark.parametrize("cmd", sorted(REQUIRED))
def test_a_folder_that_is_no_run_is_a_usage_error(cmd, tmp_path, capsys):
    """--run naming a folder without config.yaml is a bad flag value: exit 2, one line."""
    main = importlib.import_module(f"histodist.{cmd}").main
    assert main(["--run", str(tmp_path), *REQUIRED[cmd]]) == EXIT_USAGE
    want = f"{tmp_path}: not a run folder (no config.yaml); pass --run runs/NAME"
    assert capsys.readouterr().err == f"histodist.{cmd}: error: {want}\n"
