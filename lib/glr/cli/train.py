"""``glr train``, ``glr experiment`` and ``glr ablate``: one stage, a staged experiment, the seed's ablations.

The training flags of ``glr train`` are generated from :class:`glr.train.config.TrainConfig` (help,
choices, type); a config file, ``--set`` pairs and the flags go through the same coercion and checks
(:func:`glr.train.config.check_options`), each error naming its source.
"""

from __future__ import annotations

import argparse
from typing import Any

from glr.train.config import TrainConfig, check_options, options, parse_assignments
from glr.utils import InputError, check_writable_dir


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field (strings here; typed and checked by the config)."""
    g = p.add_argument_group("training options", "any key of an experiment config; a flag wins over --set, "
                                                 "--set over --config")
    for o in options():
        g.add_argument("--" + o.name.replace("_", "-"), dest=o.name, default=None, metavar=o.metavar,
                       help=o.flag_help)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``train``, ``experiment`` and ``ablate``."""
    t = sub.add_parser("train", help="train one stage (GeM + neck + margin head); writes OUT/model.safetensors")
    t.add_argument("--data", help="GLDv2-format root (required unless --print-config)")
    t.add_argument("--out", help="run folder (required unless --print-config)")
    t.add_argument("--config", help="YAML experiment config (--set and the flags win)")
    t.add_argument("--config-stage", help="which stage of a staged config to train")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="a training option (repeatable)")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved options as YAML and exit (reads no data)")
    _add_train_flags(t)
    t.set_defaults(func=run_train)

    x = sub.add_parser("experiment", help="train every stage of an experiment config, CV after each; "
                                          "artifacts and manifest in WEIGHTS/<experiment>/")
    x.add_argument("config", help="YAML experiment config (options + stages)")
    x.add_argument("--data", help="GLDv2-format root (required unless --print-config)")
    x.add_argument("--runs", default="runs", help="run folders: RUNS/<experiment>/<stage>")
    x.add_argument("--weights", default="weights", help="artifacts: WEIGHTS/<experiment>/<stage>.safetensors")
    x.add_argument("--set", action="append", metavar="KEY=VALUE", help="option for every stage (repeatable)")
    x.add_argument("--no-cv", action="store_true", help="skip the CV after each stage")
    x.add_argument("--no-recognition", action="store_true", help="CV without the recognition GAP")
    x.add_argument("--force", action="store_true", help="retrain stages already in the manifest")
    x.add_argument("--print-config", action="store_true",
                   help="print every stage's resolved options as YAML and exit (reads no data)")
    x.set_defaults(func=run_experiment)

    ab = sub.add_parser("ablate", help="the seed's Tables 2 and 3 (re-ID tricks, samplers) on a root")
    ab.add_argument("--data", required=True, help="GLDv2-format root with a retrieval solution")
    ab.add_argument("--config", required=True, help="the baseline's options (first stage of a config)")
    ab.add_argument("--out", default="runs/ablation")
    ab.add_argument("--tables", nargs="+", default=["2", "3"], help="which tables (2 = tricks, 3 = samplers)")
    ab.add_argument("--set", action="append", metavar="KEY=VALUE", help="option for every run (repeatable)")
    ab.set_defaults(func=run_ablate)


def _set_options(pairs: list[str] | None) -> dict[str, Any]:
    """``--set`` pairs, typed and checked (a backbone must be a timm model, a head registered)."""
    from glr.train.fit import check_registered

    opts = parse_assignments(pairs, "--set")
    check_registered(opts, "--set")
    return opts


def _flag_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training flags given, typed and checked (errors name the flag)."""
    from glr.train.fit import check_registered

    opts = check_options({o.name: getattr(args, o.name) for o in options() if getattr(args, o.name) is not None},
                         flags=True)
    check_registered(opts, flags=True)
    return opts


def _required(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing and not args.print_config:
        raise InputError(f"the following arguments are required: {', '.join(missing)} (unless --print-config)")


def _config_stage(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``--config`` (its ``--config-stage``), with ``experiment`` and ``stage``."""
    from glr.workflows.experiment import parse_experiment

    if not args.config:
        return {}
    exp = parse_experiment(args.config)
    names = [n for n, _ in exp.stages]
    if args.config_stage is None and len(names) > 1:
        raise InputError(f"the config has stages {names}: pass --config-stage NAME or run 'glr experiment'",
                         args.config)
    pick = args.config_stage or names[0]
    if pick not in names:
        raise InputError(f"no stage {pick!r}; the config has {names}", args.config)
    return dict(dict(exp.stages)[pick], experiment=exp.name, stage=pick if len(names) > 1 else None)


def run_train(args: argparse.Namespace) -> int:
    from glr.train.fit import check_config, train

    _required(args, "data", "out")
    opts = dict(_config_stage(args), **_set_options(args.set))
    opts.update(_flag_options(args))
    if args.print_config:
        cfg = TrainConfig.from_options(opts)
        check_config(cfg, args.config)
        print(cfg.to_yaml(), end="")
        return 0
    check_writable_dir(args.out, "--out")  # before the data is read
    print(train(args.data, args.out, **opts))
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    from glr.workflows.experiment import describe_experiment, parse_experiment
    from glr.workflows.experiment import run_experiment as run

    _required(args, "data")
    exp, overrides = parse_experiment(args.config), _set_options(args.set)
    if args.print_config:
        print(describe_experiment(exp, overrides, args.weights), end="")
        return 0
    run(exp, args.data, runs=args.runs, weights=args.weights, overrides=overrides,
        do_cv=not args.no_cv, cv_recognition=not args.no_recognition, force=args.force)
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from glr.workflows.experiment import ablate

    ablate(args.data, args.out, args.config, tables=args.tables, overrides=_set_options(args.set))
    return 0
