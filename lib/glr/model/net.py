"""The embedding network (the training side is in :mod:`glr.train`; artifacts in :mod:`glr.model.artifact`).

Architecture (the shape every top GLDv2 solution shares, e.g. Henkel & Singer 2021,
Zhang et al. 2021): timm backbone (``num_classes=0, global_pool=''``) → GeM pooling with a
learnable exponent (Radenović et al., TPAMI 2018) → Linear → BatchNorm1d → L2-normalised
512-d embedding, trained with a margin head of :mod:`glr.model.heads` (ArcFace, sub-center
ArcFace with dynamic margins, CosFace).

Re-ID switches (Luo et al., "Bag of Tricks", CVPRW 2019): ``last_stride`` (ResNet family:
the last stage keeps its input resolution, doubling the feature map) and ``bnneck`` (the
neck's BatchNorm has no bias, so the classifier's hyperplanes pass through the origin).

The network (:class:`EmbeddingNet`) is a plain ``nn.Module`` injected into
:class:`glr.train.module.LandmarkModule`, which owns the head, the loss and the optimiser. An artifact
(:func:`save_artifact`) stores the network's weights with its constructor arguments and the
data config, so :func:`load_artifact` rebuilds it with no training config.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from glr.model.adapters import (LITE0_PACKAGE, apply_last_stride_1, convert_positional, lite0_package_file,
                                weight_source)
from glr.model.layers import GeM
from glr.utils import InputError

# LITE0_PACKAGE, convert_positional and lite0_package_file live in glr.model.adapters (re-exported here)
__all__ = ["EmbeddingNet", "build_net", "resolve_pretrained_file", "LITE0_PACKAGE", "convert_positional",
           "lite0_package_file"]

log = logging.getLogger(__name__)


def resolve_pretrained_file(backbone: str, pretrained: str | os.PathLike | None,
                            cache_dir: str | os.PathLike = "weights") -> Path | None:
    """Turn a ``pretrained`` setting into a local file that timm can load.

    Args:
        backbone: timm model name.
        pretrained: ``None``/``""`` (random init), a path to a timm-keyed checkpoint, or
            the keyword of a weight source of the backbone's adapter
            (:mod:`glr.model.adapters`; :data:`LITE0_PACKAGE`: the lite0 package file,
            converted once to timm keys and cached in ``cache_dir``).
        cache_dir: where converted files are cached.

    Returns:
        The file path, or ``None`` for random initialisation.

    Raises:
        InputError: a weight source of another backbone, or a missing file.
    """
    if not pretrained:
        return None
    source = weight_source(str(pretrained))
    if source is not None:
        adapter, resolve = source
        if not adapter.matches(backbone):
            raise InputError(f"{pretrained} holds weights for {adapter.covers()}, not {backbone}")
        return resolve(backbone, Path(cache_dir))
    path = Path(pretrained)
    if not path.is_file():
        raise InputError("pretrained weights file not found", path)
    return path


class EmbeddingNet(nn.Module):
    """timm backbone → GeM → Linear → BatchNorm1d → L2-normalised embedding.

    Args:
        backbone: any timm model name (``test_resnet`` for tests, ``efficientnet_lite0`` …).
        embedding_size: output dimension D.
        pretrained_file: timm-keyed checkpoint loaded through
            ``pretrained_cfg_overlay=dict(file=...)``; ``None`` for random init.
        gem_p: initial GeM exponent (learnable).
        drop_rate: dropout before the neck's Linear.
        last_stride: stride 1 in the last stage (backbones whose adapter in
            :mod:`glr.model.adapters` has ``last_stride_1``: the ResNet family).
        bnneck: bias-free neck BatchNorm (BNNeck).
    """

    def __init__(self, backbone: str, embedding_size: int = 512, pretrained_file: str | None = None,
                 gem_p: float = 3.0, drop_rate: float = 0.0, last_stride: bool = False, bnneck: bool = False):
        super().__init__()
        #: constructor arguments minus the weights file: what an artifact needs to rebuild the net
        self.model_args = dict(backbone=backbone, embedding_size=embedding_size, gem_p=gem_p,
                               drop_rate=drop_rate, last_stride=last_stride, bnneck=bnneck)
        kwargs: dict[str, Any] = dict(num_classes=0, global_pool="")
        if pretrained_file:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained_file)))
        self.backbone = timm.create_model(backbone, **kwargs)
        if last_stride:
            apply_last_stride_1(self.backbone, backbone)
        self.feature_dim = int(self.backbone.num_features)
        self.embedding_size = embedding_size
        self.pool = GeM(gem_p)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.feature_dim, embedding_size)
        self.bn = nn.BatchNorm1d(embedding_size)
        if bnneck:
            self.bn.bias.requires_grad_(False)  # stays 0

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
    ``gem_p``, ``drop_rate``, ``last_stride``, ``bnneck`` and optionally ``pretrained`` as in
    :func:`resolve_pretrained_file`)."""
    args = dict(model_args)
    pretrained = args.pop("pretrained", None)
    cache_dir = args.pop("cache_dir", "weights")
    file = resolve_pretrained_file(args["backbone"], pretrained, cache_dir)
    return EmbeddingNet(pretrained_file=str(file) if file else None, **args)
