"""Models from the Hugging Face hub or a local folder: `hf-hub:ORG/NAME`, `local-dir:PATH`.

timm builds both from the repository's `config.json` (architecture, `model_args`, pretrained
config: input size, mean/std) and `model.safetensors`. Some pathology foundation models need
constructor arguments their `config.json` cannot express (a packed SwiGLU MLP, layer-scale init
values) or a pooling their authors use (class token + mean of the patch tokens); `KNOWN` holds
these, so that `--model hf-hub:paige-ai/Virchow2` (or its short name `virchow2`) builds the model
as its authors do. A local copy of a known model names its family with `--family`.

When the hub refuses (no token, terms not accepted, offline without a cached copy) the error
says so and how to fix it, and names the offline route (`local-dir:`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from histodist.errors import HistodistError

PREFIXES = ("hf-hub:", "local-dir:")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# H-optimus-0 and H-optimus-1 (their model cards)
H_OPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


class HubError(HistodistError, ValueError):
    """A hub model that cannot be fetched or built; the message says why and the fix."""


@dataclass(frozen=True)
class Known:
    """What timm needs, beyond the repository's config.json, to build one model correctly."""

    repo: str  # hub id, ORG/NAME
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    pool: str = "model"  # "model": timm's own pooling; "token+avg": [CLS, mean(patch tokens)]
    norm: tuple | None = None  # (mean, std) when the card gives its own

    @property
    def source(self) -> str:
        """The model card the entry is taken from."""
        return f"https://huggingface.co/{self.repo}"


def _swiglu_silu() -> dict:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


# Callables are resolved at build time (timm.layers imported lazily). Sources: the model cards.
_LAYERS: dict[str, Callable[[], dict]] = {"swiglu-silu": _swiglu_silu}
KNOWN: dict[str, Known] = {
    "uni": Known(
        "MahmoodLab/UNI",
        {"init_values": 1e-5, "dynamic_img_size": True},
        norm=IMAGENET,
    ),
    "uni2-h": Known(
        "MahmoodLab/UNI2-h",
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "layers": "swiglu-silu",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },  # fmt: skip
        norm=IMAGENET,
    ),
    "virchow": Known(
        "paige-ai/Virchow",
        {"layers": "swiglu-silu"},
        pool="token+avg",
        norm=IMAGENET,
    ),
    "virchow2": Known(
        "paige-ai/Virchow2",
        {"layers": "swiglu-silu"},
        pool="token+avg",  # class token + mean of the patch tokens (registers left out): 2560
        norm=IMAGENET,
    ),
    "h-optimus-0": Known(
        "bioptimus/H-optimus-0",
        {"init_values": 1e-5, "dynamic_img_size": False},
        norm=H_OPTIMUS,
    ),
    "h-optimus-1": Known(
        "bioptimus/H-optimus-1",
        {"init_values": 1e-5, "dynamic_img_size": False},
        norm=H_OPTIMUS,
    ),
    "prov-gigapath": Known(
        "prov-gigapath/prov-gigapath",
        norm=IMAGENET,
    ),
}
_BY_REPO = {k.repo.lower(): name for name, k in KNOWN.items()}


def is_hub(name: str) -> bool:
    """True for `hf-hub:` / `local-dir:` names and the short names of KNOWN models."""
    return name.startswith(PREFIXES) or name.lower() in KNOWN


def resolve(name: str) -> str:
    """A short name of KNOWN (`uni`) -> its timm name (`hf-hub:MahmoodLab/UNI`); else `name`."""
    k = KNOWN.get(name.lower())
    return f"hf-hub:{k.repo}" if k else name


def family(name: str, family_name: str = "auto") -> Known | None:
    """The KNOWN entry of a model: by `family_name` when given, else by its short name or hub id."""
    if family_name not in ("auto", "none", ""):
        if family_name.lower() not in KNOWN:
            raise HubError(
                f"--family {family_name!r}: choose one of auto, none, {', '.join(KNOWN)}"
            )
        return KNOWN[family_name.lower()]
    if family_name == "none":
        return None
    name = resolve(name)
    repo = name.split(":", 1)[1].split("@")[0] if name.startswith("hf-hub:") else ""
    return KNOWN.get(_BY_REPO.get(repo.lower(), ""))


