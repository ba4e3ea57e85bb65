"""Which precision a run computes in: `--precision auto` resolved against the hardware.

    choice = resolve("auto", torch.device("cuda"))   # Choice(precision="bf16", reason="...")

The rule (`choose`, pure, so tests mock the hardware):
  1. an explicit `--precision` (anything but auto) wins;
  2. then an explicit mixed precision from `accelerate launch` (its --mixed_precision flag or
     config file, seen as ACCELERATE_MIXED_PRECISION). `accelerate launch` sets that variable to
     "no" when neither says anything, so only bf16 / fp16 there count as a choice: for
     fp32 pass `--precision no`;
  3. otherwise the fastest precision the device runs natively: bf16 on CUDA devices of compute
     capability >= 8.0 (Ampere and later), fp16 with loss scaling on older CUDA devices, bf16
     on CPUs with AVX512-BF16 or AMX (2-core AMD EPYC with avx512_bf16, resnet18 at 96 px,
     batch 128: 129 img/s bf16 vs 81 img/s fp32, the same valid AUC; docs/performance.md),
     fp32 anywhere else (CPUs without native bf16 emulate it, which is slower than fp32).

Training and inference (evaluate / predict / explain) use the same rule; export stays fp32.
Imports torch lazily, so the CLIs can parse their flags first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Values of ACCELERATE_MIXED_PRECISION that only an explicit flag or config file produces
# (fp8 needs Transformer Engine or MS-AMP, which histodist does not use).
LAUNCHER_CHOICES = ("bf16", "fp16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names


@dataclass(frozen=True)
class Choice:
    """A resolved precision ("no" = fp32, "bf16", "fp16") and why it was chosen."""

    precision: str
    reason: str

    def describe(self) -> str:
        name = "fp32" if self.precision == "no" else self.precision
        return f"precision {name} ({self.reason})"


def choose(
    requested: str,
    device_type: str,
    *,
    capability: tuple[int, int] | None = None,
    cpu_bf16: str | None = None,
    launcher: str | None = None,
) -> Choice:
    """The precision for `requested` ("auto", "no"/"fp32", "bf16", "fp16") on a device of
    `device_type` ("cuda", "cpu", ...). `capability`: the CUDA device's (major, minor);
    `cpu_bf16`: the CPU's native bf16 feature (e.g. "avx512_bf16") or None; `launcher`: the
    value of ACCELERATE_MIXED_PRECISION, if any."""
    if requested not in ("auto", None):
        precision = "no" if requested == "fp32" else requested
        return Choice(precision, "set by --precision")
    if launcher in LAUNCHER_CHOICES:
        return Choice(launcher, "set by accelerate launch (--mixed_precision or its config)")
    if device_type == "cuda" and capability is not None:
        cc = f"{capability[0]}.{capability[1]}"
        if capability >= (8, 0):
            return Choice("bf16", f"auto: CUDA compute capability {cc} >= 8.0 has native bf16")
        return Choice("fp16", f"auto: CUDA compute capability {cc} < 8.0, fp16 with loss scaling")
    if device_type == "cpu":
        if cpu_bf16:
            return Choice("bf16", f"auto: the CPU has native bf16 ({cpu_bf16})")
        return Choice("no", "auto: the CPU has no native bf16 (AVX512-BF16 or AMX)")
    return Choice("no", f"auto: no native reduced precision known for {device_type}")


def cpu_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str | None:
    """The CPU feature that runs bf16 natively, as oneDNN uses it (AMX tiles or AVX512-BF16),
    or None. Asks torch's own CPU feature checks when it has them, else reads `cpuinfo`."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = (("_is_amx_tile_supported", "amx"), ("_is_avx512_bf16_supported", "avx512_bf16"))
    known = [(getattr(cpu, fn, None), name) for fn, name in checks]
    if all(fn is not None for fn, _ in known):
        return next((name for fn, name in known if fn()), None)
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return None
    return next((f for f in CPU_BF16_FLAGS if f in flags), None)


def resolve(requested: str, device, environ: dict | None = None) -> Choice:
    """`choose` for this process: the device's capability, the CPU's bf16 support and the
    launcher's setting read from the hardware and the environment."""
    import torch

    device = torch.device(device)
    env = os.environ if environ is None else environ
    launcher = env.get("ACCELERATE_MIXED_PRECISION", "").lower() or None
    capability = cpu_bf16 = None
    if requested == "auto" and launcher not in LAUNCHER_CHOICES:
        if device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
        elif device.type == "cpu":
            cpu_bf16 = cpu_native_bf16()
    return choose(
        requested, device.type, capability=capability, cpu_bf16=cpu_bf16, launcher=launcher
    )


def autocast_dtype(precision: str):
    """torch dtype an inference autocast uses for a resolved precision, or None for fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
