"""Models from the Hugging Face hub or a local folder: `hf-hub:ORG/NAME`, `local-dir:PATH`.

Names are read as timm reads them (`parse`): the source prefix in any case, `hf_hub:` as
`hf-hub:`, `@REVISION` after a hub id; a bare `ORG/NAME` or path, or an unknown prefix, is
refused. timm builds both from the repository's `config.json` (architecture, `model_args`,
pretrained config: input size, interpolation, crop, mean/std) and its weights file. Some
pathology foundation models need constructor arguments their `config.json` cannot express (a
packed SwiGLU MLP, layer-scale init values), a pooling their authors use (class token + mean of
the patch tokens) or the preprocessing of their model card; `KNOWN` holds these, so that
`--model hf-hub:paige-ai/Virchow2` (or its short name `virchow2`) builds the model as its
authors do. The family of a copy under another name is recognised from its `config.json`
(architecture and model arguments) or named with `--family`; weights that do not fit the model
so described are refused, before they are read, with a line naming `--family`.

When the hub refuses (no token, terms not accepted, offline without a cached copy) the error
says so and how to fix it, and names the offline route (`local-dir:`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from histodist.errors import HistodistError, UsageError

SOURCES = {"hf-hub": "hf-hub", "hf_hub": "hf-hub", "local-dir": "local-dir"}  # timm's, + alias
# timm's test for a source prefix: two or more characters, so that C:\\ stays a Windows path
_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.\-_]+")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# H-optimus-0 and H-optimus-1 (their model cards)
H_OPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


class HubError(HistodistError, ValueError):
    """A hub model that cannot be fetched or built; the message says why and the fix."""


class ModelChoiceError(HubError, UsageError):
    """A model name, family or folder the options cannot build as asked (exit 2)."""


@dataclass(frozen=True)
class Known:
    """What timm needs, beyond the repository's config.json, to build one model correctly."""

    repo: str  # hub id, ORG/NAME
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    pool: str = "model"  # "model": timm's own pooling; "token+avg": [CLS, mean(patch tokens)]
    norm: tuple | None = None  # (mean, std) when the card gives its own
    # Recognised in a config.json under another name by its architecture and these model_args
    # (an absent argument reads as 0); no arch: never recognised (its config names a plain timm
    # model, or holds nothing the build needs beyond it).
    arch: str = ""
    signature: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)  # pretrained_cfg entries the card sets

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
        arch="vit_giant_patch14_224",
        signature={"reg_tokens": 8, "no_embed_class": True},
    ),
    "virchow": Known(
        "paige-ai/Virchow",
        {"layers": "swiglu-silu"},
        pool="token+avg",
        norm=IMAGENET,
        arch="vit_huge_patch14_224",
        signature={"mlp_ratio": 5.3375, "reg_tokens": 0},
    ),
    "virchow2": Known(
        "paige-ai/Virchow2",
        {"layers": "swiglu-silu"},
        pool="token+avg",  # class token + mean of the patch tokens (registers left out): 2560
        norm=IMAGENET,
        arch="vit_huge_patch14_224",
        signature={"mlp_ratio": 5.3375, "reg_tokens": 4},
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
        arch="vit_giant_patch14_dinov2",
        signature={"patch_size": 16, "depth": 40, "embed_dim": 1536},
        # the card: Resize(256, bicubic), CenterCrop(224); its config.json says crop_pct 1.0
        preprocess={"interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"},
    ),
}
_BY_REPO = {k.repo.lower(): name for name, k in KNOWN.items()}


# ----------------------------------------------------------------------------- names
def parse(name: str) -> tuple[str | None, str]:
    """(source, id) of a model name, read as timm's `parse_model_name` reads it: `hf-hub:ID`,
    `hf_hub:ID` (timm's older spelling) and `local-dir:PATH`, the prefix in any case; (None,
    name) for a timm registry name or a short name of KNOWN. A bare `ORG/NAME` or path, an
    unknown prefix or an empty id raise ModelChoiceError (timm would raise ValueError)."""
    prefix, sep, ident = name.partition(":")
    if not sep or not _PREFIX.fullmatch(prefix):
        if any(c in name for c in "/\\:"):
            raise ModelChoiceError(
                f"--model {name}: a hub id or a folder needs its prefix: hf-hub:{name} (the "
                f"Hugging Face hub) or local-dir:{name} (a folder)"
            )
        return None, name
    source = SOURCES.get(prefix.lower())
    if source is None or not ident:
        raise ModelChoiceError(
            f"--model {name}: "
            + (f"unknown source {prefix!r}" if source is None else f"nothing after {prefix}:")
            + "; write hf-hub:ORG/NAME[@REVISION] or local-dir:PATH"
        )
    return source, ident


