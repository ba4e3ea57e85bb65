"""Config tree: precedence, presets, YAML, generated CLI, validation."""

import pytest
import yaml

from histodist.config import (
    PRESETS,
    RECIPES,
    Config,
    ConfigError,
    build_parser,
    load_config,
    parse_args,
    replace,
    save_config,
)


def test_defaults_then_preset_then_yaml_then_flags(tmp_path):
    cfg = parse_args([])
    assert cfg.data.dataset == "pcam" and cfg.data.shards == "shards/pcam"
    assert (cfg.data.num_classes, cfg.data.image_size, cfg.train.metric) == (2, 96, "auc")

    ham = parse_args(["--dataset", "ham10000"])
    assert (ham.data.num_classes, ham.augment.augment) == (7, "ham10000")
    assert ham.train.metric == "balanced_accuracy" and ham.data.class_balance == "loss"

    y = tmp_path / "c.yaml"
    y.write_text(
        yaml.safe_dump(
            {"data": {"dataset": "idc", "image_size": 64}, "optim": {"lr": 0.01, "batch_size": 32}}
        )
    )
    cfg = parse_args(["--config", str(y), "--lr", "0.5", "--no-resample"])
    assert cfg.data.dataset == "idc" and cfg.data.shards == "shards/idc"  # preset from YAML
    assert cfg.data.image_size == 64  # YAML beats preset (idc: 50)
    assert cfg.optim.batch_size == 32 and cfg.optim.lr == 0.5  # flag beats YAML
    assert cfg.data.resample is False


SHORT_FLAGS = [  # the measured command of docs/experiments.md ("Short budget")
    *("--epochs", "3", "--batch-size", "32", "--augment", "dihedral"),
    *("--warmup-epochs", "0.3", "--label-smoothing", "0.1", "--val-tta", "8"),
]


def test_recipe_short_is_the_measured_command(tmp_path):
    cfg = parse_args(["--recipe", "short"])
    assert cfg.train.recipe == "short"
    assert load_config(save_config(cfg, tmp_path / "config.yaml")) == cfg  # a run reloads it
    assert replace(cfg, train={"recipe": "none"}) == parse_args(SHORT_FLAGS)
    assert parse_args([]).train.recipe == "none" and RECIPES["none"] == {}


def test_recipe_sits_between_preset_and_yaml(tmp_path):
    """defaults < dataset preset < recipe < --config YAML < flags."""
    idc = parse_args(["--dataset", "idc"])
    cfg = parse_args(["--dataset", "idc", "--recipe", "short"])
    # the preset's own keys survive where the recipe is silent; the recipe's keys win
    assert (
        (cfg.data.image_size, cfg.data.class_balance)
        == (50, "loss")
        == (
            idc.data.image_size,
            idc.data.class_balance,
        )
    )
    assert (cfg.augment.augment, idc.augment.augment) == ("dihedral", "idc")
    assert (cfg.optim.batch_size, cfg.train.epochs) == (32, 3)

    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"train": {"recipe": "short"}, "optim": {"batch_size": 64}}))
    cfg = parse_args(["--config", str(y), "--epochs", "6"])
    assert cfg.train.recipe == "short"  # a YAML file selects the recipe too
    assert cfg.optim.batch_size == 64  # YAML beats recipe (32)
    assert cfg.train.epochs == 6  # flag beats recipe (3)
    assert cfg.optim.label_smoothing == 0.1 and cfg.train.val_tta == 8  # recipe beats defaults


def test_unknown_recipe_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "long"])
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"train": {"recipe": "long"}}))
    with pytest.raises(ConfigError, match="--recipe 'long'"):
        parse_args(["--config", str(y)])


def test_unknown_flags_and_keys_are_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--no-such-flag", "1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(["--lr"])  # missing value
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="optim.lrr"):
        parse_args(["--config", str(y)])
    y.write_text("optimiser:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="optimiser"):
        parse_args(["--config", str(y)])


def test_validation_names_the_flag():
    with pytest.raises(ConfigError, match="--epochs"):
        parse_args(["--epochs", "0"])
    with pytest.raises(ConfigError, match="--ema"):
        parse_args(["--ema", "1.5"])
    with pytest.raises(ConfigError, match="--augment"):
        parse_args(["--augment", "nonsense"])
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="--crop"):
            parse_args(["--crop", bad])
    with pytest.raises(SystemExit):
        parse_args(["--optimizer", "lamb"])  # argparse choices


