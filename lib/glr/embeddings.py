"""Embedding extraction: images → (N, D) float32 L2-normalised arrays, with progress.

Also the two reference descriptors the demo compares against: colour thumbnails and
GeM-pooled backbone features with no training, and :func:`export_embeddings`, the
multi-GPU / multi-node export of a split through Lightning strategies (DDP parts gathered
and de-duplicated by position).
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
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from glr.utils import InputError, atomic_write

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class PooledFeatures(nn.Module):
    """Wraps an :class:`~glr.model.EmbeddingNet` to output L2-normalised GeM-pooled backbone
    features (the "ImageNet weights + GeM, no training" descriptor); (B, 3, H, W) → (B, F)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.pooled_features(x).float(), dim=1)


@torch.no_grad()
def extract_embeddings(net: nn.Module, loader: DataLoader, device: torch.device | str | None = None,
                       amp: bool | None = None, progress: bool = True, desc: str = "embed",
                       flip: bool = False) -> np.ndarray:
    """Run ``net`` over every batch of ``loader`` in order.

    Args:
        net: maps (B, 3, H, W) images to (B, D) embeddings.
        loader: yields dicts with ``"image"`` (B, 3, H, W); must not shuffle.
        device: defaults to CUDA when present.
        amp: fp16 autocast; defaults to True on CUDA, False on CPU.
        progress: show a tqdm bar.
        desc: the bar's label.
        flip: test-time augmentation: also embed the horizontally flipped batch; the two
            L2-normalised descriptors are averaged, then re-normalised.

    Returns:
        (N, D) float32 C-contiguous array, rows L2-normalised, in loader order.
    """
    device = torch.device(device) if device is not None else default_device()
    amp = (device.type == "cuda") if amp is None else amp
    net = net.to(device).eval()
    out: list[np.ndarray] = []
    ctx = torch.autocast(device.type, dtype=torch.float16) if amp else contextlib.nullcontext()
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch", leave=False):
        images = batch["image"].to(device, non_blocking=True)
        with ctx:
            emb = F.normalize(net(images).float(), dim=1)
            if flip:
                emb = F.normalize(emb + F.normalize(net(torch.flip(images, dims=[3])).float(), dim=1), dim=1)
        out.append(emb.cpu().numpy())
    if not out:
        return np.zeros((0, 0), np.float32)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def thumbnail_embeddings(paths: Sequence[str | os.PathLike], size: int = 16, progress: bool = True) -> np.ndarray:
    """Colour-thumbnail descriptors: each image resized to ``size``×``size`` RGB, flattened,
    mean-centred and L2-normalised (the trivial baseline).

    Returns:
        (N, 3·size²) float32 array.
    """
    out = np.zeros((len(paths), 3 * size * size), np.float32)
    for i, p in enumerate(tqdm(paths, desc="thumbnails", disable=not progress, leave=False)):
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
        except OSError as e:
            raise InputError(f"cannot read image ({e})", p) from e
        v = a.reshape(-1) / 255.0
        v -= v.mean()
        out[i] = v / max(np.linalg.norm(v), 1e-12)
    return out


def save_embeddings(path: str | os.PathLike, ids: Sequence[str], emb: np.ndarray) -> Path:
    """Save ids + (N, D) embeddings as ``.npz`` (atomically)."""
    if len(ids) != len(emb):
        raise ValueError(f"{len(ids)} ids for {len(emb)} embeddings")
    with atomic_write(path, "wb") as f:
        np.savez(f, ids=np.asarray(ids, dtype=str), emb=np.asarray(emb, np.float32))
    return Path(path)


