"""Foundation models: hub / local-folder loading, the known families, adaptation modes, and
embeddings once with heads on them. Tiny random-weight models of the same families (hubkit),
no download; the pipeline runs on real PCam patches."""

from __future__ import annotations

import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hubkit import FAMILIES
from safetensors.torch import load_file
from trainkit import free_port, run, tiny_shards, train_cmd

from histodist import hub
from histodist.config import ConfigError, ModelConfig, from_dict
from histodist.models import adapt, build_model, features
from histodist.training.optim import param_groups

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_known_family_loads_its_weights_from_a_local_dir(folders, family):
    name = f"local-dir:{folders[family]}"
    model = build_model(ModelConfig(model=name, family=family), num_classes=2).eval()
    saved = load_file(str(folders[family] / "model.safetensors"))
    own = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}
    assert saved and all(torch.equal(own[k], v) for k, v in saved.items())
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 2)
    cfg = hub.input_config(name, family)
    assert cfg["input_size"] == 32
    assert cfg["mean"] == tuple(hub.KNOWN[family].norm[0])


def test_hf_hub_name_and_short_name_load_from_the_offline_cache(cache, folders):
    for name in ("hf-hub:paige-ai/Virchow2", "virchow2"):
        model = build_model(ModelConfig(model=name), num_classes=0).eval()
        assert isinstance(model, hub.ClsMeanPool)
    x = torch.rand(3, 3, 32, 32)
    tokens = model.backbone.forward_features(x)  # (B, 1 class + 4 registers + 16 patches, 32)
    assert tokens.shape[1] == 1 + 4 + 16
    expect = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1)
    assert torch.allclose(features(model, x), expect)
    assert features(model, x).shape == (3, 64)


def test_hub_refusals_name_the_fix():
    import httpx
    from huggingface_hub.errors import GatedRepoError

    response = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/x"))
    msg = hub.explain("hf-hub:MahmoodLab/UNI", GatedRepoError("403", response=response))
    assert "hf auth login" in msg and "accept the terms" in msg
    assert "https://huggingface.co/MahmoodLab/UNI" in msg and "local-dir:" in msg


@pytest.mark.slow
def test_offline_without_the_model_each_cli_fails_naming_the_routes(tmp_path, pcam_jpeg):
    shards = tiny_shards(tmp_path / "shards", pcam_jpeg, train_per_class=4, valid_per_class=4)
    empty = str(tmp_path / "empty")
    train = train_cmd("--model", "hf-hub:MahmoodLab/UNI", "--shards", str(shards),
                      "--runs-dir", str(tmp_path / "runs"))  # fmt: skip
    embed = [sys.executable, "-m", "histodist.embed", "--model", "uni", "--shards", str(shards),
             "--out", str(tmp_path / "emb")]  # fmt: skip
    for cmd in (train, embed):
        r = run(cmd, HF_HUB_CACHE=empty)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert "MahmoodLab/UNI" in last and "hf auth login" in last and "local-dir:" in last
    assert not (tmp_path / "emb" / "manifest.json").exists() and not (tmp_path / "runs").exists()


def test_safe_run_names():
    assert hub.safe_name("local-dir:/x/y/") == "local-dir_y"
    assert hub.safe_name("hf-hub:MahmoodLab/UNI2-h") == "hf-hub_MahmoodLab_UNI2-h"
    assert hub.safe_name("xception41+nasnetalarge") == "xception41_nasnetalarge"
    assert hub.safe_name("resnet18") == "resnet18"


