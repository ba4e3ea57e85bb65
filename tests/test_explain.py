"""Grad-CAM finds a planted signal; histodist.explain writes the grid."""

import numpy as np
import pytest
import torch
from PIL import Image
from runkit import tiny_run
from torch import nn

from histodist import explain
from histodist.inference.gradcam import default_layer, gradcam

SIZE, SQUARE = 32, 6


def planted(n: int, gen: torch.Generator):
    """Dim noise; class 1 adds a bright SQUARE x SQUARE square at a random position."""
    x = torch.rand(n, 3, SIZE, SIZE, generator=gen) * 0.5
    y = torch.randint(0, 2, (n,), generator=gen)
    pos = torch.randint(0, SIZE - SQUARE, (n, 2), generator=gen)
    for i in torch.nonzero(y)[:, 0].tolist():
        r, c = pos[i].tolist()
        x[i, :, r : r + SQUARE, c : c + SQUARE] = 1.0
    return x, y, pos


def fit_planted(net: nn.Module, gen: torch.Generator, *, steps: int, lr: float) -> None:
    """Train `net` with Adam on batches of 32 planted-square images, then set it to eval."""
    opt = torch.optim.Adam(net.parameters(), lr)
    for _ in range(steps):
        x, y, _ = planted(32, gen)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def test_gradcam_peaks_on_the_planted_square():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )  # fmt: skip
    fit_planted(net, gen, steps=60, lr=3e-3)
    x, y, pos = planted(64, gen)
    assert (net(x).argmax(1) == y).float().mean() > 0.8  # it learned the square
    assert default_layer(net, x) is net[6]  # the last feature map (16 x 16)
    x, pos = x[y == 1], pos[y == 1]
    cam, logits = gradcam(net, x, torch.ones(len(x), dtype=torch.long))
    assert cam.shape == (len(x), SIZE, SIZE) and cam.min() >= 0 and cam.max() <= 1
    peak = cam.flatten(1).argmax(1)
    r, c = peak // SIZE, peak % SIZE
    inside = (
        (r >= pos[:, 0]) & (r < pos[:, 0] + SQUARE) & (c >= pos[:, 1]) & (c < pos[:, 1] + SQUARE)
    )
    assert inside.all(), f"{int((~inside).sum())} of {len(x)} heatmaps peak outside the square"
    assert torch.allclose(logits, net(x), atol=1e-5)


@pytest.mark.parametrize("mode", [["--top-losses", "5"], ["--random", "4"]])
def test_explain_writes_a_grid_of_the_chosen_images(mode, pcam_jpeg, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    run_dir, _ = tiny_run(pcam_jpeg, base)
    out = base / f"grid{mode[0]}.png"
    assert explain.main(["--run", str(run_dir), "--split", "valid", *mode, "--workers", "0",
                         "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 100


def test_explain_selects_the_largest_losses():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.99, 0.01]])
    labels = torch.tensor([1, 1, 0, 0])
    batches = [{"key": ["a", "b"], "label": labels[:2], "probs": probs[:2],
                "image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8)},
               {"key": ["c", "d"], "label": labels[2:], "probs": probs[2:],
                "image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8)}]  # fmt: skip
    picked = explain.select(iter(batches), 2, "top-losses")
    assert picked["key"] == ["a", "c"]  # losses -log 0.1, -log 0.6 are the two largest
    again = explain.select(iter(batches[::-1]), 3, "random", seed=1)
    assert sorted(again["key"]) == sorted(explain.select(iter(batches), 3, "random", 1)["key"])


def test_heatmaps_of_a_centre_cropped_run_cover_only_the_crop(pcam_jpeg, tmp_path_factory):
    from runkit import make_run

    from histodist.inference import core as inference

    _, shards = tiny_run(pcam_jpeg, tmp_path_factory.getbasetemp())
    run = inference.load_run(make_run(tmp_path_factory.mktemp("cropped") / "run", shards,
                                      crop=0.5))  # fmt: skip
    images = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(p))).permute(2, 0, 1)
            for p in sorted(pcam_jpeg.glob("valid/1/*.jpg"))[:4]
        ]
    )
    picked = {"image": images, "label": torch.ones(4, dtype=torch.long),
              "probs": torch.full((4, 2), 0.5)}  # fmt: skip
    cams = explain.heatmaps(run, picked, "true", "cpu")
    assert cams.shape == (4, 96, 96)
    inside = torch.zeros(96, 96, dtype=torch.bool)
    inside[24:72, 24:72] = True
    assert (cams[:, ~inside] == 0).all() and (cams[:, inside] > 0).any()


@pytest.mark.slow
def test_gradcam_on_a_vit_peaks_near_the_planted_square():
    """ViTs: the patch tokens entering the last block, laid out on their grid, are the map."""
    import timm

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=4, embed_dim=32,
                            depth=2, num_heads=2, reg_tokens=2, num_classes=2)  # fmt: skip
    fit_planted(net, gen, steps=150, lr=1e-3)
    x, y, pos = planted(64, gen)
    assert (net(x).argmax(1) == y).float().mean() > 0.8
    assert default_layer(net, x) is net.blocks[-1].norm1
    x, pos = x[y == 1], pos[y == 1]
    cam, _ = gradcam(net, x, torch.ones(len(x), dtype=torch.long))
    assert cam.shape == (len(x), SIZE, SIZE) and cam.min() >= 0 and cam.max() <= 1
    peak = cam.flatten(1).argmax(1)
    r, c = peak // SIZE, peak % SIZE
    near = 4  # one patch: the map's resolution
    inside = ((r >= pos[:, 0] - near) & (r < pos[:, 0] + SQUARE + near)
              & (c >= pos[:, 1] - near) & (c < pos[:, 1] + SQUARE + near))  # fmt: skip
    assert inside.float().mean() > 0.9, f"{int((~inside).sum())} of {len(x)} peak elsewhere"
