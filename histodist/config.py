"""One configuration tree for training: dataclasses, dataset presets, YAML and CLI parsing.

Precedence: field defaults < dataset preset (`--dataset`) < training recipe (`--recipe`) <
`--config file.yaml` < CLI flags.
Every field is one flag (`batch_size` -> `--batch-size`) whose help text is the field's
`help` metadata, so `--help` documents every option. Unknown flags and YAML keys are errors.
Imports no torch, so `--help` is instant and the config can be read anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from histodist.errors import UsageError
from histodist.fileio import atomic_write


class ConfigError(UsageError, ValueError):
    """A bad option value, YAML key or preset; the message names the option and the fix."""


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:  # noqa: A002
    """A config field: its default, its `--help` text and optional allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _check_min(obj: Any, **minimum: float) -> None:
    """Each named integer field must be >= its minimum (rejects nonsense such as
    --log-every 0, which divided by zero, or --checkpoint-every -1, which saved every step)."""
    for name, low in minimum.items():
        if getattr(obj, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(obj, name)}: must be >= {low}")


def _check_finite(obj: Any) -> None:
    """Every float field must be a number: NaN passes every range check written as `x < low`
    (--warmup-epochs nan, --grad-clip nan) and inf is never a usable lr or factor."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_flag(f.name)} {value}: must be a finite number")


def _check_run_name(name: str | None) -> None:
    """A run name is one folder inside --runs-dir: `../x` or `/abs` would write elsewhere."""
    if name is None:
        return
    seps = {"/", os.sep, os.altsep} - {None}
    if name in ("", ".", "..") or any(c in name for c in seps) or "\0" in name:
        raise ConfigError(
            f"--run-name {name!r}: must be a folder name inside --runs-dir (no '/', no '..'); "
            "put the parent folder in --runs-dir"
        )


# Smallest --image-size: ResNets and most timm CNNs downsample 32x, so 32 px leaves one
# feature pixel; --image-size 7 ran to chance without an error.
MIN_IMAGE_SIZE = 32


def _check_choices(obj: Any) -> None:
    for f in fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and value not in choices:
            flag = "--" + f.name.replace("_", "-")
            raise ConfigError(f"{flag} {value!r}: choose one of {', '.join(map(str, choices))}")


def _usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a Slurm allocation)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class DataConfig:
    dataset: str = opt(
        "pcam",
        "dataset preset: sets shards, classes, input size, augmentation, metric",
        choices=("pcam", "kaggle-hcd", "idc", "breakhis", "ham10000", "folder"),
    )
    shards: str = opt("shards/pcam", "shard folder or URL base (holds manifest.json)")
    num_classes: int = opt(2, "number of classes; 0 = take it from the manifest")
    image_size: int = opt(96, "model input size in pixels (square); 0 = the manifest's image size")
    train_split: str = opt("train", "split to train on")
    valid_split: str = opt("valid", "split to validate on every epoch")
    workers: int = opt(
        min(4, _usable_cores()),
        "data-loading worker processes per rank (decode only); the default is min(4, the "
        "cores this process may use), as DataLoader warns about more workers than cores",
    )
    shuffle_buffer: int = opt(2000, "samples in the streaming shuffle buffer")
    resample: bool = opt(
        False,
        "draw training shards with replacement (seeded by epoch and rank) instead of exact "
        "epochs over each worker's share; only for sets of many more shards than workers",
    )
    skip_bad_shards: bool = opt(False, "skip unreadable shards instead of failing")
    verify_shards: bool = opt(
        False,
        "check each shard's sha256 (manifest) as it streams; a changed shard fails the run "
        "(or is skipped) at its end, after its samples were read; ~2%% of the decode time",
    )
    cache_dir: str | None = opt(None, "local cache folder for remote shards")
    class_balance: str = opt(
        "none",
        "class imbalance handling: class-weighted loss, or "
        "class-balanced resampling within each batch",
        choices=("none", "loss", "sampler"),
    )
    max_tiles: int = opt(
        0,
        "MIL heads: tiles drawn from each slide's bag per training step, seeded by seed, "
        "epoch and slide (0 = all); evaluation always uses every tile",
    )

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_choices(self)
        if self.num_classes < 0 or self.num_classes == 1:
            raise ConfigError(f"--num-classes {self.num_classes}: use 0 (from manifest) or >= 2")
        # 1 is set by histodist itself for embedding shards ((D, 1, 1) vectors); a user's
        # --image-size 1 is refused by resolve_namespace.
        if self.image_size < 0 or 1 < self.image_size < MIN_IMAGE_SIZE:
            _bad_image_size(self.image_size)
        _check_min(self, shuffle_buffer=0, max_tiles=0)
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers}: must be >= 0")


# Names of histodist.augment.PRESETS, listed here so that config imports without torch
# (tests/test_config.py keeps the two equal).
WANDB_MODES = ("auto", "online", "offline", "disabled")
AUGMENT_PRESETS = ("pcam", "idc", "breakhis", "ham10000", "dihedral", "none")


@dataclass
class AugmentConfig:
    augment: str = opt(
        "pcam",
        f"augmentation: a preset of histodist.augment.PRESETS ({', '.join(AUGMENT_PRESETS)}) "
        "or a .yaml file holding a list of {op: ...}",
    )
    normalize: str = opt(
        "manifest",
        "normalisation statistics: the shards' manifest mean/std or "
        "the model's pretraining mean/std",
        choices=("manifest", "model"),
    )
    crop: float = opt(
        1.0,
        "centre crop keeping this fraction of each side, before resizing to the input size, "
        "in training and in every evaluation (1.0 = none)",
    )

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_choices(self)
        if not 0.0 < self.crop <= 1.0:
            raise ConfigError(f"--crop {self.crop}: must be in (0, 1]")
        if self.augment not in AUGMENT_PRESETS and not self.augment.endswith(
            (".yaml", ".yml", ".json")
        ):
            raise ConfigError(
                f"--augment {self.augment!r}: use one of {', '.join(AUGMENT_PRESETS)} "
                "or a .yaml file"
            )


@dataclass
class ModelConfig:
    model: str = opt(
        "resnet18",
        "any timm model name, hf-hub:ORG/NAME, local-dir:PATH, a known pathology model "
        "(uni, virchow2, ...), an 'a+b' pair (xception41+nasnetalarge), resnet50-dense, "
        "resnet152-dense, small-cnn, linear / mlp (a head on embedding shards), or a MIL "
        "head on the slide bags of embedded slide tiles: abmil, clam-sb, transmil, mean, max",
    )
    pretrained: bool | None = opt(
        None,
        "start from pretrained weights (needs network or the HF cache); default: yes for "
        "hf-hub:/local-dir: and known pathology models, no for timm names",
    )
    family: str = opt(
        "auto",
        "known foundation-model family whose timm arguments and pooling to use (uni, uni2-h, "
        "virchow, virchow2, h-optimus-0, h-optimus-1, prov-gigapath); auto = by hub id or "
        "recognised from a copy's config.json, none = the config.json alone",
    )
    finetune: str = opt(
        "full",
        "what trains: every layer, the head alone on a frozen backbone (linear probe), or the "
        "head and the last --unfreeze-blocks blocks of a ViT",
        choices=("full", "linear", "last-k"),
    )
    unfreeze_blocks: int = opt(0, "blocks trained with --finetune last-k (counted from the top)")
    grad_checkpointing: bool = opt(
        False, "recompute activations in the backward pass (timm; less memory for large ViTs)"
    )
    embed_dim: int = opt(
        0, "input width of a linear/mlp head on embedding shards; 0 = the embedding manifest's"
    )
    mil_dim: int = opt(
        512, "MIL heads: width tiles are projected to (attention heads: attention width / 2)"
    )
    clam_k: int = opt(8, "clam-sb: most / least attended tiles pseudo-labelled per slide")
    clam_bag_weight: float = opt(
        0.7, "clam-sb: loss = w x slide loss + (1 - w) x instance clustering loss"
    )
    weights: str | None = opt(
        None,
        "local weights: timm/torchvision state dict, .safetensors, "
        "or a histodist checkpoint folder",
    )
    drop_rate: float = opt(0.0, "dropout before the classifier")
    freeze_epochs: int = opt(0, "train only the head for this many epochs, then unfreeze")
    channels_last: bool = opt(True, "channels_last memory format (faster convolutions on GPU)")
    compile: bool = opt(False, "torch.compile the model")

    def __post_init__(self) -> None:
        _check_finite(self)
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"--drop-rate {self.drop_rate}: must be in [0, 1)")
        if self.freeze_epochs < 0:
            raise ConfigError(f"--freeze-epochs {self.freeze_epochs}: must be >= 0")
        _check_min(self, mil_dim=1, clam_k=1)
        if not 0.0 <= self.clam_bag_weight <= 1.0:
            raise ConfigError(f"--clam-bag-weight {self.clam_bag_weight}: must be in [0, 1]")
        _check_choices(self)
        if self.finetune == "last-k" and self.unfreeze_blocks < 1:
            raise ConfigError("--finetune last-k: pass --unfreeze-blocks K (K >= 1)")
        if self.finetune != "full" and self.freeze_epochs:
            raise ConfigError(
                f"--freeze-epochs with --finetune {self.finetune}: the backbone stays frozen; "
                "drop one of the two"
            )


@dataclass
class OptimConfig:
    optimizer: str = opt("adamw", "optimizer", choices=("adamw", "sgd"))
    lr: float = opt(
        1e-3, "peak learning rate (of the head; the backbone gets lr x --backbone-lr-scale)"
    )
    weight_decay: float = opt(0.05, "weight decay (never applied to norms and biases)")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(True, "Nesterov momentum for SGD")
    backbone_lr_scale: float = opt(1.0, "learning-rate factor for the backbone (discriminative lr)")
    layer_decay: float = opt(1.0, "layer-wise lr decay for timm models (1.0 = off, e.g. 0.75)")
    schedule: str = opt(
        "cosine",
        "learning-rate schedule, stepped every optimizer step",
        choices=("cosine", "onecycle", "constant"),
    )
    warmup_epochs: float = opt(1.0, "linear warmup length for the cosine schedule, in epochs")
    min_lr_ratio: float = opt(0.01, "final lr as a fraction of the peak lr")
    batch_size: int = opt(128, "batch size per process")
    accum_steps: int = opt(1, "gradient accumulation steps per optimizer step")
    lr_scaling: str = opt(
        "none",
        "scale --lr with the global batch (batch x processes x accum steps): linear = "
        "lr x global batch / --lr-reference-batch, so runs on 1 and 16 GPUs are comparable",
        choices=("none", "linear"),
    )
    lr_reference_batch: int = opt(256, "global batch at which --lr applies unscaled (linear)")
    grad_clip: float = opt(1.0, "clip the gradient norm to this value (0 = off)")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss")
    ema: float = opt(0.0, "EMA decay of the weights (0 = off, e.g. 0.999); evaluation uses the EMA")

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_choices(self)
        for name in ("lr", "batch_size", "accum_steps", "lr_reference_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be > 0")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"--layer-decay {self.layer_decay}: must be in (0, 1]")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"--ema {self.ema}: must be in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing {self.label_smoothing}: must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio {self.min_lr_ratio}: must be in [0, 1]")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum {self.momentum}: must be in [0, 1)")
        _check_min(self, warmup_epochs=0, weight_decay=0, grad_clip=0, backbone_lr_scale=0)


# Training recipes: settings for a budget, layered over the dataset preset. `short` is the
# best 3-epoch recipe measured on the PCam sample (resnet18 from scratch, docs/experiments.md):
# valid AUC 0.897 mean over 3 seeds against 0.882 for the `pcam` preset at batch 128.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "none": {},
    "short": {
        "augment": {"augment": "dihedral"},
        "optim": {"batch_size": 32, "warmup_epochs": 0.3, "label_smoothing": 0.1},
        "train": {"epochs": 3, "val_tta": 8},
    },
}


@dataclass
class TrainConfig:
    epochs: int = opt(10, "training epochs")
    recipe: str = opt(
        "none",
        "training recipe over the dataset preset; short = 3 epochs, batch 32, dihedral "
        "augmentation, 0.3 warmup epoch, label smoothing 0.1, 8-view validation",
        choices=tuple(RECIPES),
    )
    seed: int = opt(0, "random seed (model init, data order, augmentation)")
    deterministic: bool = opt(False, "deterministic algorithms (bitwise-reproducible on CPU)")
    precision: str = opt(
        "auto",
        "mixed precision; auto = the accelerate launch's explicit bf16/fp16, else bf16 on "
        "CUDA >= 8.0 and CPUs with native bf16 (AVX512-BF16, AMX), fp16 on older CUDA, else "
        "no (fp32); the choice and why are printed and saved in config.yaml",
        choices=("auto", "no", "bf16", "fp16"),
    )
    runs_dir: str = opt("runs", "parent folder of run folders")
    run_name: str | None = opt(None, "run folder name (default: <dataset>-<model>)")
    resume: bool = opt(
        False, "continue from the run folder's last checkpoint (fresh start if none)"
    )
    metric: str = opt(
        "auc",
        "validation metric that selects the best checkpoint (higher is better)",
        choices=("auc", "accuracy", "balanced_accuracy", "f1", "neg_loss"),
    )
    eval_every: int = opt(
        0, "validate every N optimizer steps as well as every epoch (0 = epochs only)"
    )
    val_tta: int = opt(
        1,
        "dihedral views averaged in every validation, as `evaluate --tta` (1 = none); "
        "the best checkpoint is then chosen the way it will be used",
        choices=(1, 2, 4, 8),  # inference.TTA_KS (tests/test_config.py keeps them equal)
    )
    checkpoint_every: int = opt(
        0, "also save checkpoints/last every N optimizer steps (0 = epochs only)"
    )
    keep_last: int = opt(2, "full training states kept: last plus older step-* folders")
    patience: int = opt(0, "early stopping: validations without improvement (0 = off)")
    max_bad_steps: int = opt(5, "stop after this many consecutive NaN/inf losses")
    threads: int = opt(
        0,
        "CPU threads per process for the model's compute; 0 = auto: on a CPU-only run the "
        "usable cores / local processes (accelerate launch's default is 1 thread)",
    )

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_choices(self)
        if self.threads < 0:
            raise ConfigError(f"--threads {self.threads}: must be >= 0")
        if self.epochs <= 0:
            raise ConfigError(f"--epochs {self.epochs}: must be > 0")
        if self.keep_last < 1:
            raise ConfigError(f"--keep-last {self.keep_last}: must be >= 1")
        _check_run_name(self.run_name)
        _check_min(self, eval_every=0, checkpoint_every=0, patience=0, max_bad_steps=1)


@dataclass
class LogConfig:
    wandb: str = opt(
        "auto",
        "W&B mode; auto = online with an API key, otherwise offline",
        choices=WANDB_MODES,
    )
    project: str = opt("histodist", "W&B project")
    entity: str | None = opt(None, "W&B entity (team or user)")
    log_every: int = opt(20, "log loss / lr / throughput every N optimizer steps")
    log_images: bool = opt(
        True, "log a grid of augmented inputs, the ROC curve and confusion matrix"
    )
    wandb_checkpoints: str = opt(
        "none",
        "at the end of training, log these checkpoints to W&B as a model artifact (weights, "
        "meta.json, config.yaml, manifest.json; no optimizer state), aliased best / last",
        choices=("none", "best", "last", "both"),
    )
    progress: bool = opt(True, "tqdm progress bar on the main process")

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_choices(self)
        _check_min(self, log_every=1)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def flags(self) -> dict[str, Any]:
        """Every field by its flag name without `--` ({"lr": 0.001, "batch-size": 128, ...}):
        a run's W&B config, whose keys are then the names a W&B sweep's parameters take."""
        return {
            _flag(f.name)[2:]: getattr(getattr(self, section), f.name)
            for section, cls in SECTIONS.items()
            for f in fields(cls)
        }

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "log": LogConfig,
}

# Dataset presets: each states its dataset's shards, classes, input size, augmentation and
# selection metric in full, also where a value equals the field default, so that changing a
# default never changes a dataset. Binary sets select by AUC; HAM10000 (7 classes, ~67% `nv`)
# selects by balanced accuracy and weights the loss by class.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "pcam": {
        "data": {"shards": "shards/pcam", "num_classes": 2, "image_size": 96},
        "augment": {"augment": "pcam"},
        "train": {"metric": "auc"},
    },
    "kaggle-hcd": {
        "data": {"shards": "shards/kaggle-hcd", "num_classes": 2, "image_size": 96},
        "augment": {"augment": "pcam"},
        "train": {"metric": "auc"},
    },
    "idc": {
        "data": {
            "shards": "shards/idc",
            "num_classes": 2,
            "image_size": 50,
            "class_balance": "loss",
        },
        "augment": {"augment": "idc"},
        "train": {"metric": "auc"},
    },
    "breakhis": {
        "data": {"shards": "shards/breakhis", "num_classes": 2, "image_size": 224},
        "augment": {"augment": "breakhis"},
        "train": {"metric": "auc"},
    },
    "ham10000": {
        "data": {
            "shards": "shards/ham10000",
            "num_classes": 7,
            "image_size": 224,
            "class_balance": "loss",
        },
        "augment": {"augment": "ham10000"},
        "train": {"metric": "balanced_accuracy"},
    },
    "folder": {
        "data": {"shards": "shards/folder", "num_classes": 0, "image_size": 0},
        "augment": {"augment": "pcam"},
        "train": {"metric": "auc"},
    },
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> type:
    """`int`, `str | None` -> the concrete type argparse converts with."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose true/false flags also take a value: `--resume=true`,
    `--channels-last=False` (the form a W&B sweep agent passes every parameter in) are read as
    `--resume` and `--no-channels-last`."""

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._bool_value(a) for a in args], namespace)

    def _bool_value(self, arg: str) -> str:
        flag, eq, value = arg.partition("=")
        if not eq or not any(
            isinstance(a, argparse.BooleanOptionalAction) and flag in a.option_strings
            and not flag.startswith("--no-") for a in self._actions
        ):  # fmt: skip
            return arg
        if value.lower() in TRUE_WORDS:
            return flag
        if value.lower() in FALSE_WORDS:
            return "--no-" + flag[2:]
        self.error(f"{arg}: {flag} takes true or false (or {flag} / --no-{flag[2:]})")


def build_parser(
    prog: str = "histodist.train", description: str | None = None
) -> argparse.ArgumentParser:
    """One flag per config field, grouped by section; defaults are SUPPRESSed so that only
    flags given on the command line override the preset and YAML layers. Other commands
    (lr_find) add their own flags with a dest without a dot. True/false flags take
    `--flag`, `--no-flag` and `--flag=true|false`."""
    p = _Parser(
        prog=prog,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
        description=description
        or "Train a classifier on histodist shards. Precedence: defaults < --dataset "
        "preset < --recipe < --config YAML < flags.",
    )
    p.add_argument("--config", help="YAML file with sections data/augment/model/optim/train/log")
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            tp = _base_type(hints[f.name])
            kw: dict[str, Any] = {
                "help": f"{f.metadata['help']} (default: {f.default})",
                "dest": f"{section}.{f.name}",
            }
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = tp
                kw["metavar"] = f.name.upper()
                if f.metadata.get("choices"):
                    kw["choices"] = f.metadata["choices"]
            group.add_argument(_flag(f.name), **kw)
    return p


def _merge(base: dict, layer: dict, where: str) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in layer.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping")
        known = {f.name for f in fields(SECTIONS[section])}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{where}: unknown key {section}.{key}; see --help")
            out[section][key] = value
    return out


def from_dict(d: dict, where: str = "config") -> Config:
    """Build and validate a Config from nested section dicts (missing keys take defaults)."""
    merged = _merge({s: {} for s in SECTIONS}, d, where)
    try:
        return Config(**{s: SECTIONS[s](**v) for s, v in merged.items()})
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _read_yaml(path: str | os.PathLike) -> dict:
    """The sections of a YAML config, each a mapping (an empty section counts as {})."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read YAML config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for section, values in data.items():
        if values is None:
            data[section] = {}
        elif not isinstance(values, dict):
            raise ConfigError(
                f"{path}: section {section!r} must be a mapping of its keys (indented "
                f"'key: value' lines), not {type(values).__name__} {values!r}"
            )
    return data


