"""The post-processing sweep: every stage and parameter setting scored on the CV, graphs cached.

A grid (YAML) lists candidate settings per post-processing step; a list value inside a
setting expands to one candidate per value (their product)::

    expansion:
      - {form: joint, k: [2, 3, 5], alpha: [1, 3], qe: true, dba: true}
      - {form: classic, qe_n: [1, 2], dba_n: 10, alpha: 3}
    kreciprocal:
      - {k1: [10, 20], k2: [3, 6], lambda: [0.1, 0.3]}
    landmark_country:
      - {alpha: [0.5, 1.0], beta: [0.0, 0.1], k: 3}

The stages are taken in the chain's order (the step registry,
:mod:`glr.postprocess.registry`; a registered step is a stage with no change here), greedily:
each candidate is scored on top of the best chain so far, the best one on the *tuning*
subset (Public = validation for the GLDv2 v2.1 protocol) is kept when it beats the chain
without it, and the other subset (Private) is only reported. The table printed is the
paper's Table 7 pipeline: global features → DBA/QE → re-ranking. kNN graphs go through a
:class:`~glr.postprocess.cache.GraphCache` (on disk when given a folder), so a re-run
with other settings searches nothing it has searched before.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from glr import metrics
from glr.postprocess.cache import GraphCache
from glr.postprocess.chain import Context, expand_features, missing_inputs, rerank, shortlist
from glr.postprocess.config import STEPS, describe, normalize_config
from glr.postprocess.registry import Env, LiveTable, get_step, steps
from glr.submission import retrieval_rows
from glr.utils import InputError

log = logging.getLogger(__name__)

#: Labels of the stages in tables: the baseline's, then each step's ``label`` (a live view).
STAGE_NAMES: Mapping[str, str] = LiveTable(lambda: {"baseline": "global features (kNN)",
                                                    **{s.name: s.label for s in steps()}})


#: The demo's grid: small enough for the synthetic CV (seconds), wide enough to choose.
DEFAULT_GRID: dict[str, list[dict[str, Any]]] = {
    "expansion": [{"form": "joint", "k": [2, 3, 5], "alpha": [1.0, 3.0], "qe": True, "dba": True},
                  {"form": "joint", "k": [3, 5], "alpha": 3.0, "qe": True, "dba": False},
                  {"form": "classic", "qe_n": [1, 2], "dba_n": [3, 10], "alpha": 3.0}],
    "kreciprocal": [{"k1": [10, 20], "k2": [3, 6], "lambda": [0.3, 0.6]}],
    "landmark_country": [{"alpha": [0.5, 1.0], "beta": [0.0, 0.1], "k": [3, 5]}],
    "train_label": [{"insert": [False, True], "k": 5}],
    "spatial": [{"top_n": 10, "time_budget_s": 1.0, "max_side": 256}],
}


PROTOCOLS = ("v2.1", "2021")


def expand_grid(entries: Sequence[Mapping[str, Any]], step: str) -> list[dict[str, Any]]:
    """Each entry's list-valued options expanded to their product; duplicates dropped."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise InputError(f"grid step {step!r}: each candidate must be a mapping, got {entry!r}")
        keys = list(entry)
        values = [v if isinstance(v, list) else [v] for v in entry.values()]
        for combo in itertools.product(*values):
            cand = dict(zip(keys, combo))
            if cand not in out:
                out.append(cand)
    return out


def parse_grid(grid: Mapping[str, Any], source: str = "sweep grid") -> dict[str, list[dict[str, Any]]]:
    """Validate a grid: known steps, each candidate a valid setting (checked by
    :func:`normalize_config`); returns step → candidate settings, in chain order."""
    unknown = sorted(set(grid) - set(STEPS) - {"shortlist", "k", "search"})
    if unknown:
        raise InputError(f"unknown step(s) {unknown} in the grid; steps are {list(STEPS)}", source)
    out: dict[str, list[dict[str, Any]]] = {}
    for step in STEPS:
        if step not in grid or grid[step] in (None, []):
            continue
        entries = grid[step] if isinstance(grid[step], list) else [grid[step]]
        cands = expand_grid(entries, step)
        for c in cands:
            normalize_config({step: c}, source=f"{source}, step {step}")
        out[step] = cands
    return out


