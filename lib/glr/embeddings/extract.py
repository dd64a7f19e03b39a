"""Embedding extraction: images → (N, D) float32 L2-normalised arrays, with progress.

:func:`embed_views` decodes each image once for every network and TTA view of an ensemble
(:class:`~glr.data.images.MultiViewDataset` in the loader workers, one intra-op thread each) and
runs the forwards in inference mode; on CUDA in ``channels_last`` with fp16 (or bf16) autocast,
from pinned memory with non-blocking copies, optionally through ``torch.compile``. The CPU's
results are those of one loader per network and scale, bit for bit.

Also the two reference descriptors the demo compares against: colour thumbnails and
GeM-pooled backbone features with no training. No Lightning here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from glr.arrays import l2_normalize
from glr.data.images import EvalView, MultiViewDataset, one_thread, one_thread_worker, resolve_num_workers
from glr.utils import InputError

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class PooledFeatures(nn.Module):
    """Wraps an :class:`~glr.model.net.EmbeddingNet` to output L2-normalised GeM-pooled backbone
    features (the "ImageNet weights + GeM, no training" descriptor); (B, 3, H, W) → (B, F)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.pooled_features(x).float(), dim=1)


#: Forward precisions on a device: autocast to fp16 / bf16, or none (fp32).
PRECISIONS: tuple[str, ...] = ("fp16", "bf16", "fp32")


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``precision`` checked, or the default: fp16 autocast on CUDA, fp32 elsewhere (what the CPU
    results are defined with).

    Raises:
        InputError: a name not in :data:`PRECISIONS`.
    """
    if precision is None:
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise InputError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def prepare_net(net: nn.Module, device: torch.device, compile: bool | None = None) -> nn.Module:
    """``net`` moved to ``device`` in eval mode (in place), in ``channels_last`` on CUDA (faster
    convolutions; the CPU keeps its layout and its results); with ``compile`` (default: the
    ``GLR_COMPILE`` environment variable is 1) the forward is wrapped by ``torch.compile``
    (one compilation per input shape; pays on long runs)."""
    net = net.to(device).eval()
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    if compile is None:
        compile = os.environ.get("GLR_COMPILE", "") == "1"
    return torch.compile(net) if compile else net


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # from pinned memory: the copy overlaps the forwards queued before it
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device)


def _embed_view(net: nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """(B, D) float32 L2-normalised descriptors of one view of a batch; with ``flip`` the mirrored
    batch's descriptor is added and the sum re-normalised. Every path embeds through this."""
    emb = F.normalize(net(images).float(), dim=1)
    if flip:
        emb = F.normalize(emb + F.normalize(net(torch.flip(images, dims=[3])).float(), dim=1), dim=1)
    return emb