def resolve(argv: list[str] | None = None) -> Config:
    """defaults < preset < recipe < YAML < flags. Raises SystemExit(2) on unknown flags."""
    return resolve_namespace(vars(build_parser().parse_args(argv)))


def _layer_name(
    flags: dict, yaml_layer: dict, section: str, key: str, default: str, table: dict
) -> str:
    """The preset or recipe to apply: the flag, else the YAML file's, else the default; one of
    `table`'s names."""
    name = flags.get(section, {}).get(key) or yaml_layer.get(section, {}).get(key) or default
    if name not in table:
        raise ConfigError(f"{_flag(key)} {name!r}: choose one of {', '.join(table)}")
    return name


def resolve_namespace(ns: dict) -> Config:
    """The Config from parsed flags {"section.key": value, "config": path}."""
    ns = dict(ns)
    yaml_layer = _read_yaml(ns.pop("config")) if "config" in ns else {}
    flags: dict[str, dict] = {}
    for dest, value in ns.items():
        section, key = dest.split(".")
        flags.setdefault(section, {})[key] = value
    dataset = _layer_name(flags, yaml_layer, "data", "dataset", DataConfig.dataset, PRESETS)
    recipe = _layer_name(flags, yaml_layer, "train", "recipe", TrainConfig.recipe, RECIPES)
    layers = _merge({s: {} for s in SECTIONS}, {"data": {"dataset": dataset}}, "preset")
    layers = _merge(layers, PRESETS[dataset], f"preset {dataset}")
    layers = _merge(layers, RECIPES[recipe], f"recipe {recipe}")
    layers = _merge(layers, yaml_layer, "--config")
    layers = _merge(layers, flags, "flags")
    cfg = from_dict(layers)
    if cfg.data.image_size == 1:
        _bad_image_size(1)
    return cfg


