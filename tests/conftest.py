"""Test configuration: CPU only, offline, small thread counts, real data by relative path
(../shared/data beside the checkout, else the samples in examples/: tests/datakit.py)."""

import os
from pathlib import Path

import pytest
from datakit import ROOT, SHARED_DATA, real_data  # noqa: F401  (tests import them from here)

# Offline before anything imports huggingface_hub or wandb: a pretrained=True call would
# otherwise hang about a minute before failing, and wandb must never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_report_header(config) -> str:
    """Say which real images this run uses: the full copy or the bundled samples."""
    try:
        return f"real data: {real_data('pcam-jpeg', 'pcam-mini')}"
    except pytest.skip.Exception as e:
        return str(e.msg)


@pytest.fixture(autouse=True)
def _wandb_dir(tmp_path, monkeypatch):
    """Every test writes wandb's offline runs into its own temporary folder."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state: the first Accelerator of a test process fixes
    its mixed precision for every later one. Reset it after each test that made one, so that
    an in-process run at bf16 can follow one at fp32 in any order."""
    yield
    import sys

    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(scope="session")
def pcam_jpeg() -> Path:
    """Real 96x96 PCam JPEGs as train|valid/0|1/*.jpg: ../shared/data/pcam-jpeg (23,000),
    else examples/pcam-mini (the first 400 train and 100 valid of each class of it)."""
    return real_data("pcam-jpeg", "pcam-mini")


@pytest.fixture(scope="session")
def kaggle_mini() -> Path:
    """15 real Kaggle HCD tifs as train/<id>.tif + train_labels.csv (the same files either way)."""
    return real_data("kaggle-hcd-mini", "kaggle-hcd-mini")


@pytest.fixture(scope="session")
def tiny_pcam_shards(tmp_path_factory, pcam_jpeg) -> Path:
    """trainkit.tiny_shards (64 train, 40 valid real PCam patches), written once per pytest run
    for every module that trains on it; no test writes into it."""
    from trainkit import tiny_shards

    return tiny_shards(tmp_path_factory.mktemp("tiny-pcam") / "shards", pcam_jpeg)


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Local copies (config.json + weights) of tiny models of every known family (hubkit)."""
    from hubkit import FAMILIES, save_hub_folder

    base = tmp_path_factory.mktemp("hub")
    return {fam: save_hub_folder(base / fam, fam) for fam in FAMILIES}


@pytest.fixture
def cache(tmp_path, folders, monkeypatch) -> Path:
    """An offline Hugging Face cache holding the tiny Virchow2 as paige-ai/Virchow2."""
    import huggingface_hub.constants as c
    from hubkit import hf_cache

    root = tmp_path / "hf-cache"
    hf_cache(root, "paige-ai/Virchow2", folders["virchow2"])
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    return root
