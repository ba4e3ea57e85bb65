"""Resume at a new world size: a run preempted with 1 (2) processes continues with 2 (1).

Each case runs through tests/scripts/train_probe.py (histodist.train's real setup and loop):
an uninterrupted run at the new world size, a run at the old world size preempted after a
known batch (PROBE_STOP_AFTER), and its `--resume` at the new world size. The resumed run
must train the samples left in the interrupted epoch and the next epoch in full, and end
where the uninterrupted run ends: samples seen, schedule position (final lr, with
`--lr-scaling linear` re-scaled for the new global batch).
"""

import json
import sys

import pytest
from trainkit import ROOT, free_port, run, run_flags, tiny_shards

pytestmark = pytest.mark.slow

PROBE = str(ROOT / "tests" / "scripts" / "train_probe.py")
FLAGS = ["--epochs", "2", "--lr-scaling", "linear", "--lr-reference-batch", "8",
         "--warmup-epochs", "0.5", "--no-resample"]  # fmt: skip


def probe_cmd(world: int, out, flags: list[str]) -> list[str]:
    """The probe with `world` CPU processes: a real `accelerate launch` for 2, plain python for 1."""
    if world == 1:
        return [sys.executable, PROBE, str(out), *flags]
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(world), "--num_machines", "1",
        "--main_process_port", str(free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no", PROBE, str(out), *flags,
    ]  # fmt: skip


def probe(world: int, out, flags: list[str], **env: str) -> tuple[list[dict], str]:
    res = run(probe_cmd(world, out, flags), timeout=400, ACCELERATE_USE_CPU="true", **env)
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    assert [r["world_size"] for r in ranks] == [world] * world
    return ranks, res.stdout + res.stderr


def lrs(run_dir) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["train/lr"] for x in lines if "train/lr" in x]


@pytest.mark.parametrize("old,new", [(1, 2), (2, 1)], ids=["1to2", "2to1"])
def test_resume_at_new_world_size_ends_where_an_uninterrupted_run_ends(
    tmp_path, pcam_jpeg, old, new
):
    shards = tiny_shards(tmp_path / "shards", pcam_jpeg)  # 64 train samples, batch 8
    n_train = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    ref, _ = probe(new, tmp_path / "ref", [*run_flags(shards, tmp_path, "ref"), *FLAGS])

    flags = [*run_flags(shards, tmp_path, "b"), *FLAGS]
    stopped, _ = probe(old, tmp_path / "p1", flags, PROBE_STOP_AFTER="2")
    assert stopped[0]["reason"] == "preempted" and stopped[0]["epoch"] == 0
    done_before = 2 * 8 * old  # two batches of 8 on each of `old` ranks
    assert stopped[0]["samples"] == done_before

    resumed, log = probe(new, tmp_path / "p2", [*flags, "--resume"])
    assert "resuming at a new layout" in log, log[-3000:]
    assert resumed[0]["reason"] == "done"
    # The interrupted epoch trains exactly the samples left; the next epoch all of them.
    epoch0 = [k for r in resumed for k in r["keys"].get("0", [])]
    epoch1 = [k for r in resumed for k in r["keys"]["1"]]
    assert len(epoch0) == n_train - done_before and len(set(epoch0)) == len(epoch0)
    assert sorted(epoch1) == sorted(set(epoch1)) and len(epoch1) == n_train
    # Same samples seen and the same end of the schedule as the uninterrupted run.
    assert resumed[0]["samples"] == ref[0]["samples"] == 2 * n_train
    assert resumed[0]["lr"] == pytest.approx(ref[0]["lr"], rel=1e-6)
    steps_old = 2  # optimizer steps before the stop (accumulation 1)
    after = (n_train - done_before) // (8 * new) + n_train // (8 * new)
    assert resumed[0]["step"] == steps_old + after
    # Every lr after the resume is the one the uninterrupted run used at the same sample.
    assert lrs(tmp_path / "b")[-after:] == pytest.approx(lrs(tmp_path / "ref")[-after:], rel=1e-6)
    print(next(x for x in log.splitlines() if "resuming at a new layout" in x))
    print(
        f"{old}->{new} processes: resumed samples {resumed[0]['samples']} steps "
        f"{resumed[0]['step']} lr {resumed[0]['lr']:.6g}; uninterrupted ({new}) samples "
        f"{ref[0]['samples']} steps {ref[0]['step']} lr {ref[0]['lr']:.6g}"
    )
