"""The typed training configuration (glr.train.config): coercion of YAML / --set / flag values, one-line
errors naming the key and the source before any data is read, --print-config, the demo's shipped configs."""

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from glr.cli import main
from glr.train.config import (PRECISIONS, TRAIN_DEFAULTS, TrainConfig, check_options, options,
                              parse_assignments)
from glr.utils import InputError

MISSING = "no-such-root"  # --data of the error tests: an error about the data would name this folder


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _error(capsys) -> str:
    """The one stderr line of a failed command."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from glr.data.synth import make_synthetic_gldv2

    path = tmp_path_factory.mktemp("synth")
    make_synthetic_gldv2(path, n_landmarks=8, scale=0.15, image_size=32, progress=False)
    return path


# --------------------------------------------------------------------------- coercion
def test_values_are_coerced_to_the_field_types():
    cfg = TrainConfig.from_options({"lr": "1e-3", "epochs": "3", "devices": "4", "hflip": "yes", "bnneck": 1,
                                    "warmup_epochs": "null", "clean_prob": None, "limit_train_batches": "0.5",
                                    "continent_probs": "{Europe: 0.5, Asia: 1}", "image-size": "64"})
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.epochs == 3 and cfg.devices == 4 and cfg.image_size == 64
    assert cfg.hflip is True and cfg.bnneck is True and cfg.warmup_epochs is None and cfg.clean_prob is None
    assert cfg.limit_train_batches == 0.5 and cfg.continent_probs == {"Europe": 0.5, "Asia": 1}
    # values already typed stay what they are: an int in a float field is kept (the artifact's options too)
    cfg = TrainConfig.from_options({"warmup_epochs": 1, "limit_train_batches": 2, "devices": "auto", "gem_p": 3})
    assert cfg.warmup_epochs == 1 and type(cfg.warmup_epochs) is int and type(cfg.limit_train_batches) is int
    assert cfg.devices == "auto" and TrainConfig.from_options({"devices": "0,1"}).devices == "0,1"
    for text, value in (("true", True), ("No", False), ("on", True), ("0", False)):
        assert check_options({"hflip": text}) == {"hflip": value}
    assert parse_assignments(["lr=1e-3", "experiment=2021", "warmup_epochs=null"]) == \
        {"lr": 1e-3, "experiment": "2021", "warmup_epochs": None}
    assert TrainConfig().to_dict() == dict(TRAIN_DEFAULTS) and TrainConfig.from_options({}) == TrainConfig()
    with pytest.raises(TypeError):
        TRAIN_DEFAULTS["lr"] = 1.0  # a read-only view


@pytest.mark.parametrize("key, value, expected", [
    ("lr", "fast", "lr: expected a float >= 0, got 'fast'"),
    ("epochs", "one", "epochs: expected an integer >= 1, got 'one'"),
    ("epochs", 2.5, "epochs: expected an integer >= 1, got 2.5"),
    ("hflip", "maybe", "hflip: expected true or false, got 'maybe'"),
    ("image_size", True, "image_size: expected an integer >= 1, got True"),
    ("train_set", "cleen", "train_set: expected one of clean, c2x, full, all, got 'cleen' (did you mean 'clean'?)"),
    ("sampler", "pk", "sampler: expected one of shuffle, id_uniform, continent, got 'pk'"),
    ("optimizer", "adam", "optimizer: expected one of adamw, sgd, got 'adam' (did you mean 'adamw'?)"),
    ("precision", "bf15-mixed", "precision: expected one of 32-true, bf16-mixed"),
    ("val_fraction", 1.0, "val_fraction: expected a float in [0, 1), got 1.0"),
    ("devices", "many", "devices: expected 'auto', a device count or a list such as 0,1, got 'many'"),
    ("continent_probs", "[1, 2]", "continent_probs: expected a mapping of name: number or null"),
])
def test_a_bad_value_names_the_source_the_key_and_what_is_allowed(key, value, expected):
    with pytest.raises(InputError) as e:
        TrainConfig.from_options({key: value}, "x.yaml", "stage 2 (s2): ")
    assert str(e.value).startswith(f"x.yaml: stage 2 (s2): {expected}")
    assert "\n" not in str(e.value)


def test_an_unknown_key_names_the_closest_option():
    with pytest.raises(InputError, match=r"^--set: unknown option\(s\) \['lrr'\] \(did you mean 'lr'\?\)$"):
        parse_assignments(["lrr=1"])
    with pytest.raises(InputError, match=r"^--set: expected key=value, got 'lr'$"):
        parse_assignments(["lr"])
    with pytest.raises(InputError, match=r"^--image-size: expected an integer >= 1, got 'big'$"):
        check_options({"image_size": "big"}, flags=True)


def test_static_choices_equal_their_sources():
    """config.py imports no torch, so it keeps copies of names defined elsewhere; they must agree."""
    from lightning.fabric.connector import _PRECISION_INPUT

    from glr.data.root import TRAIN_SETS
    from glr.model.net import LITE0_PACKAGE
    from glr.train import config
    from glr.train.module import OPTIMIZERS
    from glr.train.samplers import SAMPLERS

    assert config.TRAIN_SETS == TRAIN_SETS and config.SAMPLERS == tuple(SAMPLERS)
    assert config.OPTIMIZERS == tuple(OPTIMIZERS) and config.LITE0_PACKAGE == LITE0_PACKAGE

    def literals(t):
        return [x for a in typing.get_args(t) for x in (literals(a) if typing.get_args(a) else [a])]
    assert set(PRECISIONS) == {str(x) for x in literals(_PRECISION_INPUT)}


def test_head_names_come_from_the_registry_at_validation_time():
    from glr.model import heads
    from glr.train.fit import check_registered

    check_registered({"head": "cosface"})
    with pytest.raises(InputError, match=r"^x.yaml: head: expected one of arcface, .*got 'arcfase' "
                                         r"\(did you mean 'arcface'\?\)$"):
        check_registered({"head": "arcfase"}, "x.yaml")
    if hasattr(heads, "register_head"):  # a plugin's head is known once registered
        heads.register_head("test_plugin_head")(lambda *a: None)
        try:
            check_registered({"head": "test_plugin_head"})
        finally:
            heads.unregister_head("test_plugin_head")


def test_the_config_module_imports_no_torch_and_the_parser_none_either():
    code = ("import sys, glr.train.config, glr.cli; glr.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_option_is_a_flag_with_help():
    opts = options()
    assert [o.name for o in opts] == list(TRAIN_DEFAULTS)
    assert all(o.help and o.flag_help for o in opts)
    assert next(o for o in opts if o.name == "train_set").metavar == "{clean,c2x,full,all}"


# --------------------------------------------------------------------------- through the CLI, before any data
def test_a_typo_in_a_yaml_file_is_one_line_and_exit_2_before_the_data(tmp_path, capsys):
    cfg = _yaml(tmp_path / "typo.yaml", "backbone: test_resnet\nlrr: 1e-3\n")
    assert main(["train", "--data", str(tmp_path / MISSING), "--out", str(tmp_path / "run"), "--config", str(cfg)]) == 2
    line = _error(capsys)
    assert line == f"glr train: error: {cfg}: unknown option(s) ['lrr'] (did you mean 'lr'?)"
    assert not (tmp_path / "run").exists()


def test_a_wrong_type_in_a_yaml_file_names_key_and_file(tmp_path, capsys):
    cfg = _yaml(tmp_path / "bad.yaml", "backbone: test_resnet\nepochs: one\n")
    assert main(["train", "--data", str(tmp_path / MISSING), "--out", str(tmp_path / "run"), "--config", str(cfg)]) == 2
    assert _error(capsys) == f"glr train: error: {cfg}: epochs: expected an integer >= 1, got 'one'"


def test_a_typo_in_the_last_stage_fails_before_the_first_trains(tmp_path, capsys):
    stages = "".join(f"  - {{stage: s{i}, epochs: 1}}\n" for i in range(1, 4)) + "  - {stage: s4, train_set: cleen}\n"
    cfg = _yaml(tmp_path / "exp.yaml", "backbone: test_resnet\npretrained: null\nstages:\n" + stages)
    assert main(["experiment", str(cfg), "--data", str(tmp_path / MISSING), "--runs", str(tmp_path / "runs"),
                 "--weights", str(tmp_path / "w")]) == 2
    line = _error(capsys)
    assert line.startswith(f"glr experiment: error: {cfg}: stage 4 (s4): train_set: expected one of clean, c2x, "
                           "full, all, got 'cleen'")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "w").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--backbone", "resnet181"], "--backbone: 'resnet181' is not a timm model (did you mean 'resnet18'?)"),
    (["--set", "backbone=test_resnett"], "--set: backbone: 'test_resnett' is not a timm model (did you mean "
                                         "'test_resnet'?)"),
    (["--head", "arcfase"], "--head: expected one of arcface, subcenter_arcface, cosface, got 'arcfase'"),
    (["--train-set", "cleen"], "--train-set: expected one of clean, c2x, full, all, got 'cleen' (did you mean "
                               "'clean'?)"),
    (["--lr", "fast"], "--lr: expected a float >= 0, got 'fast'"),
    (["--backbone", "test_resnet"], "pretrained: efficientnet-lite0-package holds efficientnet_lite0 weights, "
                                    "not test_resnet"),
])
def test_bad_flags_fail_before_the_data(tmp_path, capsys, argv, expected):
    assert main(["train", "--data", str(tmp_path / MISSING), "--out", str(tmp_path / "run")] + argv) == 2
    line = _error(capsys)
    assert line.startswith("glr train: error: " + expected) and MISSING not in line


def test_an_unknown_backbone_in_a_yaml_file(tmp_path, capsys):
    cfg = _yaml(tmp_path / "bb.yaml", "backbone: efficientnet_lite00\nstages:\n  - {stage: a}\n")
    assert main(["experiment", str(cfg), "--data", str(tmp_path / MISSING)]) == 2
    assert _error(capsys).startswith(f"glr experiment: error: {cfg}: backbone: 'efficientnet_lite00' is not a timm "
                                     "model (did you mean 'efficientnet_lite0'?)")


def test_train_and_ablate_check_their_options_before_reading(tmp_path):
    from glr.train.fit import train
    from glr.workflows.experiment import ablate

    with pytest.raises(InputError, match="^optimizer: expected one of adamw, sgd, got 'adam'"):
        train(tmp_path / MISSING, tmp_path / "run", optimizer="adam")
    with pytest.raises(InputError, match="nope.pt: init_from: model artifact not found"):
        train(tmp_path / MISSING, tmp_path / "run", init_from=str(tmp_path / "nope.pt"))
    with pytest.raises(InputError, match=r"^overrides: epochs: expected an integer >= 1, got 'two'"):
        ablate(tmp_path / MISSING, tmp_path / "abl", {"backbone": "test_resnet", "pretrained": None},
               overrides={"epochs": "two"})
    assert not (tmp_path / "run").exists() and not (tmp_path / "abl").exists()


# --------------------------------------------------------------------------- --print-config
def test_print_config_prints_the_coerced_options_as_yaml(tmp_path, capsys):
    cfg = _yaml(tmp_path / "c.yaml", "backbone: test_resnet\npretrained: null\nlr: 1e-3\nstages:\n"
                                     "  - {stage: s1, epochs: 2}\n  - {stage: s2, image_size: 48, lr: 5e-4}\n")
    assert main(["train", "--print-config", "--config", str(cfg), "--config-stage", "s2", "--set", "devices=2",
                 "--hflip", "yes", "--warmup-epochs", "0.5", "--limit-train-batches", "3"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert list(out) == list(TRAIN_DEFAULTS)
    assert out["lr"] == 5e-4 and isinstance(out["lr"], float) and out["image_size"] == 48
    assert out["devices"] == 2 and out["hflip"] is True and out["warmup_epochs"] == 0.5
    assert out["limit_train_batches"] == 3 and out["stage"] == "s2" and out["experiment"] == "c"
    assert out["epochs"] == TRAIN_DEFAULTS["epochs"] and out["pretrained"] is None

    assert main(["experiment", str(cfg), "--print-config", "--weights", str(tmp_path / "w"), "--set",
                 "num_workers=0"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["experiment"] == "c" and [s["stage"] for s in out["stages"]] == ["s1", "s2"]
    s1, s2 = out["stages"]
    assert s1["lr"] == 1e-3 and s1["epochs"] == 2 and s2["lr"] == 5e-4 and s2["epochs"] == TRAIN_DEFAULTS["epochs"]
    assert s1["init_from"] is None and s2["init_from"] == str(tmp_path / "w" / "c" / "s1.safetensors")
    assert s1["num_workers"] == s2["num_workers"] == 0
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- real training
def test_a_float_without_a_dot_in_yaml_trains(root, tmp_path, capsys):
    """``lr: 1e-3`` is the string '1e-3' to PyYAML (YAML 1.1); the config makes it a float and the run trains."""
    from glr.model.artifact import read_artifact

    cfg = _yaml(tmp_path / "lr.yaml", "backbone: test_resnet\npretrained: null\nlr: 1e-3\nweight_decay: 1e-5\n"
                                      "image_size: 32\nepochs: 1\nbatch_size: 8\nnum_workers: 0\n"
                                      "limit_train_batches: 2\n")
    assert yaml.safe_load(cfg.read_text())["lr"] == "1e-3"
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--config", str(cfg),
                 "--set", "warmup_frac=0"]) == 0
    meta = read_artifact(tmp_path / "run" / "model.safetensors")["meta"]
    assert meta["options"]["lr"] == 1e-3 and isinstance(meta["options"]["lr"], float)
    assert meta["options"]["weight_decay"] == 1e-5 and meta["options"]["warmup_frac"] == 0
    assert set(meta["options"]) == set(TRAIN_DEFAULTS) - {"init_from"}


# --------------------------------------------------------------------------- the demo's configs
def test_the_demo_experiments_are_shipped_yaml_files():
    import tomllib
    from fnmatch import fnmatch

    import glr
    from glr.workflows.demo import DEMO_EXPERIMENTS, QUICK_EXPERIMENTS, demo_config
    from glr.workflows.experiment import parse_experiment, plan_experiment

    globs = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    globs = globs["tool"]["setuptools"]["package-data"]["glr"]
    package = Path(glr.__file__).parent
    for name in DEMO_EXPERIMENTS + QUICK_EXPERIMENTS:
        path = demo_config(name)
        assert any(fnmatch(path.relative_to(package).as_posix(), g) for g in globs), path  # in the wheel
        exp = parse_experiment(path)
        assert exp.name == name and [s for s, _ in exp.stages] == ["s1", "s2"]
        plan_experiment(exp)
    with pytest.raises(InputError, match="no demo experiment config 'nope'"):
        demo_config("nope")
