"""The inference and evaluation commands: ``synth``, ``embed``, ``search``, ``cv``, ``score``, ``report``,
``eval-revisitop`` and ``demo``. Each handler imports what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glr.cli.args import (add_ensemble_args, add_ensemble_mode_arg, add_lightning_args, add_loader_args, add_tta_args,
                          ensemble_members)
from glr.utils import InputError, check_writable_dir, check_writable_file


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Every inference and evaluation command."""
    s = sub.add_parser("synth", help="write the embedded GLDv2-shaped dataset")
    s.add_argument("out", help="folder to write the root into")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-landmarks", type=int, default=120)
    s.add_argument("--image-size", type=int, default=96)
    s.add_argument("--scale", type=float, default=1.0, help="multiplies the image counts")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a root that glr synth wrote (a folder holding any other GLDv2 root is always refused)")
    s.set_defaults(func=run_synth)
    _add_cv(sub)
    sc = sub.add_parser("score", help="official GLDv2 metrics of a submission file")
    sc.add_argument("--task", choices=["retrieval", "recognition"], required=True)
    sc.add_argument("--solution", required=True)
    sc.add_argument("--submission", required=True)
    sc.add_argument("--json", action="store_true", help="print one JSON object")
    sc.set_defaults(func=run_score)
    _add_demo(sub)
    _add_embed(sub)
    _add_search(sub)
    rp = sub.add_parser("report", help="a CV run's pictures and tables in one HTML file (PNGs beside it)")
    rp.add_argument("--cv", required=True, help="a glr cv output folder (cv.json, submission.csv, emb_*.npz)")
    rp.add_argument("--data", required=True, help="the GLDv2-format root it was run on")
    rp.add_argument("--out", help="report folder (default CV/report)")
    rp.add_argument("--title", help="page title")
    rp.set_defaults(func=run_report)
    rv = sub.add_parser("eval-revisitop",
                        help="Revisited Oxford / Paris: Easy, Medium, Hard mAP and mP@k of a model or ensemble")
    rv.add_argument("--data", required=True, help="dataset folder holding jpg/ and gnd_<name>.pkl")
    rv.add_argument("--gnd", help="ground-truth pickle (default: the gnd_*.pkl in --data)")
    add_ensemble_args(rv)
    rv.add_argument("--image-size", type=int, help="default: each artifact's image size")
    rv.add_argument("--batch-size", type=int, default=32)
    rv.add_argument("--json", action="store_true", help="print the figures as JSON (fractions)")
    rv.set_defaults(func=run_revisitop)


def _add_cv(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("cv", help="embed → search → submissions → score on a GLDv2-format root")
    c.add_argument("--data", required=True)
    add_ensemble_args(c)
    c.add_argument("--descriptor", choices=["model", "imagenet", "thumbnail"], default="model")
    c.add_argument("--out", default="submission")
    c.add_argument("--image-size", type=int)
    add_loader_args(c)
    c.add_argument("--no-recognition", action="store_true", help="skip the train-set embedding and GAP")
    c.add_argument("--train-subset", choices=["clean", "full"], default="clean",
                   help="train images voting for recognition and tagging images for re-ranking")
    c.add_argument("--post", metavar="YAML", help="post-processing config to apply (see glr.postprocess.config)")
    c.add_argument("--sweep", metavar="GRID", help="sweep grid YAML: score every post-processing setting "
                   "(graphs cached), tune on Public, report Private; 'default' = the demo's grid")
    c.add_argument("--protocol", choices=["v2.1", "2021"], default="v2.1",
                   help="v2.1: Public/Private; 2021: the seed's (queries with ground truth vs --index-list "
                        "expanded with every ground-truth image)")
    c.add_argument("--index-list", help="CSV with an id column: the index for --protocol 2021")
    c.add_argument("--embeddings", metavar="DIR", help="reuse emb_<split>.npz of an earlier cv run in DIR")
    add_tta_args(c)
    add_ensemble_mode_arg(c)
    c.add_argument("--distractors", help="npz embeddings of out-of-domain images (non-landmark penalty)")
    c.add_argument("--cache-dir", help="kNN graph cache of the sweep (default OUT/graph_cache)")
    c.add_argument("--strict-images", action="store_true",
                   help="fail on the first unreadable image (default: skip it, as the kernel does: an unreadable "
                        "query gets an empty row, an unreadable index or train image is left out; counts in cv.json)")
    c.set_defaults(func=run_cv)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="synth (unless --data) → train → CV; writes submission.csv and cv.json")
    d.add_argument("--data", help="use this GLDv2-format root instead of the embedded one")
    d.add_argument("--out", default="submission")
    d.add_argument("--work", default="runs/demo", help="data, model and baseline outputs")
    d.add_argument("--quick", action="store_true", help="tiny data and model (seconds; for tests)")
    d.add_argument("--epochs", type=int)
    d.add_argument("--no-baselines", action="store_true")
    d.add_argument("--weights", help="artifacts and manifests: WEIGHTS/<experiment>/ (default WORK/weights)")
    d.add_argument("--num-workers", type=int, default=2)
    d.add_argument("--kernel", default="kernels/demo", help="where to build the demo's Kaggle kernel (then run locally)")
    d.add_argument("--no-kernel", action="store_true", help="skip building and running the kernel")
    d.set_defaults(func=run_demo)


