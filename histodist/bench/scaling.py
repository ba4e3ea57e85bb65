"""What to expect from 1 to 512 GPUs: a small model of DDP training time, from cited inputs.

`python -m histodist.bench scaling` prints the tables of docs/scaling.md (ResNet-50 on PCam at 96 and
224 px). Every input is a flag, so the tables can be redone for another GPU, network or dataset.

Model, per optimizer step of one GPU (all times in ms):
    compute  = overhead + batch * ms_per_image(px)      (ms_per_image from published images/s)
    forward  = (compute - overhead) / 3,  backward = 2 * forward
    step     = overhead + forward + max(backward, allreduce)   (DDP overlaps the all-reduce of
                                                                 gradient buckets with backward)
               + sync * compute  when N > 1                     (stragglers, bucket waits, DDP
                                                                 bookkeeping; calibrated below)
    allreduce (hierarchical, as NCCL does it on NVLink + InfiniBand nodes):
               2 (g-1)/g * S / NVLink  +  2 (n-1)/n * S / IB_node  +  buckets * 2 (n-1) * latency
    with S the gradient bytes, g GPUs per node, n nodes. The flat-ring volume each GPU sends,
    2 (N-1)/N * S, is printed for reference.
`sync` = 0.19 is calibrated so that the model reproduces NVIDIA's published 8 x A100 figure
(16,621 images/s = 84% of 8 x 2,470): bandwidth alone would predict ~100% on one NVLink node.
Images are assumed to cost in proportion to their pixel count (96 px = (96/224)^2 of 224 px),
which is optimistic for small images: treat the 96 px rows as an upper bound.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

DLE_URL = (
    "https://github.com/NVIDIA/DeepLearningExamples/blob/master/PyTorch/Classification/"
    "ConvNets/resnet50v1.5/README.md#training-performance-results"
)
LAMBDA_URL = "https://lambdalabs.com/blog/nvidia-h100-gpu-deep-learning-performance-analysis"


@dataclass(frozen=True)
class Gpu:
    name: str
    images_per_s_224: float  # ResNet-50 v1.5 training, mixed precision, batch 256, one GPU
    nvlink_gb_s: float  # NVLink bandwidth per GPU per direction, GB/s (nominal)
    source: str


GPUS = {
    # NVIDIA Deep Learning Examples, ResNet50 v1.5 PyTorch, "Training performance" tables
    # (pytorch-21.03 NGC container, AMP, batch 256 per GPU, NHWC): 1 GPU figures.
    "a100": Gpu("A100 80GB SXM", 2470, 300, f"measured by NVIDIA, {DLE_URL}"),
    "v100": Gpu("V100 16GB SXM2", 1200, 150, f"measured by NVIDIA, {DLE_URL}"),
    # No like-for-like PyTorch figure is published for H100: ~2x A100 for vision models
    # (Lambda's H100 analysis). An estimate; replace it with your own measurement.
    "h100": Gpu("H100 SXM (estimate: 2x A100)", 2 * 2470, 450, f"estimate, {LAMBDA_URL}"),
}

PCAM_TRAIN = 262_144  # PatchCamelyon training split (images)
RESNET50_2CLASS_PARAMS = 23_512_130  # timm.create_model("resnet50", num_classes=2)


@dataclass(frozen=True)
class Setup:
    gpu: Gpu
    params: int = RESNET50_2CLASS_PARAMS
    grad_bytes: int = 4  # DDP reduces fp32 gradients under AMP; 2 with a bf16 compression hook
    gpus_per_node: int = 8
    ib_gbit_s: float = 200.0  # InfiniBand per node
    latency_us: float = 5.0  # per inter-node ring step (assumption)
    bucket_mb: float = 25.0  # DDP's default bucket_cap_mb
    overhead_ms: float = 10.0  # per-step fixed cost: launches, optimizer, Python (assumption)
    sync: float = 0.19  # extra step time with N > 1 as a fraction of compute (calibrated, above)
    dataset: int = PCAM_TRAIN
    bytes_per_sample: float = 7_236  # PCam JPEG shard bytes / sample (measured)
    decodes_per_core: float = 3_000  # JPEG decodes / s / CPU core (measured)


def ms_per_image(s: Setup, px: int) -> float:
    """GPU time of one training image at px x px, excluding the fixed per-step cost."""
    batch_ms = 256 / s.gpu.images_per_s_224 * 1e3
    return (batch_ms - s.overhead_ms) / 256 * (px / 224) ** 2


def compute_ms(s: Setup, px: int, batch: int) -> float:
    """Forward + backward + optimizer time of one step on one GPU (no communication)."""
    return s.overhead_ms + batch * ms_per_image(s, px)


def ring_volume_mb(s: Setup, n_gpus: int) -> float:
    """MB each GPU sends (and receives) in a flat ring all-reduce of the gradients."""
    return 2 * (n_gpus - 1) / n_gpus * s.params * s.grad_bytes / 1e6


def allreduce_ms(s: Setup, n_gpus: int) -> float:
    """Hierarchical all-reduce time: NVLink inside a node, InfiniBand between nodes."""
    size = s.params * s.grad_bytes
    g = min(n_gpus, s.gpus_per_node)
    nodes = math.ceil(n_gpus / s.gpus_per_node)
    t = 2 * (g - 1) / g * size / (s.gpu.nvlink_gb_s * 1e9)
    if nodes > 1:
        t += 2 * (nodes - 1) / nodes * size / (s.ib_gbit_s / 8 * 1e9)
        t += math.ceil(size / (s.bucket_mb * 1e6)) * 2 * (nodes - 1) * s.latency_us * 1e-6
    return t * 1e3


def step_ms(s: Setup, px: int, n_gpus: int, batch: int) -> float:
    """One optimizer step with the all-reduce overlapped with the backward pass."""
    compute = compute_ms(s, px, batch)
    fwd = (compute - s.overhead_ms) / 3
    step = s.overhead_ms + fwd + max(2 * fwd, allreduce_ms(s, n_gpus))
    return step + (s.sync * compute if n_gpus > 1 else 0.0)


def row(s: Setup, px: int, n_gpus: int, batch: int, ib_alt: float) -> dict:
    """One line of the table: n_gpus GPUs, `batch` images per GPU per step."""
    step = step_ms(s, px, n_gpus, batch)
    images_s = n_gpus * batch / step * 1e3
    single = batch / step_ms(s, px, 1, batch) * 1e3
    per_node = images_s / math.ceil(n_gpus / s.gpus_per_node)
    alt = Setup(**{**s.__dict__, "ib_gbit_s": ib_alt})
    return {
        "gpus": n_gpus,
        "batch": batch,
        "global": n_gpus * batch,
        "steps": max(1, s.dataset // (n_gpus * batch)),
        "compute": compute_ms(s, px, batch),
        "volume": ring_volume_mb(s, n_gpus),
        "ar": allreduce_ms(s, n_gpus),
        "ar_alt": allreduce_ms(alt, n_gpus),
        "step": step,
        "images_s": images_s,
        "efficiency": images_s / (n_gpus * single),
        "epoch_s": s.dataset / images_s,
        "read_mb_s": per_node * s.bytes_per_sample / 1e6,
        "cores": per_node / s.decodes_per_core,
    }


def table(s: Setup, px: int, gpus: list[int], batch: int, cap: int, ib_alt: float) -> str:
    """Markdown table; when n x batch exceeds `cap`, a second row with the batch cut to fit."""
    head = (
        f"| GPUs | batch/GPU | global batch | steps/epoch | compute ms | all-reduce MB/GPU "
        f"| all-reduce ms ({s.ib_gbit_s:g} / {ib_alt:g} Gb/s IB) | step ms | images/s "
        f"| efficiency | epoch | read MB/s/node | decode cores/node |"
    )
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for n in gpus:
        batches = [batch]
        if cap and n * batch > cap:
            batches.append(max(1, cap // n))
        for b in batches:
            r = row(s, px, n, b, ib_alt)
            ar = "-" if n == 1 else f"{r['ar']:.1f} / {r['ar_alt']:.1f}"
            if n <= s.gpus_per_node and n > 1:
                ar = f"{r['ar']:.1f} (NVLink)"
            lines.append(
                f"| {n} | {b} | {r['global']:,} | {r['steps']:,} | {r['compute']:.1f} "
                f"| {r['volume']:.0f} | {ar} | {r['step']:.1f} | {r['images_s']:,.0f} "
                f"| {r['efficiency']:.0%} | {_duration(r['epoch_s'])} | {r['read_mb_s']:,.0f} "
                f"| {r['cores']:.0f} |"
            )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m histodist.bench scaling",
        description="Print the expected step time, communication and data rates of DDP "
        "training at several GPU counts (docs/scaling.md explains the model).",
    )
    p.add_argument("--gpu", choices=sorted(GPUS), default="a100")
    p.add_argument("--images-per-s", type=float, help="your own 224 px images/s on one GPU")
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 224], help="input sizes (px)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--batch-size", type=int, default=256, help="images per GPU per step")
    p.add_argument("--max-global-batch", type=int, default=8192, help="0 = no cap row")
    p.add_argument("--grad-bytes", type=int, default=4, choices=(2, 4))
    p.add_argument("--ib", type=float, nargs=2, default=[200, 400], metavar=("GBIT", "ALT"))
    p.add_argument("--overhead-ms", type=float, default=10.0)
    p.add_argument("--bytes-per-sample", type=float, default=7_236)
    p.add_argument("--dataset", type=int, default=PCAM_TRAIN, help="training images")
    args = p.parse_args(argv)
    if args.batch_size <= 0 or any(n <= 0 for n in args.gpus):
        p.error("--batch-size and --gpus must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    gpu = GPUS[a.gpu]
    if a.images_per_s:
        gpu = Gpu(
            f"{gpu.name} at {a.images_per_s:g} img/s", a.images_per_s, gpu.nvlink_gb_s, "flag"
        )
    s = Setup(
        gpu, grad_bytes=a.grad_bytes, ib_gbit_s=a.ib[0], overhead_ms=a.overhead_ms,
        dataset=a.dataset, bytes_per_sample=a.bytes_per_sample,
    )  # fmt: skip
    if s.overhead_ms >= 256 / gpu.images_per_s_224 * 1e3:
        print("histodist.bench.scaling: error: --overhead-ms exceeds a whole step", file=sys.stderr)
        return 2
    print(f"ResNet-50 ({s.params / 1e6:.1f}M parameters, {s.grad_bytes}-byte gradients) on "
          f"{gpu.name}: {gpu.images_per_s_224:g} images/s at 224 px ({gpu.source}); "
          f"{a.dataset:,} training images.\n")  # fmt: skip
    for px in a.sizes:
        print(f"### {px} px\n")
        print(table(s, px, a.gpus, a.batch_size, a.max_global_batch, a.ib[1]))
        print()
    return 0
