"""Embedding export through Lightning: one device or many (``glr embed``, any strategy).

Multi-GPU / multi-node extraction through Lightning strategies. Each process embeds its
share of the images (a padded DistributedSampler: every rank gets ceil(N / world) images,
the last ones repeated), writes them to ``<out dir>/.<out name>.parts/rank<R>.npz``; global
rank 0 then merges the parts, drops the repeated positions and writes ``out`` atomically.
The parts folder must be on a filesystem every node sees (the usual case on clusters).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from glr.data.images import ImageDataset, SafeImages
from glr.data.root import GLDv2Root
from glr.embeddings.npz import merge_parts, save_embeddings
from glr.predict import load_member
from glr.utils import InputError

log = logging.getLogger(__name__)

_EXPORT_SPLITS = ("train", "index", "test")


class _EmbedModule(pl.LightningModule):
    """Wraps a network for ``Trainer.predict``; builds its own (rank-aware) loader."""

    def __init__(self, net: nn.Module, dataset: Dataset, batch_size: int, num_workers: int):
        super().__init__()
        self.net = net
        self._dataset = dataset
        self._batch_size = batch_size
        self._num_workers = num_workers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def predict_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = None
        if world > 1:  # pads by repetition: equal batch counts on every rank, works for N < world
            sampler = DistributedSampler(self._dataset, num_replicas=world, rank=rank, shuffle=False,
                                         drop_last=False)
        return DataLoader(self._dataset, batch_size=self._batch_size, shuffle=False, sampler=sampler,
                          num_workers=self._num_workers, pin_memory=torch.cuda.is_available())

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        emb = F.normalize(self.net(batch["image"]).float(), dim=1)
        return {"index": batch["index"], "emb": emb, "ok": batch["ok"], "error": batch["error"]}


class _PartsWriter(BasePredictionWriter):
    """Collects this rank's ``(positions, embeddings)`` and the positions that failed."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.index: list[np.ndarray] = []
        self.emb: list[np.ndarray] = []
        self.failed: list[int] = []
        self.errors: list[str] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        ok = prediction["ok"].detach().cpu().numpy().astype(bool)
        index = prediction["index"].detach().cpu().numpy().astype(np.int64)
        emb = prediction["emb"].detach().float().cpu().numpy()
        self.index.append(index[ok])
        self.emb.append(emb[ok])
        for j in np.flatnonzero(~ok):
            self.failed.append(int(index[j]))
            self.errors.append(str(prediction["error"][j]))

    def part(self, token: str, rank: int) -> dict[str, np.ndarray]:
        index = np.concatenate(self.index) if self.index else np.zeros(0, np.int64)
        emb = np.concatenate(self.emb) if self.emb else np.zeros((0, 0), np.float32)
        return dict(token=np.asarray(token), rank=np.asarray(rank), index=index.astype(np.int64),
                    emb=np.ascontiguousarray(emb, dtype=np.float32),
                    failed=np.asarray(self.failed, np.int64), errors=np.asarray(self.errors, dtype=str))


