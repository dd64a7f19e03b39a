"""The embedding network (the training side is in :mod:`glr.train`; artifacts in :mod:`glr.model.artifact`).

Architecture (the shape every top GLDv2 solution shares, e.g. Henkel & Singer 2021,
Zhang et al. 2021): timm backbone (``num_classes=0, global_pool=''``) → GeM pooling with a
learnable exponent (Radenović et al., TPAMI 2018) → Linear → BatchNorm1d → L2-normalised
512-d embedding, trained with a margin head of :mod:`glr.model.heads` (ArcFace, sub-center
ArcFace with dynamic margins, CosFace).

Re-ID switches (Luo et al., "Bag of Tricks", CVPRW 2019): ``last_stride`` (ResNet family:
the last stage keeps its input resolution, doubling the feature map) and ``bnneck`` (the
neck's BatchNorm has no bias, so the classifier's hyperplanes pass through the origin).

Any timm backbone: CNNs pool their (B, C, H, W) map, token models (ViT, DeiT, EVA) their patch
tokens or class token (``token_pool``), Swin and MambaOut their (B, H, W, C) map; token models and
Swin are built with ``dynamic_img_size`` so stages may change the image size
(:func:`glr.model.archs.create_backbone`). Other architectures (DOLG, the CNN → Swin hybrid) are
registered in :mod:`glr.model.archs` and chosen by ``arch``. The backbone's own preprocessing
(mean, std, interpolation, crop) is :func:`backbone_preprocessing`.

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

from glr.model.adapters import (LITE0_PACKAGE, convert_positional, lite0_package_file,
                                weight_source)
from glr.model.archs import backbone_features, build_arch
from glr.utils import InputError

# LITE0_PACKAGE, convert_positional and lite0_package_file live in glr.model.adapters (re-exported here)
__all__ = ["EmbeddingNet", "backbone_preprocessing", "build_net", "resolve_pretrained_file", "LITE0_PACKAGE", "convert_positional",
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
    """timm backbone → pooling (an architecture of :mod:`glr.model.archs`) → Linear → BatchNorm1d →
    L2-normalised embedding.

    Args:
        backbone: any timm model name: a CNN (``test_resnet`` for tests, ``efficientnet_lite0`` …), a
            token model (ViT, DeiT, EVA) or a (B, H, W, C) one (Swin, MambaOut).
        embedding_size: output dimension D.
        pretrained_file: timm-keyed checkpoint loaded through
            ``pretrained_cfg_overlay=dict(file=...)``; ``None`` for random init.
        gem_p: initial GeM exponent (learnable).
        drop_rate: dropout before the neck's Linear.
        last_stride: stride 1 in the last stage (backbones whose adapter in
            :mod:`glr.model.adapters` has ``last_stride_1``: the ResNet family).
        bnneck: bias-free neck BatchNorm (BNNeck).
        arch: a registered architecture (:data:`glr.model.archs.ARCHS`). ``gem`` (default): the
            backbone's output pooled by :class:`~glr.model.layers.BackbonePool`, with the keys of every
            earlier artifact (``backbone.*``, ``pool.p``, ``fc.*``, ``bn.*``); any other: the registered
            trunk under ``trunk.*``.
        token_pool: how ``gem`` pools a token backbone (``gem`` over the patch tokens, ``avg``, ``cls``);
            see :class:`~glr.model.layers.BackbonePool`.
        backbone_args: more keyword arguments of ``timm.create_model`` (``drop_path_rate``, or a
            small Swin's ``embed_dim``, ``depths`` … in tests); arch ``gem`` passes them on.
        **arch_options: the architecture's own options (``dolg_dim``, ``hybrid_*`` …), passed to its
            factory with ``gem_p``, ``last_stride`` and ``token_pool``.

    ``backbone`` is always the timm module (the backbone learning-rate group of
    :class:`glr.train.module.LandmarkModule`); for a trunk architecture it is ``trunk.backbone``,
    looked up rather than registered a second time (a module under two names would give its
    tensors two keys).
    """

    def __init__(self, backbone: str, embedding_size: int = 512, pretrained_file: str | None = None,
                 gem_p: float = 3.0, drop_rate: float = 0.0, last_stride: bool = False, bnneck: bool = False,
                 arch: str = "gem", token_pool: str = "gem", backbone_args: dict[str, Any] | None = None,
                 **arch_options: Any):
        super().__init__()
        #: constructor arguments minus the weights file: what an artifact needs to rebuild the net. The
        #: defaults (``arch`` and ``token_pool`` gem) are left out, and so are the arch options of
        #: arch gem (it has none): a plain network's args are those of the artifacts before them.
        self.model_args = dict(backbone=backbone, embedding_size=embedding_size, gem_p=gem_p,
                               drop_rate=drop_rate, last_stride=last_stride, bnneck=bnneck)
        if arch != "gem":
            self.model_args.update(arch=arch, **arch_options)
        if token_pool != "gem":
            self.model_args["token_pool"] = token_pool
        if backbone_args:
            self.model_args["backbone_args"] = dict(backbone_args)
            arch_options["backbone_args"] = dict(backbone_args)
        self.arch = arch
        trunk = build_arch(arch, backbone, pretrained_file, gem_p=gem_p, last_stride=last_stride,
                           token_pool=token_pool, **arch_options)
        if arch == "gem":  # adopt the trunk's children: today's module layout and keys
            self.backbone, self.pool = trunk.backbone, trunk.pool
            self.through_head = trunk.through_head
        else:
            self.trunk = trunk
        self.feature_dim = int(trunk.num_features)
        self.embedding_size = embedding_size
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.feature_dim, embedding_size)
        self.bn = nn.BatchNorm1d(embedding_size)
        if bnneck:
            self.bn.bias.requires_grad_(False)  # stays 0
        #: the preprocessing the loaded weights were trained with (:func:`backbone_preprocessing`), or
        #: ``None`` for random weights (nothing to match)
        self.weights_preprocessing: dict[str, Any] | None = (
            backbone_preprocessing(self.backbone) if pretrained_file else None)

    def __getattr__(self, name: str) -> Any:
        if name == "backbone" and "trunk" in self.__dict__.get("_modules", {}):
            return self._modules["trunk"].backbone
        return super().__getattr__(name)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images → (B, F) pooled backbone features (no neck, not normalised)."""
        if self.arch == "gem":
            return self.pool(backbone_features(self.backbone, x, self.through_head))
        return self.trunk(x)

    def forward_unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, D) neck output before L2 normalisation (what the head sees)."""
        return self.bn(self.fc(self.drop(self.pooled_features(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, D) L2-normalised embeddings."""
        return F.normalize(self.forward_unnormalised(x).float(), dim=1)



def backbone_preprocessing(model: nn.Module) -> dict[str, Any]:
    """``mean``, ``std``, ``interpolation`` and ``crop_pct`` of a timm model's pretrained config
    (``timm.data.resolve_model_data_config``; timm's defaults, ImageNet's mean/std, bicubic, 0.875, for a
    model that has none)."""
    cfg = timm.data.resolve_model_data_config(model)
    return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "interpolation": str(cfg["interpolation"]), "crop_pct": float(cfg["crop_pct"])}


def build_net(model_args: dict[str, Any]) -> EmbeddingNet:
    """Build an :class:`EmbeddingNet` from ``model_args`` (``backbone``, ``embedding_size``,
    ``gem_p``, ``drop_rate``, ``last_stride``, ``bnneck``, ``arch``, ``token_pool``, the arch's options,
    and optionally ``pretrained`` as in :func:`resolve_pretrained_file`)."""
    args = dict(model_args)
    pretrained = args.pop("pretrained", None)
    cache_dir = args.pop("cache_dir", "weights")
    file = resolve_pretrained_file(args["backbone"], pretrained, cache_dir)
    return EmbeddingNet(pretrained_file=str(file) if file else None, **args)
