"""The inference chain that ``glr cv``, the Kaggle kernel and ``glr search`` share.

    load_member        an artifact → its network + the data config it was trained with
    embed_split        one member, one split → (N, D) float32 rows and (N,) readable flags
    embed_ensemble     every member, every split → the combined rows (concat / sum of blocks)
    retrieval_rows     queries × index → search → post-processing chain → one row per query
    recognition_rows   queries × train → top-k landmark vote → one row per query

Each caller keeps only its own concerns: ``glr cv`` its outputs and scores
(:mod:`glr.workflows.cv`), the kernel its inputs, fallback, phase and timing
(:mod:`glr.kaggle.kernel.runtime`), ``glr search`` its stores (:func:`search_embeddings`).
Because the computation is one piece of code, the kernel's parity with ``glr cv`` follows from
the structure; the parity test guards the packaging.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from glr.arrays import is_rows
from glr.data.images import IMAGENET_MEAN, IMAGENET_STD, preprocessing, resolve_num_workers, transforms_from_config
from glr.data.root import GLDv2Root
from glr.embeddings.extract import (Branch, PooledFeatures, default_device, embed_views, resolve_precision,
                                    tta_views)
from glr.embeddings.sharded import extract_shards
from glr.embeddings.store import DEFAULT_SHARD_SIZE, ShardedEmbeddings, open_embeddings
from glr.model.artifact import load_artifact
from glr.model.net import LITE0_PACKAGE, build_net
from glr.postprocess.cache import GraphCache
from glr.postprocess.chain import Context, retrieve, train_context
from glr.postprocess.config import STEP_NEEDS, normalize_config
from glr.postprocess.registry import graph_index, search_setting
from glr.postprocess.expansion import combine_embeddings, qe_dba_joint
from glr.search import check_index_spec, knn
from glr.submission import recognition_predictions, write_submission
from glr.submission import recognition_rows as _recognition_rows
from glr.submission import retrieval_rows as _retrieval_rows
from glr.utils import InputError, file_sha256

log = logging.getLogger(__name__)

#: ``step(name, scales_with)``: a context manager wrapped around each unit of work (the kernel times them).
Step = Callable[[str, "str | None"], ContextManager[None]]


def _no_step(name: str, scales_with: str | None = None) -> ContextManager[None]:
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- members
@dataclass
class Member:
    """One ensemble member: a network and the data config it was trained with.

    ``image_size`` overrides the artifact's own size; ``weight`` is the member's weight in the
    ensemble (see :func:`glr.postprocess.expansion.combine_embeddings`).
    """

    net: nn.Module
    data_config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = "model"
    weight: float = 1.0
    image_size: int | None = None
    source: str = ""

    @property
    def size(self) -> int:
        """The image size this member embeds at."""
        return int(self.image_size or self.data_config["image_size"])

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """The eval transform of this member: resize to :attr:`size` with its own preprocessing (mean, std,
        interpolation, crop; :func:`glr.data.images.preprocessing` for an artifact that has not all four)."""
        return transforms_from_config(self.data_config, self.size)

    def branch(self, tta: TTA) -> Branch:
        """This member's network and its view at each of ``tta``'s scales (its own size and preprocessing)."""
        return Branch(self.net, tta_views(self.size, tta.scales, **preprocessing(self.data_config)))

    @property
    def val_leak(self) -> bool:
        """Whether the artifact was trained on validation ground truth (its CV is not valid)."""
        return bool(self.meta.get("val_leak") or self.data_config.get("val_leak"))


@dataclass(frozen=True)
class MemberSpec:
    """A member not loaded yet: the artifact file, its weight and an optional image size."""

    path: str | os.PathLike
    weight: float = 1.0
    image_size: int | None = None


def load_member(path: str | os.PathLike, weight: float = 1.0, image_size: int | None = None,
                map_location: str | torch.device = "cpu") -> Member:
    """Rebuild an artifact's network with its own data config (no training config needed)."""
    net, data_config, meta = load_artifact(path, map_location=map_location)
    return Member(net, dict(data_config), dict(meta), Path(path).stem, float(weight), image_size, str(path))


