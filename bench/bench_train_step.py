"""One Lightning training step against a plain PyTorch loop: same model, batch and work.

    python bench/bench_train_step.py [--backbone efficientnet_lite0] [--image-size 128]
        [--batch-size 32] [--steps 20] [--warmup 3] [--device auto] [--precision 32-true]

Both sides train a :class:`glr.train.module.LandmarkModule` built from the same initial weights, on a
DataLoader that yields one pre-built batch over and over (no augmentation, no IO), with the
module's own AdamW groups and per-step LambdaLR schedule (``configure_optimizers``; the plain
loop attaches a stand-in trainer for ``estimated_stepping_batches``). A plain step is: fetch
the batch, move it to the device, ``net.forward_unnormalised`` → ArcFace head → cross-entropy
(+ accuracy, as ``training_step`` computes it), backward, optimiser step, scheduler step,
zero_grad. Lightning adds its loop, hooks and ``training_step``'s ``log_dict``: that overhead is
what is measured.

Lightning is timed by a Callback: ``on_train_batch_start`` → ``on_train_batch_end`` (the step
itself) and ``on_train_batch_end`` → next ``on_train_batch_end`` (throughput: everything the
loop does per batch, fetch and transfer included). The plain loop is timed the same two ways.
Warm-up steps are excluded; CUDA is synchronised at every timestamp on both sides. Each figure
is the median over the timed steps (and over ``--repeats`` alternating runs).

Prints s/step for both, ratio = plain / lightning (1.0: no overhead) and the target ≥ 0.9 on
the throughput figure.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import time
import types
import warnings

import torch
import torch.nn.functional as F

from glr.model.net import build_net
from glr.train.module import LandmarkModule


class _SameBatch(torch.utils.data.IterableDataset):
    """Yields the same CPU batch ``n`` times."""

    def __init__(self, batch: dict[str, torch.Tensor], n: int):
        self.batch, self.n = batch, n

    def __iter__(self):
        for _ in range(self.n):
            yield self.batch


def _loader(batch: dict[str, torch.Tensor], n: int, pin: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_SameBatch(batch, n), batch_size=None, num_workers=0, pin_memory=pin)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(starts: list[float], ends: list[float], warmup: int) -> tuple[float, float]:
    """(step time start→end, period end→end) over the steps after warm-up: medians, so that a
    step slowed by another process on the machine does not move the figure."""
    step = statistics.median(e - s for s, e in zip(starts[warmup:], ends[warmup:]))
    period = statistics.median(b - a for a, b in zip(ends[warmup - 1:-1], ends[warmup:]))
    return step, period


def _autocast(device: torch.device, precision: str):
    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def run_plain(module: LandmarkModule, batch: dict, total: int, warmup: int, device: torch.device,
              precision: str) -> tuple[float, float]:
    module.to(device).train()
    module.trainer = types.SimpleNamespace(estimated_stepping_batches=total)  # what configure_optimizers reads
    cfg = module.configure_optimizers()
    module.trainer = None
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    net, head = module.net, module.head
    starts, ends = [], []
    _sync(device)
    for cpu_batch in _loader(batch, total, pin=device.type == "cuda"):
        images = cpu_batch["image"].to(device, non_blocking=True)
        labels = cpu_batch["label"].to(device, non_blocking=True)
        _sync(device)
        starts.append(time.perf_counter())
        with _autocast(device, precision):
            logits = head(net.forward_unnormalised(images), labels)
            loss = F.cross_entropy(logits, labels)
        (logits.argmax(1) == labels).float().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad()  # set_to_none, as Lightning does
        _sync(device)
        ends.append(time.perf_counter())
    return _summary(starts, ends, warmup)


def run_lightning(module: LandmarkModule, batch: dict, total: int, warmup: int, device: torch.device,
                  precision: str) -> tuple[float, float]:
    import lightning.pytorch as pl

    starts, ends = [], []

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(device)
            starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(device)
            ends.append(time.perf_counter())

    trainer = pl.Trainer(max_steps=total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="gpu" if device.type == "cuda" else "cpu",
                         devices=1, precision=precision, callbacks=[Timer()])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(IterableDataset|num_workers|does not have many workers|"
                                "val_dataloader|treespec|LeafSpec).*")
        trainer.fit(module, _loader(batch, total, pin=device.type == "cuda"))
    if len(ends) != total:
        raise RuntimeError(f"Lightning ran {len(ends)} steps, expected {total}")
    return _summary(starts, ends, warmup)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (≥ 1)")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    ap.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed (CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate plain/lightning runs; report medians")
    a = ap.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available…", tips
        logging.getLogger(name).setLevel(logging.WARNING)
    if a.warmup < 1 or a.steps < 1:
        ap.error("--warmup and --steps must be ≥ 1")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = build_net(dict(backbone=a.backbone, embedding_size=512))
    template = LandmarkModule(net, num_classes=a.num_classes)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(a.batch_size, 3, a.image_size, a.image_size, generator=g),
             "label": torch.randint(0, a.num_classes, (a.batch_size,), generator=g)}
    total = a.warmup + a.steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{a.backbone} @ {a.image_size}px, batch {a.batch_size}, {a.steps} steps after {a.warmup} warm-up, "
          f"{a.precision} on {name}; torch {torch.__version__}")

    plain, light = [], []
    for r in range(a.repeats):
        plain.append(run_plain(copy.deepcopy(template), batch, total, a.warmup, device, a.precision))
        light.append(run_lightning(copy.deepcopy(template), batch, total, a.warmup, device, a.precision))
        if a.repeats > 1:
            print(f"  run {r + 1}: plain {plain[-1][1]:.4f} s/step, lightning {light[-1][1]:.4f} s/step")
    p_step, p_period = (statistics.median(x[i] for x in plain) for i in (0, 1))
    l_step, l_period = (statistics.median(x[i] for x in light) for i in (0, 1))
    ratio_step, ratio_tp = p_step / l_step, p_period / l_period
    print(f"{'':24s}{'plain s/step':>14s}{'lightning s/step':>18s}{'ratio plain/lightning':>23s}")
    print(f"{'step (start→end)':24s}{p_step:14.4f}{l_step:18.4f}{ratio_step:23.3f}")
    print(f"{'throughput (end→end)':24s}{p_period:14.4f}{l_period:18.4f}{ratio_tp:23.3f}")
    print(f"images/s: plain {a.batch_size / p_period:.1f}, lightning {a.batch_size / l_period:.1f}")
    ok = math.isfinite(ratio_tp) and ratio_tp >= 0.9
    print(f"target ≥ 0.9 (throughput): {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