def safe_name(model: str) -> str:
    """A run-folder name from any model name: `local-dir:/x/y` -> `local-dir_y`,
    `hf-hub:MahmoodLab/UNI` -> `hf-hub_MahmoodLab_UNI`, `a+b` -> `a_b`."""
    if model.startswith("local-dir:"):
        model = "local-dir:" + Path(model.split(":", 1)[1].rstrip("/\\")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"


# ----------------------------------------------------------------------------- building
def create(
    name: str, *, family_name: str = "auto", pretrained: bool, num_classes: int,
    drop_rate: float = 0.0,
) -> nn.Module:  # fmt: skip
    """The timm model `name` (hf-hub:/local-dir:/short name) built as its KNOWN entry says,
    with `num_classes` outputs (0: pooled features, (B, D)). Hub refusals become HubError."""
    known = family(name, family_name)
    kwargs = dict(known.kwargs) if known else {}
    if "layers" in kwargs:
        kwargs.update(_LAYERS[kwargs.pop("layers")]())
    pool = known.pool if known else "model"
    with hub_errors(name):
        import timm

        # Built headless (the checkpoints hold no classifier), then given a new head.
        kwargs.update(pretrained=pretrained, num_classes=0, drop_rate=drop_rate)
        if pool != "model":
            kwargs["global_pool"] = ""
        model = timm.create_model(resolve(name), **kwargs)
    if pool == "model" and num_classes:
        model.reset_classifier(num_classes)
    if known and known.norm:
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": known.norm[0], "std": known.norm[1]}
    if pool == "token+avg":
        model = ClsMeanPool(model, num_classes, drop_rate)
    return model


@contextlib.contextmanager
def hub_errors(name: str) -> Iterator[None]:
    """Turn the hub's refusals into a one-line HubError that names the fix."""
    try:
        yield
    except Exception as exc:
        msg = explain(name, exc)
        if msg is None:
            raise
        raise HubError(msg) from exc


def explain(name: str, exc: BaseException) -> str | None:
    """The one-line message for a hub or local-folder failure, or None when it is none."""
    from huggingface_hub import errors as e

    repo = resolve(name).split(":", 1)[-1]
    page = f"https://huggingface.co/{repo.split('@')[0]}"
    offline = (
        f"or download it once elsewhere (hf download {repo} --local-dir DIR) and pass "
        "--model local-dir:DIR"
    )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, e.GatedRepoError) or status in (401, 403):
        return (
            f"{name}: the hub refused the download (gated model: no token, or the terms are not "
            f"accepted); log in with `hf auth login` (older: `huggingface-cli login`) and accept "
            f"the terms on {page}, {offline}"
        )
    if isinstance(exc, e.RepositoryNotFoundError):
        return (
            f"{name}: no such repository, or it is gated and no token was sent; check the name, "
            f"run `hf auth login` and accept the terms on {page}, {offline}"
        )
    if isinstance(exc, e.LocalEntryNotFoundError):
        return (
            f"{name}: not in the local Hugging Face cache and the hub is unreachable or "
            f"HF_HUB_OFFLINE=1; download it where the hub is reachable (it needs a login for "
            f"gated models: `hf auth login`, terms accepted on {page}), {offline}"
        )
    if isinstance(exc, FileNotFoundError) and name.startswith("local-dir:"):
        return (
            f"{name}: {exc}; a local-dir: folder holds config.json and model.safetensors "
            "(what `hf download ORG/NAME --local-dir DIR` or timm's save_for_hf write)"
        )
    return None


class ClsMeanPool(nn.Module):
    """A ViT whose pooled feature is [class token, mean of the patch tokens] (2 x width), as
    Virchow / Virchow2 pool; register tokens are left out of the mean. float32 (B,3,H,W) ->
    (B, num_classes) logits, or (B, 2 x width) features when num_classes is 0."""

    def __init__(self, backbone: nn.Module, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.num_features = 2 * int(backbone.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = dict(backbone.pretrained_cfg)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        n = int(getattr(self.backbone, "num_prefix_tokens", 1))
        x = torch.cat([x[:, 0], x[:, n:].mean(1)], dim=-1)
        return x if pre_logits else self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{n}" for n in inner}

    def group_matcher(self, coarse: bool = False) -> dict:
        """The backbone's layer groups (layer-wise lr decay) under the `backbone.` prefix."""

        def pre(rx: str) -> str:
            return r"^backbone\.(?:" + rx.lstrip("^") + ")"

        out = {}
        for key, spec in self.backbone.group_matcher(coarse).items():
            if isinstance(spec, list | tuple):
                out[key] = [(pre(rx), suffix) for rx, suffix in spec]
            else:
                out[key] = pre(spec)
        return out


# ----------------------------------------------------------------------------- input config
def input_config(name: str, family_name: str = "auto") -> dict:
    """{"input_size": int, "mean": (3,), "std": (3,)} of a hub model from its config.json (no
    weights read), with the KNOWN entry's mean/std; hub refusals become HubError."""
    with hub_errors(name):
        from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

        source = resolve(name)
        ident = source.split(":", 1)[1]
        if source.startswith("local-dir:"):
            cfg, _, args = load_model_config_from_path(ident)
        else:
            cfg, _, args = load_model_config_from_hf(ident)
    known = family(name, family_name)
    size = (known.kwargs.get("img_size") if known else None) or args.get("img_size")
    size = size or cfg.get("input_size", (3, 224, 224))[-1]
    mean, std = known.norm if known and known.norm else (cfg.get("mean"), cfg.get("std"))
    return {
        "input_size": int(size if isinstance(size, int) else size[-1]),
        "mean": tuple(mean or IMAGENET[0]),
        "std": tuple(std or IMAGENET[1]),
    }


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes, bytes): names the exact
    weights whatever their source (hub revision, local folder, random init with a seed)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
