"""Run logging: metrics.jsonl (always, main process), stdout summaries and W&B (lazily).

W&B goes through Accelerate's tracker (`Accelerator(log_with="wandb")`), so only the main
process creates a run; wandb is imported only when a run is actually made. What a run holds
(history, summaries, model artifacts, sweeps) is described in docs/wandb.md.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
from pathlib import Path
from typing import Any


def wandb_api_key_configured() -> bool:
    """True when WANDB_API_KEY is set or ~/.netrc holds credentials for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(requested: str) -> tuple[str, str | None]:
    """(mode, why). `auto` honours WANDB_MODE, else online with an API key, else offline, why
    being "no API key configured" (for offline_line)."""
    if requested != "auto":
        return requested, None
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env, None
    if env == "dryrun":
        return "offline", None
    if wandb_api_key_configured():
        return "online", None
    return "offline", "no API key configured"


def offline_line(run, why: str | None = None) -> str:
    """The one line an offline W&B run prints (wandb's own banner and footer, a dozen lines
    and a history table, are silenced by quiet_settings): why it is offline, where its files
    are and the command that uploads them."""
    from histodist.samples import shown

    where = shown(Path(run.settings.sync_dir))
    because = f" ({why})" if why else ""
    return (
        f"wandb: offline{because}, run saved in {where}; to upload it: `wandb login`, then "
        f"`wandb sync {where}` (--wandb disabled turns W&B off)"
    )


def quiet_settings(mode: str) -> dict:
    """wandb.init's settings: an offline run silent (offline_line says what matters), an
    online one as wandb prints it (its run and project links)."""
    return {"silent": True} if mode == "offline" else {}


def wandb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)  # JSON has no NaN; keep the line valid
    return v


def drop_partial_line(path: Path) -> None:
    """Cut the partial last line a run killed mid-write leaves in `path`, so that a resumed
    run appends whole JSON lines after whole JSON lines (readers parse line by line)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class RunLog:
    """One logging front for the training loop. Call on every rank; only the main process
    writes. `log(values, step)` appends one JSON line and forwards to W&B when enabled."""

    def __init__(self, accelerator, run_dir: Path, *, use_wandb: bool):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.use_wandb = use_wandb
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        if self.main:
            drop_partial_line(self.path)
        self._fh = open(self.path, "a", buffering=1) if self.main else None  # noqa: SIM115
        self.t0 = time.time()
        run = self.wandb_run()
        if run is not None:
            define_summaries(run)

    def log(self, values: dict[str, Any], step: int) -> None:
        if not self.main:
            return
        line = {"step": step, "time": round(time.time() - self.t0, 3)}
        line.update({k: _clean(v) for k, v in values.items()})
        self._fh.write(json.dumps(line) + "\n")
        if self.use_wandb:
            self.accelerator.log(values, step=step)

    def wandb_run(self):
        """The wandb Run on the main process when W&B is on, else None."""
        if not (self.main and self.use_wandb):
            return None
        return self.accelerator.get_tracker("wandb", unwrap=True)

    def finish(self, reason: str, checkpoints: str = "none") -> None:
        """Main process, at the end of training: the W&B summary `stop_reason` (done,
        early-stop, preempted or nan) and, with `checkpoints` best / last / both, those
        checkpoints as W&B model artifacts; not after a preemption, when the job has seconds
        to exit (the resumed run logs them at its end)."""
        run = self.wandb_run()
        if run is None:
            if self.main and checkpoints != "none":
                self.print(f"--wandb-checkpoints {checkpoints}: W&B is off, no artifact logged")
            return
        run.summary["stop_reason"] = reason
        if checkpoints == "none" or reason == "preempted":
            return
        import wandb

        try:
            for name, aliases in log_model_artifacts(run, self.run_dir, checkpoints):
                self.print(f"wandb: logged artifact {name} ({', '.join(aliases)})")
        except (OSError, ValueError, wandb.Error) as e:  # the run itself succeeded
            self.print(f"wandb: model artifact not logged ({e}); {self.run_dir}/checkpoints")

    def print(self, msg: str) -> None:
        if self.main:
            from tqdm import tqdm

            tqdm.write(msg)

    def close(self) -> None:
        if self.use_wandb:
            self.accelerator.end_training()
        if self._fh:
            self._fh.close()
            self._fh = None


def sweep_run_id() -> str | None:
    """The run id a W&B sweep agent gave this process (WANDB_RUN_ID beside WANDB_SWEEP_ID, both
    set by `wandb agent` for the command it starts), else None."""
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    return None


def wandb_init_kwargs(run_dir: Path, run_name: str, mode: str, entity: str | None) -> dict:
    """init_kwargs for accelerator.init_trackers: a W&B id stored in the run folder so a resumed
    run continues the same W&B run; files under WANDB_DIR when set, else the run folder. Under
    a sweep agent the run is the agent's (wandb ignores an id passed to init in a sweep)."""
    id_file = Path(run_dir) / "wandb_id.txt"
    swept = sweep_run_id()
    if id_file.is_file() and not swept:
        run_id = id_file.read_text().strip()
    else:
        import secrets

        run_id = swept or secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
    kw: dict[str, Any] = {"name": run_name, "mode": mode, "settings": quiet_settings(mode)}
    if not swept:
        kw.update(id=run_id, resume="allow")
    if entity and not swept:
        kw["entity"] = entity
    if not os.environ.get("WANDB_DIR"):
        kw["dir"] = str(run_dir)
    return {"wandb": kw}


