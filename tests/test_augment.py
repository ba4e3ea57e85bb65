"""histodist.augment on real PCam patches: shapes, per-sample randomness, seeds, group laws."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from histodist import augment as A

MEAN, STD = (0.70, 0.54, 0.69), (0.23, 0.27, 0.21)
RANDOM_OPS = {
    "dihedral": {},
    "affine": {"rotate": 20.0, "scale": 0.2, "shear": 10.0, "translate": 0.1},
    "random_resized_crop": {"scale": (0.3, 1.0)},
    "hed": {"sigma": 0.05, "bias": 0.02},
    "color_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05},
    "blur": {"p": 1.0, "sigma": (0.5, 2.0)},
    "noise": {"p": 1.0, "std": (0.01, 0.05)},
}


@pytest.fixture(scope="module")
def batch(pcam_jpeg) -> torch.Tensor:
    """uint8 (8,3,96,96): four patches of each class."""
    import numpy as np

    paths = sorted((pcam_jpeg / "train" / "0").glob("*.jpg"))[:4]
    paths += sorted((pcam_jpeg / "train" / "1").glob("*.jpg"))[:4]
    arrs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("preset", sorted(A.PRESETS))
@pytest.mark.parametrize("out_size", [64, 96])
def test_presets_shape_dtype_and_seed(batch, preset, out_size):
    aug = A.build(preset, out_size=out_size, mean=MEAN, std=STD)
    y = aug(batch, gen(1))
    assert y.shape == (8, 3, out_size, out_size) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert torch.equal(y, aug(batch, gen(1)))  # same seed -> same batch
    if preset != "none":
        assert not torch.equal(y, aug(batch, gen(2)))


@pytest.mark.parametrize("name", sorted(RANDOM_OPS))
def test_each_op_draws_per_sample_parameters(batch, name):
    """One image repeated: every sample must come out different from the others."""
    x = A.to_float(batch[:1]).repeat(6, 1, 1, 1)
    y = A.OPS[name](x, gen(3), **RANDOM_OPS[name])
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= -1e-5 and y.max() <= 1.0 + 1e-5
    flat = y.flatten(1)
    distinct = {tuple(r.tolist()) for r in flat.round(decimals=5)}
    # dihedral has only 8 outcomes for 6 samples: ask for several different, not all.
    assert len(distinct) >= (3 if name == "dihedral" else 6)
    assert torch.equal(y, A.OPS[name](x, gen(3), **RANDOM_OPS[name]))


def test_dihedral_group_laws(batch):
    x = A.to_float(batch[:2])
    images = [A.dihedral(x, k) for k in range(8)]
    assert torch.equal(images[0], x)
    assert len({tuple(im.flatten().tolist()[:500]) for im in images}) == 8  # all distinct
    assert torch.equal(A.dihedral(A.dihedral(x, 1), 3), x)  # rotations compose
    for k in range(4, 8):
        assert torch.equal(A.dihedral(A.dihedral(x, k), k), x)  # reflections are involutions
    # a random dihedral sample is always one of the 8 group elements of its input
    y = A.random_dihedral(x.repeat(8, 1, 1, 1), gen(0))
    for i in range(y.shape[0]):
        assert any(torch.equal(y[i], im[i % 2]) for im in images)


def test_random_dihedral_applies_the_drawn_element_per_sample(batch):
    # the element drawn for sample i (the op's first draw) is exactly dihedral(x_i, k_i),
    # in the input's memory layout; non-square images only get the four shape-keeping ones
    for x in (
        batch,
        batch.contiguous(memory_format=torch.channels_last),
        batch[..., :80].contiguous(),
    ):
        k = torch.randint(0, 8, (x.shape[0],), generator=gen(5))
        if x.shape[-1] != x.shape[-2]:
            k = k - k % 2
        y = A.random_dihedral(x, gen(5))
        assert y.stride() == x.stride()
        for i in range(x.shape[0]):
            assert torch.equal(y[i], A.dihedral(x[i : i + 1], int(k[i]))[0])


def test_crop_is_the_same_centre_crop_in_training_and_evaluation(batch):
    # no random ops: the training pipeline and the evaluation transform agree exactly, and
    # both see the central 48 x 48 of the 96 x 96 patch, resized to the input size
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    train = A.build("none", out_size=64, mean=mean, std=std, crop=0.5)(batch, gen())
    evaluate = A.eval_transform(out_size=64, mean=mean, std=std, crop=0.5)(batch)
    assert torch.equal(train, evaluate)
    centre = A.eval_transform(out_size=64, mean=mean, std=std)(batch[..., 24:72, 24:72])
    assert torch.equal(evaluate, centre)
    assert not torch.allclose(evaluate, A.eval_transform(out_size=64, mean=mean, std=std)(batch))


def test_identity_parameters_leave_images_unchanged(batch):
    x = A.to_float(batch)
    assert torch.allclose(A.random_affine(x, gen(), rotate=0.0, scale=0.0), x, atol=1e-5)
    y = A.random_resized_crop(x, gen(), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(y, x, atol=1e-5)
    assert torch.allclose(A.hed_jitter(x, gen(), sigma=0.0, bias=0.0), x, atol=1e-4)
    assert torch.equal(A.color_jitter(x, gen()), x)


def test_hed_round_trip_and_stain_channels(batch):
    x = A.to_float(batch)
    hed = A.rgb_to_hed(x)
    assert torch.allclose(A.hed_to_rgb(hed), x, atol=1e-4)
    # haematoxylin (purple nuclei) is the dominant stain of these patches
    assert hed[:, 0].mean() > hed[:, 2].abs().mean()


def test_normalize_and_eval_transform(batch):
    x = A.to_float(batch)
    mean, std = x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()
    y = A.normalize(batch, mean, std)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(y.std((0, 2, 3)), torch.ones(3), atol=1e-3)
    t = A.eval_transform(out_size=64, mean=MEAN, std=STD)
    assert t(batch).shape == (8, 3, 64, 64) and torch.equal(t(batch), t(batch))
    t96 = A.eval_transform(out_size=96, mean=MEAN, std=STD)
    assert torch.allclose(t96(batch), A.normalize(batch, MEAN, STD))


def test_custom_spec_from_yaml_and_errors(tmp_path, batch):
    spec = tmp_path / "aug.yaml"
    spec.write_text("- {op: dihedral}\n- {op: hed, sigma: 0.1, bias: 0.02}\n")
    aug = A.build(str(spec), out_size=96, mean=MEAN, std=STD)
    assert [s["op"] for s in aug.ops] == ["dihedral", "hed"]
    assert aug(batch, gen()).shape == (8, 3, 96, 96)
    with pytest.raises(A.AugmentError, match="unknown augmentation op"):
        A.build([{"op": "sharpen"}], out_size=96, mean=MEAN, std=STD)
    with pytest.raises(A.AugmentError, match="hed"):
        A.build([{"op": "hed", "sigmaa": 0.1}], out_size=96, mean=MEAN, std=STD)
    with pytest.raises(A.AugmentError, match="unknown augmentation"):
        A.build("pcamm", out_size=96, mean=MEAN, std=STD)


@pytest.mark.parametrize(
    "text, expected",
    [(b"- {op: blur, sigma: [.nan, 1.0], p: 1.0}\n", "sigma=\\[nan, 1.0\\] is not finite"),
     (b"- {op: noise, std: [0.0, .inf]}\n", "std=\\[0.0, inf\\] is not finite"),
     (b"op: dihedral\n", "want a list"), (b"- dihedral\n", "want a list"),
     (b"- {op: dihedral}\n# caf\xe9\n", "not UTF-8")],
)  # fmt: skip
def test_spec_files_that_cannot_work_are_one_error(tmp_path, text, expected):
    """A NaN sigma made every image NaN without a word; the others were tracebacks."""
    (tmp_path / "aug.yaml").write_bytes(text)
    with pytest.raises(A.AugmentError, match=expected):
        A.build(str(tmp_path / "aug.yaml"), out_size=96, mean=MEAN, std=STD)


def test_save_grid_writes_png(tmp_path, batch):
    aug = A.build("pcam", out_size=96, mean=MEAN, std=STD)
    path = A.save_grid(aug(batch, gen()), tmp_path / "sub" / "grid.png", nrow=4, mean=MEAN, std=STD)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (4 * 98 + 2, 2 * 98 + 2)
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_shapes_and_seed(batch):
    aug = A.build("pcam", out_size=96, mean=MEAN, std=STD)
    g = torch.Generator(device="cuda").manual_seed(0)
    y = aug(batch.cuda(), g)
    assert y.is_cuda and y.shape == (8, 3, 96, 96)
    assert torch.equal(y, aug(batch.cuda(), torch.Generator(device="cuda").manual_seed(0)))


def test_centre_crop_op_in_a_custom_pipeline(batch):
    aug = A.build([{"op": "centre_crop", "fraction": 0.5}], out_size=48, mean=MEAN, std=STD)
    y = aug(batch, gen())
    assert torch.allclose(y, A.normalize(batch[..., 24:72, 24:72], MEAN, STD), atol=1e-6)


def _draws(seed: int, b: int, *ranges):
    """Replays the op's draws: the coin, then one uniform vector per range (draw order)."""
    g = gen(seed)
    on = torch.rand(b, generator=g) < 1.0
    out = [torch.rand(n, generator=g) * (hi - lo) + lo for n, lo, hi in ranges]
    return on, out


