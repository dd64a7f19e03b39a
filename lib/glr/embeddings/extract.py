"""Embedding extraction: images → (N, D) float32 L2-normalised arrays, with progress.

Also the two reference descriptors the demo compares against: colour thumbnails and
GeM-pooled backbone features with no training. No Lightning here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from glr.arrays import l2_normalize
from glr.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, SafeImages, make_transforms
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


@torch.no_grad()
def extract_embeddings(net: nn.Module, loader: DataLoader, device: torch.device | str | None = None,
                       amp: bool | None = None, progress: bool = True, desc: str = "embed",
                       flip: bool = False, with_ok: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
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
        with_ok: also return the batches' ``"ok"`` flags (:class:`SafeImages`; all True when
            the loader has none); rows of failed images are then zeros.

    Returns:
        (N, D) float32 C-contiguous array, rows L2-normalised, in loader order; with
        ``with_ok`` the pair ``(embeddings, ok)``, ``ok`` an (N,) bool array.
    """
    device = torch.device(device) if device is not None else default_device()
    amp = (device.type == "cuda") if amp is None else amp
    net = net.to(device).eval()
    out: list[np.ndarray] = []
    oks: list[np.ndarray] = []
    ctx = torch.autocast(device.type, dtype=torch.float16) if amp else contextlib.nullcontext()
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch", leave=False):
        images = batch["image"].to(device, non_blocking=True)
        with ctx:
            emb = F.normalize(net(images).float(), dim=1)
            if flip:
                emb = F.normalize(emb + F.normalize(net(torch.flip(images, dims=[3])).float(), dim=1), dim=1)
        emb = emb.cpu().numpy()
        ok = np.asarray(batch["ok"], bool) if "ok" in batch else np.ones(len(emb), bool)
        emb[~ok] = 0.0
        out.append(emb)
        oks.append(ok)
    if not out:
        empty = np.zeros((0, 0), np.float32)
        return (empty, np.zeros(0, bool)) if with_ok else empty
    emb = np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
    return (emb, np.concatenate(oks)) if with_ok else emb


def embed_images(net: nn.Module, root: str | os.PathLike, split: str, ids: Sequence[str], image_size: int,
                 batch_size: int = 64, num_workers: int = 2, device: torch.device | str | None = None,
                 progress: bool = True, flip: bool = False, scales: Sequence[float] = (1.0,),
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 skip_unreadable: bool = False, interpolation: str = "bilinear",
                 crop_pct: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Embed images ``ids`` of ``split`` under ``root`` at ``image_size``, with test-time augmentation.

    ``flip`` adds the mirrored image; ``scales`` (e.g. 0.707, 1, 1.414) embeds at
    ``round(image_size · s)`` each. Every view's descriptor is L2-normalised; the flips are
    averaged per scale, the scales averaged, each average re-normalised.

    Args:
        mean, std, interpolation, crop_pct: preprocessing (:func:`glr.data.images.make_transforms`;
            default ImageNet's mean / std and a bilinear square resize, what artifacts without
            these keys were trained with; :func:`glr.data.images.preprocessing` reads them from a
            data config).
        skip_unreadable: an unreadable image gets a zero row and ``ok=False`` instead of
            raising :class:`~glr.utils.InputError`.

    Returns:
        ``(emb, ok)``: (N, D) float32 rows in ``ids`` order, and (N,) bool.
    """

    scales = [float(s) for s in scales] or [1.0]
    if any(s <= 0 for s in scales):
        raise ValueError(f"TTA scales must be > 0, got {scales}")
    views, ok = [], np.ones(len(ids), bool)
    if not ids:
        return np.zeros((0, 0), np.float32), ok
    device_ = torch.device(device) if device is not None else default_device()
    for s in scales:
        size = max(8, int(round(image_size * s)))
        transform = make_transforms(size, train=False, mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD,
                                    interpolation=interpolation, crop_pct=crop_pct)
        ds: Dataset = ImageDataset(root, split, list(ids), transform=transform)
        if skip_unreadable:
            ds = SafeImages(ds, size)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=device_.type == "cuda")
        desc = f"embed {split}" + (f" @{size}" if len(scales) > 1 else "")
        emb, view_ok = extract_embeddings(net, loader, device=device_, progress=progress, desc=desc, flip=flip,
                                          with_ok=True)
        views.append(emb)
        ok &= view_ok
    emb = views[0] if len(views) == 1 else l2_normalize(np.mean(views, axis=0))
    emb[~ok] = 0.0
    if not ok.all():
        bad = [ids[i] for i in np.flatnonzero(~ok)]
        log.warning("%d of %d %s images could not be read and were skipped (%s%s)", len(bad), len(ids), split,
                    ", ".join(bad[:5]), ", …" if len(bad) > 5 else "")
    return emb, ok


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
