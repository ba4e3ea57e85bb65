"""W&B as the dashboard: what a training run's offline W&B run holds (read back from its
`.wandb` record log by tests/wandbkit.py): config, history, summaries and model artifacts, for
a trial of launch/wandb_sweep.yaml started by wandb's own sweep agent code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainkit import ROOT, env
from wandbkit import read_run, wandb_file

from histodist.config import Config, load_config, parse_args
from histodist.training.monitor import DATA_WAIT, PEAK_RSS

SWEEP = ROOT / "launch" / "wandb_sweep.yaml"


# ----------------------------------------------------------------------------- sweeps
def agent_command(monkeypatch, tmp_path, params: dict, sweep: dict | None = None):
    """(command, environment) with which wandb's sweep agent (wandb_agent.Agent._command_run,
    unchanged) starts a trial of `sweep` (default: launch/wandb_sweep.yaml) whose parameters
    take the values `params`; the process itself is not started."""
    from wandb import wandb_agent

    sweep = sweep or yaml.safe_load(SWEEP.read_text())
    started = {}

    class Recorder:
        def __init__(self, command=None, env=None, **kw):
            started.update(command=command, env=env)

    monkeypatch.setattr(wandb_agent, "AgentProcess", Recorder)
    for name, value in {"WANDB_DIR": str(tmp_path), "WANDB_SWEEP_ID": "sw33p",
                        "WANDB_RUN_ID": "", "WANDB_SWEEP_PARAM_PATH": ""}.items():  # fmt: skip
        monkeypatch.setenv(name, value)  # restored after the test (the agent sets some)
    agent = wandb_agent.Agent.__new__(wandb_agent.Agent)
    agent._sweep_command = list(sweep["command"])
    agent._function, agent._in_jupyter, agent._forward_signals = None, False, False
    agent._run_processes = {}
    trial = {"type": "run", "run_id": "tr1al0", "program": sweep["program"],
             "args": {k: {"value": v} for k, v in params.items()}}  # fmt: skip
    agent._command_run(trial)
    return started["command"], started["env"]


def train_argv(command: list[str]) -> list[str]:
    """The arguments histodist.train receives from `accelerate launch ... -m histodist.train`."""
    i = command.index("-m")
    assert command[:i] == ["/usr/bin/env", "accelerate", "launch"], command
    assert command[i + 1] == "histodist.train", command
    return command[i + 2 :]


def sweep_values(spec: dict) -> list:
    """Values a sweep may give a parameter: every listed value, or a distribution's ends."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def config_value(cfg: Config, flag: str):
    name = flag.replace("-", "_")
    return next(getattr(s, name) for s in vars(cfg).values() if hasattr(s, name))


def test_every_sweep_trial_parses_into_the_config(monkeypatch, tmp_path):
    """Each value of each parameter of launch/wandb_sweep.yaml, passed the way wandb's agent
    passes it (`--name=value`, booleans as `--flag=True` / `--flag=False`), parses through
    histodist's parser and lands in the config field of that name."""
    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["program"] == "histodist.train" and sweep["metric"]["name"] == "best/auc"
    grid = {name: sweep_values(spec) for name, spec in sweep["parameters"].items()}
    assert any(isinstance(v, bool) for vs in grid.values() for v in vs)  # booleans covered
    width = max(map(len, grid.values()))
    for k in range(width):  # every value at least once, across `width` trials
        params = {name: vs[k % len(vs)] for name, vs in grid.items()}
        command, _ = agent_command(monkeypatch, tmp_path, params, sweep)
        argv = train_argv(command)
        assert any(a.startswith("--lr=") for a in argv) and "--dataset=pcam" in argv
        cfg = parse_args(argv)
        for name, value in params.items():
            got = config_value(cfg, name)
            assert got == (pytest.approx(value) if isinstance(value, float) else value), name


# ----------------------------------------------------------------------------- a real trial
TRIAL = {"lr": 0.003, "weight-decay": 0.01, "label-smoothing": 0.1, "batch-size": 8,
         "augment": "dihedral", "pretrained": False, "model": "small-cnn", "image-size": 32,
         "epochs": 2, "workers": 0, "log-every": 2, "val-tta": 1, "wandb": "offline",
         "wandb-checkpoints": "both"}  # fmt: skip


@pytest.fixture(scope="module")
def trial(tiny_pcam_shards, tmp_path_factory):
    """One trial of launch/wandb_sweep.yaml started as wandb's agent starts it (its command
    and environment, run by `accelerate launch`), with tiny settings as sweep parameters."""
    tmp = tmp_path_factory.mktemp("trial")
    params = {**TRIAL, "shards": str(tiny_pcam_shards), "runs-dir": str(tmp / "runs")}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env(tmp, WANDB_DATA_DIR=str(tmp / "data")).items():
            mp.setenv(name, value)  # the agent passes its own environment on
        mp.setenv("PATH", f"{Path(sys.executable).parent}:{env()['PATH']}")  # venv's accelerate
        command, agent_env = agent_command(mp, tmp, params)
    res = subprocess.run(command, cwd=ROOT, env=agent_env, capture_output=True, text=True,
                         timeout=500)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, read_run(wandb_file(tmp))


