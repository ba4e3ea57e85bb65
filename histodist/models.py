"""Model building around timm, plus the architectures of the seed notebooks.

`build_model(cfg, num_classes=...)` accepts:
- any timm model name (`resnet50`, `efficientnet_b0`, `vit_small_patch16_224`, ...);
- `a+b`: two timm backbones side by side, pooled features concatenated, one linear head
  (the seeds' `xception41+nasnetalarge`);
- `resnet50-dense`: ResNet50 with a 128-64 dense head;
- `resnet152-dense`: ResNet152 with a 1000-unit dense head and dropout 0.25;
- `small-cnn`: a four-block CNN for quick baselines;
- `hf-hub:ORG/NAME`, `local-dir:PATH` and the short names of histodist.hub.KNOWN (pathology
  foundation models, built with their authors' timm arguments and pooling);
- `linear` / `mlp`: a head on embedding vectors (`histodist.embed`), input width `embed_dim`;
- `abmil`, `clam-sb`, `transmil`, `mean`, `max`: MIL heads on a slide's bag of tile
  embeddings (histodist.mil), float (1, N, embed_dim) -> (1, num_classes) logits.
Every other model maps float32 (B, 3, H, W) normalised images to (B, num_classes) logits; all
expose `head_parameters(model)`, the parameters trained while the backbone is frozen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import timm
import torch
from torch import nn

from histodist import hub, mil
from histodist.config import ConfigError, ModelConfig
from histodist.data.embeddings import HEADS
from histodist.errors import HistodistError, UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(HistodistError, ValueError):
    """A --weights file that cannot be read or matches nothing in the model."""


class FeatureError(UsageError, ValueError):
    """A model whose pooled features are not one vector per image."""


def _timm(
    name: str,
    *,
    pretrained: bool,
    num_classes: int,
    drop_rate: float = 0.0,
    image_size: int | None = None,
) -> nn.Module:
    kw = {"pretrained": pretrained, "num_classes": num_classes, "drop_rate": drop_rate}
    if image_size:
        # Only some families (ViT, Swin, ...) take img_size; CNNs reject the keyword.
        try:
            return timm.create_model(name, img_size=image_size, **kw)
        except TypeError:
            pass
    return timm.create_model(name, **kw)


def _feat_dim(m: nn.Module) -> int:
    """Width of a timm model's pooled output with num_classes=0 (after any pre-logits layer)."""
    return int(getattr(m, "head_hidden_size", None) or m.num_features)


class PairNet(nn.Module):
    """Two backbones on the same input; their pooled features concatenated into one head."""

    def __init__(self, a: nn.Module, b: nn.Module, num_classes: int, drop_rate: float):
        super().__init__()
        self.backbone = nn.ModuleList([a, b])
        self.head = nn.Sequential(
            nn.Dropout(drop_rate), nn.Linear(_feat_dim(a) + _feat_dim(b), num_classes)
        )
        self.pretrained_cfg = dict(getattr(a, "pretrained_cfg", {}) or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([m(x) for m in self.backbone], dim=1))


class DenseHeadNet(nn.Module):
    """A timm backbone (pooled features) followed by a multi-layer dense head."""

    def __init__(
        self, backbone: nn.Module, hidden: tuple[int, ...], num_classes: int, drop_rate: float
    ):
        super().__init__()
        self.backbone = backbone
        layers: list[nn.Module] = []
        width = _feat_dim(backbone)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(drop_rate)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*layers)
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class EmbeddingHead(nn.Module):
    """A linear or one-hidden-layer MLP head on precomputed embeddings: float (B, D) or
    (B, D, 1, 1) -> (B, num_classes) logits. No backbone: everything here trains."""

    def __init__(self, dim: int, num_classes: int, *, hidden: int = 0, drop_rate: float = 0.0):
        super().__init__()
        if dim <= 0:
            raise ValueError("an embedding head needs embed_dim > 0 (from the embedding manifest)")
        layers: list[nn.Module] = [nn.Flatten()]
        if hidden:
            layers += [nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop_rate)]
        layers += [nn.Dropout(drop_rate), nn.Linear(hidden or dim, num_classes)]
        self.head = nn.Sequential(*layers)
        self.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.float())


