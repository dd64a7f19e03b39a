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
from torch.utils.data import DataLoader

from glr import metrics
from glr.data import GLDv2DataModule, GLDv2Root, ImageDataset, make_transforms
from glr.embeddings import PooledFeatures, extract_embeddings, save_embeddings, thumbnail_embeddings
from glr.model import LITE0_PACKAGE, LandmarkModule, build_net, load_artifact, save_artifact
from glr.search import knn
from glr.submission import (recognition_predictions, recognition_rows, retrieval_rows,
                            write_submission)
from glr.utils import atomic_write

log = logging.getLogger(__name__)

#: Defaults of the demo's fine-tuning run (CPU-sized; real runs override them).
DEMO_TRAIN = dict(backbone="efficientnet_lite0", pretrained=LITE0_PACKAGE, image_size=112, epochs=8,
                  batch_size=32, lr=2e-3, backbone_lr_mult=0.5, arcface_s=30.0, arcface_m=0.2)


# --------------------------------------------------------------------------- train
def train(root: str | os.PathLike, out: str | os.PathLike, backbone: str = "efficientnet_lite0",
          pretrained: str | None = LITE0_PACKAGE, image_size: int = 96, epochs: int = 5,
          batch_size: int = 32, lr: float = 2e-3, backbone_lr_mult: float = 0.5,
          weight_decay: float = 1e-4, arcface_s: float = 30.0, arcface_m: float = 0.2,
          embedding_size: int = 512, gem_p: float = 3.0, train_subset: str = "clean",
          min_samples: int = 2, val_fraction: float = 0.0, num_workers: int = 2, seed: int = 0,
          init_from: str | None = None,
          accelerator: str = "auto", devices: Any = "auto", strategy: str = "auto",
          precision: str | None = None, limit_train_batches: int | float | None = None,
          exp_id: str | None = None, progress: bool = True) -> Path:
    """Fine-tune an :class:`~glr.model.EmbeddingNet` with an ArcFace head.

    Args:
        root: GLDv2-format root.
        out: run folder; the artifact is written to ``out/model.pt``.
        init_from: an artifact whose network weights start this stage (staged training:
            bigger images or a bigger train set load weights only, never the trainer state).
        precision: Lightning precision; default ``bf16-mixed`` on CUDA, ``32-true`` on CPU.
        Other arguments: model, data and optimiser settings (see :mod:`glr.model`, :mod:`glr.data`).

    Returns:
        Path of the saved artifact.
    """
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dm = GLDv2DataModule(str(root), image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         train_subset=train_subset, min_samples=min_samples, val_fraction=val_fraction, seed=seed)
    dm.setup("fit")
    if init_from:  # weights only: the new stage keeps the architecture of the artifact it starts from
        net, _, _ = load_artifact(init_from)
        net.train()
    else:
        net = build_net(dict(backbone=backbone, embedding_size=embedding_size, gem_p=gem_p,
                             pretrained=pretrained))
    module = LandmarkModule(net, num_classes=dm.num_classes, arcface_s=arcface_s, arcface_m=arcface_m, lr=lr,
                            backbone_lr_mult=backbone_lr_mult, weight_decay=weight_decay)
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts of mixed precision
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=accelerator, devices=devices, strategy=strategy,
        precision=precision or ("bf16-mixed" if cuda else "32-true"),
        logger=pl.loggers.CSVLogger(str(out), name="logs"), enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=10,
        limit_train_batches=limit_train_batches, deterministic=False,
    )
    t0 = time.time()
    trainer.fit(module, datamodule=dm)
    meta = dict(exp_id=exp_id or out.name, backbone=net.model_args["backbone"], epochs=epochs, image_size=image_size,
                train_subset=train_subset, num_classes=dm.num_classes, n_train=len(dm.train_ids),
                train_seconds=round(time.time() - t0, 1), init_from=init_from,
                final_loss=float(trainer.callback_metrics.get("train/loss_epoch", float("nan"))))
    path = out / "model.pt"
    if trainer.is_global_zero:
        save_artifact(path, module.net, dm.data_config(), meta, head=module.head)
        log.info("saved %s", path)
    return path


# --------------------------------------------------------------------------- embed
def embed_split(net: torch.nn.Module, root: GLDv2Root, split: str, ids: Sequence[str], image_size: int,
                batch_size: int = 64, num_workers: int = 2, device: str | None = None,
                progress: bool = True) -> np.ndarray:
    """Embed images ``ids`` of ``split`` with ``net`` at ``image_size``; (N, D) float32."""
    ds = ImageDataset(root.root, split, list(ids), transform=make_transforms(image_size, train=False))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available())
    return extract_embeddings(net, loader, device=device, progress=progress, desc=f"embed {split}")


def _embed_all(kind: str, root: GLDv2Root, splits: dict[str, list[str]], artifact: str | None,
               image_size: int | None, batch_size: int, num_workers: int, progress: bool
               ) -> dict[str, np.ndarray]:
    """Embeddings of each split for a descriptor ``kind`` (model | imagenet | thumbnail)."""
    if kind == "thumbnail":
        return {s: thumbnail_embeddings([root.path(s, i) for i in ids], progress=progress)
                for s, ids in splits.items()}
    if kind == "imagenet":
        net = PooledFeatures(build_net(dict(backbone="efficientnet_lite0", pretrained=LITE0_PACKAGE)))
        size = image_size or 96
    else:
        net, data_config, _ = load_artifact(artifact)
        size = image_size or int(data_config["image_size"])
    return {s: embed_split(net, root, s, ids, size, batch_size, num_workers, progress=progress)
            for s, ids in splits.items()}