def is_hub(name: str) -> bool:
    """True for hf-hub:/hf_hub:/local-dir: names (any case) and the short names of KNOWN."""
    return parse(name)[0] is not None or name.lower() in KNOWN


def resolve(name: str) -> str:
    """The timm name of a model in its canonical spelling: a short name of KNOWN (`uni`) ->
    `hf-hub:MahmoodLab/UNI`, `hf_hub:X` / `HF-HUB:X` -> `hf-hub:X`; any other name unchanged."""
    source, ident = parse(name)
    if source:
        return f"{source}:{ident}"
    k = KNOWN.get(name.lower())
    return f"hf-hub:{k.repo}" if k else name


def hub_id(name: str) -> tuple[str, str | None]:
    """(ORG/NAME, revision or None) of a hub model name (`hf-hub:ORG/NAME@REVISION`)."""
    repo, _, rev = resolve(name).split(":", 1)[1].partition("@")
    return repo, rev or None


def safe_name(model: str) -> str:
    """A run-folder name from any model name: `local-dir:/x/y` -> `local-dir_y`,
    `hf-hub:MahmoodLab/UNI` (or `hf_hub:...`) -> `hf-hub_MahmoodLab_UNI`, `a+b` -> `a_b`."""
    if is_hub(model) and model.lower() not in KNOWN:
        model = resolve(model)
    if model.startswith("local-dir:"):
        model = "local-dir:" + Path(model.split(":", 1)[1].rstrip("/\\")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"


# ----------------------------------------------------------------------------- families
def load_config(name: str) -> tuple[dict, str, dict]:
    """(pretrained_cfg, architecture, model_args) from a hub or local-dir model's config.json,
    parsed by timm (no weights read); hub refusals become HubError."""
    with hub_errors(name):
        from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

        source, ident = resolve(name).split(":", 1)
        if source == "local-dir":
            return load_model_config_from_path(ident)
        return load_model_config_from_hf(ident)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and math.isclose(a, b, rel_tol=1e-4)
    return a == b


def detect(arch: str, model_args: dict) -> str | None:
    """The KNOWN family whose architecture and model arguments a config.json holds, or None."""
    for key, k in KNOWN.items():
        args = k.signature.items()
        if k.arch and arch == k.arch and all(_same(model_args.get(a, 0), v) for a, v in args):
            return key
    return None


def family_key(name: str, family_name: str = "auto", config: tuple | None = None) -> str | None:
    """The KNOWN family a model is built as: `family_name` when given (`none`: no family), else
    by its short name or hub id, else recognised from its config.json (`config`: load_config's
    answer, read when not given)."""
    if family_name not in ("auto", "none", ""):
        if family_name.lower() not in KNOWN:
            raise ModelChoiceError(
                f"--family {family_name!r}: choose one of auto, none, {', '.join(KNOWN)}"
            )
        return family_name.lower()
    if family_name == "none" or not is_hub(name):
        return None
    if name.lower() in KNOWN:
        return name.lower()
    if resolve(name).startswith("hf-hub:") and hub_id(name)[0].lower() in _BY_REPO:
        return _BY_REPO[hub_id(name)[0].lower()]
    _, arch, args = config or load_config(name)
    return detect(arch, args)


# ----------------------------------------------------------------------------- building
def create(
    name: str, *, family_name: str = "auto", pretrained: bool, num_classes: int,
    drop_rate: float = 0.0,
) -> nn.Module:  # fmt: skip
    """The timm model `name` (hf-hub:/local-dir:/short name) built as its KNOWN family says,
    with `num_classes` outputs (0: pooled features, (B, D)). Refused before any weights are
    read (ModelChoiceError, one line naming --family): a model without one vector per image
    (config.json's global_pool "" and no family that pools), or local weights that do not fit.
    Hub refusals become HubError."""
    config = load_config(name)
    key = family_key(name, family_name, config)
    known = KNOWN[key] if key else None
    pool = known.pool if known else "model"
    if pool == "model" and config[2].get("global_pool") == "":
        who = f"--family {key} keeps timm's pooling" if key else "no known family is recognised"
        raise ModelChoiceError(
            f'{name}: its config.json sets global_pool "" (one feature per token, not one '
            f"vector per image) and {who}; name the family of a copy of a known model "
            "(--family virchow or virchow2: class token + mean of the patch tokens) or set "
            'model_args.global_pool to "token" or "avg" in config.json'
        )
    kwargs = dict(known.kwargs) if known else {}
    if "layers" in kwargs:
        kwargs.update(_LAYERS[kwargs.pop("layers")]())
    # Built headless (the checkpoints hold no classifier), then given a new head.
    kwargs.update(num_classes=0, drop_rate=drop_rate)
    if pool != "model":
        kwargs["global_pool"] = ""
    if pretrained and resolve(name).startswith("local-dir:"):
        check_fit(name, kwargs, key)
    with hub_errors(name):
        import timm

        try:
            model = timm.create_model(resolve(name), pretrained=pretrained, **kwargs)
        except RuntimeError as e:  # a hub model's weights, read: the same line as check_fit
            if "Error(s) in loading state_dict" not in str(e):
                raise
            detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), "")
            raise ModelChoiceError(_unfit(name, key, detail[:300])) from None
    if pool == "model" and num_classes:
        model.reset_classifier(num_classes)
    if known:
        norm = {"mean": known.norm[0], "std": known.norm[1]} if known.norm else {}
        model.pretrained_cfg = {**model.pretrained_cfg, **known.preprocess, **norm}
    if pool == "token+avg":
        model = ClsMeanPool(model, num_classes, drop_rate)
    return model


