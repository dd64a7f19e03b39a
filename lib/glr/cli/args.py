"""Argument types and argument groups that several ``glr`` commands share."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from glr.utils import InputError


def devices(x: str) -> int | str:
    """Lightning's ``devices``: a count, or a name such as ``auto``."""
    return int(x) if x.isdigit() else x


def workers(x: str) -> int | str:
    """``--num-workers``: a count >= 0, or ``auto`` (the usable cores less one, at most 8; resolved where
    the loader runs: :func:`glr.data.images.resolve_num_workers`)."""
    if x == "auto":
        return x
    if x.isdigit():
        return int(x)
    raise argparse.ArgumentTypeError(f"expected a number of workers >= 0 or 'auto', got {x!r}")


def yaml_overrides(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs; values are parsed as YAML scalars (``4``, ``true``, ``0.1``)."""
    import yaml

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InputError(f"--set expects key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def add_ensemble_args(p: argparse.ArgumentParser, required_model: bool = False) -> None:
    """``--model A.safetensors [B.safetensors …]``, ``--ensemble E.yaml`` and ``--weights DIR`` (where its
    experiments live)."""
    p.add_argument("--model", nargs="+", required=required_model,
                   help="model artifact(s); several are an ensemble (concatenated)")
    p.add_argument("--ensemble", help="ensemble YAML (members: experiment / artifact, weight)")
    p.add_argument("--weights", default="weights", help="weights folder of the ensemble's experiments")


def ensemble_members(args: argparse.Namespace) -> tuple[list[str], list[float] | None]:
    """The artifacts of ``--model`` then ``--ensemble``, and their weights (None: all 1)."""
    from glr.model.weights import read_ensemble

    artifacts, weights = list(args.model or []), None
    if args.ensemble:
        members = read_ensemble(args.ensemble, args.weights)
        artifacts += [str(m["artifact"]) for m in members]
        weights = [1.0] * len(args.model or []) + [float(m["weight"]) for m in members]
    return artifacts, weights


def add_tta_args(p: argparse.ArgumentParser, note: str = "") -> None:
    """``--tta-flip`` and ``--tta-scales``."""
    p.add_argument("--tta-flip", action="store_true", help="TTA: average with the mirrored image" + note)
    p.add_argument("--tta-scales", type=float, nargs="+", default=[1.0], help="TTA scales, e.g. 0.707 1 1.414" + note)


def add_loader_args(p: argparse.ArgumentParser, batch_size: int = 64, per_process: bool = False) -> None:
    """``--batch-size`` and ``--num-workers``."""
    each = " per process" if per_process else ""
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"images per batch{each}")
    p.add_argument("--num-workers", type=workers, default="auto",
                   help=f"data-loader workers{each}: a count, or auto (the usable cores less one, at most 8)")


def add_lightning_args(p: argparse.ArgumentParser, precision_help: str) -> None:
    """Lightning's hardware switches: accelerator, devices, num_nodes, strategy, precision."""
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu)")
    p.add_argument("--devices", default="auto", type=devices, help="Lightning devices per node (auto, 1, 4, …)")
    p.add_argument("--num-nodes", type=int, default=1, help="Lightning num_nodes")
    p.add_argument("--strategy", default="auto", help="Lightning strategy (auto, ddp, …)")
    p.add_argument("--precision", help=precision_help)


def add_ensemble_mode_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ensemble-mode", choices=["concat", "sum"], default="concat",
                   help="concat: Σw²cos/Σw² (normalised concatenation); sum: the seed's Σw·cos/Σw")
