"""``glr cv``: embed → search → post-process → submissions → official scores on a GLDv2 root.

The computation is :mod:`glr.predict`'s chain (the kernel runs the same); what is here is
``glr cv``'s own: the splits and protocol, the reference descriptors, the sweep, the files
written and the scores.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from glr import metrics
from glr.data.readers import read_ids
from glr.data.root import GLDv2Root
from glr.embeddings.extract import thumbnail_embeddings
from glr.embeddings.npz import load_embeddings, save_embeddings
from glr.eval.sweep import RetrievalScorer, protocol_2021_ids, read_grid, run_sweep, sweep_table
from glr.postprocess.cache import GraphCache
from glr.postprocess.chain import check_search
from glr.postprocess.config import normalize_config, read_config, write_config
from glr.predict import (TTA, MemberSpec, chain_context, embed_ensemble, imagenet_member, needs_train, rank, readable,
                         recognition_rows, retrieval_rows)
from glr.report.sweep import write_sweep
from glr.submission import write_submission
from glr.utils import InputError, atomic_write, check_writable_dir

log = logging.getLogger(__name__)

KINDS = ("model", "imagenet", "thumbnail")


def _thumbnails(root: GLDv2Root, split: str, ids: Sequence[str], progress: bool,
                strict: bool) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnail descriptors of ``ids`` and their (N,) readable flags; unreadable images get
    zero rows (``strict``: the first one raises :class:`InputError` naming it)."""
    paths = [root.path(split, i) for i in ids]
    try:
        return thumbnail_embeddings(paths, progress=progress), np.ones(len(ids), bool)
    except InputError:
        if strict:
            raise
    out, ok = np.zeros((len(ids), 3 * 16 * 16), np.float32), np.ones(len(ids), bool)
    for r, p in enumerate(paths):  # again image by image, to skip the unreadable ones
        try:
            out[r] = thumbnail_embeddings([p], progress=False)[0]
        except InputError:
            ok[r] = False
    return out, ok


def _warn_unreadable(split: str, ids: Sequence[str], ok: np.ndarray) -> None:
    """Log how many of ``ids`` could not be read, with up to five of them."""
    bad = [ids[i] for i in np.flatnonzero(~ok)]
    if bad:
        what = {"test": "their queries get empty rows", "index": "left out of the index",
                "train": "left out of the train set"}.get(split, "skipped")
        log.warning("%d of %d %s images could not be read (%s): %s%s", len(bad), len(ids), split, what,
                    ", ".join(bad[:5]), ", …" if len(bad) > 5 else "")


def _check_early(out: str | os.PathLike, cache_dir: str | os.PathLike | None,
                 distractors: str | os.PathLike | None) -> tuple[Path, np.ndarray | None]:
    """The output folders can be written and the distractor embeddings read (returned), before any work."""
    out = check_writable_dir(out, "the output folder")
    if cache_dir is not None:
        check_writable_dir(cache_dir, "the graph cache (--cache-dir)")
    return out, load_embeddings(distractors)[1] if distractors is not None else None


