"""Every training option once: its type, allowed values, default and help (:class:`TrainConfig`).

YAML experiment files, ``--set key=value`` pairs, ``glr train`` flags and ``train(**options)``
all go through :func:`check_options`: values are coerced to the field's type (``'1e-3'`` →
``1e-3`` for a float: PyYAML reads YAML 1.1, where a float needs a dot; ``'4'`` → ``4``;
``'yes'`` → ``True``; ``'null'`` → ``None`` where optional) and checked (choices, ranges). A bad
value or an unknown key raises :class:`~glr.utils.InputError` with one line naming the source
(the YAML file, ``--set``, the flag), the key and what is allowed::

    configs/x.yaml: stage 2 (s2): unknown option(s) ['lrr'] (did you mean 'lr'?)
    configs/x.yaml: train_set: expected one of clean, c2x, full, all, got 'cleen' (did you mean 'clean'?)
    --set: lr: expected a float >= 0, got 'fast'

This module imports neither torch nor Lightning nor argparse: the command line builds its
flags from :func:`options` and ``glr --help`` stays fast. The checks that need torch (is the
backbone a timm model, the head a name in ``glr.model.heads``' registry, which plugins may extend
at run time?) live in :func:`glr.train.fit.check_registered`. The fixed choices below are static
copies of the names their owners define (``glr.data.root.TRAIN_SETS``, ``glr.train.samplers.SAMPLERS``,
``glr.train.module.OPTIMIZERS``, Lightning's precision literals, ``glr.model.layers.TOKEN_POOLS``,
``glr.data.images.INTERPOLATIONS``, ``glr.train.fit.LOGGERS``); ``tests/test_config.py``, ``tests/test_tokens.py``
and ``tests/test_resume.py`` check that each copy equals its source. ``arch`` is checked against the registry
like ``head``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType, NoneType, UnionType
from typing import Any, Callable, Mapping, Sequence, Union, get_args, get_origin, get_type_hints

from glr.utils import InputError

#: ``glr.data.root.TRAIN_SETS``: smallest first (clean → c2x → full → all).
TRAIN_SETS: tuple[str, ...] = ("clean", "c2x", "full", "all")
#: ``glr.train.samplers.SAMPLERS``.
SAMPLERS: tuple[str, ...] = ("shuffle", "id_uniform", "continent")
#: ``glr.train.module.OPTIMIZERS``.
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
#: Lightning's ``precision`` strings (``lightning.fabric.connector._PRECISION_INPUT``).
PRECISIONS: tuple[str, ...] = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
                               "transformer-engine", "transformer-engine-float16", "32", "16", "bf16", "64")
#: ``glr.train.fit.LOGGERS``: Lightning's CSV, TensorBoard, MLflow and W&B (offline) loggers.
LOGGERS: tuple[str, ...] = ("csv", "tensorboard", "mlflow", "wandb")
#: ``glr.model.layers.TOKEN_POOLS``.
TOKEN_POOLS: tuple[str, ...] = ("gem", "avg", "cls")
#: ``glr.data.images.INTERPOLATIONS``.
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest", "nearest-exact", "lanczos", "box", "hamming")
#: ``glr.model.net.LITE0_PACKAGE``: the offline ImageNet weights of efficientnet_lite0.
LITE0_PACKAGE = "efficientnet-lite0-package"

#: Who consumes each group of fields: ``net`` → ``glr.model.net.build_net``, ``module`` →
#: ``LandmarkModule``, ``data`` → ``GLDv2DataModule`` (``seed`` also seeds everything),
#: ``trainer`` → ``lightning.Trainer`` (through :func:`glr.train.fit.train`), ``run`` → provenance.
GROUPS: tuple[str, ...] = ("net", "module", "data", "trainer", "run")

_DEVICES = re.compile(r"-?\d+|\d+(\s*,\s*\d+)*\s*,?")


def _opt(default: Any, help: str, group: str, choices: Sequence[str] | None = None,
         check: tuple[Callable[[Any], bool], str] | None = None, expect: str | None = None) -> Any:
    """A :class:`TrainConfig` field. ``check`` is ``(predicate, text)`` with text such as
    ``"> 0"``; ``expect`` replaces the generated "expected …" text."""
    return field(default=default, metadata=dict(help=help, group=group, choices=tuple(choices) if choices else None,
                                                check=check, expect=expect))


def _gt(x: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > x), f"> {x}"


def _ge(x: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= x), f">= {x}"


_UNIT = ((lambda v: 0 <= v <= 1), "in [0, 1]")
_UNIT_OPEN = ((lambda v: 0 <= v < 1), "in [0, 1)")
_RGB = ((lambda v: len(v) == 3), "of 3 numbers (R, G, B)")
#: where unset preprocessing options come from (glr.train.datamodule.GLDv2DataModule.preprocessing)
_PRE = ("the init_from artifact's, else the backbone's pretrained config for pretrained weights, else ImageNet's "
        "mean / std, bilinear")
_RGB_POS = ((lambda v: len(v) == 3 and min(v) > 0), "of 3 numbers > 0 (R, G, B)")


@dataclass(frozen=True)
class TrainConfig:
    """The options of one training stage (:func:`glr.train.fit.train`), with their defaults.

    Build one with :meth:`from_options` (defaults + one layer of options) or layer more
    options on one with :meth:`updated`; both coerce and check every value. Field metadata:
    ``help``, ``group`` (see :data:`GROUPS`), ``choices``, ``check``, ``expect``.
    """

    # model (glr.model.net.build_net)
    backbone: str = _opt("efficientnet_lite0", "timm model name (timm.list_models(); test_resnet … for tests)", "net")
    pretrained: str | None = _opt(LITE0_PACKAGE, "timm-keyed weights file, 'efficientnet-lite0-package', or '' / "
                                                 "null for random init", "net")
    embedding_size: int = _opt(512, "embedding dimension D", "net", check=_ge(1))
    gem_p: float = _opt(3.0, "initial GeM exponent p (learnable)", "net", check=_gt(0))
    drop_rate: float = _opt(0.0, "dropout before the neck", "net", check=_UNIT_OPEN)
    last_stride: bool = _opt(False, "ResNet family: stride 1 in the last stage (re-ID trick)", "net")
    bnneck: bool = _opt(False, "bias-free neck BatchNorm (BNNeck, re-ID trick)", "net")
    arch: str = _opt("gem", "architecture, a name in the glr.model.archs registry (built in: gem = backbone + "
                            "pooling, dolg, hybrid)", "net")
    token_pool: str = _opt("gem", "how gem pools a token backbone (ViT, DeiT, EVA): gem over the patch tokens, "
                                  "avg over them, or the class token (cls)", "net", choices=TOKEN_POOLS)
    backbone_args: dict[str, float] | None = _opt(None, "more timm.create_model arguments, a mapping such as "
                                                        "{drop_path_rate: 0.1}", "net")
    # arch options (dolg, hybrid: glr.model.dolg, glr.model.hybrid; other archs ignore them)
    dolg_dim: int = _opt(512, "dolg: width C of the local and global branches (the neck sees 2C)", "net",
                         check=_ge(1))
    hybrid_stage: int | None = _opt(None, "hybrid: the CNN's feature stage fed to the Swin, an index into timm's "
                                          "feature_info (negative from the end; default: the first of stride >= 8)",
                                    "net")
    hybrid_dim: int = _opt(128, "hybrid: width of the first Swin stage", "net", check=_ge(1))
    hybrid_depth: int = _opt(2, "hybrid: blocks per Swin stage", "net", check=_ge(1))
    hybrid_stages: int = _opt(2, "hybrid: Swin stages (each after the first halves the grid, doubles width and "
                                 "heads)", "net", check=_ge(1))
    hybrid_heads: int = _opt(4, "hybrid: attention heads of the first Swin stage (must divide hybrid_dim)", "net",
                             check=_ge(1))
    hybrid_window: int = _opt(7, "hybrid: Swin window side in tokens", "net", check=_ge(1))
    # head and loss (LandmarkModule)
    head: str = _opt("arcface", "margin head, a name in the glr.model.heads registry (built in: arcface, "
                                "subcenter_arcface, cosface)", "module")
    arcface_s: float = _opt(30.0, "scale s of the margin head", "module", check=_gt(0))
    arcface_m: float = _opt(0.2, "margin m of the head (fixed unless dynamic_margin)", "module", check=_ge(0))
    subcenter_k: int = _opt(3, "sub-centers per class (subcenter_arcface)", "module", check=_ge(1))
    dynamic_margin: bool = _opt(False, "per-class margins a·f(count^-1/4)+b (1st place GLR2021)", "module")
    margin_a: float = _opt(0.45, "dynamic margins: a", "module")
    margin_b: float = _opt(0.05, "dynamic margins: b", "module")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy", "module", check=_UNIT_OPEN)
    class_weight_power: float = _opt(0.0, "class loss weights ∝ count^-power (0: off)", "module", check=_ge(0))
    # data (GLDv2DataModule)
    image_size: int = _opt(96, "training image size", "data", check=_ge(1))
    mean: list[float] | None = _opt(None, "normalisation mean, R,G,B (default: the weights'; " + _PRE + ")",
                                    "data", check=_RGB)
    std: list[float] | None = _opt(None, "normalisation std, R,G,B (default: the weights', as mean)", "data",
                                   check=_RGB_POS)
    interpolation: str | None = _opt(None, "resize interpolation (default: the weights', as mean)", "data",
                                     choices=INTERPOLATIONS)
    crop_pct: float | None = _opt(1.0, "eval crop: resize to image_size / crop_pct, keep the centre image_size; "
                                       "1 (default): the whole image resized to a square; null: the weights', "
                                       "as mean", "data", check=((lambda v: 0 < v <= 1), "in (0, 1]"))
    train_set: str = _opt("clean", "training set", "data", choices=TRAIN_SETS)
    min_samples: int = _opt(2, "landmarks with fewer training images are dropped", "data", check=_ge(1))
    val_fraction: float = _opt(0.0, "hold out this fraction of train images for val/loss and val/acc", "data",
                               check=_UNIT_OPEN)
    sampler: str = _opt("shuffle", "training sampler", "data", choices=SAMPLERS)
    pk_k: int = _opt(4, "images per class of the id_uniform (P×K) sampler", "data", check=_ge(1))
    continent_probs: dict[str, float] | None = _opt(None, "continent sampler: mapping continent: probability "
                                                          "(default: the seed's)", "data")
    clean_prob: float | None = _opt(None, "continent sampler: probability of a clean image (default 0.66)", "data",
                                    check=_UNIT)
    random_erasing: float = _opt(0.0, "random-erasing probability (re-ID trick; 0: off)", "data", check=_UNIT)
    hflip: bool = _opt(False, "random horizontal flips", "data")
    allow_val_leak: bool = _opt(False, "let 'all' keep the validation ground truth (marks the CV invalid)", "data")
    batch_size: int = _opt(32, "images per batch and process", "data", check=_ge(1))
    num_workers: int = _opt(2, "data-loader workers per process", "data", check=_ge(0))
    # optimisation (LandmarkModule; epochs and accumulate_grad_batches: the Trainer)
    epochs: int = _opt(5, "training epochs", "trainer", check=_ge(1))
    optimizer: str = _opt("adamw", "optimiser", "module", choices=OPTIMIZERS)
    lr: float = _opt(2e-3, "peak learning rate (head and neck)", "module", check=_ge(0))
    backbone_lr_mult: float = _opt(0.5, "backbone learning-rate multiplier", "module", check=_ge(0))
    weight_decay: float = _opt(1e-4, "weight decay", "module", check=_ge(0))
    momentum: float = _opt(0.9, "SGD momentum (Nesterov when > 0)", "module", check=_UNIT_OPEN)
    warmup_frac: float = _opt(0.1, "linear warm-up as a fraction of the optimiser steps", "module", check=_UNIT)
    warmup_epochs: float | None = _opt(None, "linear warm-up in epochs (default: warmup_frac of the steps)",
                                       "module", check=_ge(0))
    accumulate_grad_batches: int = _opt(1, "gradient accumulation", "trainer", check=_ge(1))
    seed: int = _opt(0, "seed of everything: initial weights, validation split, sampling, augmentation", "data")
    # hardware (lightning.Trainer)
    accelerator: str = _opt("auto", "Lightning accelerator (auto, cpu, gpu)", "trainer")
    devices: int | str = _opt("auto", "Lightning devices per node (auto, 1, 4, 0,1 …)", "trainer",
                              check=(lambda v: isinstance(v, int) or v == "auto" or bool(_DEVICES.fullmatch(v)), ""),
                              expect="'auto', a device count or a list such as 0,1")
    num_nodes: int = _opt(1, "Lightning num_nodes", "trainer", check=_ge(1))
    strategy: str = _opt("auto", "Lightning strategy (auto, ddp, …)", "trainer")
    precision: str | None = _opt(None, "Lightning precision (default bf16-mixed on CUDA, 32-true on CPU)",
                                 "trainer", choices=PRECISIONS)
    limit_train_batches: int | float | None = _opt(None, "train on this many batches (int) or this fraction (<1) "
                                                         "per epoch", "trainer", check=_gt(0))
    log_every_n_steps: int = _opt(10, "Lightning logging interval in optimiser steps", "trainer", check=_ge(1))
    logger: str = _opt("csv", "training logger in the run folder: csv (OUT/logs), tensorboard (OUT/logs, needs "
                              "tensorboardX), mlflow (file store OUT/mlruns), wandb (offline, OUT/wandb)", "trainer",
                       choices=LOGGERS)
    # crash recovery and weight averaging (glr.train.fit)
    checkpoint_every_n_steps: int | None = _opt(None, "also write OUT/checkpoints/last.ckpt every N optimiser steps "
                                                      "(default: at the end of every epoch only)", "trainer",
                                                check=_ge(1))
    resume: bool = _opt(True, "resume an interrupted stage from OUT/checkpoints/last.ckpt (false: start over, the "
                              "old checkpoint moved aside to previous.ckpt)", "run")
    ema: bool = _opt(False, "keep an exponential moving average of the weights (Lightning's EMAWeightAveraging); "
                            "the artifact holds the averaged weights", "trainer")
    ema_decay: float = _opt(0.999, "EMA decay per optimiser step", "trainer", check=_UNIT_OPEN)
    # staging and provenance
    init_from: str | None = _opt(None, "artifact whose weights start this stage (weights only: fresh optimiser)",
                                 "run")
    experiment: str | None = _opt(None, "experiment id written into the artifact (default: the run folder's name)",
                                  "run")
    stage: str | None = _opt(None, "stage name written into the artifact", "run")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, source: str | os.PathLike | None = None,
                     where: str = "") -> TrainConfig:
        """The defaults overridden by ``options`` (coerced and checked by :func:`check_options`)."""
        return _DEFAULT.updated(options, source, where)

    def updated(self, options: Mapping[str, Any] | None, source: str | os.PathLike | None = None,
                where: str = "") -> TrainConfig:
        """A copy with ``options`` layered on top (coerced and checked by :func:`check_options`)."""
        return dataclasses.replace(self, **check_options(options or {}, source, where)) if options else self

    def to_dict(self) -> dict[str, Any]:
        """Every option, in field order (``continent_probs``, ``mean`` and ``std`` copied)."""
        return {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def group(self, name: str) -> dict[str, Any]:
        """The options one consumer takes (``net``, ``module``, ``data``, ``trainer``, ``run``)."""
        if name not in GROUPS:
            raise ValueError(f"unknown option group {name!r}; groups: {', '.join(GROUPS)}")
        return {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata["group"] == name}

    def to_yaml(self) -> str:
        """The options as a YAML mapping (reads back to the same values)."""
        return to_yaml(self.to_dict())


def _copy(v: Any) -> Any:
    return dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v


_DEFAULT = TrainConfig()
_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS: dict[str, Any] = get_type_hints(TrainConfig)

#: Every option with its default (read-only; the same keys and values as ``TrainConfig().to_dict()``).
TRAIN_DEFAULTS: Mapping[str, Any] = MappingProxyType(_DEFAULT.to_dict())


@dataclass(frozen=True)
class Option:
    """One option as the command line needs it: name, default, help, choices, and what it expects."""

    name: str
    default: Any
    help: str
    group: str
    choices: tuple[str, ...] | None
    expects: str

    @property
    def metavar(self) -> str:
        """``{a,b,c}`` for choices, else the type in capitals (``FLOAT``, ``INT``, ``BOOL``, …)."""
        if self.choices and len(self.choices) <= 6:
            return "{" + ",".join(self.choices) + "}"
        return self.name.upper() if self.choices else _metavar(_HINTS[self.name])

    @property
    def flag_help(self) -> str:
        """The help text with the choices the metavar does not show, and the default."""
        text = self.help
        if self.choices and len(self.choices) > 6:
            text += "; one of " + ", ".join(self.choices)
        return text if "default" in self.help else f"{text} (default {self.default})"


def options() -> tuple[Option, ...]:
    """Every option of :class:`TrainConfig`, in field order."""
    return tuple(Option(name, getattr(_DEFAULT, name), f.metadata["help"], f.metadata["group"], f.metadata["choices"],
                        _expects(name)) for name, f in _FIELDS.items())


# --------------------------------------------------------------------------- coercion
class _Bad(Exception):
    """A value that does not fit a type (caught and turned into an InputError)."""


def _describe(hint: Any) -> str:
    """"a float", "an integer or a float", … (without "or null")."""
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(_describe(a) for a in get_args(hint) if a is not NoneType)
    if get_origin(hint) is dict:
        return "a mapping of name: number"
    if get_origin(hint) is list:
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a float", str: "a string"}[hint]


def _metavar(hint: Any) -> str:
    if get_origin(hint) in (Union, UnionType):
        return "|".join(_metavar(a) for a in get_args(hint) if a is not NoneType)
    if get_origin(hint) is dict:
        return "MAPPING"
    if get_origin(hint) is list:
        return "A,B,C"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}[hint]


def _expects(name: str) -> str:
    """What option ``name`` accepts, as in "expected …": its choices, or its type and range."""
    meta, hint = _FIELDS[name].metadata, _HINTS[name]
    if meta["expect"]:
        text = meta["expect"]
    elif meta["choices"]:
        text = "one of " + ", ".join(meta["choices"])
    else:
        text = _describe(hint) + (f" {meta['check'][1]}" if meta["check"] else "")
    return text + (" or null" if NoneType in get_args(hint) else "")


_NULLS = ("null", "none", "~")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise _Bad


def _to_int(v: Any) -> int:
    if isinstance(v, bool):  # a bool is an int to Python, not to a config
        raise _Bad
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*[-+]?\d+\s*", v):
        return int(v)
    raise _Bad


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise _Bad
    if isinstance(v, int):
        return v  # numeric tower: an int is a valid float, and stays the value it was given as
    if isinstance(v, str):
        try:
            v = float(v)  # '1e-3' too, which YAML 1.1 leaves a string
        except ValueError:
            raise _Bad from None
    if isinstance(v, float) and math.isfinite(v):
        return v
    raise _Bad


def _to_str(v: Any) -> str:
    if isinstance(v, (str, os.PathLike)):
        return os.fspath(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)  # `experiment: 2021`
    raise _Bad


def _to_mapping(v: Any) -> dict[str, float]:
    if isinstance(v, str):  # a flag or --set value: a YAML flow mapping
        import yaml

        try:
            v = yaml.safe_load(v)
        except yaml.YAMLError:
            raise _Bad from None
    if not isinstance(v, Mapping):
        raise _Bad
    return {str(k): _to_float(x) for k, x in v.items()}


def _to_floats(v: Any) -> list[float]:
    """A YAML list, or a flag / --set text: ``0.5,0.5,0.5`` or ``[0.5, 0.5, 0.5]``."""
    if isinstance(v, str):
        text = v.strip()
        if text.startswith("["):
            import yaml

            try:
                v = yaml.safe_load(text)
            except yaml.YAMLError:
                raise _Bad from None
        else:
            v = [x for x in text.split(",")] if text else []
    if not isinstance(v, (list, tuple)) or not v:
        raise _Bad
    return [float(_to_float(x)) for x in v]


_SCALARS: dict[type, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _to_type(hint: Any, v: Any) -> Any:
    """``v`` as a ``hint`` value (strings parsed; ints kept in float fields), or raise :class:`_Bad`.
    A union tries its members in order (``int | float``: ``'2'`` → 2, ``'0.5'`` → 0.5)."""
    if get_origin(hint) in (Union, UnionType):
        args = get_args(hint)
        if NoneType in args and (v is None or (isinstance(v, str) and v.strip().lower() in _NULLS)):
            return None
        for a in args:
            if a is not NoneType:
                try:
                    return _to_type(a, v)
                except _Bad:
                    pass
        raise _Bad
    if get_origin(hint) is dict:
        return _to_mapping(v)
    if get_origin(hint) is list:
        return _to_floats(v)
    return _SCALARS[hint](v)


def coerce(name: str, value: Any) -> Any:
    """``value`` as option ``name`` takes it; raises ``ValueError`` with "expected …, got …"."""
    meta = _FIELDS[name].metadata
    try:
        v = _to_type(_HINTS[name], value)
        if v is not None:
            if meta["choices"] and v not in meta["choices"]:
                raise _Bad
            if meta["check"] and not meta["check"][0](v):
                raise _Bad
    except _Bad:
        guess = closest(value, meta["choices"]) if meta["choices"] and isinstance(value, str) else None
        hint = f" (did you mean {guess!r}?)" if guess else ""
        raise ValueError(f"expected {_expects(name)}, got {value!r}{hint}") from None
    return v


def choice_message(value: Any, choices: Sequence[str]) -> str:
    """``expected one of a, b, c, got 'x' (did you mean 'a'?)``."""
    guess = closest(value, choices) if isinstance(value, str) else None
    return f"expected one of {', '.join(choices)}, got {value!r}" + (f" (did you mean {guess!r}?)" if guess else "")


def closest(name: str, known: Sequence[str]) -> str | None:
    """The closest of ``known`` to ``name`` (difflib), if any is close."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_message(keys: Sequence[str], known: Sequence[str] | None = None) -> str:
    """``unknown option(s) ['lrr'] (did you mean 'lr'?)``."""
    known = list(known if known is not None else _FIELDS)
    guesses = [g for g in (closest(k, known) for k in keys) if g]
    hint = f" (did you mean {', '.join(repr(g) for g in guesses)}?)" if guesses else ""
    return f"unknown option(s) {sorted(keys)}{hint}"