def _add_embed(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("embed", help="embed one split with a model artifact (any Lightning strategy); "
                                     "writes ids + embeddings to an .npz")
    e.add_argument("--model", required=True, help="model artifact (model.safetensors)")
    e.add_argument("--data", required=True, help="GLDv2-format root")
    e.add_argument("--split", choices=["train", "index", "test"], required=True,
                   help="train = the clean subset")
    e.add_argument("--out", required=True, help="output .npz (ids, emb)")
    e.add_argument("--image-size", type=int, help="default: the artifact's image size")
    add_loader_args(e, per_process=True)
    add_lightning_args(e, "Lightning precision (default 16-mixed on CUDA, 32-true on CPU)")
    e.add_argument("--shards", action="store_true",
                   help="write OUT as a resumable sharded store (a folder; no Lightning): run again after a "
                        "crash or kill to compute only the missing shards; under torchrun each process takes "
                        "its own shards")
    e.add_argument("--shard-size", type=int, default=50_000, help="images per shard (with --shards)")
    e.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="stored dtype (with --shards)")
    add_tta_args(e, " (with --shards)")
    e.set_defaults(func=run_embed)


def _add_search(sub: argparse._SubParsersAction) -> None:
    se = sub.add_parser("search", help="retrieval submission from saved embeddings (.npz or sharded stores, "
                                       "read shard by shard), with optional joint αQE+DBA")
    se.add_argument("--query", required=True, help="query embeddings: .npz or a glr embed --shards folder")
    se.add_argument("--index", required=True, help="index embeddings: .npz or a glr embed --shards folder")
    se.add_argument("--out", required=True, help="submission.csv to write (atomically)")
    se.add_argument("--k", type=int, default=100, help="images per query")
    se.add_argument("--qe-dba", nargs=2, type=float, metavar=("K", "ALPHA"),
                    help="joint αQE+DBA with K neighbours and exponent ALPHA before the search")
    se.add_argument("--post", metavar="YAML", help="post-processing config (glr cv's postprocess.yaml): the whole chain "
                    "for .npz embeddings; a store index takes joint αQE+DBA only")
    se.add_argument("--work", help="folder for the expanded index store (default OUT.work)")
    se.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch", "numpy"])
    se.set_defaults(func=run_search)


