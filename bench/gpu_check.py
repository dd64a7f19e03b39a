"""The GPU check, one device call: faiss GPU, a bf16 training step, extraction from JPEG files, kNN at GLDv2 size,
k-reciprocal, a local kernel run. Every figure is one printed line and a key of ``$OUT/gpu_check.json``.

    bash bench/gpu_check.sh [--dry-run] [--only STEP ...] [--budget SECONDS] [--set KEY=VALUE ...]

``gpu_check.sh`` unpacks the carried faiss candidates (``make gpu-wheels``; ``bench/gpu_wheels.py`` says
which wheel and why), points ``LD_LIBRARY_PATH`` at the machine's CUDA 13 libraries and runs this file.
The device call (one H200; ``.whl`` is the carried folder, about 60 MB, the tree about 2 MB):

    run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)

(``--budget 450`` s for the steps, about 20 s to unpack and start: under 8 minutes; the reply's tail is the
summary table, ``$OUT`` brings back ``gpu_check.json`` and ``gpu_check.log``). A step that failed can be
rerun at once, while the machine is warm, with ``--only STEP`` (the searching steps probe faiss again).

Steps (each in its own interpreter, under its own time cap and the overall ``--budget``; one that fails
or runs out of time is reported and the next one runs):

* ``faiss``: each candidate (a faiss already installed, then each folder ``gpu_check.sh`` unpacked)
  is imported in a fresh interpreter: its version, ``faiss.get_num_gpus()``, and a small GPU search
  against numpy. The first that searches on the GPU is used by the later steps; with none, kNN runs
  on torch CUDA and the line says why.
* ``train``: a Lightning step with ``precision="bf16-mixed"`` (efficientnet_b0 at 384, batch 64):
  images/s after warm-up.
* ``extract``: ~3,000 JPEG files (640x480, quality 90) written on the local disk, then
  :func:`glr.predict.embed_ensemble` (decode once, ``num_workers="auto"``, fp16 autocast,
  channels_last, pinned memory) for 1 member and for 2 members with flip + 3 scales, images/s, against
  model-only (:func:`glr.embeddings.extract.embed_batches` over the same views' tensors already in
  pinned memory: the same forwards) and the ratio; decodes per image.
* ``knn``: 10,000 x 760,000 x 512, k 100: torch CUDA and faiss GPU (when loaded) through
  :func:`glr.search.knn`, seconds each, recall@100 of one against the other and of each against
  numpy on 200 of the queries.
* ``kreciprocal``: :func:`glr.postprocess.kreciprocal.k_reciprocal_rerank` at 1,129 + 76,176, D 512
  (its searches through glr.search, so on the GPU): seconds per phase, total, peak RSS.
* ``kernel``: a kernel built from two untrained networks on a synthetic root, run with
  :func:`glr.kaggle.kernel.local.run_local` (fresh interpreter, the GPU visible, parity with the
  library): wall time, device and search backend it used, whether submission.csv is valid.

``--dry-run`` runs every step at tiny sizes on the CPU (CUDA hidden), so the script is known to run
before a device call spends minutes on it; the GPU-only parts print ``skipped: no CUDA``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

STEPS = ("faiss", "train", "extract", "knn", "kreciprocal", "kernel")
#: seconds each step may take at most (the overall budget may leave it less)
CAPS = {"faiss": 120, "train": 90, "extract": 180, "knn": 120, "kreciprocal": 180, "kernel": 180}
FULL = dict(train_backbone="efficientnet_b0", train_size=384, train_batch=64, train_steps=25, train_workers=8,
            jpegs=3000, jpeg_w=640, jpeg_h=480, ext_batch=64,
            members=(("efficientnet_b0", 384), ("resnet50", 320)), scales=(0.75, 1.0, 1.25),
            knn_nq=10000, knn_ndb=760000, knn_d=512, knn_k=100, knn_check=200,
            kr_nq=1129, kr_ng=76176, kr_d=512,
            kernel_landmarks=60, kernel_scale=1.0, kernel_image=160,
            kernel_nets=(("resnet18", 128), ("efficientnet_b0", 160)),
            probe_db=20000)
TINY = dict(train_backbone="test_resnet", train_size=64, train_batch=4, train_steps=3, train_workers=0,
            jpegs=32, jpeg_w=160, jpeg_h=120, ext_batch=16,
            members=(("test_resnet", 64), ("test_efficientnet", 72)), scales=(0.75, 1.0, 1.25),
            knn_nq=300, knn_ndb=5000, knn_d=64, knn_k=100, knn_check=50,
            kr_nq=50, kr_ng=1000, kr_d=64,
            kernel_landmarks=12, kernel_scale=0.12, kernel_image=32,
            kernel_nets=(("test_resnet", 32), ("test_efficientnet", 40)),
            probe_db=2000)
POST = {"expansion": {"form": "joint", "k": 3, "alpha": 1.0},
        "kreciprocal": {"k1": 6, "k2": 2, "lambda": 0.3},
        "landmark_country": {"alpha": 0.5, "beta": 0.1, "k": 3}, "shortlist": 30}


def say(step: str, text: str) -> None:
    print(f"{step}: {text}", flush=True)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# --------------------------------------------------------------------------- faiss candidates (orchestrator)
_PROBE = r"""
import json, sys, time
if sys.argv[1]:
    sys.path.insert(0, sys.argv[1])