def read_grid(path: str | os.PathLike) -> dict[str, Any]:
    """A sweep grid from YAML (see the module docstring); ``shortlist`` / ``k`` are passed through."""
    import yaml  # noqa: PLC0415

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read the sweep grid ({e})", path) from e
    if not isinstance(data, Mapping):
        raise InputError("a sweep grid must be a mapping of steps to candidate settings", path)
    parse_grid(data, source=str(path))
    return dict(data)


class RetrievalScorer:
    """Scores rankings in memory exactly as :func:`glr.metrics.score` scores the file.

    Protocols: ``"v2.1"``: Public and Private of ``retrieval_solution_v2.1.csv`` separately
    (tune on Public). ``"2021"``: the seed's protocol, every query with retrieval ground
    truth (Public and Private together) as one set ``"all"``, against the index list it
    was given expanded with every ground-truth image (see :func:`protocol_2021_ids`).

    Args:
        solution: the retrieval solution file.
        test_ids: query ids, one per ranking row.
        index_ids: index ids, one per database row.
    """

    def __init__(self, solution: str | os.PathLike, test_ids: Sequence[str], index_ids: Sequence[str],
                 protocol: str = "v2.1"):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        public, private, _ = metrics.read_solution(solution, "retrieval")
        self.protocol = protocol
        self.subsets = ({"public": public, "private": private} if protocol == "v2.1"
                        else {"all": {**public, **private}})
        self.tune = "public" if protocol == "v2.1" else "all"
        self.test_ids, self.index_ids = list(test_ids), list(index_ids)

    def __call__(self, I: np.ndarray) -> dict[str, Any]:
        """``{"public": {"map@100": …, "p@1": …}, "private": …}`` (or ``{"all": …}``) for (Nq, K) rows ``I``."""
        rows = retrieval_rows(self.test_ids, self.index_ids, I)
        preds = {qid: cell.split(" ") if cell else [] for qid, cell in rows}
        out: dict[str, Any] = {}
        for name, sol in self.subsets.items():
            if not sol:
                out[name] = None
                continue
            p = {t: preds[t] for t in sol if t in preds}
            prec = metrics.mean_precisions(p, sol, metrics.MAX_PREDICTIONS)
            out[name] = {"map@100": float(metrics.mean_average_precision(p, sol, metrics.MAX_PREDICTIONS)),
                         "p@1": float(prec[0]), "p@10": float(prec[9]), "n_queries": len(sol)}
        return out