def load_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Inverse of :func:`save_embeddings`: ``(ids, (N, D) float32)``."""
    with np.load(path) as z:
        return [str(i) for i in z["ids"]], np.ascontiguousarray(z["emb"], dtype=np.float32)


# --------------------------------------------------------------------------- Lightning export
# Multi-GPU / multi-node extraction through Lightning strategies. Each process embeds its
# share of the images (a padded DistributedSampler: every rank gets ceil(N / world) images,
# the last ones repeated), writes them to ``<out dir>/.<out name>.parts/rank<R>.npz``; global
# rank 0 then merges the parts, drops the repeated positions and writes ``out`` atomically.
# The parts folder must be on a filesystem every node sees (the usual case on clusters).

_EXPORT_SPLITS = ("train", "index", "test")


class _SafeImages(Dataset):
    """An :class:`~glr.data.ImageDataset` whose unreadable images do not raise.

    A failed item is a zero image with ``ok=False`` and the error message, so every rank
    finishes its share and the failure is reported once, consistently, after the merge
    (an exception in one DDP rank would leave the others waiting in a collective).
    """

    def __init__(self, dataset: Dataset, image_size: int):
        self.dataset = dataset
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            item = self.dataset[index]
        except InputError as e:
            return {"image": torch.zeros(3, self.image_size, self.image_size), "index": index,
                    "ok": False, "error": str(e)}
        item["ok"] = True
        item["error"] = ""
        return item


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


def merge_parts(parts: Sequence[dict], ids: Sequence[str], split: str | None = None,
                dup_atol: float = 1e-2) -> np.ndarray:
    """Merge per-rank ``{"index", "emb", "failed", "errors"}`` parts into (N, D) rows in ``ids`` order.

    Positions seen more than once (the distributed sampler pads by repeating images) keep
    their first embedding; a repeat that differs by more than ``dup_atol`` is logged.

    Raises:
        InputError: some images could not be read (``failed``), or positions of ``ids``
            are missing from every part; the message names (up to 5 of) the ids.
    """
    n = len(ids)
    what = f"{split} image" if split else "image"
    failed = sorted({int(i) for p in parts for i in np.asarray(p.get("failed", ()), np.int64)})
    if failed:
        first = next(str(e) for p in parts for i, e in zip(p.get("failed", ()), p.get("errors", ()))
                     if int(i) == failed[0])
        shown = ", ".join(repr(ids[i]) for i in failed[:5]) + (", …" if len(failed) > 5 else "")
        raise InputError(f"{len(failed)} of {n} {what}s could not be read ({shown}); first: {first}")
    index = [np.asarray(p["index"], np.int64) for p in parts if len(p["index"])]
    emb = [np.asarray(p["emb"], np.float32) for p in parts if len(p["index"])]
    if not index:
        index, emb = [np.zeros(0, np.int64)], [np.zeros((0, 0), np.float32)]
    dims = {e.shape[1] for e in emb if len(e)}
    if len(dims) > 1:
        raise ValueError(f"parts disagree on the embedding size: {sorted(dims)}")
    index_all = np.concatenate(index)
    emb_all = np.concatenate(emb) if dims else np.zeros((0, 0), np.float32)
    if len(index_all) and (index_all.min() < 0 or index_all.max() >= n):
        raise ValueError(f"positions outside 0..{n - 1} in the parts")
    uniq, first = np.unique(index_all, return_index=True)  # first occurrence of each position
    if len(uniq) != len(index_all):
        keep = emb_all[first]
        pos = np.searchsorted(uniq, index_all)
        worst = float(np.abs(emb_all - keep[pos]).max()) if len(emb_all) else 0.0
        if worst > dup_atol:
            log.warning("repeated %ss differ by up to %.3g between ranks; kept the first", what, worst)
        log.debug("dropped %d repeated positions", len(index_all) - len(uniq))
    if len(uniq) != n:
        missing = np.setdiff1d(np.arange(n), uniq)
        shown = ", ".join(repr(ids[i]) for i in missing[:5]) + (", …" if len(missing) > 5 else "")
        raise InputError(f"{len(missing)} of {n} {what}s are missing from the gathered embeddings ({shown})")
    return np.ascontiguousarray(emb_all[first], dtype=np.float32)  # uniq == arange(n): ids order


def global_rank() -> int:
    """This process's rank in the initialised ``torch.distributed`` group (0 without one)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def split_ids(root: str | os.PathLike, split: str) -> list[str]:
    """Every id of ``split`` in a GLDv2-format root (``train``: the clean subset)."""
    from glr.data import GLDv2Root

    if split not in _EXPORT_SPLITS:
        raise InputError(f"split must be one of {', '.join(_EXPORT_SPLITS)}, got {split!r}")
    gld = GLDv2Root.open(root)
    if split == "train":
        return [i for i, _ in gld.train_ids_labels("clean")]
    return gld.index_ids() if split == "index" else gld.test_ids()


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
        artifact: model artifact (:func:`glr.model.save_artifact`).
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
    from glr.data import ImageDataset, make_transforms, transforms_from_config
    from glr.model import load_artifact

    out = Path(out)
    if out.is_dir():
        raise InputError("output is a folder, expected an .npz file path", out)
    if batch_size < 1 or num_workers < 0:
        raise InputError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    net, data_config, _ = load_artifact(artifact)
    if split not in _EXPORT_SPLITS:
        raise InputError(f"split must be one of {', '.join(_EXPORT_SPLITS)}, got {split!r}")
    if ids is None:
        ids = split_ids(root, split)
    ids = [str(i) for i in ids]
    if image_size:
        size = int(image_size)
        transform = make_transforms(size, train=False, mean=data_config["mean"], std=data_config["std"])
    else:
        size = int(data_config["image_size"])
        transform = transforms_from_config(data_config)
    if not ids:
        return save_embeddings(out, [], np.zeros((0, int(getattr(net, "embedding_size", 0))), np.float32))

    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    dataset = _SafeImages(ImageDataset(root, split, ids, transform=transform), size)
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
