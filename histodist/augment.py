"""Batched tensor augmentation on the device (CUDA when present, CPU otherwise).

Every random op is a pure function `op(x, gen, **params) -> x` over float32 (B,C,H,W) images in
[0, 1] on one device. Per-sample parameters are drawn from the explicit `torch.Generator`
`gen` (which must live on x's device), so the same seed gives the same augmented batch and
different samples of a batch get different parameters. No per-sample Python loops, no I/O.

A pipeline is data: a list of {"op": name, **params} (see PRESETS), so configs compose their
own in YAML; `build(spec, out_size=..., mean=..., std=...)` turns it into an `Augment` that
maps uint8 batches to normalised float32 batches of the model's input size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from histodist.errors import UsageError
from histodist.fileio import atomic_path

# ----------------------------------------------------------------------------- helpers


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    """(n,) float32 uniform in [lo, hi) on the generator's device."""
    return torch.rand(n, generator=gen, device=gen.device) * (hi - lo) + lo


def _coin(gen: torch.Generator, n: int, p: float) -> Tensor:
    """(n,) bool, True with probability p."""
    return torch.rand(n, generator=gen, device=gen.device) < p


def _per_sample(mask: Tensor) -> Tensor:
    return mask.view(-1, 1, 1, 1)


def _range(v: float | Sequence[float], centre: float = 0.0) -> tuple[float, float]:
    """A scalar v means [centre - v, centre + v]; a pair is taken as is."""
    if isinstance(v, (int, float)):
        return centre - float(v), centre + float(v)
    lo, hi = v
    return float(lo), float(hi)


