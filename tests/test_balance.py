"""Class balance: the loss weights (build.class_weights) and in-batch resampling (loop.rebalance),
checked against scikit-learn and against the class mix they must produce."""

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from histodist.training.build import class_weights
from histodist.training.loop import rebalance


def _manifest(counts: list[int]) -> dict:
    return {"splits": {"train": {"class_counts": counts}}}


@pytest.mark.parametrize("counts", [[900, 100], [6705, 1113, 514, 327, 1099, 142, 115]])
def test_class_weights_match_sklearn_balanced(counts):
    """HAM10000's 7 class counts (dx) and a 9:1 binary split."""
    y = np.repeat(np.arange(len(counts)), counts)
    want = compute_class_weight("balanced", classes=np.arange(len(counts)), y=y)
    got = class_weights(_manifest(counts), "train", len(counts))
    assert got.dtype == torch.float32 and got.shape == (len(counts),)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    # every class then carries the same total weight: N / C
    np.testing.assert_allclose(got.numpy() * counts, sum(counts) / len(counts), rtol=1e-6)


def test_class_weights_absent_class_gets_zero():
    got = class_weights(_manifest([30, 0, 10]), "train", 3)
    assert got[1] == 0
    np.testing.assert_allclose(got[[0, 2]].numpy(), [40 / (3 * 30), 40 / (3 * 10)], rtol=1e-6)


def test_rebalance_draws_classes_equally_and_keeps_pairs():
    y = torch.tensor([0] * 90 + [1] * 10)
    x = torch.arange(100).view(100, 1, 1, 1).expand(100, 3, 2, 2).clone()  # row i holds i
    w = class_weights(_manifest([90, 10]), "train", 2)
    gen = torch.Generator().manual_seed(0)
    ones, n = 0, 0
    for _ in range(200):
        xb, yb = rebalance(x, y, w, gen)
        assert xb.shape == x.shape and yb.shape == y.shape
        assert torch.equal(yb, y[xb[:, 0, 0, 0]])  # each image keeps its own label
        ones, n = ones + int(yb.sum()), n + len(yb)
    # 20,000 draws of p = 0.5: the binomial sd of the fraction is 0.0035
    assert abs(ones / n - 0.5) < 0.03, ones / n


def test_rebalance_is_seeded():
    y = torch.tensor([0] * 12 + [1] * 4)
    x = torch.randn(16, 3, 4, 4)
    w = class_weights(_manifest([12, 4]), "train", 2)
    a = rebalance(x, y, w, torch.Generator().manual_seed(7))
    b = rebalance(x, y, w, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