def run_score(args: argparse.Namespace) -> int:
    from glr import metrics

    result = metrics.score(args.task, args.solution, args.submission)
    for warning in metrics.submission_warnings(args.submission, args.task):  # scored as the official code does
        print(f"glr score: warning: {args.submission}: {warning}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else metrics.format_score(result))
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from glr.data.synth import make_synthetic_gldv2

    summary = make_synthetic_gldv2(args.out, seed=args.seed, n_landmarks=args.n_landmarks,
                                   image_size=args.image_size, scale=args.scale, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def run_embed(args: argparse.Namespace) -> int:
    """Lightning's ddp launcher re-runs this command line for the other ranks."""
    import contextlib

    from glr.data.images import resolve_num_workers
    from glr.predict import embed_to_shards
    from glr.train.export import export_embeddings, global_rank

    (check_writable_dir if args.shards else check_writable_file)(args.out, "--out")
    if args.shards:
        summary = embed_to_shards(args.model, args.data, args.split, args.out, image_size=args.image_size,
                                  dtype=args.dtype, shard_size=args.shard_size, batch_size=args.batch_size,
                                  num_workers=args.num_workers, flip=args.tta_flip, scales=args.tta_scales)
        print(f"{summary['path']}: {summary['computed']} shards computed, {summary['present']} already "
              f"there, {summary['missing']} left to other workers, of {summary['shards']}; "
              f"{summary['unreadable']} unreadable images skipped ({summary['seconds']:.1f} s)")
        return 0
    try:
        with contextlib.redirect_stdout(sys.stderr):  # progress bars; stdout is the path alone
            path = export_embeddings(args.model, args.data, args.split, args.out,
                                     image_size=args.image_size, batch_size=args.batch_size,
                                     num_workers=resolve_num_workers(args.num_workers), accelerator=args.accelerator,
                                     devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
                                     precision=args.precision)
    except InputError:
        if global_rank() > 0:  # rank 0 reports it; a failing child would get rank 0 killed first
            return 0
        raise
    if global_rank() == 0:
        print(path)
    return 0


def run_search(args: argparse.Namespace) -> int:
    from glr.postprocess.config import read_config
    from glr.predict import search_embeddings

    check_writable_file(args.out, "--out")
    if args.work:
        check_writable_dir(args.work, "--work")
    expansion = (int(args.qe_dba[0]), float(args.qe_dba[1])) if args.qe_dba else None
    post = read_config(args.post) if args.post else None
    res = search_embeddings(args.query, args.index, args.out, k=args.k, expansion=expansion,
                            work=args.work, backend=args.backend, post=post)
    print(f"{res['out']}: {res['queries']} queries against {res['index']} index images in {res['seconds']} s; "
          f"{res['unreadable_queries']} unreadable queries (empty rows), {res['unreadable_index']} unreadable "
          "index images (never returned)")
    return 0


def run_cv(args: argparse.Namespace) -> int:
    import errno

    from glr.eval.sweep import DEFAULT_GRID
    from glr.report import cv_table
    from glr.workflows.cv import cv

    artifacts, member_weights = ensemble_members(args)
    if args.descriptor == "model" and not artifacts and not args.embeddings:
        raise InputError("--model ARTIFACT (or --ensemble FILE, or --embeddings DIR) is needed "
                         "with --descriptor model")
    sweep = DEFAULT_GRID if args.sweep == "default" else args.sweep
    try:
        result = cv(args.data, args.out, artifact=artifacts or None, kind=args.descriptor,
                    image_size=args.image_size, batch_size=args.batch_size,
                    num_workers=args.num_workers, recognition=not args.no_recognition,
                    train_subset=args.train_subset, member_weights=member_weights, post=args.post,
                    sweep=sweep, protocol=args.protocol, index_list=args.index_list,
                    embeddings=args.embeddings, tta_flip=args.tta_flip, tta_scales=args.tta_scales,
                    ensemble_mode=args.ensemble_mode, distractors=args.distractors,
                    cache_dir=args.cache_dir, strict_images=args.strict_images)
    except OSError as e:  # e.g. a full disk: one line, exit 1 (each output file is written atomically)
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        print(f"glr cv: error: {e}" + (f" (the files already in {args.out} are whole: each is replaced "
                                        "atomically, or not at all)" if full else ""), file=sys.stderr)
        return 1
    print(cv_table(result))
    bad = {s: n for s, n in result.get("unreadable", {}).items() if n}
    if bad:
        print("unreadable images skipped: " + ", ".join(f"{n} {s}" for s, n in bad.items())
              + " (queries: empty rows; index and train images: left out)")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from glr.report import write_report

    check_writable_dir(args.out or Path(args.cv) / "report", "--out")
    print(write_report(args.cv, args.data, args.out or str(Path(args.cv) / "report"), title=args.title))
    return 0


def run_revisitop(args: argparse.Namespace) -> int:
    from glr.eval import revisitop

    artifacts, _ = ensemble_members(args)
    if not artifacts:
        raise InputError("--model ARTIFACT (or --ensemble FILE) is needed")
    gnd = args.gnd
    if gnd is None:
        found = sorted(Path(args.data).glob("gnd_*.pkl"))
        if len(found) != 1:
            raise InputError(f"expected one gnd_*.pkl in the folder, found {len(found)} (pass --gnd)", args.data)
        gnd = found[0]
    result = revisitop.evaluate_model(args.data, gnd, artifacts, image_size=args.image_size,
                                      batch_size=args.batch_size)
    print(json.dumps(result, indent=2) if args.json else revisitop.format_result(result, result["dataset"]))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from glr.workflows.demo import demo

    kernel = None if args.no_kernel else args.kernel
    for option, folder in (("--out", args.out), ("--work", args.work), ("--kernel", kernel)):
        if folder is not None:
            check_writable_dir(folder, option)
    demo(data=args.data, out=args.out, work=args.work, quick=args.quick,
         train_args={"epochs": args.epochs} if args.epochs else None,
         baselines=not args.no_baselines, num_workers=args.num_workers, weights=args.weights,
         kernel=None if args.no_kernel else args.kernel)
    return 0