MLP_HIDDEN = 256  # width of the `mlp` head's hidden layer


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-pool blocks (32..256 channels) and a linear head; any input >= 16 px."""

    def __init__(self, num_classes: int, drop_rate: float = 0.0, width: int = 32):
        super().__init__()
        blocks, cin = [], 3
        for i in range(4):
            cout = width * 2**i
            blocks += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            cin = cout
        self.backbone = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(cin, num_classes))
        self.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


LOCAL_MODELS = ("small-cnn", "resnet50-dense", "resnet152-dense")


def check_model_name(name: str) -> None:
    """Raise ConfigError, with the closest known names, unless build_model accepts `name`
    (checked before a run folder is created; timm's own error came after)."""
    import difflib

    from timm.models import is_model, parse_model_name

    def known(n: str) -> bool:
        if hub.is_hub(n):
            return True  # hub names are checked when loaded
        source, arch = parse_model_name(n)
        return source is not None or is_model(arch)

    whole = (*LOCAL_MODELS, *HEADS, *mil.MIL_HEADS)
    parts = name.split("+", 1) if "+" in name else [name]
    bad = [n for n in parts if not (n in whole and len(parts) == 1 or known(n))]
    if bad:
        names = [*whole, *hub.KNOWN, *timm.list_models()]
        close = difflib.get_close_matches(bad[0], names, n=4)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise ConfigError(f"--model {name!r}: unknown model {bad[0]!r}; {hint}")


def build_model(cfg: ModelConfig, *, num_classes: int, image_size: int | None = None) -> nn.Module:
    """The model named by `cfg.model` with `num_classes` outputs, on CPU in train mode.
    `--pretrained` loads timm hub weights into every timm backbone; `--weights` loads a local
    file."""
    name, pre, drop = cfg.model, bool(cfg.pretrained), cfg.drop_rate
    if name == "small-cnn":
        model: nn.Module = SmallCNN(num_classes, drop)
    elif name in HEADS:
        hidden = MLP_HIDDEN if name == "mlp" else 0
        model = EmbeddingHead(cfg.embed_dim, num_classes, hidden=hidden, drop_rate=drop)
    elif name in mil.MIL_HEADS:
        model = mil.build(name, dim=cfg.embed_dim, num_classes=num_classes, hidden=cfg.mil_dim,
                          dropout=drop, k=cfg.clam_k)  # fmt: skip
    elif hub.is_hub(name):
        # The point of naming a hub checkpoint is its weights: loaded unless --no-pretrained.
        model = hub.create(name, family_name=cfg.family, num_classes=num_classes, drop_rate=drop,
                           pretrained=cfg.pretrained is not False)  # fmt: skip
    elif name == "resnet50-dense":
        model = DenseHeadNet(
            _timm("resnet50", pretrained=pre, num_classes=0), (128, 64), num_classes, drop
        )
    elif name == "resnet152-dense":
        model = DenseHeadNet(
            _timm("resnet152", pretrained=pre, num_classes=0), (1000,), num_classes, max(drop, 0.25)
        )
    elif "+" in name:
        a, b = name.split("+", 1)
        model = PairNet(
            _timm(a, pretrained=pre, num_classes=0, image_size=image_size),
            _timm(b, pretrained=pre, num_classes=0, image_size=image_size),
            num_classes,
            drop,
        )
    else:
        model = _timm(
            name, pretrained=pre, num_classes=num_classes, drop_rate=drop, image_size=image_size
        )
    if cfg.weights:
        load_weights(model, cfg.weights)
    return model


def model_norm(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel in [0, 1] that the model's pretrained weights expect."""
    pc = getattr(model, "pretrained_cfg", None) or {}
    return tuple(pc.get("mean", IMAGENET_MEAN)), tuple(pc.get("std", IMAGENET_STD))


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classifier head (trained while the backbone is frozen)."""
    if isinstance(model, EmbeddingHead | mil.MILHead):
        return list(model.parameters())
    if hasattr(model, "head") and isinstance(model, PairNet | DenseHeadNet | SmallCNN):
        return list(model.head.parameters())
    if hasattr(model, "get_classifier"):
        return list(model.get_classifier().parameters())
    raise ValueError(f"{type(model).__name__}: cannot tell its classifier head")


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) every parameter outside the head."""
    head = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad_(trainable)


def adapt(model: nn.Module, cfg: ModelConfig) -> None:
    """Apply --finetune (full | linear | last-k with --unfreeze-blocks) and
    --grad-checkpointing to a freshly built model, before the optimizer sees it."""
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"--grad-checkpointing: {cfg.model} does not support it (timm only)")
        model.set_grad_checkpointing(True)
    if cfg.finetune == "full":
        return
    set_backbone_trainable(model, False)
    if cfg.finetune == "last-k":
        for p in last_blocks_parameters(model, cfg.unfreeze_blocks, cfg.model):
            p.requires_grad_(True)


def last_blocks_parameters(model: nn.Module, k: int, name: str = "model") -> list[nn.Parameter]:
    """Parameters of the last `k` transformer blocks and of everything after them (final norm,
    pooling) of a ViT-like timm model (one with `.blocks`)."""
    vit = getattr(model, "backbone", model)
    blocks = getattr(vit, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not len(blocks):
        raise ConfigError(f"--finetune last-k: {name} has no .blocks (ViT-like timm models only)")
    if k > len(blocks):
        raise ConfigError(f"--unfreeze-blocks {k}: {name} has only {len(blocks)} blocks")
    params = [p for b in list(blocks)[-k:] for p in b.parameters()]
    for attr in ("norm", "fc_norm", "attn_pool"):
        m = getattr(vit, attr, None)
        if isinstance(m, nn.Module):
            params += list(m.parameters())
    return params


def features(model: nn.Module, x: torch.Tensor, name: str = "the model") -> torch.Tensor:
    """Pooled features float (B, D) of a timm model (or ClsMeanPool) built with
    num_classes=0: what a linear probe sees. Anything but one vector per image (a model that
    does not pool: (B, tokens, D) or (B, D, H, W)) raises FeatureError naming `name`."""
    if hasattr(model, "forward_head"):
        out = model.forward_head(model.forward_features(x), pre_logits=True)
    else:
        out = model(x)
    if out.ndim == 2 and out.shape[0] == x.shape[0] and out.shape[1] == 0:
        raise FeatureError(
            f"{name}: its pooled features are 0 wide ({tuple(out.shape)}): nothing to embed; "
            "check its config (num_features, embed_dim) or the --family it was built as"
        )
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise FeatureError(
            f"{name}: its pooled features have shape {tuple(out.shape)} for {x.shape[0]} "
            "images, not one vector per image (B, D): the model does not pool (timm's "
            'global_pool ""); build it with a pooling (--family for a known model, or '
            'global_pool "token" / "avg" in its config.json)'
        )
    return out


# ----------------------------------------------------------------------------- weights
_PREFIXES = ("module.", "_orig_mod.", "model.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, a torch file read with weights_only=True, or a
    histodist checkpoint folder (its model.safetensors). Wrapper keys and prefixes are removed."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise WeightsError(
            f"{path}: no such weights file; pass a .safetensors/.pth file or a "
            "histodist checkpoint folder"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad weights file
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    return {_strip(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _strip(key: str) -> str:
    for p in _PREFIXES:
        while key.startswith(p):
            key = key[len(p) :]
    return key


def load_weights(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Load matching tensors (same name and shape) into the model or, for the seeds'
    architectures, into its backbone; a classifier of another class count is skipped.
    Returns counts {"loaded", "skipped", "missing"}; raises WeightsError if nothing matches."""
    sd = read_state_dict(path)
    best, best_n = None, -1
    for target in _targets(model):
        own = {_strip(k): v for k, v in target.state_dict().items()}
        n = sum(1 for k, v in sd.items() if k in own and own[k].shape == v.shape)
        if n > best_n:
            best, best_n = target, n
    if best is None or best_n == 0:
        raise WeightsError(
            f"{path}: no tensor matches the model by name and shape; is it "
            f"weights for {type(model).__name__}?"
        )
    own = {_strip(k): k for k in best.state_dict()}
    shapes = {_strip(k): v.shape for k, v in best.state_dict().items()}
    matched = {own[k]: v for k, v in sd.items() if k in own and shapes[k] == v.shape}
    best.load_state_dict(matched, strict=False)
    return {
        "loaded": len(matched),
        "skipped": len(sd) - len(matched),
        "missing": len(own) - len(matched),
    }


def _targets(model: nn.Module) -> Iterator[nn.Module]:
    yield model
    bb = getattr(model, "backbone", None)
    if isinstance(bb, nn.ModuleList):
        yield from bb
    elif isinstance(bb, nn.Module):
        yield bb


def describe(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return json.dumps({"class": type(model).__name__, "params_M": round(n / 1e6, 2)})