@pytest.mark.parametrize(
    "flags",
    [
        ["--log-every", "0"],
        ["--max-bad-steps", "0"],
        ["--checkpoint-every", "-1"],
        ["--eval-every", "-2"],
        ["--patience", "-1"],
        ["--image-size", "1"],
        ["--image-size", "7"],
        ["--image-size", "31"],
        ["--shuffle-buffer", "-1"],
        ["--warmup-epochs", "-0.5"],
        ["--min-lr-ratio", "2"],
        ["--grad-clip", "-1"],
    ],
)
def test_nonsense_ranges_are_rejected(flags):
    with pytest.raises(ConfigError, match=flags[0]):
        parse_args(flags)


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--grad-clip", "--warmup-epochs",
                                  "--backbone-lr-scale", "--min-lr-ratio", "--crop", "--ema"])  # fmt: skip
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_option_must_be_finite(flag, value):
    """NaN passes a check written as `x < low`; inf is no learning rate or factor."""
    with pytest.raises(ConfigError, match=f"{flag} {value}"):
        parse_args([f"{flag}={value}"])


def test_yaml_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from histodist import train

    cases = {
        "section.yaml": (b"train: 5\n", "section 'train' must be a mapping"),
        "latin1.yaml": ("model:\n  model: r\xe9snet\n".encode("latin-1"), "not UTF-8"),
        "nan.yaml": (b"optim:\n  lr: .nan\n", "--lr nan: must be a finite number"),
        "inf.yaml": (b"optim:\n  weight_decay: .inf\n", "--weight-decay inf"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_bytes(text)
        with pytest.raises(ConfigError, match=expected):
            parse_args(["--config", str(tmp_path / name)])
        assert train.main(["--config", str(tmp_path / name), "--runs-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("histodist.train: error: "), err
    (tmp_path / "empty.yaml").write_text("train:\nlog:\n  log_every: 3\n")  # an empty section
    assert parse_args(["--config", str(tmp_path / "empty.yaml")]).log.log_every == 3


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/../../b", "runs/x", "..", ".", ""])
def test_run_name_stays_inside_runs_dir(name, tmp_path, capsys):
    from histodist import train

    with pytest.raises(ConfigError, match="--run-name"):
        parse_args(["--run-name", name])
    assert train.main(["--runs-dir", str(tmp_path / "runs"), "--run-name", name]) == 2
    assert "must be a folder name inside --runs-dir" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_edges_of_the_ranges_are_accepted():
    cfg = parse_args(["--image-size", "32", "--log-every", "1", "--max-bad-steps", "1",
                      "--checkpoint-every", "0", "--grad-clip", "0"])  # fmt: skip
    assert cfg.data.image_size == 32 and cfg.train.max_bad_steps == 1
    assert parse_args(["--image-size", "0", "--dataset", "folder"]).data.image_size == 0


def test_help_documents_every_field():
    text = build_parser().format_help()
    for section in Config().to_dict().values():
        for name in section:
            assert "--" + name.replace("_", "-") in text, name
    assert "--config" in text and "--dataset" in text


def test_every_preset_resolves():
    for name in PRESETS:
        cfg = parse_args(["--dataset", name])
        assert cfg.data.dataset == name


def test_config_accepts_exactly_the_augment_presets():
    from histodist.augment import PRESETS as AUGMENT_PRESETS
    from histodist.config import AUGMENT_PRESETS as NAMES

    assert sorted(NAMES) == sorted(AUGMENT_PRESETS)
    for name in AUGMENT_PRESETS:
        assert parse_args(["--augment", name]).augment.augment == name


def test_val_tta_choices_are_the_tta_view_counts():
    """config keeps its own literal (it imports without torch); inference.TTA_KS is the source."""
    from dataclasses import fields

    from histodist.config import TrainConfig
    from histodist.inference.core import TTA_KS

    (f,) = (f for f in fields(TrainConfig) if f.name == "val_tta")
    assert f.metadata["choices"] == tuple(TTA_KS)


def test_save_and_load_round_trip(tmp_path):
    cfg = parse_args(["--dataset", "breakhis", "--model", "resnet50-dense", "--ema", "0.99"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert not list(path.parent.glob(".*tmp"))  # atomic write left no temp file


def test_true_false_flags_take_a_value():
    """`--flag=true|false` (how a W&B sweep agent passes booleans) as well as --flag / --no-flag."""
    flags = ["--resume=true", "--channels-last=False", "--log-images=0", "--pretrained=YES"]
    cfg = parse_args(flags)
    assert cfg.train.resume and not cfg.model.channels_last and not cfg.log.log_images
    assert cfg.model.pretrained is True
    assert parse_args(["--no-resume", "--resume"]).train.resume  # the last one wins
    assert not parse_args(["--resume", "--resume=false"]).train.resume
    with pytest.raises(SystemExit) as e:
        parse_args(["--resume=maybe"])
    assert e.value.code == 2