def test_fused_hed_equals_the_textbook_formula(batch):
    x = A.to_float(batch)
    b = x.shape[0]
    _, (alpha, beta) = _draws(5, b, (b * 3, 0.9, 1.1), (b * 3, -0.03, 0.03))
    hed = A.rgb_to_hed(x) * alpha.view(b, 3, 1, 1) + beta.view(b, 3, 1, 1)
    ref = A.hed_to_rgb(hed)
    assert torch.allclose(A.hed_jitter(x, gen(5), sigma=0.1, bias=0.03), ref, atol=1e-4)


def test_fused_color_jitter_equals_sequential_ops(batch):
    x = A.to_float(batch)
    b = x.shape[0]
    _, (fb, fc, fs, hue) = _draws(6, b, (b, 0.8, 1.2), (b, 0.7, 1.3), (b, 0.6, 1.4), (b, -0.1, 0.1))
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    y = x * fb.view(b, 1, 1, 1)
    mean = (y * w).sum(1, keepdim=True).mean((-2, -1), keepdim=True)
    y = (y - mean) * fc.view(b, 1, 1, 1) + mean
    g = (y * w).sum(1, keepdim=True)
    y = (y - g) * fs.view(b, 1, 1, 1) + g
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    ang = hue * 2 * torch.pi
    c, s = torch.cos(ang), torch.sin(ang)
    z = torch.einsum("ij,bjhw->bihw", yiq, y)
    i, q = (
        z[:, 1] * c.view(b, 1, 1) - z[:, 2] * s.view(b, 1, 1),
        z[:, 1] * s.view(b, 1, 1) + z[:, 2] * c.view(b, 1, 1),
    )
    ref = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(yiq), torch.stack([z[:, 0], i, q], 1))
    out = A.color_jitter(x, gen(6), brightness=0.2, contrast=0.3, saturation=0.4, hue=0.1)
    assert torch.allclose(out, ref.clamp(0, 1), atol=1e-4)


def test_channels_last_input_gives_the_same_batch(batch):
    """histodist.data.loader hands over channels_last uint8 batches; results must not depend on it."""
    aug = A.build("pcam", out_size=64, mean=MEAN, std=STD)
    cl = batch.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(aug(cl, gen(4)), aug(batch, gen(4)), atol=1e-5)
