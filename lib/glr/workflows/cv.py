"""``glr cv``: embed → search → post-process → submissions → official scores on a GLDv2 root.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from glr import metrics
from glr.data.readers import read_ids
from glr.data.root import GLDv2Root
from glr.embed.extract import PooledFeatures, embed_images, thumbnail_embeddings
from glr.embed.npz import load_embeddings, save_embeddings
from glr.eval.sweep import RetrievalScorer, protocol_2021_ids, read_grid, run_sweep, sweep_table
from glr.model.artifact import load_artifact
from glr.model.net import LITE0_PACKAGE, build_net
from glr.postprocess.cache import GraphCache
from glr.postprocess.chain import Context, retrieve, train_context
from glr.postprocess.config import normalize_config, read_config, write_config
from glr.postprocess.expansion import combine_embeddings
from glr.report.sweep import write_sweep
from glr.submission import recognition_predictions, recognition_rows, retrieval_rows, write_submission
from glr.utils import InputError, atomic_write

log = logging.getLogger(__name__)

def embed_split(net: torch.nn.Module, root: GLDv2Root, split: str, ids: Sequence[str], image_size: int,
                batch_size: int = 64, num_workers: int = 2, device: str | None = None,
                progress: bool = True, flip: bool = False, scales: Sequence[float] = (1.0,)) -> np.ndarray:
    """Embed images ``ids`` of ``split`` with ``net`` at ``image_size``; (N, D) float32.

    Test-time augmentation: ``flip`` adds the mirrored image; ``scales`` (e.g. 0.707, 1,
    1.414) embeds at ``round(image_size · s)`` each. Every view's descriptor is
    L2-normalised; the flips are averaged per scale, the scales averaged, each average
    re-normalised. An unreadable image raises :class:`InputError` naming it (see
    :func:`glr.embeddings.embed_images` with ``skip_unreadable`` to skip such images instead).
    """
    emb, _ = embed_images(net, root.root, split, ids, image_size, batch_size, num_workers, device=device,
                          progress=progress, flip=flip, scales=scales)
    return emb


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


def _embed_all(kind: str, root: GLDv2Root, splits: dict[str, list[str]], artifacts: Sequence[str],
               member_weights: Sequence[float], image_size: int | None, batch_size: int, num_workers: int,
               progress: bool, tta_flip: bool = False, tta_scales: Sequence[float] = (1.0,),
               ensemble_mode: str = "concat", strict: bool = False
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """Embeddings of each split for a descriptor ``kind`` (model | imagenet | thumbnail),
    which images could be read, and the artifacts trained on validation ground truth
    (``val_leak``).

    With several artifacts (an ensemble) each member embeds at its own image size and the
    blocks are combined by :func:`glr.postprocess.expansion.combine_embeddings`
    (``concat``: cosine ``Σ w_i² cos_i / Σ w_i²``; ``sum``: ``Σ w_i cos_i / Σ w_i``).

    Returns:
        ``(emb, ok, leaky)``: split → (N, D) float32 rows in ``splits`` order, split → (N,)
        bool (False where an image could not be read by some member; its row is zeros), and
        the leaky artifacts. With ``strict`` the first unreadable image raises
        :class:`InputError` naming it instead.
    """
    ok = {s: np.ones(len(ids), bool) for s, ids in splits.items()}
    if kind == "thumbnail":
        emb = {}
        for s, ids in splits.items():
            emb[s], ok[s] = _thumbnails(root, s, ids, progress, strict)
        return emb, ok, []
    tta = dict(flip=tta_flip, scales=tuple(tta_scales), skip_unreadable=not strict)
    if kind == "imagenet":
        net = PooledFeatures(build_net(dict(backbone="efficientnet_lite0", pretrained=LITE0_PACKAGE)))
        size = image_size or 96
        emb = {}
        for s, ids in splits.items():
            emb[s], ok[s] = embed_images(net, root.root, s, ids, size, batch_size, num_workers, progress=progress,
                                         **tta)
        return emb, ok, []
    blocks: dict[str, list[np.ndarray]] = {s: [] for s in splits}
    leaky = []
    for artifact in artifacts:
        net, data_config, meta = load_artifact(artifact)
        if meta.get("val_leak") or data_config.get("val_leak"):
            leaky.append(str(artifact))
        size = image_size or int(data_config["image_size"])
        for s, ids in splits.items():
            e, good = embed_images(net, root.root, s, ids, size, batch_size, num_workers, progress=progress, **tta)
            blocks[s].append(e)
            ok[s] &= good  # unreadable for any member: unreadable
    emb = {s: combine_embeddings(parts, member_weights, mode=ensemble_mode) for s, parts in blocks.items()}
    for s in emb:
        emb[s][~ok[s]] = 0.0
    return emb, ok, leaky


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


def _postprocess_context(root: GLDv2Root, emb: dict[str, np.ndarray], train_pairs: list[tuple[str, int]],
                         splits: dict[str, list[str]], distractors: str | os.PathLike | None,
                         paths: bool) -> Context:
    """The re-rankers' inputs: train descriptors and landmark / country labels, distractors and
    (with ``paths``, for spatial verification) the image files."""
    ctx = Context()
    if "train" in emb:
        ctx = train_context(emb["train"], [lm for _, lm in train_pairs], root.country_of())
    if paths:
        ctx.q_paths = [str(root.path("test", i)) for i in splits["test"]]
        ctx.db_paths = [str(root.path("index", i)) for i in splits["index"]]
    if distractors is not None:
        _, ctx.distractors = load_embeddings(distractors)
    return ctx


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
        post: a post-processing config (dict or YAML file, see
            :mod:`glr.postprocess.steps`) applied before the submission is written.
        sweep: a sweep grid (dict or YAML file, see :mod:`glr.sweep`): every setting is
            scored, and the chosen config is then applied (``post`` is the starting point).
        protocol: ``"v2.1"`` (Public / Private) or ``"2021"`` (the seed's: queries with
            ground truth against ``index_list`` expanded with every ground-truth image,
            scored as one set ``all``).
        index_list: file of index ids, one per line (``id`` header allowed), for ``2021``.
        embeddings: folder of an earlier run's ``emb_<split>.npz`` to reuse instead of embedding.
        tta_flip, tta_scales: test-time augmentation (see :func:`embed_split`).
        ensemble_mode: ``concat`` or ``sum`` (see :func:`combine_embeddings`).
        distractors: ``.npz`` embeddings (``save_embeddings`` format) of out-of-domain images
            for the non-landmark penalty.
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

    root = GLDv2Root.open(data)
    out = Path(out)
    artifacts = [] if artifact is None else [str(artifact)] if isinstance(artifact, (str, os.PathLike)) \
        else [str(a) for a in artifact]
    if kind == "model" and not artifacts and embeddings is None:
        raise InputError("cv with descriptor 'model' needs at least one artifact (or --embeddings)")
    weights = [1.0] * len(artifacts) if member_weights is None else [float(w) for w in member_weights]
    if len(weights) != len(artifacts):
        raise ValueError(f"{len(artifacts)} artifacts but {len(weights)} member weights")
    config = read_config(post) if isinstance(post, (str, os.PathLike)) else normalize_config(post)
    grid = read_grid(sweep) if isinstance(sweep, (str, os.PathLike)) else sweep
    if grid is not None:
        config["shortlist"] = grid.get("shortlist", config["shortlist"])
    config["k"] = k
    sol = root.solution_path("retrieval")
    test_ids, index_ids = root.test_ids(), root.index_ids()
    if protocol == "2021":
        if sol is None:
            raise InputError("protocol 2021 needs the retrieval solution file", root.root)
        wanted = None if index_list is None else [i for i in read_ids(index_list)]
        test_ids, index_ids = protocol_2021_ids(sol, test_ids, index_ids, wanted)
        log.info("protocol 2021: %d queries with ground truth, %d index images", len(test_ids), len(index_ids))
    elif protocol != "v2.1":
        raise InputError(f"protocol must be 'v2.1' or '2021', got {protocol!r}")
    if not test_ids:
        listing = root.root / "test.csv"
        raise InputError("no test images: nothing to evaluate", listing if listing.is_file() else root.root / "test")
    splits = {"test": test_ids, "index": index_ids}
    wanted = {s for s in config if config.get(s)} | set(grid or ())  # steps this run may apply
    needs_train = recognition or bool(wanted & {"landmark_country", "train_label"})
    train_pairs: list[tuple[str, int]] = []
    if needs_train:
        train_pairs = root.train_ids_labels(train_subset)
        splits["train"] = [i for i, _ in train_pairs]
    leaky: list[str] = []
    if embeddings is not None:
        emb = _load_split_embeddings(Path(embeddings), splits)
        ok = {s: np.linalg.norm(e, axis=1) > 0 for s, e in emb.items()}  # zero rows: unreadable when embedded
    else:
        for s, ids in splits.items():
            if ids and not (root.root / s).is_dir():
                raise InputError(f"image folder for split {s!r} not found ({len(ids)} {s} images listed)",
                                 root.root / s)
        emb, ok, leaky = _embed_all(kind, root, splits, artifacts, weights, image_size, batch_size, num_workers,
                                    progress, tta_flip, tta_scales, ensemble_mode, strict=strict_images)
        for s, ids in splits.items():
            save_embeddings(out / f"emb_{s}.npz", ids, emb[s])
    out.mkdir(parents=True, exist_ok=True)
    for s, ids in splits.items():
        _warn_unreadable(s, ids, ok[s])
    # the rows searched: readable queries against readable index images
    q_keep, db_keep = np.flatnonzero(ok["test"]), np.flatnonzero(ok["index"])
    q_ids, db_ids = [test_ids[i] for i in q_keep], [index_ids[i] for i in db_keep]
    q_emb, db_emb = emb["test"][q_keep], emb["index"][db_keep]
    if "train" in emb:
        t_keep = np.flatnonzero(ok["train"])
        emb["train"], train_pairs = emb["train"][t_keep], [train_pairs[i] for i in t_keep]
    ctx = _postprocess_context(root, emb, train_pairs, {"test": q_ids, "index": db_ids}, distractors,
                               paths="spatial" in wanted)
    cache = GraphCache(folder=cache_dir if cache_dir is not None else (out / "graph_cache" if grid else None),
                       progress=progress)
    result: dict[str, Any] = {"task": "retrieval", "public": None, "private": None, "descriptor": kind,
                              "protocol": protocol, "unreadable": {s: int((~ok[s]).sum()) for s in splits}}
    if grid is not None:
        if sol is None:
            raise InputError("a sweep needs the retrieval solution file", root.root)
        if not q_ids or not db_ids:
            raise InputError("a sweep needs readable test and index images", root.root)
        scorer = RetrievalScorer(sol, q_ids, db_ids, protocol)
        swept = run_sweep(q_emb, db_emb, scorer, {**grid, "k": k, "shortlist": config["shortlist"]},
                          ctx=ctx, cache=cache, progress=progress)
        write_sweep(swept, out)
        config = swept["config"]
        result["sweep"] = {"pipeline": swept["pipeline"], "cache": swept["cache"], "seconds": swept["seconds"]}
        print(sweep_table(swept))
    elif any(config.get(s) for s in config if s not in ("k", "shortlist")):
        write_config(out / "postprocess.yaml", config, comment="post-processing applied by glr cv")
    info: dict[str, Any] = {}
    if q_ids and db_ids:
        _, I, info = retrieve(q_emb, db_emb, config, ctx=ctx, cache=cache, progress=progress)
    else:
        log.warning("no readable %s image: every query gets an empty row", "test" if not q_ids else "index")
        I = np.zeros((len(q_ids), 0), np.int64)
    result["postprocess"] = config
    if info.get("spatial"):
        result["spatial"] = info["spatial"]
    found = dict(retrieval_rows(q_ids, db_ids, I))  # unreadable queries: empty rows
    sub = write_submission(out / "submission.csv", [(i, found.get(i, "")) for i in test_ids], "retrieval",
                           expected_ids=test_ids, index_ids=set(db_ids))
    if len(artifacts) > 1:
        result["ensemble"] = [{"artifact": a, "weight": w} for a, w in zip(artifacts, weights)]
        result["ensemble_mode"] = ensemble_mode
    if leaky:
        result["val_leak"] = leaky
        log.warning("trained on this root's validation ground truth (allow_val_leak): %s; "
                    "the CV figures are not valid", ", ".join(leaky))
    if sol is not None:
        if protocol == "2021":
            result["all"] = RetrievalScorer(sol, q_ids, db_ids, "2021")(I)["all"]
        else:
            result.update(metrics.score("retrieval", sol, sub))
    if recognition:
        found = {}
        if q_ids and len(ctx.train):
            St, It = cache.knn(q_emb, ctx.train, 5)
            labels, scores = recognition_predictions(St, It, ctx.train_landmarks, top_k=5)
            found = dict(recognition_rows(q_ids, labels, scores))
        rsub = write_submission(out / "submission_recognition.csv", [(i, found.get(i, "")) for i in test_ids],
                                "recognition", expected_ids=test_ids)
        rsol = root.solution_path("recognition")
        result["recognition"] = (metrics.score("recognition", rsol, rsub)
                                 if rsol is not None and protocol == "v2.1" else None)
    result.update(extra or {})
    with atomic_write(out / "cv.json") as f:
        json.dump(result, f, indent=2, default=str)
    return result
