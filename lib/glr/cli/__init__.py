"""The ``glr`` command line: ``glr synth | train | experiment | ablate | embed | search | cv | score | report |
eval-revisitop | weights | kernel | submit | demo``.

Every subcommand takes a GLDv2-format root (official v2.1 file names or the Kaggle 2021
layout); bad input ends with a one-line error naming the file and line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from glr.utils import InputError


def _load_config(path: str | None) -> dict:
    """Read a YAML/JSON config mapping (keys with '-' become '_')."""
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


def _bool(x: str) -> bool:
    v = x.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {x!r}")


def _devices(x: str) -> int | str:
    return int(x) if x.isdigit() else x


#: ``glr train`` flags: every key of glr.train.fit.TRAIN_DEFAULTS; (type, help) for the ones
#: whose default does not tell the type, or that deserve a help line.
_TRAIN_HELP: dict[str, tuple[Any, str]] = {
    "backbone": (str, "timm model name"),
    "pretrained": (str, "timm-keyed weights file, 'efficientnet-lite0-package', or '' for random init"),
    "last_stride": (_bool, "ResNet family: stride 1 in the last stage (re-ID trick)"),
    "bnneck": (_bool, "bias-free neck BatchNorm (BNNeck, re-ID trick)"),
    "head": (str, "arcface | subcenter_arcface | cosface"),
    "subcenter_k": (int, "sub-centers per class (subcenter_arcface)"),
    "dynamic_margin": (_bool, "per-class margins a·f(count^-1/4)+b (1st place GLR2021)"),
    "label_smoothing": (float, "label smoothing of the cross-entropy"),
    "class_weight_power": (float, "class loss weights ∝ count^-power (0: off)"),
    "image_size": (int, "training image size"),
    "train_set": (str, "clean | c2x | full | all"),
    "sampler": (str, "shuffle | id_uniform | continent"),
    "pk_k": (int, "images per class of the id_uniform (P×K) sampler"),
    "continent_probs": (None, "config only: mapping continent: probability"),
    "clean_prob": (float, "continent sampler: probability of a clean image (default 0.66)"),
    "random_erasing": (float, "random-erasing probability (re-ID trick; 0: off)"),
    "hflip": (_bool, "random horizontal flips"),
    "allow_val_leak": (_bool, "let 'all' keep the validation ground truth (marks the CV invalid)"),
    "val_fraction": (float, "hold out this fraction of train images for val/loss and val/acc"),
    "optimizer": (str, "adamw | sgd"),
    "lr": (float, "peak learning rate (head and neck)"),
    "backbone_lr_mult": (float, "backbone learning-rate multiplier"),
    "warmup_epochs": (float, "linear warm-up in epochs (default: warmup_frac of the steps)"),
    "accumulate_grad_batches": (int, "gradient accumulation"),
    "init_from": (str, "artifact whose weights start this stage (weights only: fresh optimiser)"),
    "accelerator": (str, "Lightning accelerator (auto, cpu, gpu)"),
    "devices": (_devices, "Lightning devices per node (auto, 1, 4, …)"),
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
            typ = _bool if isinstance(default, bool) else type(default) if default is not None else str
        flags[k] = (typ, f"{hlp} (default {default})".strip())
    return flags


def _overrides(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs; values are parsed as YAML scalars (``4``, ``true``, ``0.1``)."""
    import yaml

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InputError(f"--set expects key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


#: An example per subcommand, shown at the end of its --help (and the walk-through in ``glr --help``).
EXAMPLES: dict[str, str] = {
    "synth": "glr synth runs/demo/data --n-landmarks 120",
    "train": "glr train --data runs/demo/data --out runs/lite0_s1 --backbone efficientnet_lite0 --image-size 96 "
             "--epochs 6",
    "experiment": "glr experiment configs/exp010_lite0_seed.yaml --data /data/gldv2 --set devices=4 --set strategy=ddp",
    "ablate": "glr ablate --data runs/demo/data --config configs/ablate_lite0_synth.yaml --tables 2 3",
    "weights": "glr weights pack --ensemble configs/ensembles/seed_plus_henkel.yaml --out runs/pack --id me/glr-weights",
    "cv": "glr cv --data runs/demo/data --ensemble submission/ensemble.yaml --sweep default --out runs/cv",
    "score": "glr score --task retrieval --solution retrieval_solution_v2.1.csv --submission submission.csv",
    "demo": "glr demo            # synth → train → CV → report → kernel, about 15 min on 2 CPU cores",
    "embed": "glr embed --model weights/exp010/s4.pt --data /data/gldv2 --split index --out emb_index.npz "
             "--devices 4 --strategy ddp\n"
             "  glr embed --model weights/exp010/s4.pt --data /data/gldv2 --split train --out emb_train --shards "
             "  # resumable: rerun after a kill",
    "search": "glr search --query emb_test --index emb_index --qe-dba 3 3 --out submission.csv",
    "kernel": "glr kernel build --ensemble submission/ensemble.yaml --out kernels/my --kernel-id me/glr-my-kernel "
              "--weights-dataset me/glr-my-weights",
    "submit": "glr submit kernel push --kernel kernels/my",
    "report": "glr report --cv submission --data runs/demo/data   # writes submission/report/report.html",
    "eval-revisitop": "glr eval-revisitop --data data/roxford5k --model weights/exp010/s4.pt\n"
                      "  (revisitop's layout, downloaded by you: DIR/jpg/*.jpg and DIR/gnd_roxford5k.pkl)",
}
_WALKTHROUGH = """from the demo to a submission:
  glr demo                                              # everything on the embedded data
  glr experiment configs/exp010_lite0_seed.yaml --data /data/gldv2     # staged training on GLDv2
  glr cv --data /data/gldv2 --ensemble configs/ensembles/seed_plus_henkel.yaml --sweep configs/postprocess/sweep_gldv2.yaml
  glr report --cv submission --data /data/gldv2         # the CV as one HTML page
  glr kernel build --ensemble … --post submission/postprocess.yaml --out kernels/my --kernel-id me/glr-my-kernel \\
      --weights-dataset me/glr-my-weights && glr kernel run --data /data/gldv2 --kernel kernels/my
  glr submit dataset --folder kernels/my/weights && glr submit kernel push --kernel kernels/my
each command's --help ends with an example."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=_WALKTHROUGH)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="write the embedded GLDv2-shaped dataset")
    s.add_argument("out", help="folder to write the root into")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-landmarks", type=int, default=120)
    s.add_argument("--image-size", type=int, default=96)
    s.add_argument("--scale", type=float, default=1.0, help="multiplies the image counts")

    t = sub.add_parser("train", help="train one stage (GeM + neck + margin head); writes OUT/model.pt")
    t.add_argument("--data", required=True, help="GLDv2-format root")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--config", help="YAML experiment config (command-line options win)")
    t.add_argument("--config-stage", help="which stage of a staged config to train")
    for name, (typ, hlp) in _train_flags().items():
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=hlp)

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

    ab = sub.add_parser("ablate", help="the seed's Tables 2 and 3 (re-ID tricks, samplers) on a root")
    ab.add_argument("--data", required=True, help="GLDv2-format root with a retrieval solution")
    ab.add_argument("--config", required=True, help="the baseline's options (first stage of a config)")
    ab.add_argument("--out", default="runs/ablation")
    ab.add_argument("--tables", nargs="+", default=["2", "3"], help="which tables (2 = tricks, 3 = samplers)")
    ab.add_argument("--set", action="append", metavar="KEY=VALUE", help="option for every run (repeatable)")

    w = sub.add_parser("weights", help="weights: pack artifacts into a Kaggle dataset folder")
    wsub = w.add_subparsers(dest="weights_cmd", required=True)
    wp = wsub.add_parser("pack", help="copy artifacts + manifest.json + dataset-metadata.json into OUT")
    wp.add_argument("artifacts", nargs="*", help="artifacts (model.pt files)")
    wp.add_argument("--ensemble", help="or: an ensemble YAML whose members are packed")
    wp.add_argument("--weights", default="weights", help="weights folder the ensemble's experiments live in")
    wp.add_argument("--out", required=True, help="dataset folder to create")
    wp.add_argument("--id", required=True, dest="dataset_id", help="Kaggle dataset id owner/slug")
    wp.add_argument("--title", help="dataset title (6-50 characters)")
    wp.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("cv", help="embed → search → submissions → score on a GLDv2-format root")
    c.add_argument("--data", required=True)
    c.add_argument("--model", nargs="+", help="model artifact(s); several are an ensemble (concatenated)")
    c.add_argument("--ensemble", help="ensemble YAML (members: experiment / artifact, weight)")
    c.add_argument("--weights", default="weights", help="weights folder of the ensemble's experiments")
    c.add_argument("--descriptor", choices=["model", "imagenet", "thumbnail"], default="model")
    c.add_argument("--out", default="submission")
    c.add_argument("--image-size", type=int)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--num-workers", type=int, default=2)
    c.add_argument("--no-recognition", action="store_true", help="skip the train-set embedding and GAP")
    c.add_argument("--train-subset", choices=["clean", "full"], default="clean",
                   help="train images voting for recognition and tagging images for re-ranking")
    c.add_argument("--post", metavar="YAML", help="post-processing config to apply (see glr.postprocess.steps)")
    c.add_argument("--sweep", metavar="GRID", help="sweep grid YAML: score every post-processing setting "
                   "(graphs cached), tune on Public, report Private; 'default' = the demo's grid")
    c.add_argument("--protocol", choices=["v2.1", "2021"], default="v2.1",
                   help="v2.1: Public/Private; 2021: the seed's (queries with ground truth vs --index-list "
                        "expanded with every ground-truth image)")
    c.add_argument("--index-list", help="CSV with an id column: the index for --protocol 2021")
    c.add_argument("--embeddings", metavar="DIR", help="reuse emb_<split>.npz of an earlier cv run in DIR")
    c.add_argument("--tta-flip", action="store_true", help="TTA: average with the mirrored image")
    c.add_argument("--tta-scales", type=float, nargs="+", default=[1.0], help="TTA scales, e.g. 0.707 1 1.414")
    c.add_argument("--ensemble-mode", choices=["concat", "sum"], default="concat",
                   help="concat: Σw²cos/Σw² (normalised concatenation); sum: the seed's Σw·cos/Σw")
    c.add_argument("--distractors", help="npz embeddings of out-of-domain images (non-landmark penalty)")
    c.add_argument("--cache-dir", help="kNN graph cache of the sweep (default OUT/graph_cache)")
    c.add_argument("--strict-images", action="store_true",
                   help="fail on the first unreadable image (default: skip it, as the kernel does: an unreadable "
                        "query gets an empty row, an unreadable index or train image is left out; counts in cv.json)")

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
    d.add_argument("--weights", help="artifacts and manifests: WEIGHTS/<experiment>/ (default WORK/weights)")
    d.add_argument("--num-workers", type=int, default=2)
    d.add_argument("--kernel", default="kernels/demo", help="where to build the demo's Kaggle kernel (then run locally)")
    d.add_argument("--no-kernel", action="store_true", help="skip building and running the kernel")
    # --- glr embed (multi-GPU / multi-node export through Lightning strategies) ---
    e = sub.add_parser("embed", help="embed one split with a model artifact (any Lightning strategy); "
                                     "writes ids + embeddings to an .npz")
    e.add_argument("--model", required=True, help="model artifact (model.pt)")
    e.add_argument("--data", required=True, help="GLDv2-format root")
    e.add_argument("--split", choices=["train", "index", "test"], required=True,
                   help="train = the clean subset")
    e.add_argument("--out", required=True, help="output .npz (ids, emb)")
    e.add_argument("--image-size", type=int, help="default: the artifact's image size")
    e.add_argument("--batch-size", type=int, default=64, help="images per batch and process")
    e.add_argument("--num-workers", type=int, default=2, help="data-loader workers per process")
    e.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu)")
    e.add_argument("--devices", default="auto", help="Lightning devices per node (auto, 1, 4, …)")
    e.add_argument("--num-nodes", type=int, default=1, help="Lightning num_nodes")
    e.add_argument("--strategy", default="auto", help="Lightning strategy (auto, ddp, …)")
    e.add_argument("--precision", help="Lightning precision (default 16-mixed on CUDA, 32-true on CPU)")
    e.add_argument("--shards", action="store_true",
                   help="write OUT as a resumable sharded store (a folder; no Lightning): run again after a "
                        "crash or kill to compute only the missing shards; under torchrun each process takes "
                        "its own shards")
    e.add_argument("--shard-size", type=int, default=50_000, help="images per shard (with --shards)")
    e.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="stored dtype (with --shards)")
    e.add_argument("--tta-flip", action="store_true", help="also embed mirrored images (with --shards)")
    e.add_argument("--tta-scales", type=float, nargs="+", default=[1.0], help="TTA scales (with --shards)")
    # --- end glr embed ---
    se = sub.add_parser("search", help="retrieval submission from saved embeddings (.npz or sharded stores, "
                                       "read shard by shard), with optional joint αQE+DBA")
    se.add_argument("--query", required=True, help="query embeddings: .npz or a glr embed --shards folder")
    se.add_argument("--index", required=True, help="index embeddings: .npz or a glr embed --shards folder")
    se.add_argument("--out", required=True, help="submission.csv to write (atomically)")
    se.add_argument("--k", type=int, default=100, help="images per query")
    se.add_argument("--qe-dba", nargs=2, type=float, metavar=("K", "ALPHA"),
                    help="joint αQE+DBA with K neighbours and exponent ALPHA before the search")
    se.add_argument("--work", help="folder for the expanded index store (default OUT.work)")
    se.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch", "numpy"])
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
    kb.add_argument("--num-workers", type=int, default=2)
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
        "wheels", help="download the wheels Kaggle's image lacks (faiss) into a dataset folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  glr kernel wheels --kernel kernels/demo          # into kernels/demo/wheels\n"
               "  glr kernel wheels --out wheels --id me/glr-wheels --package faiss-gpu-cu12")
    kw.add_argument("--kernel", help="a built kernel: wheels go to KERNEL/wheels with its wheels dataset id")
    kw.add_argument("--out", help="dataset folder (instead of --kernel)")
    kw.add_argument("--id", dest="dataset_id", help="dataset id owner/slug (instead of --kernel)")
    kw.add_argument("--package", nargs="+", help="pip requirements (default faiss-cpu==1.15.1)")
    kw.add_argument("--python-version", default="3.11", help="Kaggle's Python")
    kw.add_argument("--platform", nargs="+", default=["manylinux_2_28_x86_64", "manylinux2014_x86_64"],
                    help="wheel platform tags Kaggle's image accepts")
    kw.add_argument("--find-links", nargs="+", default=[], help="local folders of wheels")
    kw.add_argument("--no-index", action="store_true", help="do not use PyPI")
    kw.add_argument("--overwrite", action="store_true")
    kr = ksub.add_parser(
        "run", help="run a built kernel in a simulated /kaggle (fresh interpreter, no glr) and check parity",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  glr kernel run --data runs/demo/data --kernel kernels/demo")
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
    kr.add_argument("--json", action="store_true", help="print the result as JSON")
    rp = sub.add_parser("report", help="a CV run's pictures and tables in one HTML file (PNGs beside it)")
    rp.add_argument("--cv", required=True, help="a glr cv output folder (cv.json, submission.csv, emb_*.npz)")
    rp.add_argument("--data", required=True, help="the GLDv2-format root it was run on")
    rp.add_argument("--out", help="report folder (default CV/report)")
    rp.add_argument("--title", help="page title")
    rv = sub.add_parser("eval-revisitop",
                        help="Revisited Oxford / Paris: Easy, Medium, Hard mAP and mP@k of a model or ensemble")
    rv.add_argument("--data", required=True, help="dataset folder holding jpg/ and gnd_<name>.pkl")
    rv.add_argument("--gnd", help="ground-truth pickle (default: the gnd_*.pkl in --data)")
    rv.add_argument("--model", nargs="+", help="model artifact(s); several are an ensemble")
    rv.add_argument("--ensemble", help="ensemble YAML")
    rv.add_argument("--weights", default="weights", help="weights folder of the ensemble's experiments")
    rv.add_argument("--image-size", type=int, help="default: each artifact's image size")
    rv.add_argument("--batch-size", type=int, default=32)
    rv.add_argument("--json", action="store_true", help="print the figures as JSON (fractions)")
    from glr.cli.submit import add_submit_parser

    add_submit_parser(sub)  # glr submit: datasets, kernels and submissions through the kaggle client
    for name, example in EXAMPLES.items():
        parser = sub.choices[name]
        if not parser.epilog:
            parser.formatter_class = argparse.RawDescriptionHelpFormatter
            parser.epilog = f"example:\n  {example}"
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
        from glr.data.synth import make_synthetic_gldv2

        summary = make_synthetic_gldv2(args.out, seed=args.seed, n_landmarks=args.n_landmarks,
                                       image_size=args.image_size, scale=args.scale)
        print(json.dumps(summary, indent=2))
        return 0

    if args.cmd == "embed":  # Lightning's ddp launcher re-runs this command line for the other ranks
        import contextlib

        from glr.train.export import export_embeddings, global_rank

        if args.shards:
            from glr.embed.sharded import embed_to_shards

            summary = embed_to_shards(args.model, args.data, args.split, args.out, image_size=args.image_size,
                                      dtype=args.dtype, shard_size=args.shard_size, batch_size=args.batch_size,
                                      num_workers=args.num_workers, flip=args.tta_flip, scales=args.tta_scales)
            print(f"{summary['path']}: {summary['computed']} shards computed, {summary['present']} already "
                  f"there, {summary['missing']} left to other workers, of {summary['shards']}; "
                  f"{summary['unreadable']} unreadable images skipped ({summary['seconds']:.1f} s)")
            return 0
        devices = int(args.devices) if args.devices.isdigit() else args.devices
        try:
            with contextlib.redirect_stdout(sys.stderr):  # progress bars; stdout is the path alone
                path = export_embeddings(args.model, args.data, args.split, args.out,
                                         image_size=args.image_size, batch_size=args.batch_size,
                                         num_workers=args.num_workers, accelerator=args.accelerator,
                                         devices=devices, num_nodes=args.num_nodes, strategy=args.strategy,
                                         precision=args.precision)
        except InputError:
            if global_rank() > 0:  # rank 0 reports it; a failing child would get rank 0 killed first
                return 0
            raise
        if global_rank() == 0:
            print(path)
        return 0


    if args.cmd == "search":
        from glr.predict import search_embeddings

        expansion = (int(args.qe_dba[0]), float(args.qe_dba[1])) if args.qe_dba else None
        res = search_embeddings(args.query, args.index, args.out, k=args.k, expansion=expansion,
                                         work=args.work, backend=args.backend)
        print(f"{res['out']}: {res['queries']} queries against {res['index']} index images in {res['seconds']} s; "
              f"{res['unreadable_queries']} unreadable queries (empty rows), {res['unreadable_index']} unreadable "
              "index images (never returned)")
        return 0
    if args.cmd == "train":
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
        from glr.train.fit import train

        path = train(args.data, args.out, **opts)
        print(path)
        return 0
    if args.cmd == "experiment":
        from glr.workflows.experiment import run_experiment

        run_experiment(args.config, args.data, runs=args.runs, weights=args.weights,
                       overrides=_overrides(args.set), do_cv=not args.no_cv,
                       cv_recognition=not args.no_recognition, force=args.force)
        return 0
    if args.cmd == "ablate":
        from glr.workflows.experiment import ablate

        ablate(args.data, args.out, args.config, tables=args.tables, overrides=_overrides(args.set))
        return 0
    if args.cmd == "weights":
        from glr.kaggle.publish import pack
        from glr.model.weights import read_ensemble

        artifacts = list(args.artifacts)
        if args.ensemble:
            artifacts += [str(m["artifact"]) for m in read_ensemble(args.ensemble, args.weights)]
        if not artifacts:
            raise InputError("nothing to pack: give artifacts or --ensemble FILE")
        print(pack(artifacts, args.out, args.dataset_id, title=args.title, overwrite=args.overwrite))
        return 0
    if args.cmd == "cv":
        from glr.report import cv_table
        from glr.workflows.cv import cv

        artifacts, member_weights = list(args.model or []), None
        if args.ensemble:
            from glr.model.weights import read_ensemble

            members = read_ensemble(args.ensemble, args.weights)
            artifacts += [str(m["artifact"]) for m in members]
            member_weights = [1.0] * len(args.model or []) + [float(m["weight"]) for m in members]
        if args.descriptor == "model" and not artifacts and not args.embeddings:
            raise InputError("--model ARTIFACT (or --ensemble FILE, or --embeddings DIR) is needed "
                             "with --descriptor model")
        from glr.eval.sweep import DEFAULT_GRID

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
            import errno

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
    if args.cmd == "kernel":
        return _kernel(args)
    if args.cmd == "report":
        from glr.report import write_report

        print(write_report(args.cv, args.data, args.out or str(Path(args.cv) / "report"), title=args.title))
        return 0
    if args.cmd == "eval-revisitop":
        from glr.eval import revisitop

        artifacts = list(args.model or [])
        if args.ensemble:
            from glr.model.weights import read_ensemble

            artifacts += [str(m["artifact"]) for m in read_ensemble(args.ensemble, args.weights)]
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
    if args.cmd == "submit":
        from glr.cli.submit import run_submit

        return run_submit(args)
    if args.cmd == "demo":
        from glr.workflows.demo import demo

        demo(data=args.data, out=args.out, work=args.work, quick=args.quick,
                      train_args={"epochs": args.epochs} if args.epochs else None,
                      baselines=not args.no_baselines, num_workers=args.num_workers, weights=args.weights,
                      kernel=None if args.no_kernel else args.kernel)
        return 0
    raise AssertionError(args.cmd)


def _kernel(args: argparse.Namespace) -> int:
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
        from glr.kaggle.kernel.wheels import DEFAULT_PACKAGES, collect_wheels

        out, dataset_id = args.out, args.dataset_id
        if args.kernel:
            from glr.kaggle.kernel.build import WHEELS_DIR, read_kernel

            _, settings, _ = read_kernel(args.kernel)
            out = out or str(Path(args.kernel) / WHEELS_DIR)
            dataset_id = dataset_id or settings.get("wheels_dataset")
        if not out or not dataset_id:
            raise InputError("give --kernel DIR (built with --wheels-dataset), or --out DIR and --id owner/slug")
        wheels = collect_wheels(out, dataset_id, args.package or DEFAULT_PACKAGES, args.python_version,
                                args.platform, args.find_links, args.no_index, overwrite=args.overwrite)
        print("\n".join(str(w) for w in wheels))
        return 0
    if args.kernel_cmd == "run":
        from glr.kaggle.kernel.local import format_result, run_local

        layouts = ["classic", "nested"] if args.layout == "both" else [args.layout]
        result = run_local(args.data, args.kernel, layouts, rerun=args.rerun, overrides=_overrides(args.set),
                           parity=not args.no_parity, keep=args.keep, timeout=args.timeout,
                           without=args.without)
        print(json.dumps(result, indent=2, default=str) if args.json else format_result(result))
        bad = [r for r in result["runs"].values() if r["returncode"] != 0 or r["status"] != "ok"]
        unequal = result.get("parity") is not None and not result["parity"]["identical"]
        return 1 if bad or unequal else 0
    raise AssertionError(args.kernel_cmd)


if __name__ == "__main__":
    sys.exit(main())