def extract_embeddings(net: nn.Module, loader: DataLoader, device: torch.device | str | None = None,
                       amp: bool | None = None, progress: bool = True, desc: str = "embed",
                       flip: bool = False, with_ok: bool = False,
                       precision: str | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Run ``net`` over every batch of ``loader`` in order.

    Args:
        net: maps (B, 3, H, W) images to (B, D) embeddings.
        loader: yields dicts with ``"image"`` (B, 3, H, W); must not shuffle.
        device: defaults to CUDA when present.
        amp: fp16 autocast (``precision`` "fp16"); defaults to True on CUDA, False on CPU.
        progress: show a tqdm bar.
        desc: the bar's label.
        flip: test-time augmentation: also embed the horizontally flipped batch; the two
            L2-normalised descriptors are averaged, then re-normalised.
        with_ok: also return the batches' ``"ok"`` flags (:class:`SafeImages`; all True when
            the loader has none); rows of failed images are then zeros.
        precision: :data:`PRECISIONS` (overrides ``amp``).

    Returns:
        (N, D) float32 C-contiguous array, rows L2-normalised, in loader order; with
        ``with_ok`` the pair ``(embeddings, ok)``, ``ok`` an (N,) bool array.
    """
    device = torch.device(device) if device is not None else default_device()
    if precision is None and amp is not None:
        precision = "fp16" if amp else "fp32"
    ctx = _autocast(device, resolve_precision(precision, device))
    net = prepare_net(net, device, compile=False)
    out: list[np.ndarray] = []
    oks: list[np.ndarray] = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch", leave=False):
            with ctx:
                emb = _embed_view(net, _to_device(batch["image"], device), flip).cpu().numpy()
            ok = np.asarray(batch["ok"], bool) if "ok" in batch else np.ones(len(emb), bool)
            emb[~ok] = 0.0
            out.append(emb)
            oks.append(ok)
    if not out:
        empty = np.zeros((0, 0), np.float32)
        return (empty, np.zeros(0, bool)) if with_ok else empty
    emb = np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
    return (emb, np.concatenate(oks)) if with_ok else emb


# --------------------------------------------------------------------------- decode once, every view
@dataclass(frozen=True)
class Branch:
    """One network of an ensemble and the view it embeds at for each TTA scale (in scale order)."""

    net: nn.Module
    views: tuple[EvalView, ...]


def tta_views(image_size: int, scales: Sequence[float] = (1.0,), **preprocessing: Any) -> tuple[EvalView, ...]:
    """The view of each TTA scale: ``max(8, round(image_size · s))`` pixels with ``preprocessing``
    (:func:`glr.data.images.make_transforms`' ``mean``, ``std``, ``interpolation``, ``crop_pct``).

    Raises:
        ValueError: a scale <= 0.
    """
    scales = [float(s) for s in scales] or [1.0]
    if any(s <= 0 for s in scales):
        raise ValueError(f"TTA scales must be > 0, got {scales}")
    return tuple(EvalView.of(max(8, int(round(image_size * s))), **preprocessing) for s in scales)


@dataclass
class ViewEmbeddings:
    """What :func:`embed_views` returns: per branch, (N, D_b) float32 rows in ids order (zero rows
    for unreadable images); ``ok`` (N,) bool; ``decodes``, image decodes in all (= N: one each)."""

    emb: list[np.ndarray]
    ok: np.ndarray
    decodes: int


def view_loader(root: str | os.PathLike, split: str, ids: Sequence[str], views: Sequence[EvalView],
                batch_size: int = 64, num_workers: int | str = "auto", skip_unreadable: bool = False,
                pin_memory: bool = False) -> DataLoader:
    """The loader of :func:`embed_views`: a :class:`~glr.data.images.MultiViewDataset` in ``ids``
    order, ``num_workers`` workers (``"auto"``: :func:`~glr.data.images.default_num_workers`) of
    one intra-op thread each."""
    workers = resolve_num_workers(num_workers)
    ds = MultiViewDataset(root, split, list(ids), views, skip_unreadable=skip_unreadable)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=one_thread_worker if workers else None)


def _fetched(batches: Iterable[dict], one_thread_fetch: bool) -> Iterator[dict]:
    """``batches``, each fetched under :func:`~glr.data.images.one_thread` when asked (a loader
    without workers decodes and transforms in this process)."""
    it = iter(batches)
    while True:
        with one_thread() if one_thread_fetch else contextlib.nullcontext():
            batch = next(it, None)
        if batch is None:
            return
        yield batch


def _average_scales(per_scale: list[np.ndarray], ok: np.ndarray) -> np.ndarray:
    """One batch of one branch: the scales' rows averaged and re-normalised (as a single scale is
    kept), unreadable rows zero."""
    for e in per_scale:
        e[~ok] = 0.0
    emb = per_scale[0] if len(per_scale) == 1 else l2_normalize(np.mean(per_scale, axis=0))
    emb[~ok] = 0.0
    return emb


def embed_batches(branches: Sequence[Branch], views: Sequence[EvalView], batches: Iterable[dict],
                  device: torch.device | str | None = None, flip: bool = False, precision: str | None = None,
                  compile: bool | None = None, progress: bool = False, desc: str = "embed",
                  one_thread_fetch: bool = False) -> ViewEmbeddings:
    """Every branch over batches of :class:`~glr.data.images.MultiViewDataset` items (``views``:
    the dataset's :attr:`~glr.data.images.MultiViewDataset.views`): each batch's views go to the
    device once and every branch and scale embeds from them (:func:`_embed_view`); a batch's
    copies back are read while the next batch runs. ``precision``: :data:`PRECISIONS`;
    ``compile``: :func:`prepare_net`."""
    device = torch.device(device) if device is not None else default_device()
    ctx = _autocast(device, resolve_precision(precision, device))
    nets = [prepare_net(b.net, device, compile) for b in branches]
    index = [[list(views).index(v) for v in b.views] for b in branches]
    rows: list[list[np.ndarray]] = [[] for _ in branches]
    oks: list[np.ndarray] = []
    decodes = 0
    pending: tuple[list[list[torch.Tensor]], np.ndarray, Any] | None = None

    def finish(p: tuple[list[list[torch.Tensor]], np.ndarray, Any]) -> None:
        host, ok, event = p
        if event is not None:
            event.synchronize()
        for j, per_scale in enumerate(host):
            rows[j].append(_average_scales([t.numpy() for t in per_scale], ok))
        oks.append(ok)

    total = len(batches) if hasattr(batches, "__len__") else None
    with torch.inference_mode():
        for batch in tqdm(_fetched(batches, one_thread_fetch), total=total, desc=desc, disable=not progress,
                          unit="batch", leave=False):
            x = [_to_device(v, device) for v in batch["views"]]
            with ctx:
                out = [[_embed_view(net, x[i], flip) for i in idx] for net, idx in zip(nets, index)]
            host = [[e.to("cpu", non_blocking=True) for e in per_scale] for per_scale in out]
            event = None
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            if pending is not None:
                finish(pending)
            pending = (host, np.asarray(batch["ok"], bool), event)
            decodes += int(np.asarray(batch["decodes"]).sum())
        if pending is not None:
            finish(pending)
    if not oks:
        return ViewEmbeddings([np.zeros((0, 0), np.float32) for _ in branches], np.zeros(0, bool), decodes)
    emb = [np.ascontiguousarray(np.concatenate(r), dtype=np.float32) for r in rows]
    return ViewEmbeddings(emb, np.concatenate(oks), decodes)


def embed_views(branches: Sequence[Branch], root: str | os.PathLike, split: str, ids: Sequence[str], *,
                batch_size: int = 64, num_workers: int | str = "auto", device: torch.device | str | None = None,
                flip: bool = False, precision: str | None = None, compile: bool | None = None,
                skip_unreadable: bool = False, progress: bool = True) -> ViewEmbeddings:
    """Embed images ``ids`` of ``split`` under ``root`` with every branch, decoding each image once.

    Each distinct view of the branches (size and preprocessing) is computed once per image from
    that decode, in the loader workers; every branch and TTA scale takes its batch from it. The
    rows equal embedding each branch and scale with its own loader (the same batches and the same
    arithmetic): per view L2-normalised, the flips averaged per scale, the scales averaged, each
    average re-normalised.

    Args:
        branches: the networks and their views per scale (:func:`tta_views`).
        num_workers: loader workers, or ``"auto"`` (:func:`~glr.data.images.default_num_workers`);
            each runs one intra-op thread, and without workers the decode and transforms in this
            process run with one thread too (the forwards keep the process's threads).
        skip_unreadable: an unreadable image gets zero rows and ``ok`` False (logged once)
            instead of raising :class:`~glr.utils.InputError`.
    """
    if not branches:
        raise ValueError("embed_views needs at least one branch")
    device = torch.device(device) if device is not None else default_device()
    resolve_precision(precision, device)  # a bad name fails before the loader starts
    if not ids:
        return ViewEmbeddings([np.zeros((0, 0), np.float32) for _ in branches], np.zeros(0, bool), 0)
    views = list(dict.fromkeys(v for b in branches for v in b.views))
    loader = view_loader(root, split, ids, views, batch_size, num_workers, skip_unreadable,
                         pin_memory=device.type == "cuda")
    sizes = sorted({v.size for v in views})
    desc = f"embed {split}" + (f" @{','.join(map(str, sizes))}" if len(sizes) > 1 else "")
    out = embed_batches(branches, loader.dataset.views, loader, device, flip, precision, compile, progress, desc,
                        one_thread_fetch=loader.num_workers == 0)
    if not out.ok.all():
        bad = [ids[i] for i in np.flatnonzero(~out.ok)]
        log.warning("%d of %d %s images could not be read and were skipped (%s%s)", len(bad), len(ids), split,
                    ", ".join(bad[:5]), ", …" if len(bad) > 5 else "")
    return out


def embed_images(net: nn.Module, root: str | os.PathLike, split: str, ids: Sequence[str], image_size: int,
                 batch_size: int = 64, num_workers: int | str = "auto", device: torch.device | str | None = None,
                 progress: bool = True, flip: bool = False, scales: Sequence[float] = (1.0,),
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 skip_unreadable: bool = False, interpolation: str = "bilinear",
                 crop_pct: float = 1.0, precision: str | None = None,
                 compile: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embed images ``ids`` of ``split`` under ``root`` at ``image_size``, with test-time augmentation.

    ``flip`` adds the mirrored image; ``scales`` (e.g. 0.707, 1, 1.414) embeds at
    ``round(image_size · s)`` each. Every view's descriptor is L2-normalised; the flips are
    averaged per scale, the scales averaged, each average re-normalised. Each image is decoded
    once for all of them (:func:`embed_views`).

    Args:
        mean, std, interpolation, crop_pct: preprocessing (:func:`glr.data.images.make_transforms`;
            default ImageNet's mean / std and a bilinear square resize, what artifacts without
            these keys were trained with; :func:`glr.data.images.preprocessing` reads them from a
            data config).
        num_workers: loader workers, or ``"auto"``.
        skip_unreadable: an unreadable image gets a zero row and ``ok=False`` instead of
            raising :class:`~glr.utils.InputError`.
        precision, compile: see :func:`embed_batches`.

    Returns:
        ``(emb, ok)``: (N, D) float32 rows in ``ids`` order, and (N,) bool.
    """
    views = tta_views(image_size, scales, mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct)
    out = embed_views([Branch(net, views)], root, split, ids, batch_size=batch_size, num_workers=num_workers,
                      device=device, flip=flip, precision=precision, compile=compile,
                      skip_unreadable=skip_unreadable, progress=progress)
    return out.emb[0], out.ok


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
