"""The Kaggle commands: ``glr weights pack``, ``glr kernel build | wheels | run`` and ``glr submit``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glr.cli.args import workers, yaml_overrides
from glr.cli.submit import add_submit_parser, run_submit
from glr.utils import InputError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``weights``, ``kernel`` and ``submit``."""
    _add_weights(sub)
    _add_kernel(sub)
    add_submit_parser(sub)  # glr submit: datasets, kernels and submissions through the kaggle client
    sub.choices["submit"].set_defaults(func=run_submit)


def _add_weights(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("weights", help="weights: pack artifacts into a Kaggle dataset folder, convert legacy .pt")
    wsub = w.add_subparsers(dest="weights_cmd", required=True)
    wp = wsub.add_parser("pack", help="copy artifacts + manifest.json + dataset-metadata.json into OUT")
    wp.add_argument("artifacts", nargs="*", help="artifacts (model.safetensors files)")
    wp.add_argument("--ensemble", help="or: an ensemble YAML whose members are packed")
    wp.add_argument("--weights", default="weights", help="weights folder the ensemble's experiments live in")
    wp.add_argument("--out", required=True, help="dataset folder to create")
    wp.add_argument("--id", required=True, dest="dataset_id", help="Kaggle dataset id owner/slug")
    wp.add_argument("--title", help="dataset title (6-50 characters)")
    wp.add_argument("--overwrite", action="store_true")
    wc = wsub.add_parser(
        "convert", help="rewrite a legacy glr-artifact-v1 .pt as a safetensors artifact (same tensors)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rewrite a legacy .pt artifact (torch pickle) as glr-artifact-v2 (safetensors + JSON).\n\n"
                    "Without --trust only plain-data files convert (dicts, lists, tensors, numbers: read with\n"
                    "torch.load(weights_only=True)), which load as they are anyway.\n"
                    "WARNING: --trust unpickles IN with weights_only=False: that runs whatever code the file\n"
                    "holds. Use it only on a file you made yourself or whose source you trust.")
    wc.add_argument("input", metavar="IN", help="legacy artifact (.pt)")
    wc.add_argument("output", metavar="OUT", help="new artifact to write (e.g. model.safetensors)")
    wc.add_argument("--trust", action="store_true",
                    help="unpickle IN with weights_only=False (RUNS ITS CODE: only a file you trust)")
    wc.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    w.set_defaults(func=run_weights)


def _add_kernel(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("kernel", help="the offline Kaggle kernel: build, collect wheels, run locally")
    ksub = k.add_subparsers(dest="kernel_cmd", required=True)
    kb = ksub.add_parser(
        "build", help="generate kernels/NAME: one script embedding glr's inference modules, weights, metadata",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  glr kernel build --ensemble submission/ensemble.yaml --post submission/postprocess.yaml \\\n"
               "    --out kernels/demo --kernel-id me/glr-demo-kernel --weights-dataset me/glr-demo-weights")
    kb.add_argument("--ensemble", required=True, help="ensemble YAML (members: experiment / artifact, weight)")
    kb.add_argument("--weights", default="weights", help="weights folder of the ensemble's experiments")
    kb.add_argument("--out", required=True, help="kernel folder to create, e.g. kernels/NAME")
    kb.add_argument("--kernel-id", required=True, help="Kaggle kernel id owner/slug")
    kb.add_argument("--title", help="kernel title (must slugify to the id's slug; default from the slug)")
    kb.add_argument("--weights-dataset", required=True, help="Kaggle dataset id owner/slug for the weights")
    kb.add_argument("--wheels-dataset", help="Kaggle dataset id owner/slug of the wheels (glr kernel wheels)")
    kb.add_argument("--competition", default="landmark-retrieval-2021", help="competition slug")
    kb.add_argument("--task", choices=["retrieval", "recognition"], default="retrieval")
    kb.add_argument("--post", metavar="YAML", help="post-processing config (e.g. glr cv's postprocess.yaml)")
    kb.add_argument("--tta-flip", action="store_true")
    kb.add_argument("--tta-scales", type=float, nargs="+", default=[1.0])
    kb.add_argument("--ensemble-mode", choices=["concat", "sum"], default="concat")
    kb.add_argument("--train-subset", choices=["clean", "full"], default="clean")
    kb.add_argument("--batch-size", type=int, default=64)
    kb.add_argument("--num-workers", type=workers, default="auto",
                    help="the kernel's loader workers: a count, or auto (its usable cores less one, at most 8)")
    kb.add_argument("--commit-mode", choices=["full", "fallback"], default="full",
                    help="what the public commit run does: the whole pipeline, or only the fallback")
    kb.add_argument("--hidden-test-size", type=int, help="test images of the hidden set (timing projection)")
    kb.add_argument("--hidden-index-size", type=int, help="index images of the hidden set (default: same)")
    kb.add_argument("--countries", help="train_label_to_country.csv to ship in the weights dataset")
    kb.add_argument("--train-embeddings", help="emb_train.npz of glr cv with this same ensemble, shipped so the "
                    "kernel does not embed the train set (landmark–country tagging, recognition)")
    kb.add_argument("--no-gpu", action="store_true", help="enable_gpu false in kernel-metadata.json")
    kb.add_argument("--overwrite", action="store_true", help="replace a previous build")
    kw = ksub.add_parser(
        "wheels", help="download the wheels the kernel needs (faiss, the models' timm) into a dataset folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  glr kernel wheels --kernel kernels/demo          # into kernels/demo/wheels\n"
               "  glr kernel wheels --out wheels --id me/glr-wheels --package faiss-gpu-cu12")
    kw.add_argument("--kernel", help="a built kernel: wheels go to KERNEL/wheels with its wheels dataset id")
    kw.add_argument("--out", help="dataset folder (instead of --kernel)")
    kw.add_argument("--id", dest="dataset_id", help="dataset id owner/slug (instead of --kernel)")
    kw.add_argument("--package", nargs="+", help="pip requirements (default faiss-cpu==1.15.1 and timm at the "
                    "version the kernel's artifacts record, else this environment's)")
    kw.add_argument("--python-version", default="3.11", help="Kaggle's Python")
    kw.add_argument("--platform", nargs="+", default=["manylinux_2_28_x86_64", "manylinux2014_x86_64"],
                    help="wheel platform tags Kaggle's image accepts")
    kw.add_argument("--find-links", nargs="+", default=[], help="local folders of wheels")
    kw.add_argument("--no-index", action="store_true", help="do not use PyPI")
    kw.add_argument("--overwrite", action="store_true")
    kr = ksub.add_parser(
        "run", help="run a built kernel in a simulated /kaggle (fresh interpreter, no glr) and check parity",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  glr kernel run --data runs/demo/data --kernel kernels/demo\n\n"
               "exit status: the kernel's own (1: it failed, even if its fallback was written; 0 in the rerun,\n"
               "where the fallback still scores), else 1 when its submission differs from the library's")
    kr.add_argument("--data", required=True, help="competition data (GLDv2-format root)")
    kr.add_argument("--kernel", required=True, help="built kernel folder")
    kr.add_argument("--layout", choices=["classic", "nested", "both"], default="both",
                    help="mount layout of /kaggle/input")
    kr.add_argument("--rerun", action="store_true", help="set KAGGLE_IS_COMPETITION_RERUN (hidden-set phase)")
    kr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a kernel setting (JSON value)")
    kr.add_argument("--no-parity", action="store_true", help="skip the library run and comparison")
    kr.add_argument("--keep", help="copy each run's /kaggle/working here")
    kr.add_argument("--timeout", type=float, help="seconds per run")
    kr.add_argument("--without", nargs="+", default=[], metavar="MODULE",
                    help="hide these modules from site-packages (e.g. faiss: Kaggle's image lacks it)")
    kr.add_argument("--site-packages", nargs="+", metavar="DIR",
                    help="run the kernel with these site-packages instead of this environment's (other library "
                         "versions, e.g. Kaggle's; see bench/bench_kernel_env.py); the parity is still this one's")
    kr.add_argument("--json", action="store_true", help="print the result as JSON")
    k.set_defaults(func=run_kernel)


def run_weights(args: argparse.Namespace) -> int:
    if args.weights_cmd == "convert":
        return _convert_weights(args)
    from glr.kaggle.publish import pack
    from glr.model.weights import read_ensemble

    artifacts = list(args.artifacts)
    if args.ensemble:
        artifacts += [str(m["artifact"]) for m in read_ensemble(args.ensemble, args.weights)]
    if not artifacts:
        raise InputError("nothing to pack: give artifacts or --ensemble FILE")
    print(pack(artifacts, args.out, args.dataset_id, title=args.title, overwrite=args.overwrite))
    return 0


def _convert_weights(args: argparse.Namespace) -> int:
    from glr.model.artifact import convert_legacy

    if Path(args.output).exists() and not args.overwrite:
        raise InputError("exists (pass --overwrite to replace it)", args.output)
    print(convert_legacy(args.input, args.output, trust=args.trust))
    return 0


def run_kernel(args: argparse.Namespace) -> int:
    if args.kernel_cmd == "build":
        from glr.kaggle.kernel.build import build_kernel

        path = build_kernel(args.ensemble, args.out, args.kernel_id, args.weights_dataset, weights_dir=args.weights,
                            post=args.post, competition=args.competition, wheels_dataset=args.wheels_dataset,
                            title=args.title, enable_gpu=not args.no_gpu, overwrite=args.overwrite,
                            countries=args.countries, train_embeddings=args.train_embeddings, task=args.task,
                            tta_flip=args.tta_flip, tta_scales=args.tta_scales, ensemble_mode=args.ensemble_mode,
                            train_subset=args.train_subset, batch_size=args.batch_size,
                            num_workers=args.num_workers, commit_mode=args.commit_mode,
                            hidden_test_size=args.hidden_test_size, hidden_index_size=args.hidden_index_size)
        print(path)
        return 0
    if args.kernel_cmd == "wheels":
        from glr.kaggle.kernel.wheels import collect_wheels, default_packages

        out, dataset_id = args.out, args.dataset_id
        if args.kernel:
            from glr.kaggle.kernel.build import WHEELS_DIR, read_kernel

            _, settings, _ = read_kernel(args.kernel)
            out = out or str(Path(args.kernel) / WHEELS_DIR)
            dataset_id = dataset_id or settings.get("wheels_dataset")
        if not out or not dataset_id:
            raise InputError("give --kernel DIR (built with --wheels-dataset), or --out DIR and --id owner/slug")
        wheels = collect_wheels(out, dataset_id, args.package or default_packages(args.kernel), args.python_version,
                                args.platform, args.find_links, args.no_index, overwrite=args.overwrite)
        print("\n".join(str(w) for w in wheels))
        return 0
    if args.kernel_cmd == "run":
        from glr.kaggle.kernel.local import exit_status, format_result, run_local

        layouts = ["classic", "nested"] if args.layout == "both" else [args.layout]
        result = run_local(args.data, args.kernel, layouts, rerun=args.rerun, overrides=yaml_overrides(args.set),
                           parity=not args.no_parity, keep=args.keep, timeout=args.timeout,
                           without=args.without, site_dirs=args.site_packages)
        print(json.dumps(result, indent=2, default=str) if args.json else format_result(result))
        return exit_status(result)  # the kernel's own exit status; 1 if it was 0 but the parity failed
    raise AssertionError(args.kernel_cmd)
