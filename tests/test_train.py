"""Single-process training through the real CLI on tiny real-image shards (CPU)."""

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from trainkit import TINY, env, run, run_flags, train_cmd
from wandbkit import read_run, wandb_file

from histodist import train
from histodist.config import load_config
from histodist.training.checkpoint import STEP, load_run_model, read_meta, states

EPOCHS = ["--epochs", "2", "--deterministic", "--seed", "3"]


@pytest.fixture(scope="module")
def shards(tiny_pcam_shards):
    return tiny_pcam_shards


@pytest.fixture(scope="module")
def run_a(shards, tmp_path_factory):
    """An uninterrupted 2-epoch run with W&B offline."""
    runs, wb = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("wandb")
    args = [
        *run_flags(shards, runs, "a", "offline"),
        *EPOCHS,
    ]
    res = run(train_cmd(*args), wandb_dir=wb)
    assert res.returncode == 0, res.stderr[-3000:]
    return runs / "a", wb, res


def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_checkpoints_metrics_and_wandb(run_a):
    run_dir, wb, res = run_a
    for which in ("last", "best"):
        ck = run_dir / "checkpoints" / which
        assert (ck / "model.safetensors").is_file() and (ck / "optimizer.bin").is_file()
        meta = read_meta(ck)
        assert meta["manifest_sha256"] and meta["config_sha256"] and meta["histodist_version"]
    assert read_meta(run_dir / "checkpoints" / "last")["step"] == 16
    assert (run_dir / "config.yaml").is_file() and (run_dir / "manifest.json").is_file()
    lines = _lines(run_dir)
    assert sum("train/loss" in x for x in lines) == 16
    val = [x for x in lines if "val/auc" in x]
    assert len(val) == 2 and all(x["val/num_samples"] == 40 for x in val)
    assert {
        "val/accuracy",
        "val/balanced_accuracy",
        "val/sensitivity",
        "val/specificity",
        "val/f1",
        "val/loss",
    } <= set(val[0])
    wrun = read_run(wandb_file(wb))  # what W&B holds: the same figures, config and best
    assert wrun.name == "a" and wrun.config["model"] == "small-cnn" and wrun.config["epochs"] == 2
    assert [h["train/loss"] for h in wrun.history if "train/loss" in h] == pytest.approx(
        [x["train/loss"] for x in lines if "train/loss" in x]
    )
    assert wrun.summary["val/auc"]["last"] == pytest.approx(val[-1]["val/auc"])
    assert wrun.summary["best/auc"] == pytest.approx(max(x["val/auc"] for x in val))
    assert wrun.summary["stop_reason"] == "done" and wrun.exit_code == 0
    assert "epoch 2/2" in res.stderr + res.stdout
    # wandb's own banner, history table and footer (about 40 lines) are silenced; one line
    # says where the offline run is and how to upload it.
    said = [x for x in (res.stderr + res.stdout).splitlines() if "wandb" in x.lower()]
    offline_dir = wandb_file(wb).parent
    assert len(said) == 1 and said[0].startswith("wandb: offline, run saved in "), said
    assert said[0].endswith(f"`wandb sync {offline_dir}` (--wandb disabled turns W&B off)")
    model, cfg, meta = load_run_model(run_dir)
    assert cfg.model.model == "small-cnn" and meta["classes"] == ["0", "1"]
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_validation_and_evaluate_report_the_same_numbers(run_a, tmp_path):
    """Training's last validation and histodist.evaluate of the state it saved score the same
    predictions with the same functions (histodist.metrics), so every shared figure agrees."""
    from histodist import evaluate

    run_dir = run_a[0]
    val = [x for x in _lines(run_dir) if "val/auc" in x][-1]
    out = tmp_path / "eval"
    assert evaluate.main(["--run", str(run_dir), "--checkpoint", "last", "--split", "valid",
                          "--batch-size", "8", "--workers", "0", "--bootstrap", "0",
                          "--no-progress", "--wandb", "disabled", "--out", str(out)]) == 0  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())["patch"]
    assert m["n"] == val["val/num_samples"] == 40
    for k in ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity"):
        assert m[k] == pytest.approx(val[f"val/{k}"], abs=1e-6), k


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted(run_a, shards, tmp_path):
    run_dir_a = run_a[0]
    args = [
        *run_flags(shards, tmp_path, "b"),
        *EPOCHS,
    ]
    proc = subprocess.Popen(
        train_cmd(*args),
        cwd=train.__file__.rsplit("/", 2)[0],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and sum(1 for _ in metrics.open()) >= 3:  # mid-epoch 1
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved" in out, out[-3000:]
    last = tmp_path / "b" / "checkpoints" / "last"
    stopped_at = read_meta(last)["step"]
    assert 0 < stopped_at < 16
    load_run_model(tmp_path / "b", "last")  # the preemption checkpoint is usable

    res = run(train_cmd(*args, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"step {stopped_at}" in res.stderr + res.stdout  # it resumed, not restarted
    a = load_file(str(run_dir_a / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(last / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_existing_run_bad_shards_and_nan_are_clear_errors(run_a, shards, tmp_path, capsys):
    run_dir = run_a[0]
    base = ["--shards", str(shards), "--wandb", "disabled", *TINY, "--epochs", "1"]
    assert train.main([*base, "--runs-dir", str(run_dir.parent), "--run-name", "a"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert train.main(["--shards", str(tmp_path / "nowhere"), "--runs-dir", str(tmp_path)]) == 1
    assert "histodist.train: error:" in capsys.readouterr().err
    # A diverging run stops after --max-bad-steps and never saves a best checkpoint.
    rc = train.main(
        [
            *base,
            "--runs-dir",
            str(tmp_path),
            "--run-name",
            "nan",
            "--lr",
            "1e12",
            "--grad-clip",
            "0",
            "--max-bad-steps",
            "2",
            "--warmup-epochs",
            "0",
        ]
    )
    assert rc == train.EXIT_NAN
    assert "NaN/inf" in capsys.readouterr().out + ""
    assert not (tmp_path / "nan" / "checkpoints" / "best").exists()


def test_lr_find_saves_plot_and_suggests(shards, tmp_path, capsys):
    from histodist import lr_find

    out = tmp_path / "lr.png"
    args = ["--shards", str(shards), *TINY, "--num-steps", "12", "--out", str(out)]
    assert lr_find.main(args) == 0
    assert out.stat().st_size > 1000 and "suggested --lr" in capsys.readouterr().out


def test_accelerate_config_is_a_multi_gpu_bf16_config():
    from accelerate.commands.config.config_args import load_config_from_file
    from trainkit import ROOT

    c = load_config_from_file(str(ROOT / "accelerate_config.yaml"))
    assert c.distributed_type.value == "MULTI_GPU" and c.mixed_precision == "bf16"
    assert c.num_machines == 1 and not c.use_cpu


@pytest.mark.slow
def test_training_options_together(shards, tmp_path):
    """Accumulation, EMA, balanced resampling, smoothing, freezing, SGD + one-cycle, step-wise
    validation and checkpoints, early stopping, a centre crop: one short run through the
    real loop."""
    args = [
        *run_flags(shards, tmp_path, "opts"),
        "--epochs",
        "2",
        "--accum-steps",
        "2",
        "--ema",
        "0.9",
        "--class-balance",
        "sampler",
        "--label-smoothing",
        "0.1",
        "--freeze-epochs",
        "1",
        "--optimizer",
        "sgd",
        "--schedule",
        "onecycle",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "2",
        "--patience",
        "2",
        "--keep-last",
        "3",
        "--crop",
        "0.75",
    ]
    assert train.main(args) == 0
    run_dir = tmp_path / "opts"
    meta = read_meta(run_dir / "checkpoints" / "last")
    assert meta["eval_weights"] == "model_ema.safetensors"
    steps = [x["step"] for x in _lines(run_dir) if "train/loss" in x]
    assert steps[:4] == [1, 2, 3, 4]  # 8 micro-batches per epoch -> 4 optimizer steps
    val_steps = [x["step"] for x in _lines(run_dir) if "val/auc" in x]
    assert val_steps[:3] == [3, 4, 6]  # every 3 steps and at each epoch end (step 4)
    # The first validation (step 3) always improves, so after epoch 1 at most one validation
    # is stale (< --patience 2): early stopping cannot end the run before its last epoch.
    assert meta["step"] == 8
    # states at steps 2 (--checkpoint-every), 3, 4, 6, 8 (validations); --keep-last 3 keeps
    # the newest three and the best one
    ckpts = run_dir / "checkpoints"
    best = read_meta(ckpts / "best")["step"]
    assert best in (3, 4, 6, 8) and meta["best_step"] == best
    assert {p.name for p in states(ckpts)} == {STEP.format(s) for s in {4, 6, 8, best}}
    assert (ckpts / "last").resolve().name == STEP.format(8)
    assert (ckpts / "best").resolve().name == STEP.format(best)
    assert load_config(run_dir / "config.yaml").augment.crop == 0.75
    model, _, _ = load_run_model(run_dir)  # EMA weights load into the model
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 2)


def test_val_tta_scores_validation_as_evaluate_tta_does(shards, tmp_path):
    """--val-tta 8: the epoch's validation figures are those `evaluate --tta 8` gives for the
    same checkpoint, and differ from the single-view figures of the same weights."""
    from histodist import evaluate

    assert train.main([*run_flags(shards, tmp_path, "tta"), "--epochs", "1",
                       "--val-tta", "8"]) == 0  # fmt: skip
    run_dir = tmp_path / "tta"
    val = [x for x in _lines(run_dir) if "val/auc" in x][-1]
    args = ["--run", str(run_dir), "--checkpoint", "last", "--split", "valid", "--workers", "0",
            "--bootstrap", "0", "--no-progress", "--wandb", "disabled"]  # fmt: skip
    for tta in (8, 1):
        assert evaluate.main([*args, "--tta", str(tta), "--out", str(tmp_path / f"e{tta}")]) == 0
    m8, m1 = (json.loads((tmp_path / f"e{t}" / "metrics.json").read_text())["patch"]
              for t in (8, 1))  # fmt: skip
    assert val["val/num_samples"] == m8["n"] == 40
    assert val["val/auc"] == pytest.approx(m8["auc"], abs=1e-5)
    assert val["val/accuracy"] == pytest.approx(m8["accuracy"], abs=1e-6)
    assert m1["auc"] != pytest.approx(m8["auc"], abs=1e-5)


@pytest.mark.slow
def test_patience_stops_after_that_many_validations_without_improvement(
    shards, tmp_path, monkeypatch, capsys
):
    """A metric that never improves after the first validation: with --patience 1 the run stops
    at the end of epoch 2 of 3 (step 16), and best stays the first validation's state."""
    from histodist import metrics

    monkeypatch.setattr(metrics, "is_better", lambda value, best: best is None)
    args = [*run_flags(shards, tmp_path, "es"), "--epochs", "3", "--patience", "1"]
    assert train.main(args) == 0
    ckpts = tmp_path / "es" / "checkpoints"
    assert "early stop: no auc improvement in 1 validations" in capsys.readouterr().out
    assert read_meta(ckpts / "last")["step"] == 16  # 8 steps per epoch, epoch 3 never ran
    assert read_meta(ckpts / "best")["step"] == 8
    assert [x["step"] for x in _lines(tmp_path / "es") if "val/auc" in x] == [8, 16]


def test_epoch_summary_line_rounds_and_names_the_best_step():
    from histodist.config import Config
    from histodist.training.loop import State

    st = State(epoch=1, step=625, best=0.8846720457077026, best_step=625)
    m = {"loss": 0.44481, "auc": 0.88467, "accuracy": 0.781}
    line = train.summary(st, Config(), m, 264.2)
    assert "val loss 0.4448 auc 0.8847 accuracy 0.7810" in line
    assert "best auc 0.8847 at step 625 | 264s" in line
    assert "best auc none" in train.summary(State(), Config(), m, 1.0)
