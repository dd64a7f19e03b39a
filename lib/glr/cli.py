"""The ``glr`` command line: ``glr synth | train | cv | score | demo``.

Every subcommand takes a GLDv2-format root (official v2.1 file names or the Kaggle 2021
layout); bad input ends with a one-line error naming the file and line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from glr.utils import InputError


def _load_config(path: str | None) -> dict:
    """Read a YAML/JSON experiment config (flat keys = ``glr train`` options)."""
    if not path:
        return {}
    import yaml

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except OSError as e:
        raise InputError(f"cannot read config ({e.strerror})", path) from e
    if not isinstance(cfg, dict):
        raise InputError("config must be a mapping of option: value", path)
    return {k.replace("-", "_"): v for k, v in cfg.items()}


_TRAIN_OPTS = {  # option: (type, help); defaults come from glr.pipeline.train
    "backbone": (str, "timm model name"),
    "pretrained": (str, "timm-keyed weights file, 'efficientnet-lite0-package', or '' for random init"),
    "image_size": (int, "training image size"),
    "epochs": (int, "epochs"),
    "batch_size": (int, "batch size"),
    "lr": (float, "peak learning rate (head and neck)"),
    "backbone_lr_mult": (float, "backbone learning-rate multiplier"),
    "arcface_s": (float, "ArcFace scale"),
    "arcface_m": (float, "ArcFace margin"),
    "embedding_size": (int, "embedding dimension"),
    "train_subset": (str, "clean | full"),
    "min_samples": (int, "drop classes with fewer images"),
    "val_fraction": (float, "hold out this fraction of train images for val/loss and val/acc"),
    "num_workers": (int, "data-loader workers"),
    "seed": (int, "random seed"),
    "init_from": (str, "artifact whose weights start this stage"),
    "accelerator": (str, "Lightning accelerator (auto, cpu, gpu)"),
    "devices": (str, "Lightning devices (auto, 1, 4, …)"),
    "strategy": (str, "Lightning strategy (auto, ddp, …)"),
    "precision": (str, "Lightning precision (32-true, bf16-mixed, 16-mixed)"),
    "limit_train_batches": (float, "train on this many batches (int) or this fraction (<1) per epoch"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="write the embedded GLDv2-shaped dataset")
    s.add_argument("out", help="folder to write the root into")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-landmarks", type=int, default=120)
    s.add_argument("--image-size", type=int, default=96)
    s.add_argument("--scale", type=float, default=1.0, help="multiplies the image counts")

    t = sub.add_parser("train", help="fine-tune a backbone with GeM + neck + ArcFace; writes OUT/model.pt")
    t.add_argument("--data", required=True, help="GLDv2-format root")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--config", help="YAML config of train options (command-line options win)")
    for name, (typ, hlp) in _TRAIN_OPTS.items():
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=hlp)

    c = sub.add_parser("cv", help="embed → search → submissions → score on a GLDv2-format root")
    c.add_argument("--data", required=True)
    c.add_argument("--model", help="model artifact (model.pt)")
    c.add_argument("--descriptor", choices=["model", "imagenet", "thumbnail"], default="model")
    c.add_argument("--out", default="submission")
    c.add_argument("--image-size", type=int)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--num-workers", type=int, default=2)
    c.add_argument("--no-recognition", action="store_true", help="skip the train-set embedding and GAP")
    c.add_argument("--train-subset", choices=["clean", "full"], default="clean",
                   help="train images voting for recognition")

    sc = sub.add_parser("score", help="official GLDv2 metrics of a submission file")
    sc.add_argument("--task", choices=["retrieval", "recognition"], required=True)
    sc.add_argument("--solution", required=True)
    sc.add_argument("--submission", required=True)
    sc.add_argument("--json", action="store_true", help="print one JSON object")

    d = sub.add_parser("demo", help="synth (unless --data) → train → CV; writes submission.csv and cv.json")
    d.add_argument("--data", help="use this GLDv2-format root instead of the embedded one")
    d.add_argument("--out", default="submission")
    d.add_argument("--work", default="runs/demo", help="data, model and baseline outputs")
    d.add_argument("--quick", action="store_true", help="tiny data and model (seconds; for tests)")
    d.add_argument("--epochs", type=int)
    d.add_argument("--no-baselines", action="store_true")
    d.add_argument("--num-workers", type=int, default=2)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, force=True,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines list every CPU build it tries
    for name in ("lightning.pytorch", "lightning.fabric"):  # they print through handlers of their own
        logging.getLogger(name).propagate = False
    try:
        return _run(args)
    except InputError as e:
        print(f"glr {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "score":
        from glr import metrics

        result = metrics.score(args.task, args.solution, args.submission)
        print(json.dumps(result, indent=2) if args.json else metrics.format_score(result))
        return 0
    if args.cmd == "synth":
        from glr.synth import make_synthetic_gldv2

        summary = make_synthetic_gldv2(args.out, seed=args.seed, n_landmarks=args.n_landmarks,
                                       image_size=args.image_size, scale=args.scale)
        print(json.dumps(summary, indent=2))
        return 0

    from glr import pipeline

    if args.cmd == "train":
        opts = _load_config(args.config)
        unknown = set(opts) - set(_TRAIN_OPTS) - {"exp_id"}
        if unknown:
            raise InputError(f"unknown option(s) {sorted(unknown)}", args.config)
        opts.update({k: getattr(args, k) for k in _TRAIN_OPTS if getattr(args, k) is not None})
        if "limit_train_batches" in opts and float(opts["limit_train_batches"]) >= 1:
            opts["limit_train_batches"] = int(opts["limit_train_batches"])
        if "devices" in opts and str(opts["devices"]).isdigit():
            opts["devices"] = int(opts["devices"])
        opts.setdefault("exp_id", Path(args.config).stem if args.config else None)
        path = pipeline.train(args.data, args.out, **opts)
        print(path)
        return 0
    if args.cmd == "cv":
        if args.descriptor == "model" and not args.model:
            raise InputError("--model ARTIFACT is needed with --descriptor model")
        from glr.report import cv_table

        result = pipeline.cv(args.data, args.out, artifact=args.model, kind=args.descriptor,
                             image_size=args.image_size, batch_size=args.batch_size,
                             num_workers=args.num_workers, recognition=not args.no_recognition,
                             train_subset=args.train_subset)
        print(cv_table(result))
        return 0
    if args.cmd == "demo":
        pipeline.demo(data=args.data, out=args.out, work=args.work, quick=args.quick,
                      train_args={"epochs": args.epochs} if args.epochs else None,
                      baselines=not args.no_baselines, num_workers=args.num_workers)
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
