"""The frozen feature extractor of `histodist.embed`: built, described, and built again.

    bb = Backbone.build(BuildArgs(model="uni", pretrained=None, family="auto"))
    bb.identity      # model, source, hub revision, weights sha256, preprocessing, dim
    bb = Backbone.rebuild(run.manifest["embedding"], where="runs/c16-abmil")

`build` makes the backbone an embedding set is written with; its identity and the options it
was built with (`build_record`) go into the set's manifest (`embedding` block). `rebuild` makes
the same backbone again from that block, for inference on slides with a head trained on the
set (`predict --slides`, `explain --slide`): it builds it from the recorded options and
checks that the weights' sha256 is the recorded one, so a head never scores vectors of other
weights; anything that cannot be rebuilt is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from histodist import hub
from histodist.data.embeddings import EmbeddingError
from histodist.errors import HistodistError
from histodist.models import features

# The identity keys of an embedding block (what makes two sets' vectors comparable).
IDENTITY = ("model", "source", "repo", "revision", "requested_revision", "path", "name",
            "family", "weights_sha256", "preprocessing", "dim")  # fmt: skip


@dataclass(frozen=True)
class BuildArgs:
    """How a backbone is built (histodist.embed's flags of the same names)."""

    model: str
    pretrained: bool | None = None
    family: str = "auto"
    weights: str | None = None
    seed: int = 0  # random initialisation of a model without pretrained weights
    image_size: int = 0  # 0: the model's
    interpolation: str | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None


def load_backbone(args) -> torch.nn.Module:
    """The frozen feature extractor (num_classes=0), eval mode, on the CPU; same weights on
    every rank (random init is seeded)."""
    from histodist.config import ModelConfig
    from histodist.models import build_model

    torch.manual_seed(args.seed)
    cfg = ModelConfig(model=args.model, pretrained=args.pretrained, family=args.family,
                      weights=args.weights)  # fmt: skip
    model = build_model(cfg, num_classes=0, image_size=args.image_size or None)
    return model.eval().requires_grad_(False)


def preprocessing(model: torch.nn.Module, args) -> dict:
    """The model's own eval preprocessing, as timm resolves it from its pretrained config
    (`resolve_data_config`: input size, interpolation, crop_pct, crop_mode, mean, std; KNOWN
    families add their model card's), each overridden by its flag when given. Keys as timm's
    data config, so `timm.data.create_transform(**p)` builds the same transform for PIL
    images; histodist.augment.pretrained_transform runs it on the device."""
    from timm.data import resolve_data_config

    size = args.image_size or None
    flags = {"input_size": (3, size, size) if size else None, "interpolation": args.interpolation,
             "crop_pct": args.crop_pct, "crop_mode": args.crop_mode}  # fmt: skip
    given = {k: v for k, v in flags.items() if v is not None}
    cfg = {**resolve_data_config(given, model=model), **given}  # checked by pretrained_transform
    return {"input_size": int(cfg["input_size"][-1]), "interpolation": cfg["interpolation"],
            "crop_pct": float(cfg["crop_pct"]), "crop_mode": cfg["crop_mode"],
            "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}  # fmt: skip


def source_info(name: str) -> dict:
    """Where the weights came from: hub id and revision (the commit of the snapshot used: the
    one `@REVISION` names, else main's), local folder, or a timm name."""
    name = hub.resolve(name)
    if name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        repo, rev = hub.hub_id(name)
        with hub.hub_errors(name):
            path = Path(hf_hub_download(repo, "config.json", revision=rev))
        pinned = {"requested_revision": rev} if rev else {}
        return {"source": "hf-hub", "repo": repo, "revision": path.parent.name, **pinned}
    if name.startswith("local-dir:"):
        return {"source": "local-dir", "path": str(Path(name.split(":", 1)[1]).resolve())}
    return {"source": "timm", "name": name}


def describe(model: torch.nn.Module, args) -> dict:
    """The identity of the embeddings: model name, source, weights sha256, preprocessing, dim."""
    pre = preprocessing(model, args)
    probe = torch.zeros(2, 3, pre["input_size"], pre["input_size"])
    with torch.no_grad():
        dim = int(features(model, probe, args.model).shape[1])  # one vector per image, or refused
    return {"model": args.model, **source_info(args.model),
            "family": hub.family_key(args.model, args.family) if hub.is_hub(args.model) else None,
            "weights_sha256": hub.weights_sha256(model), "preprocessing": pre, "dim": dim}  # fmt: skip


def build_record(args) -> dict:
    """The options a backbone was built with (the manifest's `embedding.build`), paths
    resolved, so that `Backbone.rebuild` makes it again from anywhere."""
    weights = str(Path(args.weights).resolve()) if args.weights else None
    return {"pretrained": args.pretrained, "family": args.family, "weights": weights,
            "seed": args.seed, "image_size": args.image_size}  # fmt: skip


@dataclass
class Backbone:
    """A frozen feature extractor (eval, CPU until moved) and the identity of its vectors."""

    model: torch.nn.Module
    identity: dict
    build_args: dict

    @classmethod
    def build(cls, args) -> Backbone:
        model = load_backbone(args)
        return cls(model, describe(model, args), build_record(args))

    def transform(self):
        """uint8 (B, 3, H, W) on any device -> float32 normalised model input (timm's eval
        transform of the model, histodist.augment.pretrained_transform)."""
        from histodist.augment import pretrained_transform

        return pretrained_transform(**self.identity["preprocessing"])

    @classmethod
    def rebuild(cls, emb: dict, where: str) -> Backbone:
        """The backbone of an embedding block (a run's or a set's manifest), its weights
        checked against the recorded sha256. Raises EmbeddingError (one line, exit 2) when it
        cannot be built or its weights differ."""
        model_name = emb.get("model")
        source = emb.get("source")
        if source not in ("hf-hub", "local-dir", "timm"):
            raise EmbeddingError(
                f"{where}: its embeddings are of {model_name!r}, a backbone histodist cannot "
                "build again; embed the slides with histodist.embed --slides and score the set"
            )
        if source == "local-dir":  # the folder as it was resolved when the set was written
            model_name = f"local-dir:{emb['path']}"
        pre = emb.get("preprocessing") or {}
        # sets written before the build options were recorded: the defaults, at the input size
        b = emb.get("build") or {"image_size": pre.get("input_size")}
        args = BuildArgs(model_name, b.get("pretrained"), b.get("family") or "auto",
                         b.get("weights"), int(b.get("seed") or 0), int(b.get("image_size") or 0))  # fmt: skip
        if args.weights and not Path(args.weights).exists():  # a file or a checkpoint folder
            raise EmbeddingError(f"{where}: the backbone's weights file {args.weights} is gone; "
                                 "restore it to score slides with this run")  # fmt: skip
        try:
            model = load_backbone(args)
        except (HistodistError, OSError, RuntimeError, ValueError) as e:
            raise EmbeddingError(f"{where}: cannot build its backbone {model_name}: {e}") from e
        sha = hub.weights_sha256(model)
        if sha != emb.get("weights_sha256"):
            raise EmbeddingError(
                f"{where}: the backbone {model_name} built here has other weights (sha256 "
                f"{sha[:12]}...) than the embeddings the head was trained on "
                f"({str(emb.get('weights_sha256'))[:12]}...); make those weights available "
                "(the same hub revision, folder or --weights file)"
            )
        identity = {k: emb[k] for k in IDENTITY if k in emb}
        identity["preprocessing"] = pre
        return cls(model, identity, build_record(args))
