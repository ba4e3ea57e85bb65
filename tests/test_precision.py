"""`--precision auto` per hardware (detection mocked), what wins over it, where the choice is
recorded, and that the CLIs answer --help and bad flags before importing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from histodist import precision
from histodist.precision import choose

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("device", "hw", "want"),
    [
        ("cuda", {"capability": (9, 0)}, "bf16"),  # H100 / H200
        ("cuda", {"capability": (8, 0)}, "bf16"),  # A100
        ("cuda", {"capability": (8, 9)}, "bf16"),  # RTX 4090
        ("cuda", {"capability": (7, 5)}, "fp16"),  # T4
        ("cuda", {"capability": (7, 0)}, "fp16"),  # V100
        ("cpu", {"cpu_bf16": "avx512_bf16"}, "bf16"),
        ("cpu", {"cpu_bf16": "amx"}, "bf16"),
        ("cpu", {"cpu_bf16": None}, "no"),
        ("mps", {}, "no"),
    ],
)
def test_auto_follows_the_hardware(device, hw, want):
    c = choose("auto", device, **hw)
    assert c.precision == want and c.reason.startswith("auto:")


def test_explicit_choices_win_over_auto():
    assert choose("no", "cuda", capability=(9, 0)).precision == "no"
    assert choose("fp32", "cpu", cpu_bf16="amx").precision == "no"
    assert choose("bf16", "cpu", cpu_bf16=None).precision == "bf16"
    # accelerate launch --mixed_precision fp16 (or its config) wins over auto, not over a flag
    launched = choose("auto", "cuda", capability=(9, 0), launcher="fp16")
    assert launched.precision == "fp16" and "accelerate launch" in launched.reason
    assert choose("no", "cuda", capability=(9, 0), launcher="fp16").precision == "no"
    # accelerate launch exports "no" when neither a flag nor a config says anything: not a choice
    assert choose("auto", "cuda", capability=(9, 0), launcher="no").precision == "bf16"


def test_resolve_reads_the_cpu_and_the_launcher(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision.resolve("auto", "cpu", environ={}).precision == "bf16"
    env = {"ACCELERATE_MIXED_PRECISION": "fp16"}
    assert precision.resolve("auto", "cpu", environ=env).precision == "fp16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert precision.resolve("auto", "cpu", environ={}).precision == "no"
    # a torch without the feature checks: /proc/cpuinfo's flags decide
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    assert precision.cpu_native_bf16(cpuinfo) == "avx512_bf16"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2\n")
    assert precision.cpu_native_bf16(cpuinfo) is None


def test_run_folder_records_the_choice(tmp_path, monkeypatch):
    from histodist.config import Config, load_config, replace
    from histodist.training import build

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: "avx512_bf16")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cfg = replace(Config(), train={"runs_dir": str(tmp_path), "run_name": "r"})
    cfg, choice = build.resolve_precision(cfg)
    assert cfg.train.precision == choice.precision == "bf16"

    class Acc:
        is_main_process, num_processes = True, 1

        def wait_for_everyone(self):
            pass

    run_dir, lock = build.prepare_run_dir(Acc(), cfg, {"classes": [0, 1]}, note=choice.describe())
    build.release(lock)
    text = (run_dir / "config.yaml").read_text()
    assert text.startswith("# precision bf16 (auto: the CPU has native bf16 (avx512_bf16))")
    assert load_config(run_dir / "config.yaml").train.precision == "bf16"


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("histodist.train", ["--help"]),
        ("histodist.train", ["--no-such-flag"]),
        ("histodist.train", ["--epochs", "0"]),
    ],
)
def test_cli_answers_before_importing_torch(module, args):
    """--help and a bad flag must not wait for torch and timm (~9 s on a 2-core machine)."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = [{module!r}, *{args!r}]\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.stdout.strip().splitlines()[-1].startswith("NO-TORCH"), proc.stdout + proc.stderr
    if args != ["--help"]:
        assert "histodist.train: error:" in proc.stderr and proc.stdout.split()[-1] == "2"


# Two in-process runs at different precisions, in this order: accelerate keeps one state per
# process, which tests/conftest.py resets after each test (the second failed without it).
@pytest.mark.parametrize("mixed", ["no", "bf16"])
def test_in_process_accelerators_at_different_precisions(mixed):
    from accelerate import Accelerator

    assert Accelerator(cpu=True, mixed_precision=mixed).mixed_precision == mixed