def _unfit(name: str, key: str | None, detail: str) -> str:
    built = f"as --family {key}" if key else "from its config.json alone"
    return (
        f"{name}: its weights do not fit the model built {built}: {detail}; name the family "
        f"of a copy of a known model: --family {'|'.join(KNOWN)}"
    )


# timm's first choices of weights file in a folder (timm.models._hub.load_state_dict_from_path)
_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a weights file, without reading their data: the
    safetensors header, or a torch zip file memory-mapped."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            names = f.keys()
            return {k: tuple(f.get_slice(k).get_shape()) for k in names}
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    for key in ("state_dict", "model"):
        sd = sd[key] if isinstance(sd.get(key), dict) else sd
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def check_fit(name: str, kwargs: dict, key: str | None) -> None:
    """Refuse (ModelChoiceError naming --family) a local-dir: folder whose weights file holds
    tensors of other names or shapes than the model `kwargs` build from its config.json. The
    model is built on the meta device and only the file's header or index is read, so a
    mismatch costs no load. Files in another key layout (which timm's checkpoint filter
    converts) and files timm would not pick first are left to timm."""
    import timm

    folder = Path(resolve(name).split(":", 1)[1])
    path = next((folder / f for f in _WEIGHTS_FILES if (folder / f).is_file()), None)
    try:
        file = _tensor_shapes(path) if path else {}
    except Exception:  # noqa: BLE001 - unreadable here: timm's own loader says why
        return
    with torch.device("meta"):
        model = timm.create_model(resolve(name), pretrained=False, **kwargs)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not file or len(own.keys() & file.keys()) < len(file) / 2:
        return
    head = str(model.pretrained_cfg.get("classifier") or "head")
    differ = [
        f"{k}: {list(file[k])} in {path.name}, {list(own[k])} built"
        for k in sorted(own.keys() & file.keys())
        if own[k] != file[k] and k != "pos_embed"  # timm resamples a position embedding
    ]
    differ += [f"{k} only in {path.name}" for k in sorted(file.keys() - own.keys())
               if not k.startswith(head)]  # fmt: skip
    differ += [f"{k} not in {path.name}" for k in sorted(own.keys() - file.keys())]
    if differ:
        raise ModelChoiceError(_unfit(name, key, f"{differ[0]}, {len(differ)} tensors differ"))


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

    local = resolve(name).startswith("local-dir:")
    repo, rev = hub_id(name) if not local else (name, None)
    page = f"https://huggingface.co/{repo}"
    revision = f" --revision {rev}" if rev else ""
    offline = (
        f"or download it once elsewhere (hf download {repo}{revision} --local-dir DIR) and pass "
        "--model local-dir:DIR"
    )
    if isinstance(exc, e.RevisionNotFoundError):
        return f"{name}: {repo} has no revision {rev!r}; see {page}/tree/main for its branches"
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
    if isinstance(exc, FileNotFoundError) and local:
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
    weights read), with the KNOWN family's mean/std; hub refusals become HubError."""
    config = load_config(name)
    cfg, _, args = config
    key = family_key(name, family_name, config)
    known = KNOWN[key] if key else None
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
