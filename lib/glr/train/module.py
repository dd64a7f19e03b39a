"""The Lightning side of training: :class:`LandmarkModule` (head, loss, optimiser around an
injected :class:`~glr.model.net.EmbeddingNet`) and :class:`GLDv2DataModule` (training sets,
samplers, loaders).

Kept apart from :mod:`glr.model` and :mod:`glr.data` so that inference (the Kaggle kernel
built from those modules) never imports Lightning.
"""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from glr.model.heads import build_head, class_weights

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")


class LandmarkModule(pl.LightningModule):
    """Metric-learning LightningModule: owns the margin head, the loss and the optimiser.

    Args:
        net: the injected embedding network (any module mapping images to (B, D)
            embeddings with a ``forward_unnormalised`` method and an ``embedding_size``,
            e.g. :class:`EmbeddingNet`).
        num_classes: number of training classes C.
        head: a registered head kind (:data:`glr.model.heads.HEADS`: ``arcface``,
            ``subcenter_arcface``, ``cosface``, …; built by :func:`glr.model.heads.build_head`).
        arcface_s, arcface_m: scale and (fixed) margin of the head.
        subcenter_k: sub-centers per class of ``subcenter_arcface``.
        dynamic_margin: per-class margins ``margin_a · f(count) + margin_b`` (1st place
            GLR2021; needs ``class_counts``).
        class_counts: (C,) training images per class (dynamic margins, class weights).
        class_weight_power: loss weight of a class ∝ count^-power (0 = unweighted).
        label_smoothing: label smoothing of the cross-entropy.
        optimizer: ``adamw`` or ``sgd`` (momentum, Nesterov).
        lr: peak learning rate of the head and neck; the backbone gets ``lr * backbone_lr_mult``.
        backbone_lr_mult: backbone learning-rate multiplier.
        weight_decay: weight decay.
        momentum: SGD momentum.
        warmup_frac: fraction of the optimiser steps spent in linear warm-up before the
            cosine decay (stepped per iteration).
        warmup_epochs: warm-up length in epochs; overrides ``warmup_frac`` when set.
    """

    def __init__(self, net: nn.Module, num_classes: int, head: str = "arcface", arcface_s: float = 30.0,
                 arcface_m: float = 0.3, subcenter_k: int = 3, dynamic_margin: bool = False,
                 margin_a: float = 0.45, margin_b: float = 0.05, class_counts: list[int] | None = None,
                 class_weight_power: float = 0.0, label_smoothing: float = 0.0, optimizer: str = "adamw",
                 lr: float = 1e-3, backbone_lr_mult: float = 0.3, weight_decay: float = 1e-4,
                 momentum: float = 0.9, warmup_frac: float = 0.1, warmup_epochs: float | None = None):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.save_hyperparameters(ignore=["net", "class_counts"])
        self.net = net
        self.head = build_head(head, net.embedding_size, num_classes, s=arcface_s, m=arcface_m, k=subcenter_k,
                               dynamic_margin=dynamic_margin, margin_a=margin_a, margin_b=margin_b,
                               counts=class_counts)
        weights = None
        if class_weight_power:
            if class_counts is None:
                raise ValueError("class_weight_power needs class_counts")
            weights = class_weights(class_counts, class_weight_power)
        self.register_buffer("class_weight", weights, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, D) L2-normalised embeddings."""
        return self.net(images)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of (B, C) logits with optional class weights and label smoothing."""
        return F.cross_entropy(logits, labels, weight=self.class_weight,
                               label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        emb = self.net.forward_unnormalised(batch["image"])
        logits = self.head(emb, batch["label"])
        loss = self.loss(logits, batch["label"])
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True, on_step=True, on_epoch=True,
                      batch_size=len(batch["label"]), sync_dist=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Held-out images (``val_fraction`` > 0): loss and accuracy without the margin."""
        logits = self.head(self.net.forward_unnormalised(batch["image"]))
        self.log_dict({"val/loss": F.cross_entropy(logits, batch["label"]),
                       "val/acc": (logits.argmax(1) == batch["label"]).float().mean()},
                      prog_bar=True, on_epoch=True, batch_size=len(batch["label"]), sync_dist=True)

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of the peak LR at optimiser step ``step`` of ``total``: linear warm-up,
        then cosine decay to 0."""
        hp = self.hparams
        trainer = self._trainer
        if hp.warmup_epochs is not None and trainer is not None and trainer.max_epochs:
            warm = int(round(total * hp.warmup_epochs / trainer.max_epochs))
        else:
            warm = int(total * hp.warmup_frac)
        warm = max(1, warm)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    def configure_optimizers(self):
        hp = self.hparams
        backbone = list(self.net.backbone.parameters()) if hasattr(self.net, "backbone") else []
        ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if id(p) not in ids and p.requires_grad]
        groups = [{"params": rest, "lr": hp.lr}]
        if backbone:
            groups.append({"params": [p for p in backbone if p.requires_grad], "lr": hp.lr * hp.backbone_lr_mult})
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0,
                                  weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.lr_factor(step, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
