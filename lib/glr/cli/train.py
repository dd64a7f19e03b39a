"""``glr train``, ``glr experiment`` and ``glr ablate``: one stage, a staged experiment, the seed's ablations."""

from __future__ import annotations

import argparse
from typing import Any

from glr.cli.args import boolean, devices, yaml_overrides
from glr.utils import InputError

#: ``glr train`` flags: every key of glr.train.fit.TRAIN_DEFAULTS; (type, help) for the ones
#: whose default does not tell the type, or that deserve a help line.
_TRAIN_HELP: dict[str, tuple[Any, str]] = {
    "backbone": (str, "timm model name"),
    "pretrained": (str, "timm-keyed weights file, 'efficientnet-lite0-package', or '' for random init"),
    "last_stride": (boolean, "ResNet family: stride 1 in the last stage (re-ID trick)"),
    "bnneck": (boolean, "bias-free neck BatchNorm (BNNeck, re-ID trick)"),
    "head": (str, "arcface | subcenter_arcface | cosface"),
    "subcenter_k": (int, "sub-centers per class (subcenter_arcface)"),
    "dynamic_margin": (boolean, "per-class margins a·f(count^-1/4)+b (1st place GLR2021)"),
    "label_smoothing": (float, "label smoothing of the cross-entropy"),
    "class_weight_power": (float, "class loss weights ∝ count^-power (0: off)"),
    "image_size": (int, "training image size"),
    "train_set": (str, "clean | c2x | full | all"),
    "sampler": (str, "shuffle | id_uniform | continent"),
    "pk_k": (int, "images per class of the id_uniform (P×K) sampler"),
    "continent_probs": (None, "config only: mapping continent: probability"),
    "clean_prob": (float, "continent sampler: probability of a clean image (default 0.66)"),
    "random_erasing": (float, "random-erasing probability (re-ID trick; 0: off)"),
    "hflip": (boolean, "random horizontal flips"),
    "allow_val_leak": (boolean, "let 'all' keep the validation ground truth (marks the CV invalid)"),
    "val_fraction": (float, "hold out this fraction of train images for val/loss and val/acc"),
    "optimizer": (str, "adamw | sgd"),
    "lr": (float, "peak learning rate (head and neck)"),
    "backbone_lr_mult": (float, "backbone learning-rate multiplier"),
    "warmup_epochs": (float, "linear warm-up in epochs (default: warmup_frac of the steps)"),
    "accumulate_grad_batches": (int, "gradient accumulation"),
    "init_from": (str, "artifact whose weights start this stage (weights only: fresh optimiser)"),
    "accelerator": (str, "Lightning accelerator (auto, cpu, gpu)"),
    "devices": (devices, "Lightning devices per node (auto, 1, 4, …)"),
    "num_nodes": (int, "Lightning num_nodes"),
    "strategy": (str, "Lightning strategy (auto, ddp, …)"),
    "precision": (str, "Lightning precision (32-true, bf16-mixed, 16-mixed)"),
    "limit_train_batches": (float, "train on this many batches (int) or this fraction (<1) per epoch"),
    "experiment": (str, "experiment id written into the artifact"),
    "stage": (str, "stage name written into the artifact"),
}


def _train_flags() -> dict[str, tuple[Any, str]]:
    from glr.train.fit import TRAIN_DEFAULTS

    flags = {}
    for k, default in TRAIN_DEFAULTS.items():
        typ, hlp = _TRAIN_HELP.get(k, (None, ""))
        if typ is None and k in _TRAIN_HELP:
            continue  # config-only option
        if typ is None:
            typ = boolean if isinstance(default, bool) else type(default) if default is not None else str
        flags[k] = (typ, f"{hlp} (default {default})".strip())
    return flags


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``train``, ``experiment`` and ``ablate``."""
    t = sub.add_parser("train", help="train one stage (GeM + neck + margin head); writes OUT/model.pt")
    t.add_argument("--data", required=True, help="GLDv2-format root")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--config", help="YAML experiment config (command-line options win)")
    t.add_argument("--config-stage", help="which stage of a staged config to train")
    for name, (typ, hlp) in _train_flags().items():
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=hlp)
    t.set_defaults(func=run_train)

    x = sub.add_parser("experiment", help="train every stage of an experiment config, CV after each; "
                                          "artifacts and manifest in WEIGHTS/<experiment>/")
    x.add_argument("config", help="YAML experiment config (options + stages)")
    x.add_argument("--data", required=True, help="GLDv2-format root")
    x.add_argument("--runs", default="runs", help="run folders: RUNS/<experiment>/<stage>")
    x.add_argument("--weights", default="weights", help="artifacts: WEIGHTS/<experiment>/<stage>.pt")
    x.add_argument("--set", action="append", metavar="KEY=VALUE", help="option for every stage (repeatable)")
    x.add_argument("--no-cv", action="store_true", help="skip the CV after each stage")
    x.add_argument("--no-recognition", action="store_true", help="CV without the recognition GAP")
    x.add_argument("--force", action="store_true", help="retrain stages already in the manifest")
    x.set_defaults(func=run_experiment)

    ab = sub.add_parser("ablate", help="the seed's Tables 2 and 3 (re-ID tricks, samplers) on a root")
    ab.add_argument("--data", required=True, help="GLDv2-format root with a retrieval solution")
    ab.add_argument("--config", required=True, help="the baseline's options (first stage of a config)")
    ab.add_argument("--out", default="runs/ablation")
    ab.add_argument("--tables", nargs="+", default=["2", "3"], help="which tables (2 = tricks, 3 = samplers)")
    ab.add_argument("--set", action="append", metavar="KEY=VALUE", help="option for every run (repeatable)")
    ab.set_defaults(func=run_ablate)


def run_train(args: argparse.Namespace) -> int:
    from glr.train.fit import train
    from glr.workflows.experiment import parse_experiment

    opts: dict[str, Any] = {}
    if args.config:
        exp = parse_experiment(args.config)
        names = [n for n, _ in exp.stages]
        if args.config_stage is None and len(names) > 1:
            raise InputError(f"the config has stages {names}: pass --config-stage NAME or run "
                             "'glr experiment'", args.config)
        pick = args.config_stage or names[0]
        if pick not in names:
            raise InputError(f"no stage {pick!r}; the config has {names}", args.config)
        opts = dict(dict(exp.stages)[pick], experiment=exp.name, stage=pick if len(names) > 1 else None)
    opts.update({k: getattr(args, k) for k in _train_flags() if getattr(args, k, None) is not None})
    print(train(args.data, args.out, **opts))
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    from glr.workflows.experiment import run_experiment as run

    run(args.config, args.data, runs=args.runs, weights=args.weights, overrides=yaml_overrides(args.set),
        do_cv=not args.no_cv, cv_recognition=not args.no_recognition, force=args.force)
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from glr.workflows.experiment import ablate

    ablate(args.data, args.out, args.config, tables=args.tables, overrides=yaml_overrides(args.set))
    return 0
