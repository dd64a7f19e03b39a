"""The stages chained: train → embed → search → submission → score, and the demo.

Every function takes a GLDv2-format root (official v2.1 file names, or the Kaggle 2021
layout) and works the same on the embedded synthetic root and on the real dataset.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from glr import metrics
from glr.data import GLDv2Root, read_ids
from glr.embeddings import PooledFeatures, embed_images, load_embeddings, save_embeddings, thumbnail_embeddings
from glr.postprocess.expansion import combine_embeddings
from glr.postprocess.steps import Context, train_context
from glr.model import LITE0_PACKAGE, build_net, load_artifact, read_artifact, save_artifact
from glr.submission import (recognition_predictions, recognition_rows, retrieval_rows,
                            write_submission)
from glr.utils import InputError, atomic_write

log = logging.getLogger(__name__)

#: Every option of :func:`train` with its default: the keys an experiment config or a
#: stage may set (the CLI builds its ``glr train`` flags from this table).
TRAIN_DEFAULTS: dict[str, Any] = dict(
    # model
    backbone="efficientnet_lite0", pretrained=LITE0_PACKAGE, embedding_size=512, gem_p=3.0, drop_rate=0.0,
    last_stride=False, bnneck=False,
    # head and loss
    head="arcface", arcface_s=30.0, arcface_m=0.2, subcenter_k=3, dynamic_margin=False, margin_a=0.45,
    margin_b=0.05, label_smoothing=0.0, class_weight_power=0.0,
    # data
    image_size=96, train_set="clean", min_samples=2, val_fraction=0.0, sampler="shuffle", pk_k=4,
    continent_probs=None, clean_prob=None, random_erasing=0.0, hflip=False, allow_val_leak=False,
    batch_size=32, num_workers=2,
    # optimisation
    epochs=5, optimizer="adamw", lr=2e-3, backbone_lr_mult=0.5, weight_decay=1e-4, momentum=0.9,
    warmup_frac=0.1, warmup_epochs=None, accumulate_grad_batches=1, seed=0,
    # hardware
    accelerator="auto", devices="auto", num_nodes=1, strategy="auto", precision=None, limit_train_batches=None,
    log_every_n_steps=10,
    # staging and provenance
    init_from=None, experiment=None, stage=None,
)

# --------------------------------------------------------------------------- train
def _net_for_stage(init_from: str | None, opts: dict[str, Any], backbone_given: bool
                   ) -> tuple[torch.nn.Module, dict | None]:
    """The network a stage starts from: the previous artifact's weights (its architecture
    wins; a different ``backbone`` asked for explicitly is an error), or a new one from
    ``opts``. Also returns the artifact payload (None for a new network)."""
    if not init_from:
        return build_net({k: opts[k] for k in ("backbone", "embedding_size", "gem_p", "pretrained", "drop_rate",
                                                 "last_stride", "bnneck")}), None
    payload = read_artifact(init_from)
    net = build_net(dict(payload["model_args"]))
    net.load_state_dict(payload["state_dict"])
    if backbone_given and opts["backbone"] != net.model_args["backbone"]:
        raise InputError(f"init_from holds a {net.model_args['backbone']} network, the stage asks for "
                         f"{opts['backbone']}", init_from)
    return net, payload


def train(root: str | os.PathLike, out: str | os.PathLike, progress: bool = True, **options: Any) -> Path:
    """Train one stage: an :class:`~glr.model.EmbeddingNet` with a margin head.

    Args:
        root: GLDv2-format root.
        out: run folder; the artifact is written to ``out/model.pt`` and Lightning's CSV
            logs to ``out/logs``.
        progress: progress bars.
        **options: any key of :data:`TRAIN_DEFAULTS` (unknown keys raise ``InputError``):

            * model: ``backbone``, ``pretrained``, ``embedding_size``, ``gem_p``,
              ``drop_rate``, ``last_stride``, ``bnneck``;
            * head and loss: ``head`` (arcface | subcenter_arcface | cosface), ``arcface_s``,
              ``arcface_m``, ``subcenter_k``, ``dynamic_margin``, ``margin_a``, ``margin_b``,
              ``label_smoothing``, ``class_weight_power``;
            * data: ``image_size``, ``train_set`` (clean | c2x | full | all), ``sampler``
              (shuffle | id_uniform | continent), ``pk_k``, ``random_erasing``,
              ``allow_val_leak``, …;
            * optimisation: ``epochs``, ``optimizer`` (adamw | sgd), ``lr``, ``warmup_epochs``
              or ``warmup_frac``, ``accumulate_grad_batches``, …;
            * hardware: ``accelerator``, ``devices``, ``num_nodes``, ``strategy``,
              ``precision`` (default ``bf16-mixed`` on CUDA, ``32-true`` on CPU);
            * ``init_from``: the previous stage's artifact. Only its weights are loaded (the
              optimiser and schedule start fresh, the stage's own settings hold); head rows
              of classes the new stage keeps are copied, new classes start fresh.

    Returns:
        Path of the saved artifact.
    """
    import lightning.pytorch as pl

    from glr.heads import expand_head_state
    from glr.training import GLDv2DataModule, LandmarkModule

    unknown = set(options) - set(TRAIN_DEFAULTS)
    if unknown:
        raise InputError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)}")
    o = dict(TRAIN_DEFAULTS, **options)
    pl.seed_everything(o["seed"], workers=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dm = GLDv2DataModule(str(root), image_size=o["image_size"], batch_size=o["batch_size"],
                         num_workers=o["num_workers"], train_set=o["train_set"], min_samples=o["min_samples"],
                         val_fraction=o["val_fraction"], seed=o["seed"], hflip=o["hflip"], sampler=o["sampler"],
                         pk_k=o["pk_k"], continent_probs=o["continent_probs"], clean_prob=o["clean_prob"],
                         random_erasing=o["random_erasing"], allow_val_leak=o["allow_val_leak"])
    dm.setup("fit")
    net, prev = _net_for_stage(o["init_from"], o, backbone_given="backbone" in options)
    net.train()
    module = LandmarkModule(net, num_classes=dm.num_classes, head=o["head"], arcface_s=o["arcface_s"],
                            arcface_m=o["arcface_m"], subcenter_k=o["subcenter_k"],
                            dynamic_margin=o["dynamic_margin"], margin_a=o["margin_a"], margin_b=o["margin_b"],
                            class_counts=dm.class_counts, class_weight_power=o["class_weight_power"],
                            label_smoothing=o["label_smoothing"], optimizer=o["optimizer"], lr=o["lr"],
                            backbone_lr_mult=o["backbone_lr_mult"], weight_decay=o["weight_decay"],
                            momentum=o["momentum"], warmup_frac=o["warmup_frac"], warmup_epochs=o["warmup_epochs"])
    copied = 0
    if prev is not None and prev.get("head_state_dict") is not None:
        old_map = {int(k): v for k, v in prev["data_config"].get("label_map", {}).items()}
        try:  # class centres carry over between ArcFace and CosFace alike; k must match
            copied = expand_head_state(prev["head_state_dict"], old_map, module.head, dm.label_map)
        except ValueError as e:
            log.warning("head rows not copied from %s: %s", o["init_from"], e)
        log.info("stage starts from %s: %d of %d classes keep their head rows", o["init_from"], copied,
                 dm.num_classes)
    cuda = torch.cuda.is_available() and o["accelerator"] in ("auto", "gpu", "cuda")
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts of mixed precision
    limit = o["limit_train_batches"]
    if limit is not None and float(limit) >= 1:
        limit = int(limit)
    trainer = pl.Trainer(
        max_epochs=o["epochs"], accelerator=o["accelerator"], devices=o["devices"], num_nodes=o["num_nodes"],
        strategy=o["strategy"], precision=o["precision"] or ("bf16-mixed" if cuda else "32-true"),
        accumulate_grad_batches=o["accumulate_grad_batches"],
        use_distributed_sampler=False,  # glr's samplers shard themselves (glr.samplers)
        logger=pl.loggers.CSVLogger(str(out), name="logs"), enable_checkpointing=False,
        callbacks=[pl.callbacks.LearningRateMonitor(logging_interval="step")],
        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=o["log_every_n_steps"],
        limit_train_batches=limit, deterministic=False,
    )
    t0 = time.time()
    trainer.fit(module, datamodule=dm)
    meta = dict(
        experiment=o["experiment"] or out.name, stage=o["stage"], exp_id=o["experiment"] or out.name,
        backbone=net.model_args["backbone"], epochs=o["epochs"], image_size=o["image_size"],
        train_set=o["train_set"], val_leak=dm.training.val_leak, num_classes=dm.num_classes,
        n_train=len(dm.train_ids), head_rows_copied=copied, init_from=o["init_from"],
        train_seconds=round(time.time() - t0, 1),
        final_loss=float(trainer.callback_metrics.get("train/loss_epoch", float("nan"))),
        options={k: v for k, v in o.items() if k != "init_from"},
        # bit-identical reruns need the same seed, workers, threads and CPU kind (tests/test_determinism.py)
        torch_threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
    path = out / "model.pt"
    if trainer.is_global_zero:
        save_artifact(path, module.net, dm.data_config(), meta, head=module.head)
        log.info("saved %s", path)
    if trainer.world_size > 1:
        trainer.strategy.barrier("artifact saved")
    return path


# --------------------------------------------------------------------------- embed
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


# --------------------------------------------------------------------------- cv
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
    from glr.postprocess.steps import GraphCache, normalize_config, read_config, retrieve, write_config  # noqa
    from glr.sweep import RetrievalScorer, protocol_2021_ids, read_grid, run_sweep, sweep_table, write_sweep

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


# --------------------------------------------------------------------------- demo
#: The demo's ensemble: two backbones, each trained in two stages with growing image size
#: and training set (the seed's clean → c2x pattern at CPU size). Only efficientnet_lite0
#: has ImageNet weights offline; resnet18 learns from scratch and shows the re-ID
#: switches (last stride 1, BNNeck) and the 1st place head (sub-center ArcFace, dynamic margins).
DEMO_EXPERIMENTS: list[dict[str, Any]] = [
    dict(experiment="demo_lite0", backbone="efficientnet_lite0", pretrained=LITE0_PACKAGE, batch_size=32,
         lr=2e-3, backbone_lr_mult=0.5, arcface_s=30.0, arcface_m=0.2,
         stages=[dict(stage="s1", train_set="clean", image_size=96, epochs=6),
                 dict(stage="s2", train_set="c2x", image_size=128, epochs=2, lr=5e-4, warmup_frac=0.0)]),
    dict(experiment="demo_r18", backbone="resnet18", pretrained=None, last_stride=True, bnneck=True,
         head="subcenter_arcface", subcenter_k=3, dynamic_margin=True, margin_a=0.3, margin_b=0.1,
         batch_size=32, lr=3e-3, backbone_lr_mult=1.0,
         stages=[dict(stage="s1", train_set="clean", image_size=80, epochs=10),
                 dict(stage="s2", train_set="c2x", image_size=96, epochs=4, lr=1e-3, warmup_frac=0.0)]),
]
#: ``quick`` (tests): tiny timm models, one epoch per stage.
QUICK_EXPERIMENTS: list[dict[str, Any]] = [
    dict(experiment="quick_resnet", backbone="test_resnet", pretrained=None, batch_size=16, lr=2e-3,
         stages=[dict(stage="s1", train_set="clean", image_size=32, epochs=1),
                 dict(stage="s2", train_set="c2x", image_size=40, epochs=1, lr=5e-4)]),
    dict(experiment="quick_effnet", backbone="test_efficientnet", pretrained=None, batch_size=16, lr=2e-3,
         head="subcenter_arcface", dynamic_margin=True,
         stages=[dict(stage="s1", train_set="clean", image_size=32, epochs=1),
                 dict(stage="s2", train_set="c2x", image_size=40, epochs=1, lr=5e-4)]),
]


def demo(data: str | os.PathLike | None = None, out: str | os.PathLike = "submission",
         work: str | os.PathLike = "runs/demo", quick: bool = False, train_args: dict | None = None,
         baselines: bool = True, num_workers: int = 2, progress: bool = True,
         synth_args: dict | None = None, experiments: Sequence[dict[str, Any]] | None = None,
         weights: str | os.PathLike | None = None, sweep: dict[str, Any] | None | bool = True,
         kernel: str | os.PathLike | None = "kernels/demo") -> dict[str, Any]:
    """synth (unless ``data``) → two staged experiments → ensemble CV with the post-processing
    sweep, plus two reference descriptors → the Kaggle kernel built and run locally.

    Prints the CV after every stage and a table of every stage, the ensemble and the
    baselines at the end.

    Args:
        data: a GLDv2-format root instead of the embedded synthetic one.
        out: receives the ensemble's ``submission.csv`` (retrieval),
            ``submission_recognition.csv``, ``cv.json`` (with ``stages`` and ``baselines``
            entries), ``retrievals.png``, ``ensemble.yaml`` and ``report/report.html`` (:func:`glr.report.write_report`).
        work: data, runs and (unless ``weights``) the weights folder.
        quick: tiny data and models (seconds; tests).
        train_args: options applied to every stage (e.g. ``{"epochs": 1}``).
        experiments: experiment configs (default :data:`DEMO_EXPERIMENTS`).
        weights: weights folder (default ``work/weights``).
        sweep: the post-processing grid swept on the ensemble's CV (True: :data:`glr.sweep.DEFAULT_GRID`;
            None/False: plain kNN); the chosen chain writes the submission and ``postprocess.yaml``.
        kernel: where to build the ensemble's Kaggle kernel (:func:`glr.kernel.build.build_kernel`),
            which is then run in a simulated ``/kaggle`` in both mount layouts and compared with
            the library's submission (None: skip). The result is ``cv.json``'s ``kernel`` entry.

    Returns:
        The ensemble's cv.json content.
    """
    from glr.experiment import parse_experiment, run_experiment
    from glr.report import cv_table, draw_retrievals, stages_table, write_report
    from glr.synth import make_synthetic_gldv2

    work, out = Path(work), Path(out)
    if data is None:
        data = work / "data"
        if not (Path(data) / "train.csv").exists():
            synth_kw = dict(n_landmarks=24, scale=0.15, image_size=48) if quick else {}
            make_synthetic_gldv2(data, **dict(synth_kw, seed=0, progress=progress, **(synth_args or {})))
    exps = list(experiments or (QUICK_EXPERIMENTS if quick else DEMO_EXPERIMENTS))
    weights = Path(weights) if weights else work / "weights"
    overrides = dict(num_workers=num_workers, **(train_args or {}))
    rows: list[dict[str, Any]] = []
    finals: list[str] = []
    for cfg in exps:
        exp = parse_experiment(dict(cfg))
        # the demo retrains from scratch each time (force): its runs are throwaway
        res = run_experiment(dict(cfg), data, runs=work / "runs", weights=weights, overrides=overrides,
                             force=True, progress=progress)
        for (stage, opts), r in zip(exp.stages, res):
            rows.append(dict(name=f"{exp.name} {stage} ({opts['backbone']})", train_set=opts["train_set"],
                             image_size=opts["image_size"], cv=r["cv"]))
        finals.append(res[-1]["artifact"])
    figures: dict[str, Any] = {}
    if baselines:
        for kind in ("thumbnail", "imagenet"):
            r = cv(data, work / f"cv_{kind}", kind=kind, image_size=96, num_workers=num_workers,
                   recognition=False, progress=progress)
            figures[kind] = {"public": r["public"], "private": r["private"]}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "ensemble.yaml") as f:
        f.write("# the demo's ensemble: final artifact of each experiment, equal weights\nmembers:\n")
        f.writelines(f"  - artifact: {Path(a).resolve()}\n" for a in finals)
    stage_rows = [{k: r[k] for k in ("name", "train_set", "image_size")} | {"cv": _brief(r["cv"])} for r in rows]
    from glr.sweep import DEFAULT_GRID, sweep_table

    grid = DEFAULT_GRID if sweep is True else (sweep or None)
    result = cv(data, out, artifact=finals, num_workers=num_workers, progress=progress, sweep=grid,
                extra={"baselines": figures, "artifacts": finals, "stages": stage_rows})
    root = GLDv2Root.open(data)
    if root.solution_path("retrieval") is not None:
        try:
            draw_retrievals(root, out, out / "retrievals.png")
            write_report(out, root, out / "report", title="glr demo: CV of the ensemble")
        except Exception as e:  # a picture must never fail the run
            log.warning("could not draw retrievals or write the report: %s", e)
    chosen = [k for k, v in (result.get("postprocess") or {}).items() if k not in ("k", "shortlist") and v]
    rows.append(dict(name=f"ensemble ({len(finals)} models)" + (" + post-processing" if chosen else ""),
                     cv=result))
    print()
    print(stages_table(rows))
    print()
    print(cv_table(result))
    if result.get("sweep"):
        print()
        print("post-processing of the ensemble (tuned on Public, chosen chain in postprocess.yaml):")
        print(sweep_table({"protocol": result.get("protocol", "v2.1"), "pipeline": result["sweep"]["pipeline"]}))
    if kernel is not None:
        result["kernel"] = demo_kernel(data, out, kernel, weights, num_workers, progress)
        with atomic_write(out / "cv.json") as f:
            json.dump(result, f, indent=2, default=str)
    return result


def demo_kernel(data: str | os.PathLike, out: Path, kernel: str | os.PathLike, weights: Path,
                num_workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Build the demo ensemble's kernel (``out/ensemble.yaml`` + ``out/postprocess.yaml``), run it
    locally in both mount layouts and print whether its submission equals the library's."""
    from glr.kernel.build import build_kernel  # noqa: PLC0415
    from glr.kernel.local import format_result, run_local  # noqa: PLC0415

    post = out / "postprocess.yaml"
    built = build_kernel(out / "ensemble.yaml", kernel, "glr-demo/glr-demo-kernel", "glr-demo/glr-demo-weights",
                         weights_dir=weights, post=post if post.is_file() else None, overwrite=True,
                         num_workers=num_workers, hidden_test_size=10_000, progress=progress)
    print()
    print(f"kernel built in {built}; running it in a simulated /kaggle (fresh interpreter, glr not importable):")
    res = run_local(data, built, stream=False, progress=progress)
    print(format_result(res))
    timing = next(iter(res["runs"].values()))["report"].get("timing") or []
    if timing:
        total = sum(r["seconds"] for r in timing)
        projected = sum(r["projected_seconds"] for r in timing)
        print(f"  kernel time {total:.1f} s here; projected for 10,000 hidden test images: {projected / 60:.1f} min "
              "(same index, same machine)")
    return {"folder": str(built), "parity": res.get("parity"),
            "runs": {k: {x: v[x] for x in ("returncode", "status", "rows", "seconds")} for k, v in res["runs"].items()}}


