"""The post-processing chain as one configurable function, and the kNN-graph cache it shares.

A post-processing configuration is a plain dict (YAML in files), one key per step, in the
order the steps run; a step that is absent, ``null`` or ``false`` is off::

    whitening:        {dim: null, shrinkage: 0.0}            # PCA whitening fitted on the index
    expansion:        {form: joint, k: 3, alpha: 3.0, qe: true, dba: true}
                      # or {form: classic, qe_n: 2, dba_n: 10, alpha: 3.0}
    kreciprocal:      {k1: 20, k2: 6, lambda: 0.3}
    landmark_country: {alpha: 1.0, beta: 0.1, k: 3}           # needs train embeddings + labels
    train_label:      {insert: false, k: 5}                   # needs train embeddings + labels
    nonlandmark:      {weight: 1.0, k: 5}                     # needs distractor embeddings
    spatial:          {top_n: 20, max_inliers: 70, time_budget_s: 2.0, detector: sift, max_side: 512}
    shortlist: 1000   # candidates kept for the re-rankers after the kNN / k-reciprocal stage
    k: 100            # results per query returned

Images are tagged through their train-set neighbours with the *original* descriptors (the
train graphs do not depend on the expansion settings, so a sweep searches them once).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from glr.utils import InputError, atomic_write

log = logging.getLogger(__name__)

#: Every step with its options and their defaults, in the order the steps run.
STEP_DEFAULTS: dict[str, dict[str, Any]] = {
    "whitening": {"dim": None, "shrinkage": 0.0},
    "expansion": {"form": "joint", "k": 3, "alpha": 3.0, "qe": True, "dba": True, "qe_n": 2, "dba_n": 10},
    "kreciprocal": {"k1": 20, "k2": 6, "lambda": 0.3},
    "landmark_country": {"alpha": 1.0, "beta": 0.1, "k": 3},
    "train_label": {"insert": False, "k": 5},
    "nonlandmark": {"weight": 1.0, "k": 5},
    "spatial": {"top_n": 20, "max_inliers": 70, "time_budget_s": 2.0, "detector": "sift", "max_side": 512},
}


STEPS = tuple(STEP_DEFAULTS)


#: Top-level options besides the steps.
TOP_DEFAULTS: dict[str, Any] = {"shortlist": 1000, "k": 100}


#: Steps that re-rank a shortlist (they make a shortlist longer than ``k`` worth computing).
RERANKERS = ("landmark_country", "train_label", "nonlandmark", "spatial")


#: The :class:`Context` fields each re-ranker needs.
STEP_NEEDS: dict[str, tuple[str, ...]] = {"landmark_country": ("train", "train_landmarks"),
                                          "train_label": ("train", "train_landmarks"),
                                          "nonlandmark": ("distractors",), "spatial": ("q_paths", "db_paths")}


def normalize_config(config: Mapping[str, Any] | None, source: str = "post-processing config") -> dict[str, Any]:
    """A complete configuration: every step key present (``None`` = off), defaults filled in.

    Raises:
        InputError: an unknown step or option (named, with ``source``), or a bad value.
    """
    config = dict(config or {})
    out: dict[str, Any] = dict(TOP_DEFAULTS)
    for key in list(config):
        if key in TOP_DEFAULTS:
            out[key] = config.pop(key)
    for step in STEPS:
        value = config.pop(step, None)
        if value is None or value is False:
            out[step] = None
            continue
        if value is True:
            value = {}
        if not isinstance(value, Mapping):
            raise InputError(f"step {step!r} must be a mapping of options, null or false; got {value!r}", source)
        unknown = sorted(set(value) - set(STEP_DEFAULTS[step]))
        if unknown:
            raise InputError(f"step {step!r}: unknown option(s) {unknown}; known: {sorted(STEP_DEFAULTS[step])}",
                             source)
        out[step] = {**STEP_DEFAULTS[step], **value}
    if config:
        raise InputError(f"unknown key(s) {sorted(config)}; steps are {list(STEPS)}, options {list(TOP_DEFAULTS)}",
                         source)
    for key in ("shortlist", "k"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise InputError(f"{key} must be an integer >= 1, got {out[key]!r}", source)
    exp = out["expansion"]
    if exp is not None and exp["form"] not in ("joint", "classic"):
        raise InputError(f"expansion.form must be 'joint' or 'classic', got {exp['form']!r}", source)
    return out


def describe(config: Mapping[str, Any], step: str) -> str:
    """A short human label of one step's setting (for tables): ``"joint k=3 α=3 qe+dba"``."""
    opts = config.get(step)
    if not opts:
        return "off"
    if step == "expansion":
        if opts["form"] == "joint":
            sides = "+".join(s for s in ("qe", "dba") if opts[s])
            return f"joint k={opts['k']} α={opts['alpha']:g} {sides}"
        return f"classic qe_n={opts['qe_n']} dba_n={opts['dba_n']} α={opts['alpha']:g}"
    if step == "kreciprocal":
        return f"k1={opts['k1']} k2={opts['k2']} λ={opts['lambda']:g}"
    if step == "landmark_country":
        return f"α={opts['alpha']:g} β={opts['beta']:g} k={opts['k']}"
    return " ".join(f"{k}={v}" for k, v in opts.items())


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A post-processing config from a YAML file (a top-level ``postprocess:`` key is allowed)."""
    import yaml  # noqa: PLC0415

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read post-processing config ({e})", path) from e
    if isinstance(data, Mapping) and "postprocess" in data:
        data = data["postprocess"]
    if not isinstance(data, Mapping):
        raise InputError("a post-processing config must be a mapping of steps", path)
    return normalize_config(data, source=str(path))


def write_config(path: str | os.PathLike, config: Mapping[str, Any], comment: str = "") -> Path:
    """Write a (normalised) post-processing config as YAML, atomically; off steps are ``null``."""
    import yaml  # noqa: PLC0415

    config = normalize_config(copy.deepcopy(dict(config)))
    with atomic_write(path) as f:
        if comment:
            f.writelines(f"# {line}\n" for line in comment.splitlines())
        yaml.safe_dump({"postprocess": config}, f, sort_keys=False)
    return Path(path)
