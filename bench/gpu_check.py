"""GPU paths for real, on a CUDA machine: a Lightning training step, fp16 extraction, GPU kNN.

    python bench/gpu_check.py [--backbone efficientnet_b0] [--image-size 384]

Prints one line per check with its figure; exits non-zero if CUDA is absent.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from glr.embeddings.extract import extract_embeddings
from glr.model.net import EmbeddingNet
from glr.train.module import LandmarkModule
from glr.search import knn, resolve_backend


class _Random(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int, classes: int):
        self.n, self.size, self.classes = n, size, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randn(3, self.size, self.size, generator=g), "label": torch.tensor(i % self.classes),
                "index": i}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="efficientnet_b0")
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    import lightning.pytorch as pl

    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    classes = 1000
    net = EmbeddingNet(a.backbone, embedding_size=512)
    module = LandmarkModule(net, num_classes=classes)
    ds = _Random(a.batch_size * a.steps, a.image_size, classes)
    dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, num_workers=8, drop_last=True)
    trainer = pl.Trainer(max_epochs=1, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    t = time.perf_counter()
    trainer.fit(module, dl)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(f"train: {a.steps} steps x {a.batch_size} @ {a.image_size}px bf16-mixed in {dt:.1f} s "
          f"({a.steps * a.batch_size / dt:.0f} img/s incl. warm-up), loss {float(trainer.callback_metrics['train/loss_epoch']):.3f}")

    # in-memory pinned batches: measures the network, not the JPEG decoding or the loader
    batch = torch.randn(256, 3, a.image_size, a.image_size).pin_memory()
    batches = [{"image": batch}] * 16
    extract_embeddings(net, batches[:2], device="cuda", amp=True, progress=False)  # warm-up
    for amp in (False, True):
        torch.cuda.synchronize()
        t = time.perf_counter()
        emb = extract_embeddings(net, batches, device="cuda", amp=amp, progress=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        print(f"extract: 4096 images @ {a.image_size}px {'fp16' if amp else 'fp32'} in {dt:.2f} s "
              f"({4096 / dt:.0f} img/s), shape {emb.shape}")

    rng = np.random.default_rng(0)
    q = rng.standard_normal((10000, 512), dtype=np.float32)
    db = rng.standard_normal((760000, 512), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    backend = resolve_backend("auto", use_gpu=True)
    t = time.perf_counter()
    S, I = knn(q, db, 100, backend=backend, use_gpu=True)
    dt = time.perf_counter() - t
    print(f"knn GPU ({backend}): 10000 q x 760000 db x 512 d, k=100 in {dt:.2f} s")
    t = time.perf_counter()
    S2, I2 = knn(q[:500], db, 100, backend="numpy")
    dt_cpu = time.perf_counter() - t
    agree = float((I[:500] == I2).mean())
    print(f"knn CPU numpy on 500 of the queries: {dt_cpu:.2f} s; top-100 index agreement with GPU {agree:.4f}, "
          f"max |dS| {float(np.abs(S[:500] - S2).max()):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