def _bad_image_size(size: int) -> None:
    raise ConfigError(
        f"--image-size {size}: use 0 (the manifest's size) or "
        f">= {MIN_IMAGE_SIZE} (the networks downsample 32x)"
    )


def parse_args(argv: list[str] | None = None) -> Config:
    """The training CLI's config. `argv` excludes the program name."""
    return resolve(argv)


def load_config(path: str | os.PathLike) -> Config:
    """Read a resolved config written by save_config (a run's `config.yaml`)."""
    return from_dict(_read_yaml(path), str(path))


def save_config(cfg: Config, path: str | os.PathLike, note: str | None = None) -> Path:
    """Write the config as YAML atomically (temp file in the same folder, then rename);
    `note` (e.g. why a value was chosen) goes first as YAML comment lines."""
    comments = "".join(f"# {line}\n" for line in (note or "").splitlines())
    return atomic_write(path, comments + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def replace(cfg: Config, **sections: dict) -> Config:
    """A copy of `cfg` with some fields changed: replace(cfg, data={"num_classes": 7})."""
    return from_dict(_merge(cfg.to_dict(), sections, "replace"))


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "AugmentConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "LogConfig",
    "PRESETS",
    "RECIPES",
    "build_parser",
    "parse_args",
    "load_config",
    "save_config",
    "from_dict",
    "replace",
]
