"""The ``glr`` command line: ``glr synth | train | experiment | ablate | embed | search | cv | score | report |
eval-revisitop | weights | kernel | submit | demo``.

Every subcommand takes a GLDv2-format root (official v2.1 file names or the Kaggle 2021
layout); bad input ends with a one-line error naming the file and line, exit status 2.

One module per command group (:mod:`glr.cli.train`, :mod:`glr.cli.infer`, :mod:`glr.cli.kaggle`), each adding its
parsers with ``set_defaults(func=handler)``; a handler imports what it needs when it runs, so building the parser
(and ``glr --help``) imports no torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

import glr
from glr.cli import infer, kaggle, train
from glr.utils import InputError

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
    "demo": "glr demo            # synth → train → CV → report → kernel, about 23 min on 2 CPU cores",
    "embed": "glr embed --model weights/exp010/s4.safetensors --data /data/gldv2 --split index --out emb_index.npz "
             "--devices 4 --strategy ddp\n"
             "  glr embed --model weights/exp010/s4.safetensors --data /data/gldv2 --split train --out emb_train "
             "--shards "
             "  # resumable: rerun after a kill",
    "search": "glr search --query emb_test --index emb_index --qe-dba 3 3 --out submission.csv",
    "kernel": "glr kernel build --ensemble submission/ensemble.yaml --out kernels/my --kernel-id me/glr-my-kernel "
              "--weights-dataset me/glr-my-weights",
    "submit": "glr submit kernel push --kernel kernels/my",
    "report": "glr report --cv submission --data runs/demo/data   # writes submission/report/report.html",
    "eval-revisitop": "glr eval-revisitop --data data/roxford5k "
                      "--model weights/exp010/s4.safetensors\n"
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


#: The optional distributions a command may need, by top-level module: the extra (pyproject.toml) that installs it.
EXTRA_OF_MODULE: dict[str, str] = {"lightning": "train", "kaggle": "kaggle", "slugify": "kaggle", "requests": "kaggle",
                                   "six": "kaggle", "matplotlib": "report", "tensorboardX": "tensorboard",
                                   "mlflow": "mlflow", "wandb": "wandb"}


def version() -> str:
    """This package's version: the installed distribution's (``importlib.metadata``), else the source tree's
    ``glr.__version__`` (running from a checkout that was never installed)."""
    from importlib import metadata  # about 80 ms of email parsing: only when the version is asked for

    try:
        return metadata.version("glr")
    except metadata.PackageNotFoundError:
        return glr.__version__


class _VersionAction(argparse.Action):
    """``--version``: print ``glr X.Y.Z`` and exit 0; the version is looked up only when the flag is given."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print glr's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(f"glr {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The whole ``glr`` parser; each subcommand's handler is its ``func`` default."""
    p = argparse.ArgumentParser(prog="glr", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_WALKTHROUGH)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="cmd", required=True)
    for group in (infer, train, kaggle):
        group.add_parsers(sub)
    for name, example in EXAMPLES.items():
        parser = sub.choices[name]
        if not parser.epilog:
            parser.formatter_class = argparse.RawDescriptionHelpFormatter
            parser.epilog = f"example:\n  {example}"
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``glr`` command; returns its exit status (2 for bad input, with one error line)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, force=True,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines list every CPU build it tries
    for name in ("lightning.pytorch", "lightning.fabric"):  # they print through handlers of their own
        logging.getLogger(name).propagate = False
    try:
        return args.func(args)
    except InputError as e:
        print(f"glr {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an extra not installed (pip install glr gives the core commands only)
        top = (e.name or "").split(".")[0]
        if top not in EXTRA_OF_MODULE:
            raise
        print(f"glr {args.cmd}: error: needs {top}, which glr's core does not install: "
              f"pip install 'glr[{EXTRA_OF_MODULE[top]}]'", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