def test_finetune_modes(folders):
    name = f"local-dir:{folders['virchow2']}"

    def trainable(**kw) -> set[str]:
        cfg = ModelConfig(model=name, family="virchow2", **kw)
        model = build_model(cfg, num_classes=2)
        adapt(model, cfg)
        return {n for n, p in model.named_parameters() if p.requires_grad}, model

    names, _ = trainable(finetune="linear")
    assert names == {"head.weight", "head.bias"}
    names, _ = trainable(finetune="last-k", unfreeze_blocks=1)
    assert any(n.startswith("backbone.blocks.1.") for n in names)
    assert not any(n.startswith("backbone.blocks.0.") for n in names)
    assert {"backbone.norm.weight", "head.weight"} <= names
    names, model = trainable(grad_checkpointing=True)
    assert model.backbone.grad_checkpointing and "backbone.cls_token" in names
    # Layer-wise lr decay reaches the wrapped backbone: stem, 2 blocks, then norm + head.
    groups = param_groups(model, from_dict({"optim": {"layer_decay": 0.5}}).optim)
    assert sorted({round(g["lr"] / 1e-3, 6) for g in groups}) == [0.125, 0.25, 0.5, 1.0]
    with pytest.raises(ConfigError, match="unfreeze-blocks"):
        ModelConfig(model=name, finetune="last-k")
    with pytest.raises(ConfigError, match="freeze-epochs"):
        ModelConfig(model=name, finetune="linear", freeze_epochs=1)
    with pytest.raises(ConfigError, match="only 2 blocks"):
        trainable(finetune="last-k", unfreeze_blocks=3)


def _keys(folder: Path) -> Counter:
    keys: Counter = Counter()
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys.update(m.name.split(".", 1)[0] for m in t if m.name.endswith(".emb.npy"))
    return keys


@pytest.mark.slow
def test_finetune_embed_and_train_a_head_on_real_patches(tmp_path, pcam_jpeg, folders):
    """Fine-tune a local-dir model a few steps (PCam 96 px resized to its 32 px on the device),
    embed the patches once, train a linear head to completion, evaluate and export it."""
    shards = tiny_shards(tmp_path / "shards", pcam_jpeg)
    model = f"local-dir:{folders['virchow2']}"
    common = ["--runs-dir", str(tmp_path / "runs"), "--wandb", "disabled", "--workers", "0",
              "--batch-size", "16", "--no-progress", "--epochs", "1"]  # fmt: skip
    r = run(train_cmd("--shards", str(shards), "--model", model, "--family", "virchow2",
                      "--finetune", "last-k", "--unfreeze-blocks", "1", *common))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads(
        (tmp_path / "runs/pcam-local-dir_virchow2/checkpoints/last/meta.json").read_text()
    )
    assert meta["image_size"] == 32 and meta["mean"] == list(hub.IMAGENET[0])

    emb = tmp_path / "emb"
    cmd = [sys.executable, "-m", "histodist.embed", "--model", model, "--family", "virchow2",
           "--shards", str(shards), "--out", str(emb), "--workers", "0"]  # fmt: skip
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((emb / "manifest.json").read_text())
    assert m["kind"] == "embeddings" and m["embedding"]["dim"] == 64
    assert m["splits"]["train"]["num_samples"] == 64 and sum(_keys(emb).values()) == 104
    # Resumable: complete shards are kept; one split again leaves the manifest listing both.
    again = run([*cmd, "--split", "valid"])
    assert "embedded 0 samples" in again.stdout and "40 reused" in again.stdout
    assert set(json.loads((emb / "manifest.json").read_text())["splits"]) == {"train", "valid"}

    r = run(train_cmd("--shards", str(emb), "--model", "linear", *common[:-1], "3"))
    assert r.returncode == 0, r.stderr[-2000:]
    head = tmp_path / "runs" / "pcam-linear"
    assert json.loads((head / "manifest.json").read_text())["embedding"]["weights_sha256"]
    r = run([sys.executable, "-m", "histodist.evaluate", "--run", str(head), "--bootstrap", "10",
             "--wandb", "disabled", "--no-progress", "--knn", "5"])  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((head / "eval-valid" / "metrics.json").read_text())
    assert res["num_predictions"] == 40 and 0 <= res["knn"]["auc"] <= 1
    r = run([sys.executable, "-m", "histodist.evaluate", "--run", str(head),
             "--shards", str(shards)])  # fmt: skip
    assert r.returncode == 2 and "embed them first" in r.stderr  # a usage error
    csv = tmp_path / "pred.csv"
    r = run([sys.executable, "-m", "histodist.predict", "--run", str(head), "--input", str(emb),
             "--split", "valid", "--out", str(csv), "--workers", "0"])  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(csv.read_text().splitlines()) == 41
    r = run([sys.executable, "-m", "histodist.export", "--run", str(head), "--format",
             "safetensors"])  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    exported = json.loads((head / "export" / "model.safetensors.json").read_text())
    assert (
        exported["input"]["shape"] == ["batch", 64, 1, 1] and "virchow2" in exported["preprocess"]
    )


