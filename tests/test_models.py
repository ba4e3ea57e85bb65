"""Every model option builds and trains one step at a small input size; weights; freezing."""

import pytest
import torch

from histodist.config import ModelConfig
from histodist.models import (
    WeightsError,
    build_model,
    head_parameters,
    load_weights,
    model_norm,
    set_backbone_trainable,
)

# The seeds' xception41+nasnetalarge pair is exercised through a small pair of the same kind.
OPTIONS = [
    "small-cnn",
    "resnet18",
    "resnet50-dense",
    "resnet152-dense",
    "resnet18+mobilenetv3_small_050",
]


@pytest.mark.parametrize("name", OPTIONS)
def test_builds_and_trains_one_step(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(model=name, drop_rate=0.1), num_classes=3, image_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    head = head_parameters(model)
    before = [p.detach().clone() for p in head]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert model(x).shape == (2, 3) and torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, head, strict=True))
    mean, std = model_norm(model)
    assert len(mean) == len(std) == 3


def test_dense_heads_have_the_seed_shapes():
    r50 = build_model(ModelConfig(model="resnet50-dense"), num_classes=2)
    widths = [m.out_features for m in r50.head if isinstance(m, torch.nn.Linear)]
    assert widths == [128, 64, 2]
    r152 = build_model(ModelConfig(model="resnet152-dense"), num_classes=2)
    assert [m.out_features for m in r152.head if isinstance(m, torch.nn.Linear)] == [1000, 2]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.25 for m in r152.head)


def test_local_weights_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = build_model(ModelConfig(model="resnet18"), num_classes=2)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "r18.pth")
    save_file(src.state_dict(), str(tmp_path / "r18.safetensors"))
    for f in ("r18.pth", "r18.safetensors"):
        # Another class count: the backbone loads, the 2-class classifier is skipped.
        dst = build_model(ModelConfig(model="resnet18", weights=str(tmp_path / f)), num_classes=5)
        assert torch.equal(dst.conv1.weight, src.conv1.weight)
        assert dst.fc.out_features == 5
    # Plain resnet50 weights go into the backbone of the seeds' resnet50-dense.
    r50 = build_model(ModelConfig(model="resnet50"), num_classes=1000)
    torch.save(r50.state_dict(), tmp_path / "r50.pth")
    dense = build_model(ModelConfig(model="resnet50-dense"), num_classes=2)
    counts = load_weights(dense, tmp_path / "r50.pth")
    assert counts["loaded"] > 300 and torch.equal(dense.backbone.conv1.weight, r50.conv1.weight)


def test_bad_weights_are_clear_errors(tmp_path):
    model = build_model(ModelConfig(model="small-cnn"), num_classes=2)
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights(model, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(model, tmp_path / "junk.pth")
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="no tensor matches"):
        load_weights(model, tmp_path / "other.pth")


def test_freeze_and_unfreeze_backbone():
    model = build_model(ModelConfig(model="resnet18"), num_classes=2)
    set_backbone_trainable(model, False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in head_parameters(model)}
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())