def imagenet_member(image_size: int = 96) -> Member:
    """The reference descriptor: efficientnet_lite0's ImageNet weights, GeM pooling, no training."""
    net = PooledFeatures(build_net(dict(backbone="efficientnet_lite0", pretrained=LITE0_PACKAGE)))
    config = {"image_size": int(image_size), "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    return Member(net, config, name="imagenet_lite0_gem")


# --------------------------------------------------------------------------- embedding
@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: ``flip`` adds the mirrored image, ``scales`` embeds at
    ``round(size · s)`` each; views are L2-normalised, averaged and re-normalised."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)


def embed_split(member: Member, root: str | os.PathLike, split: str, ids: Sequence[str], *, batch_size: int = 64,
                num_workers: int | str = "auto", device: torch.device | str | None = None, tta: TTA = TTA(),
                skip_unreadable: bool = True, progress: bool = True, precision: str | None = None,
                compile: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embed images ``ids`` of ``split`` under ``root`` with one member, at its image size and with
    its own preprocessing (the artifact's ``mean``, ``std``, ``interpolation``, ``crop_pct``).

    Returns:
        ``(emb, ok)``: (N, D) float32 L2-normalised rows in ``ids`` order (zero rows for
        unreadable images) and (N,) bool. Without ``skip_unreadable`` the first unreadable image
        raises :class:`~glr.utils.InputError` naming it.
    """
    out = embed_views([member.branch(tta)], root, split, list(ids), batch_size=batch_size, num_workers=num_workers,
                      device=device, flip=tta.flip, precision=precision, compile=compile,
                      skip_unreadable=skip_unreadable, progress=progress)
    return out.emb[0], out.ok


def _loaded(m: Member | MemberSpec) -> Member:
    return m if isinstance(m, Member) else load_member(m.path, m.weight, m.image_size)


def embed_ensemble(members: Sequence[Member | MemberSpec], root: str | os.PathLike,
                   splits: Mapping[str, Sequence[str]], *, mode: str = "concat", batch_size: int = 64,
                   num_workers: int | str = "auto", device: torch.device | str | None = None, tta: TTA = TTA(),
                   skip_unreadable: bool = True, progress: bool = True, step: Step = _no_step,
                   on_load: Callable[[Member], Any] | None = None, precision: str | None = None,
                   compile: bool | None = None, stats: dict[str, dict[str, int]] | None = None
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every member's embeddings of every split, combined as the ensemble says.

    Every member is loaded first (members given as :class:`MemberSpec` are released at the end);
    then each split's images are decoded once, each distinct input size and preprocessing is
    computed once from that decode, and every member and TTA view embeds from those batches
    (:func:`~glr.embeddings.extract.embed_views`; the rows are those of embedding each member
    alone). With several members each embeds at its own image size and the blocks are combined
    by :func:`~glr.postprocess.expansion.combine_embeddings` (``concat``: cosine
    ``Σ w_i² cos_i / Σ w_i²``; ``sum``: ``Σ w_i cos_i / Σ w_i``).

    Args:
        splits: split → ids, e.g. ``{"test": [...], "index": [...]}``.
        num_workers: loader workers, or ``"auto"`` (the usable cores less one, at most 8:
            :func:`~glr.data.images.default_num_workers`); the embeddings do not depend on it.
        step: wraps each load and each split's embedding, e.g. a timer.
        on_load: called with each member once it is loaded.
        precision: on CUDA, ``fp16`` (default) or ``bf16`` autocast, or ``fp32``; the CPU runs fp32.
        compile: wrap each network in ``torch.compile`` (default: ``GLR_COMPILE=1`` in the environment).
        stats: when given, filled with split → ``{"images": N, "decodes": n}`` (``n`` = N: one decode each).

    Returns:
        ``(emb, ok)``: split → (N, D) float32 rows in ``splits`` order, and split → (N,) bool:
        False where the image could not be read (its row is then zeros).
    """
    if not members:
        raise InputError("an ensemble needs at least one member")
    device = torch.device(device) if device is not None else default_device()
    resolve_precision(precision, device)  # bad settings fail before any member is loaded
    num_workers = resolve_num_workers(num_workers)
    loaded: list[Member] = []
    for spec in members:
        with step(f"load {Path(spec.path).name if isinstance(spec, MemberSpec) else spec.name}", None):
            member = _loaded(spec)
        if on_load is not None:
            on_load(member)
        loaded.append(member)
    branches = [m.branch(tta) for m in loaded]
    weights = [m.weight for m in loaded]
    label = ", ".join(f"{m.name} @{m.size}" for m in loaded)
    emb: dict[str, np.ndarray] = {}
    ok: dict[str, np.ndarray] = {}
    for s, ids in splits.items():
        with step(f"embed {s} {label}", s):
            out = embed_views(branches, root, s, list(ids), batch_size=batch_size, num_workers=num_workers,
                              device=device, flip=tta.flip, precision=precision, compile=compile,
                              skip_unreadable=skip_unreadable, progress=progress)
        log.info("embed %s: %d images, %d decodes, %d member(s) × %d scale(s)%s", s, len(ids), out.decodes,
                 len(loaded), len(tta.scales), " × flip" if tta.flip else "")
        if stats is not None:
            stats[s] = {"images": len(ids), "decodes": out.decodes}
        emb[s] = combine_embeddings(out.emb, weights, mode=mode)
        ok[s] = out.ok
        emb[s][~ok[s]] = 0.0
    del branches, loaded, member  # the members loaded here go with them
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return emb, ok


# --------------------------------------------------------------------------- search → post-processing → rows
def needs_train(config: Mapping[str, Any], recognition: bool = False, steps: Sequence[str] = ()) -> bool:
    """Whether the train set must be embedded: recognition votes with it, and so do the steps
    of ``config`` (or of ``steps``, e.g. a sweep's) that need train descriptors."""
    wanted = {s for s in config if config.get(s)} | set(steps)
    return recognition or any("train" in STEP_NEEDS.get(s, ()) for s in wanted)


def chain_context(train: np.ndarray | None = None, train_ok: np.ndarray | None = None,
                  train_landmarks: Sequence[int] | None = None, countries: Mapping[int, str] | None = None,
                  q_paths: Sequence[str] | None = None, db_paths: Sequence[str] | None = None,
                  distractors: np.ndarray | None = None) -> Context:
    """The re-rankers' inputs (:class:`~glr.postprocess.chain.Context`): the readable train rows
    with their landmarks and countries, image paths for spatial verification, distractors."""
    ctx = Context()
    if train is not None:
        keep = np.ones(len(train), bool) if train_ok is None else np.asarray(train_ok, bool)
        ctx = train_context(train[keep], np.asarray(train_landmarks)[keep], countries)
    ctx.q_paths, ctx.db_paths, ctx.distractors = q_paths, db_paths, distractors
    return ctx


def readable(ids: Sequence[str], emb: np.ndarray, ok: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The ids and (n, D) rows of the images that could be read."""
    keep = np.flatnonzero(ok)
    return [ids[i] for i in keep], emb[keep]


def rank(q: np.ndarray, db: np.ndarray, config: Mapping[str, Any] | None = None, ctx: Context | None = None,
         cache: GraphCache | None = None, progress: bool = False,
         source: str = "post-processing config") -> tuple[np.ndarray, dict[str, Any]]:
    """(Nq, k') int64 index rows per query, best first, through search and the post-processing
    chain of ``config`` (plain kNN when None); an empty side gives ``k' = 0``. Also the chain's info.
    ``source``: where ``config`` came from, named by errors (an approximate ``search`` setting that
    cannot work at these sizes is one, before any search)."""
    if not len(q) or not len(db):
        return np.zeros((len(q), 0), np.int64), {}
    _, I, info = retrieve(q, db, config, ctx=ctx, cache=cache, progress=progress, source=source)
    return I, info


def retrieval_rows(test_ids: Sequence[str], q_ids: Sequence[str], db_ids: Sequence[str],
                   I: np.ndarray) -> list[tuple[str, str]]:
    """One ``(id, images)`` row per test id, in ``test_ids`` order: the ranking ``I`` of the
    queries ``q_ids`` (rows of ``db_ids``); queries not searched (unreadable) get empty rows."""
    found = dict(_retrieval_rows(q_ids, db_ids, I))
    return [(i, found.get(i, "")) for i in test_ids]


def recognition_rows(test_ids: Sequence[str], q_ids: Sequence[str], q: np.ndarray, ctx: Context,
                     top_k: int = 5, cache: GraphCache | None = None, config: Mapping[str, Any] | None = None,
                     source: str = "post-processing config") -> list[tuple[str, str]]:
    """One ``(id, "landmark score")`` row per test id: the top-``top_k`` cosine-sum vote of each
    query's train neighbours (``ctx.train``); unreadable queries, or no train set, get empty rows.
    The train set is searched as the post-processing ``config``'s ``search.train`` says (exact
    by default; ``source`` names the config in errors)."""
    found: dict[str, str] = {}
    if len(q_ids) and ctx.train is not None and len(ctx.train):
        cache = cache or GraphCache()
        config = normalize_config(config, source)
        index = graph_index(config, "train")
        if index is not None:  # before the search
            check_index_spec(index, len(ctx.train), search_setting(config, "train"), source, cache.backend)
        S, I = cache.knn(q, ctx.train, top_k, index=index)
        labels, scores = recognition_predictions(S, I, ctx.train_landmarks, top_k=top_k)
        found = dict(_recognition_rows(q_ids, labels, scores))
    return [(i, found.get(i, "")) for i in test_ids]


# --------------------------------------------------------------------------- at scale: stores
def embed_to_shards(artifact: str | os.PathLike, root: str | os.PathLike, split: str, out: str | os.PathLike,
                    ids: Sequence[str] | None = None, image_size: int | None = None,
                    dtype: str = "float16", shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 64,
                    num_workers: int | str = "auto", device: str | None = None, flip: bool = False,
                    scales: Sequence[float] = (1.0,), rank: int | None = None, world: int | None = None,
                    progress: bool = True,
                    on_shard: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Embed a split of a GLDv2 root with a model artifact into a resumable store.

    Unreadable images are recorded in their shard (zero rows, ``ok`` False) and counted; the
    job goes on. ``rank``/``world`` default to the ``RANK``/``WORLD_SIZE`` environment
    variables of ``torchrun`` / SLURM (``LOCAL_RANK`` picks the GPU), so ``torchrun
    --nproc-per-node 8 -m glr embed --shards …`` runs eight workers on disjoint shards.

    Returns:
        :func:`~glr.embeddings.sharded.extract_shards`'s summary plus ``"path"``.
    """
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))) if world is None else world
    member = load_member(artifact, image_size=image_size)
    ids = GLDv2Root.open(root).embedding_ids(split) if ids is None else [str(i) for i in ids]
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    tta = TTA(bool(flip), tuple(float(s) for s in scales))
    info = {"artifact_sha256": file_sha256(artifact), "split": split, "image_size": member.size,
            "flip": tta.flip, "scales": list(tta.scales), **preprocessing(member.data_config)}
    dim = int(getattr(member.net, "embedding_size", 0)) or int(
        member.net(torch.zeros(1, 3, member.size, member.size)).shape[1])

    def embed(chunk: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return embed_split(member, root, split, chunk, batch_size=batch_size, num_workers=num_workers,
                           device=device, tta=tta, progress=False)

    summary = extract_shards(embed, ids, out, dim, dtype, shard_size, info, rank, world, progress, on_shard)
    summary["path"] = str(out)
    return summary


def _streamed_rank(q: np.ndarray, db: ShardedEmbeddings, config: Mapping[str, Any], work: Path,
                   backend: str, progress: bool) -> np.ndarray:
    """:func:`rank` for an index kept as a store: plain kNN, optionally after joint αQE+DBA, read
    one shard at a time (the expanded index is written as a new store in ``work``)."""
    if config.get("search"):
        raise InputError("an index kept as a store is searched exactly, shard by shard; an approximate "
                         "search setting needs the embeddings in memory (.npz)")
    other = [s for s, v in config.items() if v and s not in ("k", "shortlist", "expansion")]
    e = config.get("expansion")
    if other or (e and e["form"] != "joint"):
        raise InputError(f"an index kept as a store takes only joint αQE+DBA before the kNN; "
                         f"{', '.join(other) or 'classic expansion'} needs the embeddings in memory (.npz)")
    if e:
        dest = work / "index_qe_dba"
        if dest.exists():
            shutil.rmtree(dest)  # derived data of an earlier run of this command
        q, db = qe_dba_joint(q, db, k=e["k"], alpha=e["alpha"], qe=e["qe"], dba=e["dba"], backend=backend,
                             out=dest)
    return knn(q, db, config["k"], backend=backend, progress=progress)[1]


def search_embeddings(query: str | os.PathLike, index: str | os.PathLike, out: str | os.PathLike,
                      k: int = 100, expansion: tuple[int, float] | None = None,
                      work: str | os.PathLike | None = None, backend: str = "auto",
                      progress: bool = True, post: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``glr search``: a retrieval submission from saved embeddings, through the same chain.

    ``query`` and ``index`` are ``.npz`` files (:func:`glr.embeddings.npz.save_embeddings`) or
    sharded stores (``glr embed --shards``). Zero rows of an ``.npz`` and the unreadable rows of a
    store are unreadable images: such queries get empty rows, such index images are never returned.
    ``expansion = (k, α)`` is joint αQE+DBA (a shorthand for ``post``, a post-processing config).
    An ``.npz`` index goes through :func:`rank` like ``glr cv``'s; a store is never loaded whole:
    the kNN runs over its shards and the expanded index is written as a new store in ``work``
    (default ``<out>.work/``). ``out`` is written atomically.

    Returns:
        ``{"queries", "index", "unreadable_queries", "unreadable_index", "seconds", "out"}``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    config = dict(post or {})
    if expansion is not None:
        config["expansion"] = {"form": "joint", "k": int(expansion[0]), "alpha": float(expansion[1]),
                               "qe": True, "dba": True}
    config = normalize_config({**config, "k": int(k)}, "glr search")
    q_ids, q = open_embeddings(query)
    db_ids, db = open_embeddings(index)
    q_ok = q.ok if is_rows(q) else np.linalg.norm(q, axis=1) > 0
    db_ok = db.ok if is_rows(db) else np.linalg.norm(db, axis=1) > 0
    q = q.to_array() if is_rows(q) else q  # the queries fit in memory (118k × D)
    if len(q_ids) and len(db_ids) and q.shape[1] != db.shape[1]:
        raise InputError(f"query embeddings are {q.shape[1]}-d, index embeddings {db.shape[1]}-d "
                         "(embedded by different models?)", index)
    kept_q, q_rows = readable(q_ids, q, q_ok)
    if is_rows(db):  # streamed: the store's unreadable rows are never returned by its kNN
        I = (_streamed_rank(q_rows, db, config, Path(work) if work is not None else out.parent / f"{out.name}.work",
                            backend, progress) if len(kept_q) and len(db_ids) else np.zeros((len(kept_q), 0), np.int64))
        kept_db = list(db_ids)
    else:
        kept_db, db_rows = readable(db_ids, db, db_ok)
        I, _ = rank(q_rows, db_rows, config, cache=GraphCache(backend=backend, progress=progress), progress=progress)
    write_submission(out, retrieval_rows(q_ids, kept_q, kept_db, I), "retrieval", expected_ids=q_ids,
                     index_ids=db_ids)
    return {"queries": len(q_ids), "index": len(db_ids), "unreadable_queries": int((~q_ok).sum()),
            "unreadable_index": int((~db_ok).sum()), "seconds": round(time.perf_counter() - t0, 2),
            "out": str(out)}