def check_options(options: Mapping[str, Any], source: str | os.PathLike | None = None, where: str = "",
                  flags: bool = False, known: Sequence[str] | None = None) -> dict[str, Any]:
    """Coerce and check one layer of options; returns only the keys given, typed.

    Args:
        options: option → value (keys may use ``-`` for ``_``); values typed or strings.
        source: where the options come from, first in the message: a YAML file, ``"--set"``.
        where: a prefix after the source, e.g. ``"stage 2 (s2): "``.
        flags: the options are command-line flags: messages name ``--image-size``, not the key.
        known: the keys allowed here (default: every option).

    Raises:
        InputError: one line naming the source, the key (closest known name for an unknown
            one) and what the option accepts.
    """
    opts = {str(k).replace("-", "_"): v for k, v in options.items()}
    allowed = list(known if known is not None else _FIELDS)
    bad = [k for k in opts if k not in allowed]
    if bad:
        raise InputError(where + unknown_message(bad, allowed), source)
    out = {}
    for k, v in opts.items():
        try:
            out[k] = coerce(k, v)
        except ValueError as e:
            label = "--" + k.replace("_", "-") if flags else k
            raise InputError(f"{where}{label}: {e}", source) from None
    return out


def parse_assignments(pairs: Sequence[str] | None, source: str = "--set") -> dict[str, Any]:
    """``key=value`` pairs (``--set``), each value coerced from its text by the option's type."""
    raw: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InputError(f"expected key=value, got {pair!r}", source)
        k, v = pair.split("=", 1)
        raw[k.strip()] = v.strip()
    return check_options(raw, source)


def to_yaml(data: Any) -> str:
    """``data`` (options, or a mapping of experiment and stages) as block-style YAML, keys in order."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