def _load_split_embeddings(folder: Path, splits: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """The rows of ``ids`` (in that order) from ``emb_<split>.npz`` of an earlier run."""
    out = {}
    for s, ids in splits.items():
        path = folder / f"emb_{s}.npz"
        if not path.is_file():
            raise InputError(f"no embeddings of split {s!r} here (run glr cv without --embeddings first)", path)
        got_ids, e = load_embeddings(path)
        row = {i: r for r, i in enumerate(got_ids)}
        missing = [i for i in ids if i not in row]
        if missing:
            raise InputError(f"{len(missing)} of the {len(ids)} {s} images wanted have no embedding here "
                             f"(e.g. {missing[0]!r})", path)
        out[s] = np.ascontiguousarray(e[[row[i] for i in ids]])
    return out


@dataclass
class _Run:
    """What one ``glr cv`` run works on: the root, the ids per split, the chain and the sweep grid."""

    root: GLDv2Root
    splits: dict[str, list[str]]
    config: dict[str, Any]
    grid: dict[str, Any] | None
    protocol: str
    train_pairs: list[tuple[str, int]] = field(default_factory=list)
    source: str = "post-processing config"  # where ``config`` came from, named by errors


def _plan(data: str | os.PathLike, post: Any, sweep: Any, k: int, protocol: str,
          index_list: str | os.PathLike | None, recognition: bool, train_subset: str) -> _Run:
    """The root, the splits under ``protocol`` and the post-processing to apply or sweep; checks
    everything that can be checked before any image is read."""
    source = str(post) if isinstance(post, (str, os.PathLike)) else "post-processing config"
    config = read_config(post) if isinstance(post, (str, os.PathLike)) else normalize_config(post)
    grid = read_grid(sweep) if isinstance(sweep, (str, os.PathLike)) else sweep
    root = GLDv2Root.open(data)
    if grid is not None:
        config["shortlist"] = grid.get("shortlist", config["shortlist"])
    config["k"] = k
    test_ids, index_ids = root.test_ids(), root.index_ids()
    if protocol == "2021":
        sol = root.solution_path("retrieval")
        if sol is None:
            raise InputError("protocol 2021 needs the retrieval solution file", root.root)
        wanted = None if index_list is None else list(read_ids(index_list))
        test_ids, index_ids = protocol_2021_ids(sol, test_ids, index_ids, wanted)
        log.info("protocol 2021: %d queries with ground truth, %d index images", len(test_ids), len(index_ids))
    elif protocol != "v2.1":
        raise InputError(f"protocol must be 'v2.1' or '2021', got {protocol!r}")
    if not test_ids:
        listing = root.root / "test.csv"
        raise InputError("no test images: nothing to evaluate", listing if listing.is_file() else root.root / "test")
    run = _Run(root, {"test": test_ids, "index": index_ids}, config, grid, protocol, source=source)
    if needs_train(config, recognition, steps=tuple(grid or ())):
        run.train_pairs = root.train_ids_labels(train_subset)
        run.splits["train"] = [i for i, _ in run.train_pairs]
    # an approximate search that cannot work at these sizes fails now, not after the embedding
    check_search(config, len(test_ids), len(index_ids), len(run.train_pairs), recognition=recognition,
                 source=source)
    return run


def _embed(run: _Run, kind: str, artifacts: Sequence[str], weights: Sequence[float], image_size: int | None,
           batch_size: int, num_workers: int, progress: bool, tta: TTA, ensemble_mode: str,
           strict: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """Each split's embeddings for a descriptor ``kind``, which images could be read, and the
    artifacts trained on this root's validation ground truth (``allow_val_leak``)."""
    for s, ids in run.splits.items():
        if ids and not (run.root.root / s).is_dir():
            raise InputError(f"image folder for split {s!r} not found ({len(ids)} {s} images listed)",
                             run.root.root / s)
    if kind == "thumbnail":
        pairs = {s: _thumbnails(run.root, s, ids, progress, strict) for s, ids in run.splits.items()}
        return {s: p[0] for s, p in pairs.items()}, {s: p[1] for s, p in pairs.items()}, []
    members = ([imagenet_member(image_size or 96)] if kind == "imagenet"
               else [MemberSpec(a, w, image_size) for a, w in zip(artifacts, weights)])
    leaky: list[str] = []
    emb, ok = embed_ensemble(members, run.root.root, run.splits, mode=ensemble_mode, batch_size=batch_size,
                             num_workers=num_workers, tta=tta, skip_unreadable=not strict, progress=progress,
                             on_load=lambda m: leaky.append(m.source) if m.val_leak else None)
    return emb, ok, leaky


def _retrieve(run: _Run, q_ids: list[str], q: np.ndarray, db_ids: list[str], db: np.ndarray, ctx: Any,
              cache: GraphCache, out: Path, progress: bool, result: dict[str, Any]) -> np.ndarray:
    """Sweep the grid (choosing the chain on Public) or apply the config; the ranking of the queries."""
    if run.grid is not None:
        sol = run.root.solution_path("retrieval")
        if sol is None:
            raise InputError("a sweep needs the retrieval solution file", run.root.root)
        if not q_ids or not db_ids:
            raise InputError("a sweep needs readable test and index images", run.root.root)
        scorer = RetrievalScorer(sol, q_ids, db_ids, run.protocol)
        swept = run_sweep(q, db, scorer, {**run.grid, "k": run.config["k"], "shortlist": run.config["shortlist"],
                                          "search": run.config["search"]},
                          ctx=ctx, cache=cache, progress=progress)
        write_sweep(swept, out)
        run.config = swept["config"]
        result["sweep"] = {"pipeline": swept["pipeline"], "cache": swept["cache"], "seconds": swept["seconds"]}
        print(sweep_table(swept))
    elif any(run.config.get(s) for s in run.config if s not in ("k", "shortlist")):
        write_config(out / "postprocess.yaml", run.config, comment="post-processing applied by glr cv")
    if not q_ids or not db_ids:
        log.warning("no readable %s image: every query gets an empty row", "test" if not q_ids else "index")
    I, info = rank(q, db, run.config, ctx=ctx, cache=cache, progress=progress, source=run.source)
    result["postprocess"] = run.config
    if info.get("spatial"):
        result["spatial"] = info["spatial"]
    return I


def _score_retrieval(run: _Run, sub: Path, q_ids: list[str], db_ids: list[str], I: np.ndarray,
                     result: dict[str, Any]) -> None:
    sol = run.root.solution_path("retrieval")
    if sol is None:
        return
    if run.protocol == "2021":
        result["all"] = RetrievalScorer(sol, q_ids, db_ids, "2021")(I)["all"]
    else:
        result.update(metrics.score("retrieval", sol, sub))


def _members(artifact: str | os.PathLike | Sequence[str] | None, member_weights: Sequence[float] | None,
             kind: str, have_embeddings: bool) -> tuple[list[str], list[float]]:
    """The artifacts of the ensemble and their weights (1 each by default), checked."""
    artifacts = [] if artifact is None else [str(artifact)] if isinstance(artifact, (str, os.PathLike)) \
        else [str(a) for a in artifact]
    if kind not in KINDS:
        raise InputError(f"descriptor must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "model" and not artifacts and not have_embeddings:
        raise InputError("cv with descriptor 'model' needs at least one artifact (or --embeddings)")
    weights = [1.0] * len(artifacts) if member_weights is None else [float(w) for w in member_weights]
    if len(weights) != len(artifacts):
        raise ValueError(f"{len(artifacts)} artifacts but {len(weights)} member weights")
    missing = [a for a in artifacts if kind == "model" and not have_embeddings and not Path(a).is_file()]
    if missing:  # before the first member embeds anything
        raise InputError("model artifact not found", missing[0])
    return artifacts, weights


def cv(data: str | os.PathLike, out: str | os.PathLike, artifact: str | Sequence[str] | None = None,
       kind: str = "model", image_size: int | None = None, batch_size: int = 64, num_workers: int = 2,
       k: int = 100, recognition: bool = True, train_subset: str = "clean",
       member_weights: Sequence[float] | None = None, extra: dict[str, Any] | None = None,
       progress: bool = True, post: str | os.PathLike | dict | None = None,
       sweep: str | os.PathLike | dict | None = None, protocol: str = "v2.1",
       index_list: str | os.PathLike | None = None, embeddings: str | os.PathLike | None = None,
       tta_flip: bool = False, tta_scales: Sequence[float] = (1.0,), ensemble_mode: str = "concat",
       distractors: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
       strict_images: bool = False) -> dict[str, Any]:
    """Embed → search → post-process → submissions → score on a GLDv2-format root.

    Unreadable images (corrupt, truncated or missing files) are skipped, as in the Kaggle
    kernel: an unreadable query keeps an empty row (scored as a miss), an unreadable index
    image is left out of the index (it is in no row), an unreadable train image is left out
    of the recognition vote and the re-rankers' train set. Their number per split is
    logged with up to five ids and recorded in ``cv.json`` (``unreadable``); their rows of
    ``emb_<split>.npz`` are zeros, which ``embeddings`` reads back as unreadable.

    Args:
        data: the root.
        out: folder receiving ``submission.csv`` (retrieval), ``submission_recognition.csv``,
            the embeddings (``emb_<split>.npz``), ``cv.json`` and, with ``sweep``, the
            sweep's ``sweep.{json,md,png}`` and the chosen ``postprocess.yaml``.
        artifact: model artifact, or several (an ensemble) for ``kind="model"``.
        kind: ``model`` (the artifact(s)), ``imagenet`` (lite0 ImageNet weights, GeM, no
            training) or ``thumbnail`` (16×16 colour thumbnails).
        k: retrieval list length (≤ 100 are written).
        recognition: also predict landmarks by the top-5 cosine-sum vote over the train
            images (needs their embeddings; set False to skip on a big root).
        train_subset: the recognition and tagging database, "clean" or "full" (see
            ``GLDv2Root.train_ids_labels``).
        member_weights: weight of each artifact's block in the ensemble (default 1 each).
        extra: entries added to ``cv.json`` (the demo's baselines).
        post: a post-processing config (dict or YAML file, :mod:`glr.postprocess.config`).
        sweep: a sweep grid (dict or YAML file, see :mod:`glr.eval.sweep`): every setting is
            scored, and the chosen config is then applied (``post`` is the starting point).
        protocol: ``"v2.1"`` (Public / Private) or ``"2021"`` (the seed's: queries with
            ground truth against ``index_list`` expanded with every ground-truth image,
            scored as one set ``all``).
        index_list: file of index ids, one per line (``id`` header allowed), for ``2021``.
        embeddings: folder of an earlier run's ``emb_<split>.npz`` to reuse instead of embedding.
        tta_flip, tta_scales, ensemble_mode: see :class:`glr.predict.TTA`, :func:`glr.predict.embed_ensemble`.
        distractors: ``.npz`` embeddings of out-of-domain images (the non-landmark penalty).
        cache_dir: where the sweep stores its kNN graphs (default ``out/graph_cache``).
        strict_images: raise :class:`InputError` naming the first unreadable image instead of
            skipping it.

    Raises:
        InputError: among others, no test image (a ``test.csv`` without rows or an empty
            ``test/`` folder: there is nothing to evaluate), or a split's image folder
            missing; nothing is written then, so earlier outputs in ``out`` stay as they were.

    Returns:
        ``{"task": "retrieval", "public": …, "private": …, "recognition": {...}}`` as in
        :func:`glr.metrics.score` (protocol 2021: ``"all"``), plus ``postprocess`` (the
        config applied) and ``sweep`` (its pipeline table). Figures are ``None`` when the
        root has no solution file. ``val_leak`` lists artifacts trained on this root's
        validation ground truth (their figures are not a valid CV). ``unreadable``: split →
        number of images skipped.
    """
    out, distractor_emb = _check_early(out, cache_dir, distractors)
    artifacts, weights = _members(artifact, member_weights, kind, embeddings is not None)
    run = _plan(data, post, sweep, k, protocol, index_list, recognition, train_subset)
    leaky: list[str] = []
    if embeddings is not None:
        emb = _load_split_embeddings(Path(embeddings), run.splits)
        ok = {s: np.linalg.norm(e, axis=1) > 0 for s, e in emb.items()}  # zero rows: unreadable when embedded
    else:
        emb, ok, leaky = _embed(run, kind, artifacts, weights, image_size, batch_size, num_workers, progress,
                                TTA(tta_flip, tuple(tta_scales)), ensemble_mode, strict_images)
        for s, ids in run.splits.items():
            save_embeddings(out / f"emb_{s}.npz", ids, emb[s])
    out.mkdir(parents=True, exist_ok=True)
    for s, ids in run.splits.items():
        _warn_unreadable(s, ids, ok[s])
    return _finish(run, emb, ok, out, kind, artifacts, weights, leaky, ensemble_mode, recognition, distractor_emb,
                   cache_dir, progress, extra)


def _finish(run: _Run, emb: dict[str, np.ndarray], ok: dict[str, np.ndarray], out: Path, kind: str,
            artifacts: list[str], weights: list[float], leaky: list[str], ensemble_mode: str, recognition: bool,
            distractors: np.ndarray | None, cache_dir: str | os.PathLike | None, progress: bool,
            extra: dict[str, Any] | None) -> dict[str, Any]:
    """Search, post-process, write both submissions and ``cv.json``, score."""
    test_ids = run.splits["test"]
    q_ids, q = readable(test_ids, emb["test"], ok["test"])  # readable queries against readable index images
    db_ids, db = readable(run.splits["index"], emb["index"], ok["index"])
    wanted = {s for s in run.config if run.config.get(s)} | set(run.grid or ())
    ctx = chain_context(emb.get("train"), ok.get("train"), [lm for _, lm in run.train_pairs] if "train" in emb
                        else None, run.root.country_of() if "train" in emb else None,
                        q_paths=[str(run.root.path("test", i)) for i in q_ids] if "spatial" in wanted else None,
                        db_paths=[str(run.root.path("index", i)) for i in db_ids] if "spatial" in wanted else None,
                        distractors=distractors)
    cache = GraphCache(folder=cache_dir if cache_dir is not None else (out / "graph_cache" if run.grid else None),
                       progress=progress)
    result: dict[str, Any] = {"task": "retrieval", "public": None, "private": None, "descriptor": kind,
                              "protocol": run.protocol, "unreadable": {s: int((~ok[s]).sum()) for s in run.splits}}
    I = _retrieve(run, q_ids, q, db_ids, db, ctx, cache, out, progress, result)
    sub = write_submission(out / "submission.csv", retrieval_rows(test_ids, q_ids, db_ids, I), "retrieval",
                           expected_ids=test_ids, index_ids=set(db_ids))
    if len(artifacts) > 1:
        result["ensemble"] = [{"artifact": a, "weight": w} for a, w in zip(artifacts, weights)]
        result["ensemble_mode"] = ensemble_mode
    if leaky:
        result["val_leak"] = leaky
        log.warning("trained on this root's validation ground truth (allow_val_leak): %s; "
                    "the CV figures are not valid", ", ".join(leaky))
    _score_retrieval(run, sub, q_ids, db_ids, I, result)
    if recognition:
        rsub = write_submission(out / "submission_recognition.csv",
                                recognition_rows(test_ids, q_ids, q, ctx, top_k=5, cache=cache, config=run.config,
                                                 source=run.source), "recognition",
                                expected_ids=test_ids)
        rsol = run.root.solution_path("recognition")
        result["recognition"] = (metrics.score("recognition", rsol, rsub)
                                 if rsol is not None and run.protocol == "v2.1" else None)
    result.update(extra or {})
    with atomic_write(out / "cv.json") as f:
        json.dump(result, f, indent=2, default=str)
    return result