@pytest.mark.slow
def test_sweep_trial_writes_a_comparable_wandb_run(trial):
    tmp, run = trial
    run_dir = tmp / "runs" / "pcam-small-cnn-tr1al0"  # <run name>-<W&B run id>
    assert run.run_id == "tr1al0" and (run_dir / "wandb_id.txt").read_text().strip() == "tr1al0"
    # Config: every option by its flag name, the sweep's parameters the same keys.
    flags = load_config(run_dir / "config.yaml").flags()
    assert {k: v for k, v in run.config.items() if k in flags} == flags
    assert set(run.config) - set(flags) == {"_wandb", "precision_reason"}
    assert [run.config[k] for k in ("lr", "model", "augment", "pretrained", "runs-dir")] == [
        0.003, "small-cnn", "dihedral", False, str(run_dir.parent)]  # fmt: skip
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if "val/auc" in x]
    # History: every metrics.jsonl line is a W&B history row at its step (one per step).
    rows = {h["_step"]: h for h in run.history}
    for x in lines:
        for k, v in x.items():
            if k not in ("step", "time") and not isinstance(v, str):  # "nan" in JSON
                assert rows[x["step"]][k] == pytest.approx(v, nan_ok=True), (x["step"], k)
    train_rows = [h for h in run.history if "train/loss" in h]
    assert len(train_rows) == 8 and all(0 <= h[DATA_WAIT] <= 1 for h in train_rows)
    assert all(h[PEAK_RSS] > 0.05 for h in train_rows)
    # Summary: best extreme and last value of each validation figure, best/auc at its step.
    s = run.summary
    aucs = [x["val/auc"] for x in val]
    assert s["val/auc"] == pytest.approx({"max": max(aucs), "last": aucs[-1]})
    assert s["val/loss"] == pytest.approx({"min": min(x["val/loss"] for x in val),
                                           "last": val[-1]["val/loss"]})  # fmt: skip
    best = max(val, key=lambda x: x["val/auc"])
    assert s["best/auc"] == pytest.approx(best["val/auc"]) and s["best/step"] == best["step"]
    assert s["epoch"] == 2 and s["stop_reason"] == "done"
    assert s[PEAK_RSS] == pytest.approx({"max": max(h[PEAK_RSS] for h in train_rows)})
    mean_wait = sum(h[DATA_WAIT] for h in train_rows) / len(train_rows)
    assert s[DATA_WAIT]["mean"] == pytest.approx(mean_wait)
    assert run.metrics["val/specificity"] == {"max", "last"}
    assert run.exit_code == 0


@pytest.mark.slow
def test_checkpoint_artifacts_are_loadable_run_folders(trial, tmp_path):
    """`--wandb-checkpoints both`: the best and last states as versions of `model-<id>`, each
    a run folder (as staged for upload) that loads with the checkpoint's exact weights."""
    from histodist.inference.core import load_run

    tmp, run = trial
    run_dir = tmp / "runs" / "pcam-small-cnn-tr1al0"
    aliases = [set(a.aliases) - {"latest"} for a in run.artifacts]
    assert set().union(*aliases) == {"best", "last"} and len(aliases) <= 2, aliases
    for a in run.artifacts:
        assert a.name == "model-tr1al0" and a.type == "model"
        meta = json.loads(a.metadata)
        files = {c.path: Path(c.local_path) for c in a.manifest.contents}
        assert set(files) == {"config.yaml", "manifest.json", "meta.json", "model.safetensors"}
        folder = tmp_path / "-".join(sorted(a.aliases))
        folder.mkdir()
        for name, staged in files.items():
            (folder / name).write_bytes(staged.read_bytes())
        loaded = load_run(folder)
        assert loaded.meta["step"] == meta["step"] and loaded.classes == ["0", "1"]
        ckpt = run_dir / "checkpoints" / ("last" if "last" in a.aliases else "best")
        want = load_file(str(ckpt / "model.safetensors"))
        got = loaded.model.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want)
    steps = {alias: json.loads(a.metadata)["step"] for a in run.artifacts for alias in a.aliases}
    assert steps["last"] == 16 and steps["best"] == run.summary["best/step"]


def test_an_artifact_that_cannot_be_logged_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    """A full staging disk while logging the model artifact: one line, the run still ends
    with its summary (its checkpoints are on disk)."""
    from histodist.training import tracking

    class Run:
        def __init__(self):
            self.summary = {}

        def define_metric(self, name, summary):
            pass

    class Acc:
        is_main_process = True

        def get_tracker(self, name, unwrap):
            return run

    def no_space(*args):
        raise OSError(28, "No space left on device")

    run = Run()
    monkeypatch.setattr(tracking, "log_model_artifacts", no_space)
    tracking.RunLog(Acc(), tmp_path, use_wandb=True).finish("done", checkpoints="best")
    assert run.summary == {"stop_reason": "done"}
    assert (
        "model artifact not logged ([Errno 28] No space left on device)" in capsys.readouterr().out
    )
