"""Foundation models named as users write them: every model-name spelling timm accepts, the
family of a copy recognised from its config.json (or refused before its weights load), one
vector per image, the model's own preprocessing (checked against timm's transform on real PCam
patches) and the hub revision a name pins. Tiny random-weight models (hubkit), no download."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hubkit import hf_cache, save_hub_folder
from PIL import Image
from safetensors.torch import load_file

from histodist import embed, hub
from histodist.config import ModelConfig
from histodist.errors import HistodistError
from histodist.inference import backbone
from histodist.models import FeatureError, build_model, check_model_name, features

# config.json as published (architecture, model_args) by paige-ai/Virchow, paige-ai/Virchow2
# and prov-gigapath/prov-gigapath; a plain ViT-H/14 and ViT-L/16 beside them.
PUBLISHED = {
    "virchow": ("vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "num_classes": 0,
                "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True}),
    "virchow2": ("vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "num_classes": 0,
                 "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
                 "dynamic_img_size": True}),
    "prov-gigapath": ("vit_giant_patch14_dinov2", {"img_size": 224, "in_chans": 3,
                      "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                      "init_values": 1e-05, "mlp_ratio": 5.33334, "num_classes": 0}),
    None: ("vit_huge_patch14_224", {"img_size": 224, "num_classes": 0}),
}  # fmt: skip


def _copy_without(src: Path, dst: Path, arg: str) -> Path:
    """A copy of a hub folder whose config.json lacks model_args[arg] (same weights)."""
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    del cfg["model_args"][arg]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _same_weights(model: torch.nn.Module, folder: Path) -> bool:
    own = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}
    saved = load_file(str(folder / "model.safetensors"))
    return bool(saved) and all(torch.equal(own[k], v) for k, v in saved.items())


# ----------------------------------------------------------------------------- names
SPELLINGS = [
    "hf-hub:paige-ai/Virchow2", "hf_hub:paige-ai/Virchow2", "HF-HUB:paige-ai/Virchow2",
    "Hf_Hub:timm/vit_small_patch16_224.augreg_in21k@main", "local-dir:/models/uni",
    "LOCAL-DIR:models/uni", "local-dir:C:\\models\\uni", "resnet18", "resnet18.a1_in1k", "uni",
    # refused by timm and by histodist:
    "timm/resnet18.a1_in1k", "paige-ai/Virchow2", "hf:paige-ai/Virchow2", "hub:org/name",
    "hf-hub:", "local-dir:", "models/uni", "C:\\models\\uni",
]  # fmt: skip


@pytest.mark.parametrize("name", SPELLINGS)
def test_model_names_are_read_as_timm_reads_them(name):
    from timm.models import parse_model_name

    try:
        expect = parse_model_name(name)
    except ValueError:
        with pytest.raises(hub.ModelChoiceError) as e:
            hub.parse(name)
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
        assert "hf-hub:" in str(e.value) and "local-dir:" in str(e.value)  # names the fix
        with pytest.raises(hub.ModelChoiceError):
            check_model_name(name)  # what train checks first
        return
    assert hub.parse(name) == (expect[0], expect[1] if expect[0] else name)
    if expect[0]:
        assert hub.is_hub(name) and hub.resolve(name) == f"{expect[0]}:{expect[1]}"


def test_hf_hub_spellings_build_the_known_family(cache, folders):
    """`hf_hub:` (the Prov-GigaPath card's spelling) and any case of the prefix: the Virchow2
    family (SwiGLU MLP, class token + mean pooling) with its weights, not a random ViT."""
    for name in ("hf_hub:paige-ai/Virchow2", "HF-HUB:paige-ai/Virchow2"):
        model = build_model(ModelConfig(model=name), num_classes=0).eval()
        assert isinstance(model, hub.ClsMeanPool) and _same_weights(model, folders["virchow2"])
        assert features(model, torch.rand(2, 3, 32, 32)).shape == (2, 64)
        assert hub.safe_name(name) == "hf-hub_paige-ai_Virchow2"


# ----------------------------------------------------------------------------- families
@pytest.mark.parametrize("family", sorted(k for k in PUBLISHED if k))
def test_published_config_names_its_family(tmp_path, family):
    for key, (arch, args) in PUBLISHED.items():
        folder = tmp_path / str(key)
        folder.mkdir(exist_ok=True)
        cfg = {"architecture": arch, "model_args": args, "pretrained_cfg": {"num_classes": 0}}
        (folder / "config.json").write_text(json.dumps(cfg))
        found = hub.family_key(f"local-dir:{folder}")
        assert (found == family) == (key == family), (key, found)


@pytest.mark.parametrize("family", ["virchow", "virchow2"])
def test_local_copy_without_family_is_built_as_its_family(folders, family):
    """Before: the weights failed to load (size mismatch), or --no-pretrained built a plain
    MLP that output per-token features."""
    from timm.layers import GluMlp  # SwiGLUPacked is a GluMlp

    name = f"local-dir:{folders[family]}"
    model = build_model(ModelConfig(model=name), num_classes=0).eval()
    assert isinstance(model, hub.ClsMeanPool) and _same_weights(model, folders[family])
    assert features(model, torch.rand(2, 3, 32, 32)).shape == (2, 64)
    random = build_model(ModelConfig(model=name, pretrained=False), num_classes=2)
    assert isinstance(random.backbone.blocks[0].mlp, GluMlp)
    assert random(torch.rand(2, 3, 32, 32)).shape == (2, 2)


def test_weights_that_do_not_fit_are_refused_before_they_load(tmp_path, folders, monkeypatch):
    """A UNI copy whose config.json names a plain ViT-L/16 (no layer scale); a Virchow2 copy
    built from its config.json alone (plain MLP): one line naming --family, and the weights
    file is never loaded."""
    import timm.models._builder as builder

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the check")

    monkeypatch.setattr(builder, "load_pretrained", no_load)
    copies = {f: _copy_without(folders[f], tmp_path / f, arg)
              for f, arg in (("uni", "init_values"), ("virchow2", "global_pool"))}  # fmt: skip
    for fam, family, first in (("uni", "auto", "blocks.0.ls1.gamma only in model.safetensors"),
                               ("virchow2", "none", "mlp.fc2.weight: [32, 85] in model.safetensors, [32, 170] built")):  # fmt: skip
        with pytest.raises(HistodistError) as e:
            build_model(ModelConfig(model=f"local-dir:{copies[fam]}", family=family), num_classes=2)
        msg = str(e.value)
        assert (
            isinstance(e.value, hub.ModelChoiceError)
            and e.value.exit_code == 2
            and "\n" not in msg
            and first in msg
        )
        assert "--family uni|uni2-h|virchow|virchow2" in msg


def test_hub_weights_that_do_not_fit_fail_in_one_line(tmp_path, folders, monkeypatch):
    """The same line for a hub mirror, whose weights timm reads first (its own error before)."""
    import huggingface_hub.constants as c

    copy = _copy_without(folders["uni"], tmp_path / "uni", "init_values")
    hf_cache(tmp_path / "hf-cache", "lab/uni-mirror", copy)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(HistodistError) as e:
        build_model(ModelConfig(model="hf-hub:lab/uni-mirror"), num_classes=2)
    assert isinstance(e.value, hub.ModelChoiceError) and "\n" not in str(e.value)
    assert "ls1.gamma" in str(e.value) and "--family uni|" in str(e.value)


# ----------------------------------------------------------------------------- one vector per image
def test_a_model_that_does_not_pool_is_refused(tmp_path, tiny_pcam_shards, capsys):
    """A config.json with global_pool "" and no family that pools: build and embed refuse in
    one line (before: embed wrote (tokens)-d "embeddings" and recorded the token count)."""
    import timm

    folder = tmp_path / "tokens"
    cfg = {"architecture": "vit_tiny_patch16_224", "model_args": {"img_size": 32,
           "patch_size": 8, "global_pool": "", "num_classes": 0},
           "pretrained_cfg": {"input_size": [3, 32, 32], "num_classes": 0}}  # fmt: skip
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "emb"
    rc = embed.main(["--model", f"local-dir:{folder}", "--no-pretrained", "--shards",
                     str(tiny_pcam_shards), "--out", str(out), "--workers", "0"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not (out / "manifest.json").exists()
    assert len(err) == 1 and "global_pool" in err[0] and "--family" in err[0]
    with pytest.raises(HistodistError, match="global_pool"):
        build_model(ModelConfig(model=f"local-dir:{folder}", pretrained=False), num_classes=2)
    # features() checks any model: a timm ViT built without pooling gives (B, 1 + 16, 192).
    tokens = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                               global_pool="", num_classes=0)  # fmt: skip
    with pytest.raises(FeatureError, match=r"\(2, 17, 192\)"):
        features(tokens, torch.rand(2, 3, 32, 32), "vit_tiny")
    # ... and refuses 0-wide vectors (embed would record dimension 0 and write empty rows).
    with pytest.raises(FeatureError, match=r"0 wide \(\(2, 0\)\)"):
        features(torch.nn.Identity(), torch.rand(2, 0), "empty")


# ----------------------------------------------------------------------------- preprocessing
def _pcam(pcam_jpeg: Path, n: int) -> list[Image.Image]:
    paths = sorted((pcam_jpeg / "valid").glob("*/*.jpg"))
    return [Image.open(p).convert("RGB") for p in paths[:: len(paths) // n][:n]]


@pytest.mark.parametrize("crop", [None, (0, 0, 96, 60), (10, 0, 60, 96)])
def test_pretrained_transform_matches_timm_on_real_patches(pcam_jpeg, crop):
    """augment.pretrained_transform on uint8 batches against timm's own eval transform of the
    same PIL images (create_transform, as the model cards run it), at the models' sizes:
    Prov-GigaPath's card (bicubic, 256 -> centre 224), Virchow2's config (bicubic 224), UNI's
    config (bilinear 224), a downscale with squash. Within 1.2/255 per pixel: the reference's
    own 8-bit rounding; a single 2-D resize, no crop or bilinear for bicubic miss it by far."""
    from timm.data import create_transform

    from histodist.augment import pretrained_transform

    images = [im.crop(crop) if crop else im for im in _pcam(pcam_jpeg, 8)]
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    mean, std = hub.IMAGENET
    for size, interp, pct, mode in ((224, "bicubic", 0.875, "center"),
                                    (224, "bicubic", 1.0, "center"),
                                    (224, "bilinear", 1.0, "center"),
                                    (40, "bicubic", 0.9, "squash")):  # fmt: skip
        cfg = {"interpolation": interp, "crop_pct": pct, "crop_mode": mode}
        ref = create_transform(input_size=(3, size, size), mean=mean, std=std, **cfg)
        want = torch.stack([ref(im) for im in images])
        got = pretrained_transform(input_size=size, mean=mean, std=std, **cfg)(x)
        err = (got - want).abs() * torch.tensor(std).view(1, 3, 1, 1) * 255  # in 8-bit steps
        assert got.shape == want.shape and err.max() < 1.2 and err.mean() < 0.4, (cfg, err.max())


def _members(folder: Path, pattern: str, ext: tuple[str, ...]) -> dict[str, bytes]:
    out = {}
    for path in sorted(folder.glob(pattern)):
        with tarfile.open(path) as t:
            for m in t:
                key, _, e = m.name.partition(".")
                if e in ext:
                    out[key] = t.extractfile(m).read()
    return out


def test_embed_preprocesses_as_the_model_card_does(tmp_path, folders, tiny_pcam_shards):
    """embed's vectors of real PCam patches against the model run on timm's own transform of
    the same JPEGs decoded by PIL: Virchow2's bicubic from its config, --crop-pct from the flag
    (before: bilinear, never a crop; 30x further from the reference than float16 rounding)."""
    from timm.data import create_transform, resolve_data_config

    from histodist.data.embeddings import MEMBER, decode_vector

    name, out = f"local-dir:{folders['virchow2']}", tmp_path / "emb"
    args = ["--model", name, "--family", "virchow2", "--shards", str(tiny_pcam_shards),
            "--out", str(out), "--split", "valid", "--workers", "0", "--crop-pct", "0.875"]  # fmt: skip
    assert embed.main(args) == 0
    pre = json.loads((out / "manifest.json").read_text())["embedding"]["preprocessing"]
    assert (pre["interpolation"], pre["crop_pct"], pre["input_size"]) == ("bicubic", 0.875, 32)
    vecs = {k: decode_vector(v).float() for k, v in _members(out, "*.tar", (MEMBER,)).items()}
    jpegs = _members(tiny_pcam_shards, "valid-*.tar", ("jpg", "jpeg"))
    assert len(vecs) == len(jpegs) == 40
    model = build_model(ModelConfig(model=name, family="virchow2"), num_classes=0).eval()
    ref = create_transform(**resolve_data_config({"crop_pct": 0.875}, model=model))
    keys = sorted(jpegs)
    with torch.no_grad():
        want = features(model, torch.stack([ref(Image.open(io.BytesIO(jpegs[k]))) for k in keys]))
    got = torch.stack([vecs[k] for k in keys])
    assert ((got - want).abs().max() / want.abs().max()) < 5e-3


def test_known_preprocessing_comes_from_the_card_or_config(tmp_path, folders):
    """Prov-GigaPath's card resizes to 256 and centre-crops 224 (its config.json says crop 1.0);
    Virchow2's config.json says bicubic; flags override either."""
    import argparse

    gp = save_hub_folder(tmp_path / "gp", "prov-gigapath")
    flags = argparse.Namespace(image_size=0, interpolation=None, crop_pct=None, crop_mode=None)
    for name, fam, want in ((f"local-dir:{gp}", "prov-gigapath", ("bicubic", 0.875)),
                            (f"local-dir:{folders['virchow2']}", "auto", ("bicubic", 1.0))):  # fmt: skip
        model = build_model(ModelConfig(model=name, family=fam), num_classes=0)
        pre = backbone.preprocessing(model, flags)
        assert (pre["interpolation"], pre["crop_pct"], pre["crop_mode"]) == (*want, "center")
        over = argparse.Namespace(image_size=48, interpolation="bilinear", crop_pct=0.9,
                                  crop_mode="squash")  # fmt: skip
        pre = backbone.preprocessing(model, over)
        assert [pre[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode")] == [
            48, "bilinear", 0.9, "squash"]  # fmt: skip


# ----------------------------------------------------------------------------- revision
def test_embed_records_the_revision_the_name_pins(tmp_path, folders, monkeypatch):
    """`hf-hub:ORG/NAME@REV`: weights and the recorded revision are REV's, not main's."""
    import huggingface_hub.constants as c

    root, main, pinned = tmp_path / "hf-cache", "a" * 40, "b" * 40
    other = save_hub_folder(tmp_path / "v2-other", "virchow2", seed=1)
    hf_cache(root, "paige-ai/Virchow2", folders["virchow2"], revision=main)
    hf_cache(root, "paige-ai/Virchow2", other, revision=pinned, ref=None)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    assert backbone.source_info("hf-hub:paige-ai/Virchow2")["revision"] == main
    args = embed.build_parser().parse_args(
        ["--model", f"hf-hub:paige-ai/Virchow2@{pinned}", "--shards", "S", "--out", "O"]
    )
    model = backbone.load_backbone(args)
    assert _same_weights(model, other)
    ident = backbone.describe(model, args)
    assert ident["revision"] == pinned and ident["requested_revision"] == pinned
    assert ident["repo"] == "paige-ai/Virchow2" and ident["family"] == "virchow2"