import numpy as np
import torch  # the machine's CUDA 13 libraries first
out = {}
t = time.perf_counter()
import faiss
out.update(version=getattr(faiss, "__version__", "?"), file=faiss.__file__, import_s=round(time.perf_counter() - t, 2),
           gpus=int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0)
print("PROBE " + json.dumps(out), flush=True)
if out["gpus"]:
    try:
        from glr.search import knn
        rng = np.random.default_rng(0)
        q = rng.standard_normal((500, 64), dtype=np.float32)
        db = rng.standard_normal((int(sys.argv[2]), 64), dtype=np.float32)
        S, I = knn(q, db, 10, backend="faiss", use_gpu=True)
        S2, I2 = knn(q, db, 10, backend="numpy")
        res = {"gpu_search_agreement": float((I == I2).mean())}
    except Exception as e:  # imports, but cannot search (no kernel for this GPU, a missing symbol ...)
        res = {"gpu_search_error": f"{type(e).__name__}: {e}"[:600]}
    print("SEARCH " + json.dumps(res), flush=True)
"""


def probe_faiss(site: Path | None, cfg: dict, cap: float, cuda_wanted: bool) -> dict[str, Any]:
    """Import each faiss candidate in a fresh interpreter; the first that searches on the GPU wins (on the CPU
    run: the first that imports). Returns ``{"candidates": [...], "use": dir or "" or None, "why": ...}``."""
    dirs = [("installed", "")]
    if site is not None and site.is_dir():
        dirs += [(d.name, str(d)) for d in sorted(site.iterdir()) if d.is_dir()]
    found: list[dict[str, Any]] = []
    use, why = None, []
    t_end = time.perf_counter() + cap
    for name, d in dirs:
        left = t_end - time.perf_counter()
        if left < 5:
            found.append({"candidate": name, "error": "no time left"})
            continue
        try:
            done = subprocess.run([sys.executable, "-c", _PROBE, d, str(cfg["probe_db"])], capture_output=True,
                                  text=True, timeout=min(90.0, left))
        except subprocess.TimeoutExpired:
            found.append({"candidate": name, "error": "timed out"})
            say("faiss", f"{name}: timed out")
            continue
        line = [x for x in done.stdout.splitlines() if x.startswith("PROBE ")]
        if not line:
            lines = done.stderr.strip().splitlines()
            errors = [x.strip() for x in lines if "Error" in x and not x.startswith(" ")] or lines[-1:]
            err = " | ".join(errors[-2:])[:600] or f"exit {done.returncode}"  # a load error and what it caused
            found.append({"candidate": name, "error": err})
            say("faiss", f"{name}: does not import ({err})")
            why.append(f"{name}: {err}")
            continue
        info = {"candidate": name, **json.loads(line[-1][6:])}
        search = [x for x in done.stdout.splitlines() if x.startswith("SEARCH ")]
        if search:
            info.update(json.loads(search[-1][7:]))
        elif info["gpus"]:
            info["gpu_search_error"] = f"died in the GPU search (exit {done.returncode}): {done.stderr[-300:]}"
        found.append(info)
        agree, failed = info.get("gpu_search_agreement"), info.get("gpu_search_error")
        say("faiss", f"{name}: faiss {info['version']} imported in {info['import_s']} s from {info['file']}, "
                     f"get_num_gpus() = {info['gpus']}"
            + (f", GPU search agrees with numpy on {agree:.4f} of top-10" if agree is not None else "")
            + (f", GPU search FAILED: {failed}" if failed else ""))
        good = info["gpus"] > 0 and (agree or 0) >= 0.99 if cuda_wanted else True
        if good and use is None:
            use = d
        elif not good:
            why.append(f"{name}: " + ("no GPU" if not info["gpus"] else failed or f"GPU search agreement {agree}"))
    if use is None:
        reason = "; ".join(why) or "no candidate (make gpu-wheels, carry .whl)"
        say("faiss", f"none searches on the GPU ({reason}): kNN falls back to torch CUDA")
    else:
        say("faiss", f"using {[n for n, d in dirs if d == use][0]}" + (f" ({use})" if use else ""))
    name = None if use is None else [n for n, d in dirs if d == use][0]
    return {"candidates": found, "use": use, "name": name, "why": None if use is not None else "; ".join(why)}


# --------------------------------------------------------------------------- steps (each in a child process)
def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_train(cfg: dict, work: Path) -> dict[str, Any]:
    """A Lightning fit over random tensors with bf16-mixed: images/s after the first steps."""
    import lightning.pytorch as pl
    import torch

    from glr.model.net import build_net
    from glr.train.module import LandmarkModule

    class Random(torch.utils.data.Dataset):
        """Items from a pool of random images drawn once: the loader costs a copy, not a draw."""

        def __init__(self, n: int, size: int, classes: int):
            self.n, self.classes = n, classes
            self.pool = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> dict:
            return {"image": self.pool[i % len(self.pool)], "label": torch.tensor(i % self.classes), "index": i}

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            _sync()
            self.t.append(time.perf_counter())

    cuda = torch.cuda.is_available()
    bs, steps, size = cfg["train_batch"], cfg["train_steps"], cfg["train_size"]
    net = build_net(dict(backbone=cfg["train_backbone"], embedding_size=512))
    module = LandmarkModule(net, num_classes=1000)
    dl = torch.utils.data.DataLoader(Random(bs * steps, size, 1000), batch_size=bs, drop_last=True,
                                     num_workers=cfg["train_workers"], pin_memory=cuda)
    clock = Clock()
    trainer = pl.Trainer(max_epochs=1, accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[clock])
    t = time.perf_counter()
    trainer.fit(module, dl)
    _sync()
    total = time.perf_counter() - t
    warm = min(5, len(clock.t) - 2)
    steady = (len(clock.t) - 1 - warm) * bs / (clock.t[-1] - clock.t[warm]) if len(clock.t) > warm + 1 else None
    loss = float(trainer.callback_metrics.get("train/loss_epoch", float("nan")))
    say("train", f"{cfg['train_backbone']} @ {size}px, batch {bs}, {steps} steps, bf16-mixed on "
                 f"{'cuda' if cuda else 'cpu'}: {total:.1f} s in all, "
                 + (f"{steady:.0f} img/s after {warm} steps" if steady else "too few steps for a rate")
                 + f", loss {loss:.3f}")
    return {"backbone": cfg["train_backbone"], "image_size": size, "batch": bs, "steps": steps, "seconds": total,
            "img_per_s_steady": steady, "loss": loss, "device": "cuda" if cuda else "cpu"}


def _write_jpeg(args: tuple[str, int, int, int]) -> int:
    """One photo-like JPEG (smooth colour field + texture, quality 90); returns its size in bytes."""
    import numpy as np
    from PIL import Image

    path, seed, w, h = args
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8))
    img = np.asarray(low.resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.normal(0, 10, (h, w, 1)).astype(np.int16), 0, 255).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90)
    return Path(path).stat().st_size


def write_jpegs(root: Path, n: int, w: int, h: int) -> tuple[list[str], float]:
    """``n`` JPEG files of ``test`` in the GLDv2 layout under ``root``; returns (ids, mean KB)."""
    from multiprocessing import Pool

    from glr.data.images import image_path

    ids = [f"{i:016x}"[::-1] for i in range(n)]  # varied leading characters: GLDv2's 3-level folders
    jobs = [(str(image_path(root, "test", x)), i, w, h) for i, x in enumerate(ids)]
    with Pool(max(1, (os.cpu_count() or 2) - 1)) as pool:
        sizes = pool.map(_write_jpeg, jobs, chunksize=32)
    return ids, sum(sizes) / len(sizes) / 1024


def _model_only(members: list, tta: Any, batch: int, n: int, device: Any) -> float:
    """Seconds of the same forwards as the pipeline over tensors already in pinned memory."""
    import numpy as np
    import torch

    from glr.embeddings.extract import embed_batches

    branches = [m.branch(tta) for m in members]
    views = list(dict.fromkeys(v for b in branches for v in b.views))
    x = [torch.randn(batch, 3, v.size, v.size) for v in views]
    if device.type == "cuda":
        x = [t.pin_memory() for t in x]
    one = {"views": x, "ok": np.ones(batch, bool), "decodes": np.zeros(batch, int)}
    embed_batches(branches, views, [one] * 2, device, tta.flip)  # warm-up (cudnn, allocator)
    _sync()
    t = time.perf_counter()
    embed_batches(branches, views, [one] * max(1, n // batch), device, tta.flip)
    _sync()
    return (time.perf_counter() - t) * n / (max(1, n // batch) * batch)


def step_extract(cfg: dict, work: Path) -> dict[str, Any]:
    """embed_ensemble from JPEG files against model-only, for 1 member and 2 members with flip + 3 scales."""
    import torch

    from glr.data.images import IMAGENET_MEAN, IMAGENET_STD, resolve_num_workers
    from glr.model.net import build_net
    from glr.predict import TTA, Member, embed_ensemble

    device = _device()
    root = work / "jpeg"
    t = time.perf_counter()
    ids, kb = write_jpegs(root, cfg["jpegs"], cfg["jpeg_w"], cfg["jpeg_h"])
    say("extract", f"wrote {len(ids)} JPEG files {cfg['jpeg_w']}x{cfg['jpeg_h']} ({kb:.0f} KB each) in "
                   f"{time.perf_counter() - t:.1f} s; num_workers auto = {resolve_num_workers('auto')}")
    torch.manual_seed(0)
    members = [Member(build_net(dict(backbone=b, embedding_size=512)), {"image_size": s, "mean": list(IMAGENET_MEAN),
                      "std": list(IMAGENET_STD)}, name=b) for b, s in cfg["members"]]
    out: dict[str, Any] = {"jpegs": len(ids), "jpeg_kb": kb, "num_workers": resolve_num_workers("auto"),
                           "device": device.type}
    bs = cfg["ext_batch"]
    for key, mem, tta in (("1_member", members[:1], TTA()),
                          ("2_members_flip_3_scales", members, TTA(flip=True, scales=tuple(cfg["scales"])))):
        label = " + ".join(f"{m.name}@{m.size}" for m in mem) + (f", flip, scales {tta.scales}" if tta.flip else "")
        embed_ensemble(mem, root, {"test": ids[:2 * bs]}, tta=tta, batch_size=bs, device=device, progress=False)
        stats: dict[str, dict[str, int]] = {}
        _sync()
        t = time.perf_counter()
        emb, ok = embed_ensemble(mem, root, {"test": ids}, tta=tta, batch_size=bs, device=device, progress=False,
                                 stats=stats)
        _sync()
        pipe = time.perf_counter() - t
        model = _model_only(mem, tta, bs, len(ids), device)
        forwards = len(mem) * len(tta.scales) * (2 if tta.flip else 1)
        r = {"members": label, "forwards_per_image": forwards, "pipeline_img_s": len(ids) / pipe,
             "model_only_img_s": len(ids) / model, "ratio": model / pipe,
             "decodes_per_image": stats["test"]["decodes"] / len(ids), "readable": int(ok["test"].sum()),
             "dim": int(emb["test"].shape[1])}
        out[key] = r
        say("extract", f"{label} ({forwards} forwards/image, batch {bs}, {device.type}): pipeline "
                       f"{r['pipeline_img_s']:.0f} img/s, model-only {r['model_only_img_s']:.0f} img/s, "
                       f"ratio {r['ratio']:.2f}; {r['decodes_per_image']:.2f} decodes/image, "
                       f"{r['readable']}/{len(ids)} readable")
    return out


def _unit(rng: Any, n: int, d: int) -> Any:
    import numpy as np

    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def step_knn(cfg: dict, work: Path) -> dict[str, Any]:
    """Torch CUDA and faiss GPU exact kNN at GLDv2 size, and their agreement (with numpy on a subset)."""
    import numpy as np
    import torch

    from glr.search import _faiss_num_gpus, faiss_available, knn, recall_at_k

    cuda = torch.cuda.is_available()
    nq, ndb, d, k, nc = cfg["knn_nq"], cfg["knn_ndb"], cfg["knn_d"], cfg["knn_k"], cfg["knn_check"]
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    q, db = _unit(rng, nq, d), _unit(rng, ndb, d)
    say("knn", f"{nq} x {ndb} x {d} random unit rows in {time.perf_counter() - t:.1f} s")
    ref = knn(q[:nc], db, k, backend="numpy")[1]
    out: dict[str, Any] = {"nq": nq, "ndb": ndb, "d": d, "k": k}
    runs: dict[str, Any] = {}
    faiss_gpu = faiss_available() and _faiss_num_gpus() > 0
    plan = [("torch", cuda)]
    if faiss_gpu or (not cuda and faiss_available()):
        plan.append(("faiss", cuda))
    else:
        why = os.environ.get("GLR_GPU_CHECK_FAISS_WHY") or ("faiss does not import" if not faiss_available()
                                                            else "faiss has no GPU")
        say("knn", f"faiss GPU: skipped: {why}" if cuda else "faiss: skipped: does not import")
        out["faiss_skipped"] = why
    for backend, gpu in plan:
        knn(q[:8], db[:1000], 5, backend=backend, use_gpu=gpu)  # warm-up: context, handles
        t = time.perf_counter()
        S, I = knn(q, db, k, backend=backend, use_gpu=gpu)
        dt = time.perf_counter() - t
        runs[backend] = I
        name = f"{backend} {'GPU' if gpu else 'CPU'}"
        out[f"{backend}_seconds"] = dt
        out[f"{backend}_recall_vs_numpy"] = recall_at_k(I[:nc], ref)
        say("knn", f"{name}: {nq} x {ndb} x {d}, k={k} in {dt:.2f} s; recall@{k} against numpy on {nc} queries "
                   f"{out[f'{backend}_recall_vs_numpy']:.4f}")
    if "faiss" in runs:
        out["recall_faiss_vs_torch"] = recall_at_k(runs["faiss"], runs["torch"])
        say("knn", f"recall@{k} of faiss against torch over all {nq} queries: {out['recall_faiss_vs_torch']:.4f}; "
                   f"torch / faiss time {out['torch_seconds'] / out['faiss_seconds']:.2f}")
    if not cuda:
        say("knn", "GPU: skipped: no CUDA (the CPU figures above are the dry run's)")
    return out


def step_kreciprocal(cfg: dict, work: Path) -> dict[str, Any]:
    """k_reciprocal_rerank at GLDv2 size with glr.search's default backend: seconds per phase and total."""
    import logging

    import numpy as np
    import torch

    from glr.postprocess.kreciprocal import k_reciprocal_rerank
    from glr.search import resolve_backend

    class Phases(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.seconds: dict[str, float] = {}

        def emit(self, record: logging.LogRecord) -> None:
            phase = getattr(record, "kr_phase", None)
            if phase is not None:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + record.kr_seconds

    phases = Phases()
    logger = logging.getLogger("glr.postprocess.kreciprocal")
    logger.setLevel(logging.INFO)
    logger.addHandler(phases)
    nq, ng, d = cfg["kr_nq"], cfg["kr_ng"], cfg["kr_d"]
    rng = np.random.default_rng(0)
    q, db = _unit(rng, nq, d), _unit(rng, ng, d)
    backend = resolve_backend("auto")
    t = time.perf_counter()
    S, I = k_reciprocal_rerank(q, db, k1=20, k2=6, lambda_value=0.3, topk=100)
    total = time.perf_counter() - t
    where = "GPU" if torch.cuda.is_available() and backend in ("torch", "faiss") else "CPU"
    say("kreciprocal", f"{nq} + {ng}, D {d}, k1 20, k2 6, search {backend} on the {where}: {total:.1f} s; "
                       + ", ".join(f"{p} {s:.1f} s" for p, s in phases.seconds.items())
                       + f"; peak RSS {_peak_rss_gb():.2f} GB; result {I.shape}")
    return {"nq": nq, "ng": ng, "d": d, "backend": backend, "on": where, "seconds": total,
            "phases": phases.seconds, "peak_rss_gb": _peak_rss_gb()}


def step_kernel(cfg: dict, work: Path) -> dict[str, Any]:
    """Build a kernel from two untrained networks on a synthetic root; run it locally with parity."""
    import torch

    from glr.data.images import IMAGENET_MEAN, IMAGENET_STD
    from glr.data.root import GLDv2Root
    from glr.data.synth import make_synthetic_gldv2
    from glr.kaggle.kernel.build import build_kernel
    from glr.kaggle.kernel.local import _site_dirs, run_local
    from glr.model.artifact import save_artifact
    from glr.model.net import build_net
    from glr.submission import validate_submission_file

    t0 = time.perf_counter()
    root = work / "kernel_root"
    make_synthetic_gldv2(root, n_landmarks=cfg["kernel_landmarks"], scale=cfg["kernel_scale"],
                         image_size=cfg["kernel_image"], progress=False, overwrite=True)
    arts = []
    for i, (backbone, size) in enumerate(cfg["kernel_nets"]):
        torch.manual_seed(i)
        net = build_net(dict(backbone=backbone, embedding_size=128)).eval()
        arts.append(save_artifact(work / f"m{i}.pt", net, {"image_size": size, "mean": list(IMAGENET_MEAN),
                                                          "std": list(IMAGENET_STD)},
                                  meta={"experiment": f"gpu{i}", "stage": "s1"}))
    ens = work / "ensemble.yaml"
    ens.write_text(f"members:\n  - artifact: {arts[0]}\n  - artifact: {arts[1]}\n    weight: 0.5\n")
    kernel = build_kernel(ens, work / "kernels" / "gpu", "me/glr-gpu-check-kernel", "me/glr-gpu-check-weights",
                          post=POST, hidden_test_size=100000, batch_size=64, progress=False, overwrite=True)
    extra = os.environ.get("GLR_GPU_CHECK_FAISS_DIR")
    site_dirs = _site_dirs() + [extra] if extra else None  # the kernel's interpreter drops PYTHONPATH
    prep = time.perf_counter() - t0
    keep = work / "kernel_keep"
    t = time.perf_counter()
    result = run_local(root, kernel, layouts=["classic"], parity=True, keep=keep, stream=False, progress=False,
                       site_dirs=site_dirs)
    wall = time.perf_counter() - t
    run = result["runs"]["classic"]
    gl = GLDv2Root.open(root)
    test_ids = gl.test_ids()
    try:
        validate_submission_file(keep / "classic" / "submission.csv", "retrieval", expected_ids=test_ids,
                                 index_ids=set(gl.index_ids()))
        valid = True
    except Exception as e:  # noqa: BLE001 - reported, not raised
        valid = f"{type(e).__name__}: {e}"
    env = (run.get("report") or {}).get("environment", {})
    parity = result.get("parity", {})
    say("kernel", f"{len(test_ids)} test x {len(gl.index_ids())} index images ({prep:.0f} s to synthesise and build): "
                  f"kernel {run['seconds']:.1f} s, status {run['status']}, device {env.get('device')}, "
                  f"search {env.get('search')}; submission.csv valid: {valid}; parity with the library: "
                  f"{parity.get('identical', result.get('parity_skipped'))}; run_local {wall:.1f} s in all")
    return {"kernel_seconds": run["seconds"], "status": run["status"], "returncode": run["returncode"],
            "device": env.get("device"), "search": env.get("search"), "valid": valid,
            "parity_identical": parity.get("identical"), "run_local_seconds": wall, "rows": run.get("rows"),
            "log_tail": None if run["status"] == "ok" else run.get("log_tail", "")[-2000:]}


CHILD: dict[str, Callable[[dict, Path], dict[str, Any]]] = {
    "train": step_train, "extract": step_extract, "knn": step_knn, "kreciprocal": step_kreciprocal,
    "kernel": step_kernel}


def child(step: str, cfg: dict, work: Path, result: Path) -> int:
    """Run one step here; write ``{"ok": ..., figures or error}`` to ``result``."""
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        out = {"ok": True, **CHILD[step](cfg, work)}
    except Exception as e:  # noqa: BLE001 - one failed step must not lose the others
        traceback.print_exc()
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        say(step, f"FAILED: {out['error']}")
    out["step_seconds"] = time.perf_counter() - t
    result.write_text(json.dumps(out, default=str))
    return 0 if out["ok"] else 1


# --------------------------------------------------------------------------- orchestrator
def _device_line() -> dict[str, Any]:
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name(0) if c else 'cpu', "
            "'memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c else 0}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    info = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-300:]}
    info.update(python=sys.version.split()[0], cpus=os.cpu_count())
    return info


def _summary(results: dict[str, Any]) -> list[str]:
    """The last lines printed: one per step, its headline figures."""
    s = results["steps"]
    lines = [f"== gpu_check ({results['mode']}, {results['device'].get('device')}, "
             f"{results['seconds']:.0f} s of a {results['budget']} s budget)"]
    for step in results["order"]:
        r = s.get(step, {})
        if not r.get("ok"):
            lines.append(f"{step:12s} {r.get('error', 'not run')}")
            continue
        if step == "faiss":
            lines.append(f"{step:12s} " + (f"using {r['name']}" if r["name"] else f"none: {r['why']}"))
        elif step == "train":
            lines.append(f"{step:12s} {r['img_per_s_steady'] or 0:.0f} img/s bf16 ({r['backbone']}@{r['image_size']})")
        elif step == "extract":
            for k in ("1_member", "2_members_flip_3_scales"):
                x = r[k]
                lines.append(f"{step:12s} {k}: pipeline {x['pipeline_img_s']:.0f} img/s, model-only "
                             f"{x['model_only_img_s']:.0f}, ratio {x['ratio']:.2f}, "
                             f"{x['decodes_per_image']:.0f} decode/img")
        elif step == "knn":
            f = f", faiss {r['faiss_seconds']:.2f} s, recall@{r['k']} faiss/torch {r['recall_faiss_vs_torch']:.4f}" \
                if "faiss_seconds" in r else f", faiss skipped ({r.get('faiss_skipped')})"
            lines.append(f"{step:12s} {r['nq']}x{r['ndb']}x{r['d']}: torch {r['torch_seconds']:.2f} s{f}")
        elif step == "kreciprocal":
            lines.append(f"{step:12s} {r['nq']}+{r['ng']}: {r['seconds']:.1f} s ({r['backend']} on the {r['on']}), "
                         f"peak RSS {r['peak_rss_gb']:.2f} GB")
        elif step == "kernel":
            lines.append(f"{step:12s} {r['kernel_seconds']:.1f} s on {r['device']} ({r['search']}), valid "
                         f"{r['valid']}, parity {r['parity_identical']}")
    return lines


def _run_child(step: str, a: argparse.Namespace, cap: float, env: dict[str, str]) -> dict[str, Any]:
    result = a.work / f"{step}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", step, "--work", str(a.work), "--result", str(result)]
    cmd += (["--dry-run"] if a.dry_run else []) + [x for kv in a.set for x in ("--set", kv)]
    try:
        subprocess.run(cmd, env=env, timeout=cap)
    except subprocess.TimeoutExpired:
        say(step, f"FAILED: timed out after {cap:.0f} s")
        return {"ok": False, "error": f"timed out after {cap:.0f} s"}
    if not result.is_file():
        return {"ok": False, "error": "the step's interpreter died without a result (see its output above)"}
    return json.loads(result.read_text())