# --------------------------------------------------------------------------- cv
def cv(data: str | os.PathLike, out: str | os.PathLike, artifact: str | None = None, kind: str = "model",
       image_size: int | None = None, batch_size: int = 64, num_workers: int = 2, k: int = 100,
       recognition: bool = True, train_subset: str = "clean", extra: dict[str, Any] | None = None,
       progress: bool = True) -> dict[str, Any]:
    """Embed → search → submissions → score on a GLDv2-format root.

    Args:
        data: the root.
        out: folder receiving ``submission.csv`` (retrieval), ``submission_recognition.csv``,
            the embeddings (``emb_<split>.npz``) and ``cv.json``.
        artifact: model artifact (``kind="model"``).
        kind: ``model`` (the artifact), ``imagenet`` (lite0 ImageNet weights, GeM, no training)
            or ``thumbnail`` (16×16 colour thumbnails).
        k: retrieval list length (≤ 100 are written).
        recognition: also predict landmarks by the top-5 cosine-sum vote over the train
            images (needs their embeddings; set False to skip on a big root).
        train_subset: the recognition database, "clean" or "full" (see ``GLDv2Root.train_ids_labels``).
        extra: entries added to ``cv.json`` (the demo's baselines).

    Returns:
        ``{"task": "retrieval", "public": …, "private": …, "recognition": {...}}`` as in
        :func:`glr.metrics.score`; figures are absent (``None``) when the root has no solution file.
    """
    root = GLDv2Root.open(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    test_ids, index_ids = root.test_ids(), root.index_ids()
    splits = {"test": test_ids, "index": index_ids}
    train_pairs: list[tuple[str, int]] = []
    if recognition:
        train_pairs = root.train_ids_labels(train_subset)
        splits["train"] = [i for i, _ in train_pairs]
    emb = _embed_all(kind, root, splits, artifact, image_size, batch_size, num_workers, progress)
    for s, ids in splits.items():
        save_embeddings(out / f"emb_{s}.npz", ids, emb[s])

    _, I = knn(emb["test"], emb["index"], k)
    sub = write_submission(out / "submission.csv", retrieval_rows(test_ids, index_ids, I), "retrieval",
                           expected_ids=test_ids, index_ids=set(index_ids))
    result: dict[str, Any] = {"task": "retrieval", "public": None, "private": None, "descriptor": kind}
    sol = root.solution_path("retrieval")
    if sol is not None:
        result.update(metrics.score("retrieval", sol, sub))
    if recognition:
        St, It = knn(emb["test"], emb["train"], 5)
        labels, scores = recognition_predictions(St, It, np.array([l for _, l in train_pairs]), top_k=5)
        rsub = write_submission(out / "submission_recognition.csv", recognition_rows(test_ids, labels, scores),
                                "recognition", expected_ids=test_ids)
        rsol = root.solution_path("recognition")
        result["recognition"] = metrics.score("recognition", rsol, rsub) if rsol is not None else None
    result.update(extra or {})
    with atomic_write(out / "cv.json") as f:
        json.dump(result, f, indent=2)
    return result


# --------------------------------------------------------------------------- demo
def demo(data: str | os.PathLike | None = None, out: str | os.PathLike = "submission",
         work: str | os.PathLike = "runs/demo", quick: bool = False, train_args: dict | None = None,
         baselines: bool = True, num_workers: int = 2, progress: bool = True,
         synth_args: dict | None = None) -> dict[str, Any]:
    """synth (unless ``data``) → train → CV, plus the two reference descriptors.

    ``quick`` shrinks data and model to seconds (tests); ``train_args`` / ``synth_args``
    override :func:`train` / :func:`glr.synth.make_synthetic_gldv2` arguments.

    Writes ``out/submission.csv`` (retrieval), ``out/submission_recognition.csv``,
    ``out/cv.json`` (the fine-tuned model's score JSON, with a ``baselines`` entry) and
    ``out/retrievals.png``, and returns the cv.json content.
    """
    from glr.report import cv_table, draw_retrievals
    from glr.synth import make_synthetic_gldv2

    work, out = Path(work), Path(out)
    if data is None:
        data = work / "data"
        if not (Path(data) / "train.csv").exists():
            synth_kw = dict(n_landmarks=24, scale=0.15, image_size=48) if quick else {}
            make_synthetic_gldv2(data, **dict(synth_kw, seed=0, progress=progress, **(synth_args or {})))
    targs = dict(DEMO_TRAIN, **(dict(epochs=1, image_size=48, backbone="test_resnet", pretrained=None)
                                if quick else {}))
    targs.update(train_args or {})
    artifact = train(data, work / "model", num_workers=num_workers, progress=progress, **targs)
    figures: dict[str, Any] = {}
    if baselines:
        for kind in ("thumbnail", "imagenet"):
            r = cv(data, work / f"cv_{kind}", kind=kind, image_size=targs["image_size"],
                   num_workers=num_workers, recognition=False, progress=progress)
            figures[kind] = {"public": r["public"], "private": r["private"]}
    result = cv(data, out, artifact=str(artifact), num_workers=num_workers, progress=progress,
                train_subset=targs.get("train_subset", "clean"),
                extra={"baselines": figures, "artifact": str(artifact)})
    root = GLDv2Root.open(data)
    sol = root.solution_path("retrieval")
    if sol is not None:
        try:
            draw_retrievals(root, out, out / "retrievals.png")
        except Exception as e:  # a picture must never fail the run
            log.warning("could not draw retrievals: %s", e)
    print(cv_table(result))
    return result