@pytest.mark.slow
def test_two_process_embedding_writes_each_sample_once(tmp_path, pcam_jpeg):
    shards = tiny_shards(tmp_path / "shards", pcam_jpeg)
    emb = tmp_path / "emb"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "histodist.embed",
        "--model", "vit_tiny_patch16_224", "--image-size", "32", "--shards", str(shards),
        "--out", str(emb), "--workers", "0",
    ]  # fmt: skip
    r = run(cmd, ACCELERATE_USE_CPU="true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0: embedded" in r.stdout and "rank 1: embedded" in r.stdout
    keys = _keys(emb)
    src = Counter()
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            src.update(m.name.split(".", 1)[0] for m in t if m.name.endswith(".cls"))
    assert keys == src and set(keys.values()) == {1}


def test_embedding_runs_refuse_other_inputs():
    from histodist.data.embeddings import EmbeddingError, check_compatible, config_overrides

    emb = {"model": "uni", "weights_sha256": "a", "preprocessing": {"input_size": 224}, "dim": 8}
    run_m, shards_m = {"embedding": emb}, {"embedding": dict(emb)}
    check_compatible(run_m, shards_m, "E")
    check_compatible({}, {}, "S")
    with pytest.raises(EmbeddingError, match="histodist.embed --model uni"):
        check_compatible(run_m, {}, "S")
    with pytest.raises(EmbeddingError, match="trained on images"):
        check_compatible({}, shards_m, "E")
    with pytest.raises(EmbeddingError, match="weights_sha256"):
        check_compatible(run_m, {"embedding": {**emb, "weights_sha256": "b"}}, "E")
    cfg = from_dict({"model": {"model": "resnet18"}})
    with pytest.raises(EmbeddingError, match="--model linear"):
        config_overrides(cfg, {"embedding": emb}, "E")
    fixed = config_overrides(from_dict({"model": {"model": "mlp"}}), {"embedding": emb}, "E")
    assert fixed["model"]["embed_dim"] == 8 and fixed["augment"]["augment"] == "none"


def test_embedding_vectors_round_trip():
    import numpy as np

    from histodist.data.embeddings import MEMBER, decode, encode

    vec = np.random.default_rng(0).standard_normal(37).astype(np.float32)
    raw = {MEMBER: encode(vec), "cls": b"1", "json": b'{"group": "p1"}', "__key__": "k"}
    out = decode(raw)
    assert out["image"].dtype == torch.float16 and out["image"].shape == (37, 1, 1)
    assert torch.equal(out["image"].flatten(), torch.from_numpy(vec.astype(np.float16)))
    assert (out["label"], out["group"]) == (1, "p1")


def test_knn_probe_matches_sklearn():
    import numpy as np
    from sklearn.neighbors import KNeighborsClassifier

    from histodist.inference.knn import TEMPERATURE, knn_probs

    gen = torch.Generator().manual_seed(0)
    tx, ty = torch.randn(200, 16, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    x = torch.randn(50, 16, generator=gen)
    ours = knn_probs(tx, ty, x, k=7, num_classes=3, chunk=16)
    ref = KNeighborsClassifier(n_neighbors=7, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / TEMPERATURE))  # fmt: skip
    ref.fit(tx.numpy(), ty.numpy())
    assert np.allclose(ours.numpy(), ref.predict_proba(x.numpy()), atol=1e-4)