def to_float(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is returned as float32 unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


@functools.lru_cache(maxsize=64)
def _on_device(values: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A constant (nested tuple of floats) as a tensor on `device`, made once per device and
    dtype: building it per batch is a blocking host-to-device copy on a GPU."""
    return torch.tensor(values, dtype=torch.float64).to(device=device, dtype=dtype)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 or float [0, 1] (B,C,H,W) -> float32 (x - mean) / std, per channel."""
    x = to_float(x)
    m = _on_device(tuple(map(float, mean)), x.device, x.dtype).view(1, -1, 1, 1)
    s = _on_device(tuple(map(float, std)), x.device, x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize (antialiased when shrinking) of float (B,C,H,W) to size."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def centre_crop(x: Tensor, fraction: float = 1.0) -> Tensor:
    """Central crop keeping `fraction` of each side (deterministic)."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


# ----------------------------------------------------------------------------- geometry


def dihedral(x: Tensor, k: int) -> Tensor:
    """Element k (0..7) of the dihedral group: rotate by 90*(k % 4) degrees, then mirror
    left-right when k >= 4. Deterministic, for test-time augmentation; square images only
    for odd rotations."""
    y = torch.rot90(x, k % 4, dims=(-2, -1))
    return y.flip(-1) if k >= 4 else y


@functools.lru_cache(maxsize=16)
def _dihedral_index(h: int, w: int, device: torch.device) -> Tensor:
    """(8, h*w) int64: row k lists, for each output pixel, the input pixel that
    dihedral(., k) moves there (odd rows only meaningful when h == w). Built on the device."""
    probe = torch.arange(h * w, device=device).view(h, w)
    return torch.stack([dihedral(probe, k).reshape(-1) for k in range(8)])


def random_dihedral(x: Tensor, gen: torch.Generator) -> Tensor:
    """Per sample a uniform element of the dihedral group (tissue has no orientation); for
    non-square images only the four that keep the shape (identity, flips, 180 degrees).
    One batched gather of pixel indices: no host sync on a GPU, the input's layout kept."""
    b, c, h, w = x.shape
    k = torch.randint(0, 8, (b,), generator=gen, device=gen.device).to(x.device)
    if h != w:
        k = k - k % 2  # 0, 2, 4, 6: no 90-degree turn
    idx = _dihedral_index(h, w, x.device)[k].unsqueeze(1).expand(b, c, h * w)
    y = x.reshape(b, c, h * w).gather(2, idx).view(b, c, h, w)
    return y if x.is_contiguous() else torch.empty_like(x).copy_(y)


def _sample_grid(x: Tensor, theta: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """One batched grid_sample of x through per-sample 2x3 theta, reflection padding."""
    h, w = size or tuple(x.shape[-2:])
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_affine(
    x: Tensor,
    gen: torch.Generator,
    rotate: float = 0.0,
    scale: float | Sequence[float] = 0.0,
    shear: float = 0.0,
    translate: float = 0.0,
    p: float = 1.0,
) -> Tensor:
    """Per-sample rotation (degrees, +-rotate), zoom (scale: +-fraction or (lo, hi) factors),
    shear (degrees, +-shear), translation (+-fraction of the side), reflect padding."""
    b = x.shape[0]
    ang = torch.deg2rad(_uniform(gen, b, -rotate, rotate))
    sh = torch.deg2rad(_uniform(gen, b, -shear, shear))
    lo, hi = _range(scale, 1.0) if isinstance(scale, (int, float)) else _range(scale)
    zoom = _uniform(gen, b, lo, hi)
    tx, ty = (_uniform(gen, b, -translate, translate) * 2 for _ in range(2))  # grid units
    on = _coin(gen, b, p)
    ang, sh = ang * on, sh * on
    zoom, tx, ty = torch.where(on, zoom, 1.0), tx * on, ty * on
    # theta maps output to input coordinates: inverse zoom so zoom > 1 magnifies.
    cos, sin, tan = torch.cos(ang), torch.sin(ang), torch.tan(sh)
    a = torch.stack([cos, -sin + cos * tan, tx, sin, cos + sin * tan, ty], 1).view(b, 2, 3)
    a[:, :, :2] /= zoom.view(b, 1, 1)
    if p >= 1.0:  # every sample drawn; decided from p, so no device-to-host sync here
        return _sample_grid(x, a)
    # Resample the whole batch and keep the drawn samples, the rest exact: selecting the drawn
    # ones first (nonzero) would wait for the device to know how many there are.
    return torch.where(_per_sample(on), _sample_grid(x, a), x)


def random_resized_crop(
    x: Tensor,
    gen: torch.Generator,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    size: int | None = None,
) -> Tensor:
    """Per sample a crop of area fraction in `scale` and aspect ratio in `ratio` (log-uniform)
    at a random position, resized to size (default: the input size) in one grid_sample."""
    b = x.shape[0]
    area = _uniform(gen, b, *scale)
    logr = _uniform(gen, b, math.log(ratio[0]), math.log(ratio[1]))
    cw = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
    ch = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen, device=gen.device) * 2 - 1) * (1 - cw)
    cy = (torch.rand(b, generator=gen, device=gen.device) * 2 - 1) * (1 - ch)
    zero = torch.zeros_like(cw)
    theta = torch.stack([cw, zero, cx, zero, ch, cy], 1).view(b, 2, 3)
    out = (size, size) if isinstance(size, int) else None
    return _sample_grid(x, theta, out)


# ----------------------------------------------------------------------------- colour

# Ruifrok & Johnston stain vectors, as in skimage.color.rgb2hed.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_LOG_ADJUST = math.log(1e-6)
# The same float32 values as nested tuples, the keys of their per-device copies (_on_device).
_RGB_FROM_HED = tuple(map(tuple, RGB_FROM_HED.tolist()))
_HED_FROM_RGB = tuple(map(tuple, HED_FROM_RGB.tolist()))


def rgb_to_hed(x: Tensor) -> Tensor:
    """float RGB [0, 1] (B,3,H,W) -> haematoxylin/eosin/DAB stain densities (B,3,H,W), like
    skimage.color.rgb2hed but without clipping negatives (so hed_to_rgb inverts it)."""
    od = torch.log(x.clamp(min=1e-6)) / _LOG_ADJUST
    return torch.einsum("bchw,cd->bdhw", od, _on_device(_HED_FROM_RGB, x.device, x.dtype))


def hed_to_rgb(hed: Tensor) -> Tensor:
    """Stain densities (B,3,H,W) -> float RGB in [0, 1] (inverse of rgb_to_hed)."""
    r = _on_device(_RGB_FROM_HED, hed.device, hed.dtype)
    log_rgb = torch.einsum("bchw,cd->bdhw", hed, r) * _LOG_ADJUST
    return torch.exp(log_rgb).clamp(0.0, 1.0)


def _per_sample_linear(x: Tensor, m: Tensor, c: Tensor | None = None) -> Tensor:
    """y[b] = m[b] @ x[b] (+ c[b]) over the channels of (B,3,H,W): one batched matmul."""
    b, ch, h, w = x.shape
    flat = x.reshape(b, ch, h * w)
    y = torch.bmm(m, flat) if c is None else torch.baddbmm(c.unsqueeze(-1), m, flat)
    return y.view(b, ch, h, w)


def hed_jitter(
    x: Tensor, gen: torch.Generator, sigma: float = 0.05, bias: float = 0.05, p: float = 1.0
) -> Tensor:
    """HED stain augmentation (Tellez et al. 2019): per sample and stain channel, density
    * U(1-sigma, 1+sigma) + U(-bias, bias), in skimage's rgb2hed units (densities in [0, 1]);
    sigma = bias = 0.05 is Tellez's "HED-light", 0.2 "HED-strong".

    Equal to hed_to_rgb(rgb_to_hed(x) * alpha + beta), computed as one per-sample 3x3 map of
    log(x): exp(R^T diag(alpha) H^T log x + log(1e-6) R^T beta) (R = RGB_FROM_HED, H its
    inverse), so a batch costs one log, one batched matmul and one exp."""
    b = x.shape[0]
    on = _coin(gen, b, p).view(b, 1)
    alpha = torch.where(on, _uniform(gen, b * 3, 1 - sigma, 1 + sigma).view(b, 3), 1.0)
    beta = torch.where(on, _uniform(gen, b * 3, -bias, bias).view(b, 3), 0.0)
    h = _on_device(_HED_FROM_RGB, x.device, x.dtype)
    r = _on_device(_RGB_FROM_HED, x.device, x.dtype)
    m = r.T @ (alpha.unsqueeze(-1) * h.T)  # (B,3,3): R^T diag(alpha) H^T
    c = _LOG_ADJUST * (beta @ r)  # (B,3)
    y = _per_sample_linear(x.clamp(min=1e-6).log_(), m, c).exp_().clamp_(0.0, 1.0)
    # samples left alone come back exactly (log/exp would round them)
    return torch.where(on.view(b, 1, 1, 1), y, x)


_GRAY = (0.299, 0.587, 0.114)
_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


@functools.lru_cache(maxsize=16)
def _yiq(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(RGB -> YIQ, its inverse) on `device`: inverted once on the CPU, where the inverse's
    error check costs no device-to-host sync, then copied once per device."""
    to_yiq = torch.tensor(_TO_YIQ, dtype=dtype)
    return to_yiq.to(device), torch.linalg.inv(to_yiq).to(device)


def _hue_matrix(angle: Tensor) -> Tensor:
    """(B,3,3) RGB maps rotating hue by per-sample angles (radians) in YIQ space."""
    to_yiq, from_yiq = _yiq(angle.device, angle.dtype)
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    rot = torch.stack([one, zero, zero, zero, c, -s, zero, s, c], 1).view(-1, 3, 3)
    return from_yiq @ rot @ to_yiq


def color_jitter(
    x: Tensor,
    gen: torch.Generator,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
    p: float = 1.0,
) -> Tensor:
    """Per-sample brightness / contrast / saturation factors in [1-v, 1+v] and hue shift in
    [-hue, hue] (fraction of a full turn, a rotation in YIQ space), applied in that order.

    All four are affine in RGB, so they fold into one per-sample 3x3 matrix and offset:
    one batched matmul for the batch, then a clip to [0, 1]."""
    b = x.shape[0]
    if not (brightness or contrast or saturation or hue):
        return x
    on = _coin(gen, b, p)

    def factor(v: float) -> Tensor:
        return (
            torch.where(on, _uniform(gen, b, 1 - v, 1 + v), 1.0)
            if v
            else torch.ones(b, device=x.device)
        )

    fb, fc, fs = factor(brightness), factor(contrast), factor(saturation)
    angle = torch.where(on, _uniform(gen, b, -hue, hue), 0.0) * 2 * math.pi if hue else None
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    gray = _on_device(_GRAY, x.device, x.dtype)
    # saturation: y = f y + (1 - f) gray(y) 1  ->  f I + (1 - f) 1 w^T
    sat = fs.view(b, 1, 1) * eye + (1 - fs).view(b, 1, 1) * gray.view(1, 1, 3).expand(b, 3, 3)
    m = sat if angle is None else _hue_matrix(angle) @ sat
    # brightness then contrast around the (brightened) mean gray level mu = fb * mean(gray(x))
    mu = fb * (x * gray.view(1, 3, 1, 1)).sum(1).mean((-2, -1))
    lin = m * (fc * fb).view(b, 1, 1)
    offset = m @ ((1 - fc) * mu).view(b, 1, 1).expand(b, 3, 1)
    return _per_sample_linear(x, lin, offset.squeeze(-1)).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------- blur / noise


def gaussian_blur(
    x: Tensor, gen: torch.Generator, sigma: Sequence[float] = (0.1, 1.5), p: float = 0.5
) -> Tensor:
    """Per-sample Gaussian blur with sigma ~ U(sigma) pixels: one separable grouped conv."""
    b, c, h, w = x.shape
    s = _uniform(gen, b, *sigma).clamp(min=1e-3)
    r = min(math.ceil(3 * sigma[1]), (min(h, w) - 1) // 2)
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / s.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 2r+1)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c).view(b, c, h, w)
    return torch.where(_per_sample(_coin(gen, b, p)), y, x)


def gaussian_noise(
    x: Tensor, gen: torch.Generator, std: Sequence[float] = (0.0, 0.03), p: float = 0.5
) -> Tensor:
    """Additive Gaussian noise with per-sample standard deviation ~ U(std), clipped to [0, 1]."""
    b = x.shape[0]
    s = _uniform(gen, b, *std).view(b, 1, 1, 1)
    noise = torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype)
    y = (x + noise * s).clamp(0.0, 1.0)
    return torch.where(_per_sample(_coin(gen, b, p)), y, x)


# ----------------------------------------------------------------------------- pipelines


def centre_crop_op(x: Tensor, gen: torch.Generator, fraction: float = 0.875) -> Tensor:
    """centre_crop as a pipeline op (deterministic; gen is unused)."""
    return centre_crop(x, fraction)


OPS: dict[str, Callable[..., Tensor]] = {
    "dihedral": random_dihedral,
    "centre_crop": centre_crop_op,
    "affine": random_affine,
    "random_resized_crop": random_resized_crop,
    "hed": hed_jitter,
    "color_jitter": color_jitter,
    "blur": gaussian_blur,
    "noise": gaussian_noise,
}
_SIZED = {"random_resized_crop"}  # ops that take the model's input size (resample only once)

# Chosen for 96 px H&E patches: orientation-free tissue (dihedral), mild zoom/shear/rotation as
# in the seed notebooks, HED-light-sized stain jitter (Tellez 2019), a little brightness and
# contrast for scanner differences. Geometry first, colour after, all at the native size.
_HE_PATCH = [
    {"op": "dihedral"},
    {"op": "affine", "rotate": 15.0, "scale": 0.1, "shear": 5.0, "translate": 0.05, "p": 0.5},
    {"op": "hed", "sigma": 0.05, "bias": 0.01},
    {"op": "color_jitter", "brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.02},
]
PRESETS: dict[str, list[dict]] = {
    "pcam": _HE_PATCH,
    # 50 px patches: the same, slightly stronger stain jitter (many patients, many labs).
    "idc": _HE_PATCH[:2]
    + [
        {"op": "hed", "sigma": 0.08, "bias": 0.02},
        {"op": "color_jitter", "brightness": 0.1, "contrast": 0.1, "saturation": 0.15, "hue": 0.03},
    ],
    # Large 700x460 images down to the model size: random crops carry the geometry.
    "breakhis": [
        {"op": "random_resized_crop", "scale": (0.35, 1.0)},
        {"op": "dihedral"},
        {"op": "hed", "sigma": 0.05, "bias": 0.01},
        {"op": "color_jitter", "brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.02},
        {"op": "blur", "sigma": (0.1, 1.0), "p": 0.2},
    ],
    # Dermatoscopy is not H&E-stained: no HED; lesions have no orientation either.
    "ham10000": [
        {"op": "random_resized_crop", "scale": (0.5, 1.0)},
        {"op": "dihedral"},
        {"op": "affine", "rotate": 30.0, "p": 0.5},
        {"op": "color_jitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.03},
    ],
    # Orientation only: the lightest geometry-preserving choice, for short budgets (3 epochs
    # from scratch on 20,000 PCam patches: AUC 0.894 against 0.887 with "pcam" at batch 32;
    # the `short` recipe uses it; docs/experiments.md).
    "dihedral": [{"op": "dihedral"}],
    "none": [],
}


class AugmentError(UsageError, ValueError):
    """An augmentation spec that names an unknown op or preset, or bad parameters."""


def load_spec(spec: str | Sequence[dict]) -> list[dict]:
    """A preset name, a YAML/JSON file holding a list of {"op": ...}, or such a list."""
    if isinstance(spec, str):
        if spec in PRESETS:
            return [dict(s) for s in PRESETS[spec]]
        if Path(spec).suffix in (".yaml", ".yml", ".json") and Path(spec).is_file():
            return _read_spec_file(Path(spec))
        raise AugmentError(
            f"unknown augmentation {spec!r}: use one of {sorted(PRESETS)} "
            "or a .yaml file with a list of {op: ...}"
        )
    if not isinstance(spec, Sequence) or not all(isinstance(s, dict) for s in spec):
        raise AugmentError(f"augmentation {spec!r}: want a list of {{op: ..., param: ...}}")
    ops = [dict(s) for s in spec]
    for s in ops:
        if s.get("op") not in OPS:
            raise AugmentError(f"unknown augmentation op {s.get('op')!r}: use one of {sorted(OPS)}")
        bad = [k for k, v in s.items() if k != "op" and not _finite(v)]
        if bad:  # a NaN sigma turned every image into NaNs without an error
            raise AugmentError(f"augmentation op {s['op']!r}: {bad[0]}={s[bad[0]]!r} is not finite")
    return ops


def _finite(value) -> bool:
    """False for a NaN or infinite float, also inside a list (a range such as sigma: [a, b])."""
    if isinstance(value, (list, tuple)):
        return all(map(_finite, value))
    return not isinstance(value, float) or math.isfinite(value)


def _read_spec_file(path: Path) -> list[dict]:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise AugmentError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise AugmentError(f"{path}: cannot read YAML ({e})") from None
    if not isinstance(spec, list):
        raise AugmentError(f"{path}: want a list of {{op: ..., param: ...}} at the top level")
    return load_spec(spec)


class Augment:
    """(x uint8 (B,C,H,W) on a device, torch.Generator on that device) -> float32
    (B,C,out,out) normalised with mean/std. Ops run in spec order at the input size; the
    result is resized to out_size at the end (random_resized_crop outputs it directly).
    crop < 1: the central crop keeping that fraction of each side comes first, as in
    eval_transform."""

    def __init__(self, ops: list[dict], *, out_size: int, mean, std, crop: float = 1.0):
        self.ops, self.out_size, self.crop = load_spec(ops), out_size, crop
        self.mean, self.std = tuple(mean), tuple(std)
        for s in self.ops:  # fail at build time, not at the first batch
            params = {k: v for k, v in s.items() if k != "op"}
            try:
                OPS[s["op"]](torch.zeros(1, 3, 8, 8), torch.Generator(), **params)
            except TypeError as exn:
                raise AugmentError(f"augmentation op {s['op']!r}: {exn}") from exn

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        # NCHW: on the CPU the per-pixel ops below run 1.5-2x slower on channels_last batches
        # (measured, 128x3x96x96); the training loop restores channels_last for the model.
        x, ops = x if self.crop == 1.0 else centre_crop(x, self.crop), self.ops
        x = x.contiguous()
        # A leading dihedral only permutes pixels: exact on uint8, a quarter of float32's bytes.
        while ops and ops[0]["op"] == "dihedral":
            x, ops = random_dihedral(x, gen), ops[1:]
        x = to_float(x)
        for s in ops:
            params = {k: v for k, v in s.items() if k != "op"}
            if s["op"] in _SIZED:
                params.setdefault("size", self.out_size)
            x = OPS[s["op"]](x, gen, **params)
        return normalize(resize(x, self.out_size).clamp_(0.0, 1.0), self.mean, self.std)

    def __repr__(self) -> str:
        return f"Augment({self.ops}, out_size={self.out_size})"


def build(spec: str | list[dict], *, out_size: int, mean, std, crop: float = 1.0) -> Augment:
    """Augment from a preset name, a YAML file or a list of {"op": name, **params}."""
    return Augment(load_spec(spec), out_size=out_size, mean=mean, std=std, crop=crop)


def eval_transform(*, out_size: int, mean, std, crop: float = 1.0) -> Callable[[Tensor], Tensor]:
    """uint8 or float (B,C,H,W) -> float32 normalised (B,C,out,out): centre crop keeping
    `crop` of each side (1.0: none), resize, normalise. Deterministic."""

    def transform(x: Tensor) -> Tensor:
        x = centre_crop(to_float(x), crop) if crop < 1.0 else to_float(x)
        return normalize(resize(x, out_size).clamp_(0.0, 1.0), mean, std)

    return transform


# timm's interpolation names -> F.interpolate modes (both antialiased, as PIL's filters are)
INTERPOLATIONS = {"bilinear": "bilinear", "bicubic": "bicubic"}
CROP_MODES = ("center", "squash")  # timm's crop modes but "border" (padding)


def resize_like_pil(x: Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> Tensor:
    """float (B,C,H,W) in [0, 1] resized to `size` as PIL's Image.resize resizes 8-bit images
    (what timm's and torchvision's transforms do to PIL images): an antialiased filter (torch's
    antialiased bicubic is PIL's, a = -0.5) in two passes, each clamped to [0, 1] as PIL's
    8-bit passes are, the width first unless the height shrinks by more than twice as many
    pixels as the width (Pillow 13's order; older Pillow always starts with the width). One
    2-D call without the clamp between the passes differs from PIL by up to 17/255 where
    bicubic overshoots (edges of nuclei); this stays within about 1/255 of PIL (PIL's 8-bit
    rounding) on real PCam patches (tests/test_hub.py)."""
    mode = INTERPOLATIONS[interpolation]
    (h, w), (oh, ow) = x.shape[-2:], size
    passes = [(h, ow), (oh, ow)]
    if h - oh > 0 and h - oh > 2 * (w - ow):
        passes = [(oh, w), (oh, ow)]
    for step in passes:
        if tuple(x.shape[-2:]) != step:
            x = F.interpolate(x, size=step, mode=mode, antialias=True, align_corners=False)
            x = x.clamp_(0.0, 1.0)
    return x


def pretrained_transform(
    *, input_size: int, mean, std, interpolation: str = "bicubic", crop_pct: float = 1.0,
    crop_mode: str = "center",
) -> Callable[[Tensor], Tensor]:  # fmt: skip
    """uint8 or float (B,C,H,W) -> float32 normalised (B,C,input_size,input_size), as timm's
    eval transform (`create_transform(**resolve_data_config(model=m))`, a model's own
    preprocessing) maps a PIL image, on the device on whole batches: resize to
    floor(input_size / crop_pct) (`center`: the shorter side, aspect kept; `squash`: both
    sides) with `interpolation`, centre crop input_size, normalise. Deterministic."""
    if interpolation not in INTERPOLATIONS:
        raise AugmentError(f"--interpolation {interpolation!r}: use one of {list(INTERPOLATIONS)}")
    if crop_mode not in CROP_MODES:
        raise AugmentError(f"--crop-mode {crop_mode!r}: use one of {list(CROP_MODES)}")
    if not 0.0 < crop_pct <= 1.0:
        raise AugmentError(f"--crop-pct {crop_pct}: must be in (0, 1]")
    scale = math.floor(input_size / crop_pct)

    def transform(x: Tensor) -> Tensor:
        x = to_float(x)
        h, w = x.shape[-2:]
        if crop_mode == "squash" or h == w:
            size = (scale, scale)
        else:  # torchvision's Resize(int): the shorter side to scale, the longer in proportion
            size = (scale, int(scale * w / h)) if h < w else (int(scale * h / w), scale)
        x = resize_like_pil(x, size, interpolation)
        # torchvision's CenterCrop rounds the offsets (not floor, as centre_crop does)
        top, left = (int(round((n - input_size) / 2.0)) for n in size)
        x = x[..., top : top + input_size, left : left + input_size]
        return normalize(x, mean, std)

    return transform


def save_grid(x: Tensor, path, *, nrow: int = 8, mean=None, std=None) -> Path:
    """Write a PNG grid of a batch (uint8, float [0, 1], or normalised float with mean/std
    given to undo it); written to a temporary file, then renamed. Returns the path."""
    from torchvision.utils import save_image

    x = to_float(x.detach().cpu())
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_image(x.clamp(0.0, 1.0), tmp, nrow=nrow, padding=2, format="png")
    return path
