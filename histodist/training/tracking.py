"""Run logging: metrics.jsonl (always, main process), stdout summaries and W&B (lazily).

W&B goes through Accelerate's tracker (`Accelerator(log_with="wandb")`), so only the main
process creates a run; wandb is imported only when a run is actually made.
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
    """(mode, message). `auto` honours WANDB_MODE, else online with an API key, else offline
    (with a one-line message saying how to sync or go online)."""
    if requested != "auto":
        return requested, None
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env, None
    if env == "dryrun":
        return "offline", None
    if wandb_api_key_configured():
        return "online", None
    return "offline", (
        "wandb: no API key configured, logging offline (`wandb login` then "
        "`wandb sync <run>/wandb/offline-run-*` to upload; --wandb disabled to turn off)"
    )


def wandb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)  # JSON has no NaN; keep the line valid
    return v


class RunLog:
    """One logging front for the training loop. Call on every rank; only the main process
    writes. `log(values, step)` appends one JSON line and forwards to W&B when enabled."""

    def __init__(self, accelerator, run_dir: Path, *, use_wandb: bool):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.use_wandb = use_wandb
        self.path = Path(run_dir) / "metrics.jsonl"
        self._fh = open(self.path, "a", buffering=1) if self.main else None  # noqa: SIM115
        self.t0 = time.time()

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


def wandb_init_kwargs(run_dir: Path, run_name: str, mode: str, entity: str | None) -> dict:
    """init_kwargs for accelerator.init_trackers: a W&B id stored in the run folder so a resumed
    run continues the same W&B run; files under WANDB_DIR when set, else the run folder."""
    id_file = Path(run_dir) / "wandb_id.txt"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        import secrets

        run_id = secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
    kw: dict[str, Any] = {"name": run_name, "mode": mode, "id": run_id, "resume": "allow"}
    if entity:
        kw["entity"] = entity
    if not os.environ.get("WANDB_DIR"):
        kw["dir"] = str(run_dir)
    return {"wandb": kw}
