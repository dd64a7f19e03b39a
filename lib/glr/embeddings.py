"""Embedding extraction: images → (N, D) float32 L2-normalised arrays, with progress.

Also the two reference descriptors the demo compares against: colour thumbnails and
GeM-pooled backbone features with no training.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
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
                       amp: bool | None = None, progress: bool = True, desc: str = "embed") -> np.ndarray:
    """Run ``net`` over every batch of ``loader`` in order.

    Args:
        net: maps (B, 3, H, W) images to (B, D) embeddings.
        loader: yields dicts with ``"image"`` (B, 3, H, W); must not shuffle.
        device: defaults to CUDA when present.
        amp: fp16 autocast; defaults to True on CUDA, False on CPU.
        progress: show a tqdm bar.
        desc: the bar's label.

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
            emb = net(images)
        out.append(F.normalize(emb.float(), dim=1).cpu().numpy())
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