def orchestrate(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cfg = config(a)
    env = dict(os.environ)
    if a.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths, whatever the machine has
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    order = [s for s in STEPS if not a.only or s in a.only]
    if a.site is not None and "faiss" not in order and {"knn", "kreciprocal", "kernel"} & set(order):
        order.insert(0, "faiss")  # the searching steps use what the probe picks
    results: dict[str, Any] = {"mode": "dry-run (CPU, tiny sizes)" if a.dry_run else "device", "budget": a.budget,
                               "config": cfg, "order": order, "steps": {}, "device": _device_line()}
    say("device", json.dumps(results["device"]))
    cuda = bool(results["device"].get("memory_gib"))
    if not cuda and not a.dry_run:
        say("device", "no CUDA device: every GPU figure below is a CPU one (use --dry-run for the quick CPU run)")
    json_path = a.out / "gpu_check.json"
    for step in order:
        left = a.budget - (time.perf_counter() - t0)
        if left < 15:
            results["steps"][step] = {"ok": False, "error": f"skipped: budget spent ({a.budget} s)"}
            say(step, "skipped: budget spent")
            continue
        cap = min(CAPS[step], left)
        t = time.perf_counter()
        if step == "faiss":
            r = {"ok": True, **probe_faiss(a.site, cfg, cap, cuda)}
            if r["use"]:
                env["PYTHONPATH"] = os.pathsep.join([r["use"], env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
                env["GLR_GPU_CHECK_FAISS_DIR"] = r["use"]
            elif r["why"]:
                env["GLR_GPU_CHECK_FAISS_WHY"] = r["why"]
        else:
            r = _run_child(step, a, cap, env)
        r.setdefault("step_seconds", time.perf_counter() - t)
        results["steps"][step] = r
        results["seconds"] = time.perf_counter() - t0
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")  # what is done survives a kill
    results["seconds"] = time.perf_counter() - t0
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print("\n".join(_summary(results)), flush=True)
    print(f"figures: {json_path}", flush=True)
    return 0 if all(results["steps"][s].get("ok") for s in order) else 1


def config(a: argparse.Namespace) -> dict[str, Any]:
    """The sizes of this run: :data:`TINY` (dry run) or :data:`FULL`, with ``--set`` applied."""
    cfg = dict(TINY if a.dry_run else FULL)
    for kv in a.set:
        key, sep, value = kv.partition("=")
        if not sep or key not in cfg:
            raise SystemExit(f"--set {kv!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(cfg))}")
        try:
            cfg[key] = json.loads(value)
        except json.JSONDecodeError:
            cfg[key] = value
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (CUDA hidden)")
    ap.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all steps together")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu_check"),
                    help="where gpu_check.json goes (default $OUT)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/glr_gpu_check"), help="scratch on the local disk")
    ap.add_argument("--site", type=Path, default=None, help="folder of unpacked faiss candidates (one per subfolder)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a size (JSON value), e.g. --set jpegs=2000 --set train_steps=60")
    ap.add_argument("--child", choices=sorted(CHILD), help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, config(a), a.work, a.result)
    return orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())
