"""Tiny random-weight models of the pathology foundation-model families, saved as the hub
stores them (config.json + model.safetensors), in a folder or in a Hugging Face cache layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from histodist import hub

# Same constructor options as the families (histodist.hub.KNOWN), at 32 px with 2 blocks of
# width 32, so that a model builds and runs in milliseconds.
TINY_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
FAMILIES = {
    # family: (architecture, model_args written to config.json, mean, std)
    "uni": ("vit_large_patch16_224", {**TINY_ARGS, "init_values": 1e-5}, None, None),
    "virchow2": (
        "vit_huge_patch14_224",
        {
            **TINY_ARGS,
            "init_values": 1e-5,
            "mlp_ratio": 5.3375,
            "reg_tokens": 4,
            "global_pool": "",
            "dynamic_img_size": True,
        },
        None,
        None,
    ),  # fmt: skip
    "virchow": (
        "vit_huge_patch14_224",
        {
            **TINY_ARGS,
            "init_values": 1e-5,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
        },
        None,
        None,
    ),  # fmt: skip
    "prov-gigapath": ("vit_giant_patch14_dinov2", {**TINY_ARGS, "init_values": 1e-5}, None, None),
    "h-optimus-0": (
        "vit_giant_patch14_reg4_dinov2",
        {**TINY_ARGS, "init_values": 1e-5, "num_classes": 0},
        (0.707223, 0.578729, 0.703617),
        (0.211883, 0.230117, 0.177517),
    ),  # fmt: skip
}


def save_hub_folder(out: Path, family: str, *, seed: int = 0) -> Path:
    """A hub-style folder of a tiny random-weight model of `family`: config.json (architecture,
    model_args, pretrained_cfg with input size and mean/std) and model.safetensors."""
    arch, args, mean, std = FAMILIES[family]
    kwargs = dict(hub.KNOWN[family].kwargs)
    if "layers" in kwargs:
        kwargs.update(hub._LAYERS[kwargs.pop("layers")]())
    kwargs.update({k: v for k, v in args.items()})
    kwargs.setdefault("num_classes", 0)
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))  # fmt: skip
    pcfg = {
        "input_size": [3, args["img_size"], args["img_size"]],
        "mean": list(mean or hub.IMAGENET[0]),
        "std": list(std or hub.IMAGENET[1]),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "num_classes": 0,
    }
    config = {"architecture": arch, "num_classes": 0, "num_features": args["embed_dim"],
              "model_args": args, "pretrained_cfg": pcfg}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def hf_cache(
    cache: Path, repo: str, folder: Path, revision: str = "0" * 40, ref: str | None = "main"
) -> Path:
    """Lay `folder` out as the Hugging Face cache holds `repo` (HF_HUB_CACHE=cache):
    snapshots/<revision>/<files>, and refs/<ref> naming it (ref None: no ref, a snapshot
    reachable only by its commit, as `@REVISION` fetches one)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        shutil.copy(f, snap / f.name)
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(revision)
    return root
