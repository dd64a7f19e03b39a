"""Post-processing configs: defaults, normalisation and YAML, all read from the step registry.

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
    search: null      # every graph exact (the default), or approximate (faiss), opt-in:
                      #   one spec for every graph:  {ivf: {nlist: 1024, nprobe: 32}} or {hnsw: {M: 32, ef: 128}}
                      #   per graph (others exact):  {kreciprocal: {ivf: {...}}, train: {hnsw: {...}}}

The graphs ``search`` names (:data:`~glr.postprocess.registry.GRAPHS`): ``shortlist`` (the plain
kNN q → db), ``expansion`` (the αQE/DBA graphs), ``kreciprocal`` (its joint graph and final
search), ``train`` (q / db → train: landmark–country, train-label tagging, the recognition
vote) and ``nonlandmark`` (db → distractors). An approximate index is trained on the database
it searches; a setting that cannot work at the sizes of a run (``nlist`` above its database's
rows, ``nprobe > nlist``, HNSW on a GPU backend, no faiss) is an error naming the setting and
the file before any search (:func:`glr.postprocess.chain.check_search`).

The steps, their options (typed: ``k: three`` is an error naming the step, the option and
the file) and their order come from :mod:`glr.postprocess.registry`; the tables below are
live, read-only views of it, so a step registered later (a plugin's) shows up in them.

Images are tagged through their train-set neighbours with the *original* descriptors (the
train graphs do not depend on the expansion settings, so a sweep searches them once).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from glr.postprocess.registry import (GRAPHS, RERANK_NAMES, STEP_NAMES, TOP_DEFAULTS, LiveTable, get_step,
                                      graph_index, steps)
from glr.search import INDEX_KINDS, IndexSpec, parse_index_spec
from glr.utils import InputError, atomic_write

log = logging.getLogger(__name__)

__all__ = ["STEP_DEFAULTS", "STEPS", "TOP_DEFAULTS", "RERANKERS", "STEP_NEEDS", "normalize_config",
           "normalize_search", "describe", "read_config", "write_config"]

#: Every step with its options and their defaults, in the order the steps run (live view).
STEP_DEFAULTS: Mapping[str, dict[str, Any]] = LiveTable(lambda: {s.name: s.defaults for s in steps()})

#: Step names in chain order (live view).
STEPS = STEP_NAMES

#: Steps that re-rank a shortlist (they make a shortlist longer than ``k`` worth computing).
RERANKERS = RERANK_NAMES

#: The :class:`~glr.postprocess.registry.Context` fields each step needs (steps that need some).
STEP_NEEDS: Mapping[str, tuple[str, ...]] = LiveTable(lambda: {s.name: s.needs for s in steps() if s.needs})


def _spec_value(spec: IndexSpec) -> dict[str, Any] | None:
    """An approximate :class:`~glr.search.IndexSpec` as plain config data (None when exact)."""
    if spec.exact:
        return None
    opts = {o: getattr(spec, o) for o in ("nlist", "nprobe", "M", "ef") if getattr(spec, o) is not None}
    return {spec.kind: opts}


def normalize_search(value: Any, source: str = "post-processing config") -> dict[str, Any] | None:
    """The ``search`` setting in its normal form, plain YAML/JSON data: None (every graph exact),
    one spec for every graph (``{"ivf": {"nlist": 1024, "nprobe": 32}}``), or per graph
    (``{"kreciprocal": {"ivf": {...}}, ...}``: only the approximate graphs, in :data:`GRAPHS`
    order; None if none is).

    Raises:
        InputError: not a spec nor a mapping of graphs to specs, an unknown graph, kind or
            option, a value of the wrong type (naming the setting, ``search.train.hnsw.M``, and
            ``source``).
    """
    if isinstance(value, Mapping) and not value:
        return None
    if isinstance(value, Mapping) and not set(value) & set(INDEX_KINDS):
        unknown = sorted(set(value) - set(GRAPHS))
        if unknown:
            raise InputError(f"search: unknown graph(s) {unknown}; graphs are {list(GRAPHS)} (or give one "
                             f"spec for every graph: {', '.join(INDEX_KINDS)})", source)
        per_graph = {g: _spec_value(parse_index_spec(value[g], setting=f"search.{g}", source=source))
                     for g in GRAPHS if g in value}
        return {g: v for g, v in per_graph.items() if v is not None} or None
    return _spec_value(parse_index_spec(value, setting="search", source=source))


def normalize_config(config: Mapping[str, Any] | None, source: str = "post-processing config") -> dict[str, Any]:
    """A complete configuration: every step key present (``None`` = off), defaults filled in,
    every option of its declared type, ``search`` in its normal form (:func:`normalize_search`).

    Raises:
        InputError: an unknown step or option, a value of the wrong type (named, with
            ``source``), two shortlist steps on, a bad ``search`` setting.
    """
    config = dict(config or {})
    out: dict[str, Any] = dict(TOP_DEFAULTS)
    for key in list(config):
        if key in TOP_DEFAULTS:
            out[key] = config.pop(key)
    for step in steps():
        value = config.pop(step.name, None)
        if value is None or value is False:
            out[step.name] = None
            continue
        if value is True:
            value = {}
        if not isinstance(value, Mapping):
            raise InputError(f"step {step.name!r} must be a mapping of options, null or false; got {value!r}",
                             source)
        out[step.name] = step.normalize(value, source)
    if config:
        raise InputError(f"unknown key(s) {sorted(config)}; steps are {list(STEPS)}, options {list(TOP_DEFAULTS)}",
                         source)
    for key in ("shortlist", "k"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise InputError(f"{key} must be an integer >= 1, got {out[key]!r}", source)
    out["search"] = normalize_search(out["search"], source)
    on = [s.name for s in steps("shortlist") if out[s.name]]
    if len(on) > 1:
        raise InputError(f"steps {on} both make the shortlist; turn all but one off", source)
    return out


def describe(config: Mapping[str, Any], step: str) -> str:
    """A short human label of one step's setting (for tables): ``"joint k=3 α=3 qe+dba"``;
    ``step="search"``: how the graphs are searched (``"exact"``, ``"kreciprocal IVF..., train HNSW..."``)."""
    if step == "search":
        specs = {g: graph_index(config, g) for g in GRAPHS}
        approx = {g: s.describe() for g, s in specs.items() if s is not None}
        if not approx:
            return "exact"
        if len(set(approx.values())) == 1 and len(approx) == len(GRAPHS):
            return f"{next(iter(approx.values()))} (every graph)"
        return ", ".join(f"{g} {d}" for g, d in approx.items())
    opts = config.get(step)
    if not opts:
        return "off"
    if step not in STEPS:
        return " ".join(f"{k}={v}" for k, v in opts.items())
    return get_step(step).summary(opts)


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