def record_config(accelerator, values: dict[str, Any]) -> None:
    """The run's W&B config (main process): `values` by flag name (Config.flags()), so that a
    sweep's parameters (`lr`, `model`, ...) are the same keys. Keys a sweep agent already set
    to the same value are left alone (wandb locks them and warns about every update)."""
    if not accelerator.is_main_process:
        return
    run = accelerator.get_tracker("wandb", unwrap=True)
    missing = object()
    changed = {k: v for k, v in values.items() if run.config.get(k, missing) != v}
    run.config.update(changed, allow_val_change=True)


def define_summaries(run) -> None:
    """What the W&B runs table keeps of each figure (W&B's default is the last value): every
    validation figure its best extreme and its last value (`val/auc.max`, `val/auc.last`,
    `val/loss.min`, ...), the data wait its mean and last value, the peak memory its maximum."""
    from histodist import metrics
    from histodist.training import monitor

    for name in metrics.HIGHER_IS_BETTER:
        run.define_metric(f"val/{name}", summary="max,last")
    for name in metrics.LOWER_IS_BETTER:
        run.define_metric(f"val/{name}", summary="min,last")
    run.define_metric(monitor.DATA_WAIT, summary="mean,last")
    for name in (monitor.PEAK_RSS, monitor.PEAK_GPU):
        run.define_metric(name, summary="max")


def artifact_files(run_dir: Path, checkpoint: Path) -> dict[str, Path]:
    """The files of a model artifact, {name in the artifact: file}: config.yaml and
    manifest.json of the run, meta.json and the weights evaluation uses (the EMA weights when
    the run kept an EMA) of `checkpoint`. Without the optimizer state: the artifact is a run
    folder that evaluate / predict / explain / export take as `--run`, not a training state."""
    from histodist.training.checkpoint import read_meta

    weights = read_meta(checkpoint).get("eval_weights", "model.safetensors")
    return {
        "config.yaml": Path(run_dir) / "config.yaml",
        "manifest.json": Path(run_dir) / "manifest.json",
        "meta.json": Path(checkpoint) / "meta.json",
        weights: Path(checkpoint) / weights,
    }


def log_model_artifacts(run, run_dir: Path, which: str) -> list[tuple[str, list[str]]]:
    """Log the run folder's checkpoints `which` (best | last | both) as versions of the W&B
    artifact `model-<run id>` (type model, the checkpoint's meta.json as its metadata),
    aliased `best` / `last`; one version when both are the same state. wandb copies the files
    into its staging folder (WANDB_DATA_DIR), so an offline run can be synced after the
    checkpoints rotated. Returns [(artifact name, aliases)]."""
    import wandb

    from histodist.training.checkpoint import CheckpointError, find_checkpoint, read_meta

    by_state: dict[Path, list[str]] = {}
    for name in ("best", "last") if which == "both" else (which,):
        try:
            by_state.setdefault(find_checkpoint(run_dir, name).resolve(), []).append(name)
        except CheckpointError:
            continue  # no such checkpoint (a run stopped before its first save)
    logged = []
    for state, aliases in by_state.items():
        art = wandb.Artifact(f"model-{run.id}", type="model", metadata=read_meta(state))
        for name, path in artifact_files(run_dir, state).items():
            art.add_file(str(path), name=name)
        run.log_artifact(art, aliases=aliases)
        logged.append((art.name, aliases))
    return logged