def protocol_2021_ids(solution: str | os.PathLike, test_ids: Sequence[str], index_ids: Sequence[str],
                      index_list: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """The seed's 2021 CV sets: the queries with retrieval ground truth, and ``index_list``
    (default: every index image) plus every ground-truth image, in index order.

    Raises:
        InputError: an id of ``index_list`` or of the ground truth is not an index image.
    """
    public, private, _ = metrics.read_solution(solution, "retrieval")
    gt = {**public, **private}
    known = set(index_ids)
    queries = [t for t in test_ids if t in gt]
    wanted = set(index_ids if index_list is None else index_list)
    for i in wanted:
        if i not in known:
            raise InputError(f"index list id {i!r} is not an index image of this root")
    for t in queries:
        for i in gt[t]:
            if i not in known:
                raise InputError(f"ground-truth image {i!r} of query {t!r} is not an index image", solution)
            wanted.add(i)
    return queries, [i for i in index_ids if i in wanted]


def _figure(scores: Mapping[str, Any] | None, subset: str) -> float:
    s = (scores or {}).get(subset)
    return -1.0 if not s else float(s["map@100"])


def run_sweep(q: np.ndarray, db: np.ndarray, scorer: RetrievalScorer, grid: Mapping[str, Any],
              ctx: Context | None = None, cache: GraphCache | None = None, progress: bool = True) -> dict[str, Any]:
    """Score every candidate of ``grid``, stage by stage, greedily (see the module docstring).

    Args:
        q: (Nq, D) query descriptors, rows in ``scorer.test_ids`` order.
        db: (Ndb, D) index descriptors, rows in ``scorer.index_ids`` order.
        scorer: the CV (solution + protocol).
        grid: step → candidate settings (and optional ``shortlist`` / ``k``).
        ctx: train set etc. for the re-rankers (steps whose inputs are missing are skipped
            with a warning).
        cache: graph cache (default: a fresh in-memory one).

    Returns:
        ``{"protocol", "tune", "rows": [every scored setting], "pipeline": [the best row of
        each stage, cumulative], "config": the chosen post-processing config, "cache":
        {"searches", "hits"}, "seconds"}``.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    ctx = ctx or Context()
    cache = cache or GraphCache()
    stages = parse_grid(grid)
    base = normalize_config({k: grid[k] for k in ("shortlist", "k", "search") if k in grid})
    t0 = time.perf_counter()

    def evaluate(config: dict[str, Any]) -> dict[str, Any]:
        S, I = shortlist(q, db, config, cache)
        S, I, _ = rerank(S, I, q, db, config, ctx, cache)
        return scorer(I[:, : config["k"]])

    best_cfg = copy.deepcopy(base)
    best = evaluate(best_cfg)
    rows = [{"stage": "baseline", "setting": "-", "scores": best, "kept": True}]
    pipeline = [dict(rows[0])]
    total = sum(len(c) for c in stages.values())
    bar = tqdm(total=total, desc="sweep", disable=not progress, leave=False)
    for step, cands in stages.items():
        missing = missing_inputs(ctx, step)
        if missing:
            log.warning("sweep: step %s skipped (needs %s)", step, ", ".join(missing))
            bar.update(len(cands))
            continue
        _prewarm(step, cands, best_cfg, q, db, ctx, cache)
        stage_best: tuple[float, dict, dict] | None = None
        for cand in cands:
            cfg = normalize_config({**{s: best_cfg[s] for s in STEPS}, step: cand, "shortlist": best_cfg["shortlist"],
                                    "k": best_cfg["k"], "search": best_cfg["search"]})
            sc = evaluate(cfg)
            rows.append({"stage": step, "setting": describe(cfg, step), "options": cfg[step], "scores": sc})
            if stage_best is None or _figure(sc, scorer.tune) > _figure(stage_best[1], scorer.tune):
                stage_best = (_figure(sc, scorer.tune), sc, cfg)
            bar.update(1)
        assert stage_best is not None
        kept = stage_best[0] > _figure(best, scorer.tune)
        pipeline.append({"stage": step, "setting": describe(stage_best[2], step), "options": stage_best[2][step],
                         "scores": stage_best[1], "kept": kept})
        if kept:
            best_cfg, best = stage_best[2], stage_best[1]
    bar.close()
    return {"protocol": scorer.protocol, "tune": scorer.tune, "rows": rows, "pipeline": pipeline,
            "config": best_cfg, "final": best, "cache": {"searches": cache.searches, "hits": cache.hits},
            "seconds": time.perf_counter() - t0}


def _prewarm(step: str, cands: Sequence[Mapping[str, Any]], best_cfg: Mapping[str, Any], q: np.ndarray,
             db: np.ndarray, ctx: Context, cache: GraphCache) -> None:
    """Let a stage's step search its graphs once, at the largest k its candidates need (they
    take slices): on the descriptors its ``apply`` sees (the feature steps before it of the
    chain so far; all of them for a shortlist step; the original ones for a re-ranker)."""
    s = get_step(step)
    if s.prewarm is None:
        return
    full = [s.normalize(c) for c in cands]
    if s.kind == "rerank":
        qi, dbi = q, db
    else:
        before = [f.name for f in steps("features")]
        before = before[: before.index(step)] if s.kind == "features" else before
        qi, dbi = expand_features(q, db, {**{n: best_cfg.get(n) for n in before}, "search": best_cfg.get("search")},
                                  cache)
    s.prewarm(full, qi, dbi, Env(q=q, db=db, ctx=ctx, cache=cache, config=best_cfg))


def _fmt(scores: Mapping[str, Any] | None, subset: str) -> str:
    s = (scores or {}).get(subset)
    return "-" if not s else f"{s['map@100']:.4f}"


def sweep_table(result: Mapping[str, Any], all_rows: bool = False) -> str:
    """Markdown table of the pipeline (Table 7 style), or of every scored setting."""
    subsets = ["public", "private"] if result["protocol"] == "v2.1" else ["all"]
    head = "| stage | setting | " + " | ".join(f"mAP@100 {s.capitalize()}" for s in subsets) + " | kept |"
    lines = [head, "|" + "---|" * (len(subsets) + 3)]
    for r in result["rows" if all_rows else "pipeline"]:
        kept = {True: "yes", False: "no", None: ""}[r.get("kept")]
        lines.append(f"| {STAGE_NAMES.get(r['stage'], r['stage'])} | {r['setting']} | "
                     + " | ".join(_fmt(r["scores"], s) for s in subsets) + f" | {kept} |")
    return "\n".join(lines)
