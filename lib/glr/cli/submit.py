"""``glr submit``: its parser and what each subcommand runs (the work is :mod:`glr.kaggle.client`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from glr.kaggle.client import (DATASET_METADATA, DIR_MODES, FAILED_STATES, KERNEL_METADATA, SUBMISSION_FILE,
                               fetch_output, format_submissions, kernel_status, list_submissions, push_dataset,
                               push_kernel, submit_code, submit_file, wait_kernel)
from glr.submission import validate_submission_file
from glr.utils import InputError

log = logging.getLogger(__name__)

_DESCRIPTION = """Send datasets, kernels and submissions to Kaggle through the official kaggle client.

Everything a command sends is checked first (folder metadata, ids, submission files): bad input
ends with one error line, exit status 2 and no request. Credentials are the kaggle client's own:
KAGGLE_API_TOKEN or ~/.kaggle/access_token; KAGGLE_USERNAME + KAGGLE_KEY or a legacy kaggle.json;
'kaggle auth login'. glr never reads, prints or stores them."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _parser(sub, name: str, help: str, example: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                          epilog="example:\n  " + example, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_submit_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``glr submit`` (its sub-command in ``args.submit_cmd``, ``kernel``'s in ``args.kernel_cmd``)."""
    from glr.submission import TASKS

    s = _parser(sub, "submit", "send datasets, kernels and submissions to Kaggle (official kaggle client)",
                "glr submit file --competition landmark-retrieval-2021 --file submission/submission.csv "
                "--task retrieval --message 'lite0 ensemble'",
                description=_DESCRIPTION)
    ss = s.add_subparsers(dest="submit_cmd", required=True, metavar="{dataset,kernel,file,code,list}")

    d = _parser(ss, "dataset", "create a Kaggle dataset from a folder, or upload a new version if it exists",
                "glr submit dataset --folder weights/kaggle-pack --message 'exp010 stage s3'")
    d.add_argument("--folder", required=True, help=f"folder with {DATASET_METADATA} (glr weights pack output)")
    d.add_argument("--message", help="version notes of a new version")
    d.add_argument("--public", action="store_true", help="create the dataset public (default private)")
    d.add_argument("--dir-mode", choices=DIR_MODES, default="skip",
                   help="sub-folders: skip them, or upload each as one zip/tar archive (default skip)")

    k = _parser(ss, "kernel", "push a kernel, follow its run, fetch its output",
                "glr submit kernel push --kernel kernels/build && glr submit kernel status --kernel kernels/build --wait")
    ks = k.add_subparsers(dest="kernel_cmd", required=True, metavar="{push,status,output}")
    kp = _parser(ks, "push", "push a kernel folder as a new version (Kaggle runs it)",
                 "glr submit kernel push --kernel kernels/build")
    kp.add_argument("--kernel", required=True, metavar="DIR",
                    help=f"folder with {KERNEL_METADATA} (enable_internet must be false) and the code file")
    kst = _parser(ks, "status", "show the status of a kernel's latest run; --wait polls until it ends",
                  "glr submit kernel status --kernel me/glr-inference --wait --poll 60 --timeout 32400\n\n"
                  "exit status: 0 complete (or still running without --wait), 1 error, cancelled or timed out")
    kst.add_argument("--kernel", required=True, metavar="DIR_OR_ID", help="kernel folder or owner/slug")
    kst.add_argument("--wait", action="store_true", help="poll until complete, error or cancelled")
    kst.add_argument("--poll", type=_positive_float, default=30.0, metavar="SECONDS",
                     help="seconds between polls (default 30)")
    kst.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                     help="with --wait: give up after this many seconds")
    ko = _parser(ks, "output", "download a kernel's output files and validate its submission.csv",
                 "glr submit kernel output --kernel me/glr-inference --out runs/kernel-output --task retrieval")
    ko.add_argument("--kernel", required=True, metavar="DIR_OR_ID", help="kernel folder or owner/slug")
    ko.add_argument("--out", required=True, help="folder to write the files into")
    ko.add_argument("--task", choices=TASKS, default="retrieval", help="submission format to check (default retrieval)")

    f = _parser(ss, "file", "validate a submission CSV, then submit it to a competition",
                "glr submit file --competition landmark-retrieval-2021 --file submission/submission.csv "
                "--task retrieval --message 'lite0 ensemble'")
    f.add_argument("--competition", required=True, help="competition slug")
    f.add_argument("--file", required=True, help="submission CSV")
    f.add_argument("--task", required=True, choices=TASKS)
    f.add_argument("--message", required=True, help="submission description")

    c = _parser(ss, "code", "submit a kernel version to a code competition",
                "glr submit code --competition landmark-retrieval-2021 --kernel me/glr-inference --version 3 "
                "--message 'lite0 ensemble' --check runs/kernel-output/submission.csv")
    c.add_argument("--competition", required=True, help="competition slug")
    c.add_argument("--kernel", required=True, metavar="OWNER/SLUG")
    c.add_argument("--version", required=True, type=_positive_int, help="kernel version (kernel push prints it)")
    c.add_argument("--file-name", default=SUBMISSION_FILE, help=f"the kernel's output file (default {SUBMISSION_FILE})")
    c.add_argument("--message", required=True, help="submission description")
    c.add_argument("--check", metavar="FILE", help="a fetched copy of the kernel's output: validate it first")
    c.add_argument("--task", choices=TASKS, default="retrieval", help="format for --check (default retrieval)")

    ls = _parser(ss, "list", "list your submissions to a competition with their scores",
                 "glr submit list --competition landmark-retrieval-2021")
    ls.add_argument("--competition", required=True, help="competition slug")
    ls.add_argument("--limit", type=_positive_int, default=20, help="how many, newest first (default 20)")


