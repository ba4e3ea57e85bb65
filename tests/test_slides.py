"""Slide reader, tissue detection and tiling on the real slides and on pyramids of real patches."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA
from slidekit import CELL, block, make_slide

from histodist.ingest.slides.reader import SlideError, open_slide
from histodist.ingest.slides.tiling import geometry, plan_tiles, read_tiles, tissue_thumbnail
from histodist.ingest.slides.tissue import box_fractions, saturation, tissue_mask

openslide = pytest.importorskip("openslide", reason="the wsi extra (openslide) is not installed")
WSI = SHARED_DATA / "wsi"
CMU = WSI / "CMU-1-Small-Region.svs"
TCGA = WSI / "TCGA-CR-7395-01A-01-TS1.svs"


def _need(path):
    if not path.is_file():
        pytest.skip(f"real slide absent: {path}")
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, pcam_jpeg):
    """12 x 8 cells of 256 px at 0.25 µm/px; real patches in cells 3..8 x 2..5 (class 1 in
    6..8 x 2..3); levels 1 and 4 (2 missing), in both layouts openslide reads µm/px from."""
    tissue = {**block(range(3, 9), range(2, 6)), **block(range(6, 9), range(2, 4), 1)}
    d = tmp_path_factory.mktemp("slides")
    return {
        kind: make_slide(
            d / f"s-{kind}.{'svs' if kind == 'aperio' else 'tif'}",
            pcam_jpeg,
            cols=12,
            rows=8,
            tissue=tissue,
            kind=kind,
        )  # fmt: skip
        for kind in ("generic", "aperio")
    }


def test_real_cmu_slide_reads_like_openslide():
    with open_slide(_need(CMU)) as s:
        assert s.dimensions == (2220, 2967) and s.level_downsamples == (1.0,)
        assert s.mpp == pytest.approx(0.499) and s.mpp_source == "metadata"
        region = s.read_region(1000, 1200, 0, 300, 200)
        assert region.shape == (200, 300, 3) and region.dtype == np.uint8
        ref = np.asarray(openslide.OpenSlide(str(CMU)).read_region((1000, 1200), 0, (300, 200)))
        assert np.array_equal(region, ref[..., :3])  # opaque inside the scan: alpha is 255
        thumb = s.thumbnail(512)
        assert thumb.shape == (512, round(2220 * 512 / 2967), 3)
        ref = np.asarray(openslide.OpenSlide(str(CMU)).get_thumbnail((512, 512)).convert("RGB"))
        h, w = min(thumb.shape[0], ref.shape[0]), min(thumb.shape[1], ref.shape[1])
        diff = np.abs(thumb[:h, :w].astype(int) - ref[:h, :w].astype(int)).mean()
        assert diff < 6  # the same picture, resampled by another filter


def test_real_cmu_tissue_tiles_agree_with_pixel_saturation():
    """Kept tiles against an independent per-pixel reference at full resolution: tiles that
    are >= 70% saturated pixels are kept, tiles with <= 5% are not."""
    with open_slide(_need(CMU)) as s:
        thumb, mpp = tissue_thumbnail(s)
        assert mpp == pytest.approx(4.0, rel=0.02)
        mask = tissue_mask(thumb, mpp=mpp)
        tiles = plan_tiles(s, mpp=0.5, tile_size=224, min_tissue=0.5, mask=mask)
        full = s.read_region(0, 0, 0, *s.dimensions)
    assert 0.2 < mask.mean() < 0.6  # the strip of skin, not the glass around it
    sat = saturation(full) > 0.15
    kept = {(t.x, t.y) for t in tiles}
    assert tiles and all(t.extent == 224 and t.level == 0 and t.tissue >= 0.5 for t in tiles)
    assert [(t.y, t.x) for t in tiles] == sorted((t.y, t.x) for t in tiles)
    for y in range(0, 2967 - 223, 224):
        for x in range(0, 2220 - 223, 224):
            frac = sat[y : y + 224, x : x + 224].mean()
            if frac >= 0.7:
                assert (x, y) in kept, (x, y, frac)
            if frac <= 0.05:
                assert (x, y) not in kept, (x, y, frac)


def test_real_tcga_slide_has_no_mpp_until_assumed():
    with open_slide(_need(TCGA)) as s:
        assert s.mpp is None and s.mpp_source is None
        assert len(s.level_dimensions) == 2 and s.level_downsamples[1] == pytest.approx(2.0, 1e-3)
        with pytest.raises(SlideError, match="assume-mpp"):
            geometry(s, mpp=0.5, tile_size=224)
    with open_slide(TCGA, assume_mpp=0.25) as s:
        assert (s.mpp, s.mpp_source) == (0.25, "assumed")
        g = geometry(s, mpp=0.5, tile_size=224)  # the 2.0005x level, 0.03% coarser: used
        assert (g.level, g.read_size, g.extent) == (1, 224, 448)


@pytest.mark.parametrize("kind", ["generic", "aperio"])
def test_synthetic_pyramid_levels_mpp_and_tiles(synthetic, kind):
    import tifffile

    with open_slide(synthetic[kind]) as s:
        assert s.mpp == pytest.approx(0.25) and s.mpp_source == "metadata"
        assert s.level_downsamples == (1.0, 4.0) and s.dimensions == (12 * CELL, 8 * CELL)
        tiles = plan_tiles(s, mpp=1.0, tile_size=64, min_tissue=0.5)
        # exactly the planted cells, in (y, x) order, read from the 4x level without resizing
        assert [(t.x, t.y) for t in tiles] == [(c * CELL, r * CELL) for r in range(2, 6)
                                               for c in range(3, 9)]  # fmt: skip
        assert {(t.level, t.read_size, t.extent) for t in tiles} == {(1, 64, CELL)}
        assert min(t.tissue for t in tiles) > 0.9
        page = tifffile.imread(synthetic[kind], key=1 if kind == "generic" else 2)
        got = list(read_tiles(s, tiles[:3], 64))
        for t, px in zip(tiles[:3], got, strict=True):
            assert np.array_equal(px, page[t.y // 4 : t.y // 4 + 64, t.x // 4 : t.x // 4 + 64])
        # 0.5 µm/px: the 2x level is missing, so 128 px of level 0 resized to 64
        half = plan_tiles(s, mpp=0.5, tile_size=64, min_tissue=0.5)
        assert {(t.level, t.read_size, t.extent) for t in half} == {(0, 128, 128)}
        assert len(half) == 4 * len(tiles)
        level0 = tifffile.imread(synthetic[kind], key=0)
        t = half[0]
        ref = level0[t.y : t.y + 128, t.x : t.x + 128].reshape(64, 2, 64, 2, 3).mean((1, 3))
        assert np.abs(next(read_tiles(s, [t], 64)).astype(float) - ref).mean() < 4
        g = geometry(s, mpp=2.0, tile_size=64)  # 2 µm/px: 128 px of the 4x level resized
        assert (g.level, g.read_size, g.extent) == (1, 128, 512)


def test_too_coarse_a_slide_is_refused_and_a_white_one_has_no_tiles(tmp_path, pcam_jpeg):
    white = make_slide(tmp_path / "white.tif", pcam_jpeg, cols=4, rows=4, tissue={})
    with open_slide(white) as s:
        assert plan_tiles(s, mpp=1.0, tile_size=64, min_tissue=0.5) == []
        assert not tissue_mask(tissue_thumbnail(s)[0]).any()
        geometry(s, mpp=0.24, tile_size=64)  # 4% finer than the scan: upsampled a little
        with pytest.raises(SlideError, match="coarser than 0.2 µm/px"):
            geometry(s, mpp=0.2, tile_size=64)


def test_box_fractions_are_exact_for_fractional_boxes():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) > 0.6
    x0, y0 = rng.uniform(0, 30, 200), rng.uniform(0, 20, 200)
    x1, y1 = x0 + rng.uniform(1, 20, 200), y0 + rng.uniform(1, 20, 200)
    got = box_fractions(mask, x0, y0, x1, y1)
    fine = np.repeat(np.repeat(mask, 20, 0), 20, 1)  # supersampled reference, 1/20 px grid
    q = lambda v: np.round(v * 20).astype(int)  # noqa: E731
    x0, y0, x1, y1 = q(x0), q(y0), q(x1), q(y1)
    ref = [fine[b:d, a:c].mean() for a, b, c, d in zip(x0, y0, x1, y1, strict=True)]
    got = box_fractions(mask, x0 / 20, y0 / 20, x1 / 20, y1 / 20)
    assert np.allclose(got, ref, atol=1e-9)