def global_rank() -> int:
    """This process's rank in the initialised ``torch.distributed`` group (0 without one)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def split_ids(root: str | os.PathLike, split: str) -> list[str]:
    """Every id of ``split`` in a GLDv2-format root (``train``: the clean subset)."""

    return GLDv2Root.open(root).embedding_ids(split)


def _parts_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def export_embeddings(artifact: str | os.PathLike, root: str | os.PathLike, split: str,
                      out: str | os.PathLike, ids: Sequence[str] | None = None,
                      image_size: int | None = None, batch_size: int = 64, num_workers: int = 2,
                      accelerator: str = "auto", devices: int | str = "auto", num_nodes: int = 1,
                      strategy: str = "auto", precision: str | None = None,
                      progress: bool = True) -> Path:
    """Embed ``split`` images with a model artifact through ``lightning.pytorch.Trainer.predict``.

    Works on one device and under any Lightning strategy (``devices``, ``num_nodes``,
    ``strategy="ddp"``): each process embeds its share, global rank 0 gathers the shares
    (through ``<out dir>/.<out name>.parts/``, which must be visible to every node),
    de-duplicates them by position and writes ``out`` with :func:`save_embeddings`. Under
    ``strategy="ddp"`` Lightning re-executes the running command (``sys.argv``) for the other
    local ranks, so call this from a script or ``glr embed``, not from an interactive session.

    Args:
        artifact: model artifact (:func:`glr.model.artifact.save_artifact`).
        root: GLDv2-format root.
        split: ``train`` (clean subset), ``index`` or ``test``.
        out: the ``.npz`` to write (ids + (N, D) float32, L2-normalised rows).
        ids: images to embed, default every id of the split.
        image_size: eval resize; default the artifact's ``data_config["image_size"]``.
        precision: Lightning precision; default ``16-mixed`` on CUDA, ``32-true`` otherwise.
        Other arguments: loader and ``lightning.pytorch.Trainer`` settings.

    Returns:
        ``Path(out)``, on every rank.

    Raises:
        InputError: bad artifact, root, split or ids, or unreadable images (named); raised on
            every rank, and ``out`` is left as it was.
    """

    out = Path(out)
    if out.is_dir():
        raise InputError("output is a folder, expected an .npz file path", out)
    if batch_size < 1 or num_workers < 0:
        raise InputError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    member = load_member(artifact, image_size=image_size)
    net, size, transform = member.net, member.size, member.transform()
    if split not in _EXPORT_SPLITS:
        raise InputError(f"split must be one of {', '.join(_EXPORT_SPLITS)}, got {split!r}")
    if ids is None:
        ids = split_ids(root, split)
    ids = [str(i) for i in ids]
    if not ids:
        return save_embeddings(out, [], np.zeros((0, int(getattr(net, "embedding_size", 0))), np.float32))

    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    dataset = SafeImages(ImageDataset(root, split, ids, transform=transform), size)
    module = _EmbedModule(net, dataset, batch_size, num_workers)
    writer = _PartsWriter()
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                         precision=precision or ("16-mixed" if cuda else "32-true"),
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=progress, inference_mode=True, use_distributed_sampler=False,
                         callbacks=[writer])
    trainer.predict(module, return_predictions=False)
    _gather(trainer, writer, out, ids, split)
    return out


def _gather(trainer: "pl.Trainer", writer: _PartsWriter, out: Path, ids: list[str], split: str) -> None:
    """Write this rank's part, merge on rank 0, then raise the same error on every rank if any."""
    strategy, rank, world = trainer.strategy, trainer.global_rank, trainer.world_size
    if world == 1:  # nothing to exchange
        save_embeddings(out, ids, merge_parts([writer.part("", 0)], ids, split))
        return
    parts = _parts_dir(out)
    if rank == 0:
        shutil.rmtree(parts, ignore_errors=True)  # a crashed run's leftovers
    token = strategy.broadcast(uuid.uuid4().hex if rank == 0 else None, src=0)
    mine = parts / f"rank{rank}.npz"
    failure: tuple[str, str] | None = None
    exc: BaseException | None = None
    try:
        parts.mkdir(parents=True, exist_ok=True)
        tmp = parts / f".rank{rank}.{token}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **writer.part(token, rank))
        os.replace(tmp, mine)
    except OSError as e:
        exc, failure = e, ("error", f"rank {rank} cannot write its part {mine}: {e}")
    # every rank reports whether its part is written; rank 0 merges only when all are
    written = _all_gather_object(failure)
    bad = next((f for f in written if f is not None), None)
    if rank == 0 and bad is None:
        try:
            loaded = []
            for r in range(world):
                path = parts / f"rank{r}.npz"
                if not path.is_file():
                    raise InputError(f"the part of rank {r} is not in {parts}: with num_nodes > 1 the "
                                     "output must be on a filesystem shared by every node")
                with np.load(path) as z:
                    part = {k: z[k] for k in z.files}
                if str(part["token"]) != token:
                    raise InputError(f"{path} belongs to another run writing the same output")
                loaded.append(part)
            save_embeddings(out, ids, merge_parts(loaded, ids, split))
        except InputError as e:
            exc, bad = e, ("input", str(e))
        except Exception as e:  # noqa: BLE001 - reported to every rank, re-raised here
            exc, bad = e, ("error", f"{type(e).__name__}: {e}")
    bad = strategy.broadcast(bad, src=0)
    with contextlib.suppress(OSError):
        mine.unlink()
    strategy.barrier("glr-export-cleanup")
    if rank == 0:
        shutil.rmtree(parts, ignore_errors=True)
    if bad is not None:
        if exc is not None:
            raise exc
        raise (InputError if bad[0] == "input" else RuntimeError)(bad[1])


def _all_gather_object(obj):
    """``[obj of rank 0, obj of rank 1, …]`` (``[obj]`` without a process group)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, obj)
    return got