def run_submit(args: argparse.Namespace) -> int:
    """Run a parsed ``glr submit`` command; returns the exit status (InputError is raised)."""
    cmd = args.submit_cmd
    if cmd == "dataset":
        r = push_dataset(args.folder, message=args.message, public=args.public, dir_mode=args.dir_mode)
        for name in r["skipped"]:
            print(f"warning: skipped sub-folder {name} (use --dir-mode zip or tar to upload it)", file=sys.stderr)
        if r["action"] == "created":
            print(f"created {'public' if r['public'] else 'private'} dataset {r['id']} with "
                  f"{len(r['files'])} file(s): {', '.join(r['files'])}")
        else:
            if args.public:
                print("warning: --public is ignored for a new version; the dataset keeps its visibility",
                      file=sys.stderr)
            print(f"uploaded a new version of dataset {r['id']} with {len(r['files'])} file(s): "
                  f"{', '.join(r['files'])}")
        if r["url"]:
            print(r["url"])
        return 0

    if cmd == "kernel":
        return _run_kernel(args)
    if cmd == "file":
        validate_submission_file(args.file, args.task, require_rows=True)  # a header alone is never a submission
        r = submit_file(args.competition, args.file, args.task, args.message)
        print(f"submitted {r['file']} ({r['rows']} rows) to {r['competition']}: {r['message'] or 'ok'}")
        return 0
    if cmd == "code":
        r = submit_code(args.competition, args.kernel, args.version, args.message, file_name=args.file_name,
                        check=args.check, task=args.task)
        print(f"submitted kernel {r['kernel']} version {r['version']} ({r['file_name']}) to {r['competition']}: "
              f"{r['message'] or 'ok'}")
        return 0
    if cmd == "list":
        rows = list_submissions(args.competition, limit=args.limit)
        print(format_submissions(rows) if rows else f"no submissions to {args.competition}")
        return 0
    raise InputError(f"unknown submit command {cmd!r}")


def _run_kernel(args: argparse.Namespace) -> int:
    """``glr submit kernel push | status | output``."""
    if args.kernel_cmd == "push":
        r = push_kernel(args.kernel)
        version = f" version {r['version']}" if r["version"] is not None else ""
        print(f"pushed kernel {r['ref']}{version}")
        if r["url"]:
            print(r["url"])
        for key, values in r["invalid_sources"].items():
            print(f"warning: Kaggle did not accept {key}: {', '.join(values)}", file=sys.stderr)
        return 1 if r["invalid_sources"] else 0
    if args.kernel_cmd == "status":
        if args.wait:
            def show(st: dict[str, Any]) -> None:
                print(f"{st['kernel']}: {st['status']}", flush=True)

            r = wait_kernel(args.kernel, poll=args.poll, timeout=args.timeout, on_change=show)
            if r["timed_out"]:
                print(f"glr submit: kernel {r['kernel']} still {r['status']} after {r['elapsed']:.0f} s "
                      "(--timeout)", file=sys.stderr)
                return 1
        else:
            r = kernel_status(args.kernel)
            print(f"{r['kernel']}: {r['status']}")
        if r["status"] in FAILED_STATES:
            reason = f": {r['failure_message']}" if r["failure_message"] else ""
            print(f"glr submit: kernel {r['kernel']} {r['status']}{reason}", file=sys.stderr)
            return 1
        return 0
    if args.kernel_cmd == "output":
        r = fetch_output(args.kernel, args.out, task=args.task)
        for path in r["files"]:
            print(path)
        if r["submission"] is None:
            print(f"warning: no {SUBMISSION_FILE} in the output of {r['kernel']}", file=sys.stderr)
            return 1
        if r["error"]:
            raise InputError(r["error"])
        print(f"{r['submission']}: valid {args.task} submission, {r['rows']} rows")
        return 0
    raise InputError(f"unknown submit kernel command {args.kernel_cmd!r}")


def main(argv: list[str] | None = None) -> int:
    """``glr submit ...`` on its own (tests, ``python -m``): bad input prints one line, exit 2."""
    p = argparse.ArgumentParser(prog="glr")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_submit_parser(sub)
    args = p.parse_args(argv)
    try:
        return run_submit(args)
    except InputError as e:
        print(f"glr {args.cmd}: error: {e}", file=sys.stderr)
        return 2