def _brief(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The headline figures of a cv result (for cv.json's ``stages`` entry)."""
    if not result:
        return None
    rec = result.get("recognition") or {}
    return {"public": result.get("public"), "private": result.get("private"),
            "recognition": {"public": rec.get("public"), "private": rec.get("private")} if rec else None}


# --------------------------------------------------------------------------- search at scale
def search_embeddings(query: str | os.PathLike, index: str | os.PathLike, out: str | os.PathLike,
                      k: int = 100, expansion: tuple[int, float] | None = None,
                      work: str | os.PathLike | None = None, backend: str = "auto",
                      progress: bool = True) -> dict[str, Any]:
    """Retrieval submission from saved embeddings, the index read shard by shard.

    ``query`` and ``index`` are ``.npz`` files (:func:`glr.embeddings.save_embeddings`) or
    sharded stores (``glr embed --shards``); a store is never loaded whole: the kNN runs over
    its shards and joint αQE+DBA (``expansion = (k, α)``) writes the expanded index as a new
    store in ``work`` (default: ``<out>.work/``). Queries whose image was unreadable get an
    empty row; unreadable index images are never returned. ``out`` is written atomically,
    so an earlier file there stays whole if anything fails.

    Returns:
        ``{"queries", "index", "unreadable_queries", "unreadable_index", "seconds", "out"}``.
    """
    from glr.postprocess.expansion import qe_dba_joint  # noqa: PLC0415
    from glr.search import knn  # noqa: PLC0415
    from glr.shards import ArrayRows, ShardedEmbeddings, open_embeddings  # noqa: PLC0415

    t0 = time.perf_counter()
    out = Path(out)
    q_ids, q = open_embeddings(query)
    db_ids, db = open_embeddings(index)
    # zero rows of an .npz are unreadable images too (glr cv's convention)
    q_ok = q.ok if isinstance(q, ShardedEmbeddings) else np.linalg.norm(q, axis=1) > 0
    db_ok = db.ok if isinstance(db, ShardedEmbeddings) else np.linalg.norm(db, axis=1) > 0
    if not isinstance(db, ShardedEmbeddings) and not db_ok.all():
        db = ArrayRows(db, ok=db_ok)  # searched without its unreadable rows
    q = q.to_array() if isinstance(q, ShardedEmbeddings) else q  # the queries fit in memory (118k × D)
    if len(q_ids) and len(db_ids) and q.shape[1] != db.shape[1]:
        raise InputError(f"query embeddings are {q.shape[1]}-d, index embeddings {db.shape[1]}-d "
                         "(embedded by different models?)", index)
    if expansion is not None and len(q_ids) and len(db_ids):
        ek, alpha = expansion
        dest = None
        if isinstance(db, ShardedEmbeddings):
            dest = Path(work) if work is not None else out.parent / f"{out.name}.work"
            dest = dest / "index_qe_dba"
            if dest.exists():
                import shutil  # noqa: PLC0415

                shutil.rmtree(dest)  # derived data of an earlier run of this command
        q, db = qe_dba_joint(q, db, k=int(ek), alpha=float(alpha), qe=True, dba=True, backend=backend, out=dest)
    I = (knn(q, db, k, backend=backend, progress=progress)[1] if len(q_ids) and len(db_ids)
         else np.full((len(q_ids), 0), -1, np.int64))
    I[~q_ok] = -1
    rows = retrieval_rows(q_ids, db_ids, I)
    write_submission(out, rows, "retrieval", expected_ids=q_ids, index_ids=db_ids)
    return {"queries": len(q_ids), "index": len(db_ids), "unreadable_queries": int((~q_ok).sum()),
            "unreadable_index": int((~db_ok).sum()), "seconds": round(time.perf_counter() - t0, 2),
            "out": str(out)}
