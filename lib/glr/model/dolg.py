"""DOLG: deep orthogonal fusion of local and global features, for any timm CNN (arch ``dolg``).

Yang et al., "DOLG: Single-Stage Image Retrieval with Deep Orthogonal Fusion of Local and Global
Features", ICCV 2021, as Henkel & Singer used it in the 1st place of the Google Landmark Retrieval
2021 (``models/ch_mdl_dolg_efficientnet.py`` of ChristofHenkel/kaggle-landmark-2021-1st-place):

* local branch on the second-to-last stage: three dilated 3×3 convolutions (dilations 3, 6, 9,
  Henkel's; the paper's ASPP has 6, 12, 18), concatenated, a 1×1 convolution and ReLU, then a spatial
  attention: 1×1 convolution and BN give ``f``; ``local = normalize_c(f) * softplus(conv(relu(f)))``;
* global branch on the last stage: 1×1 convolution, BN, SiLU, GeM → ``fg`` (B, C);
* orthogonal fusion: each local vector's component orthogonal to ``fg``,
  ``f_orth = f − (f·fg / |fg|²) fg`` (the exact projection; Henkel's code divides by ``|fg|``), averaged
  over H, W and concatenated with ``fg`` → (B, 2C), the input of :class:`glr.model.net.EmbeddingNet`'s neck.

C is ``dolg_dim`` (Henkel: 1024, default here 512).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glr.model.archs import cnn_features, register_arch
from glr.model.layers import GeM
from glr.utils import InputError

#: Dilations of the local branch's three 3×3 convolutions (Henkel & Singer's ``cfg.dilations``).
DILATIONS: tuple[int, ...] = (3, 6, 9)


def orthogonal_component(fl: torch.Tensor, fg: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The component of every local vector orthogonal to the global descriptor.

    Args:
        fl: local feature map (B, C, H, W).
        fg: global descriptors (B, C).
        eps: lower bound of ``|fg|²`` (GeM output is positive, so it only guards a zero vector).

    Returns:
        (B, C, H, W) ``fl − (fl·fg / |fg|²) fg`` at every position: its dot product with ``fg`` is 0.
    """
    dot = torch.einsum("bchw,bc->bhw", fl, fg)[:, None]                  # (B, 1, H, W)
    norm2 = fg.pow(2).sum(dim=1).clamp(min=eps)[:, None, None, None]     # (B, 1, 1, 1)
    return fl - dot / norm2 * fg[:, :, None, None]


def orthogonal_fusion(fl: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) local map and (B, C) global descriptors → (B, 2C): the spatial mean of the
    orthogonal components (:func:`orthogonal_component`) followed by ``fg``."""
    return torch.cat([orthogonal_component(fl, fg).mean(dim=(-2, -1)), fg], dim=1)


class MultiAtrous(nn.Module):
    """Dilated 3×3 convolutions side by side, concatenated, then 1×1 convolution and ReLU (ASPP-like).

    (B, C_in, H, W) → (B, C_out, H, W); padding keeps H and W.
    """

    def __init__(self, in_chs: int, out_chs: int, dilations: tuple[int, ...] = DILATIONS):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_chs, out_chs, 3, padding=d, dilation=d) for d in dilations)
        self.project = nn.Conv2d(out_chs * len(dilations), out_chs, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.project(torch.cat([b(x) for b in self.branches], dim=1)))


class SpatialAttention(nn.Module):
    """DOLG's local attention: ``f = BN(conv1x1(x))``; ``normalize_c(f) * softplus(conv1x1(relu(f)))``.

    (B, C, H, W) → (B, C, H, W): unit-norm local vectors weighted by a positive score per position.
    """

    def __init__(self, chs: int):
        super().__init__()
        self.conv = nn.Conv2d(chs, chs, 1)
        self.bn = nn.BatchNorm2d(chs)
        self.score = nn.Conv2d(chs, 1, 1)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) → the channel-normalised map (B, C, H, W) and the scores (B, 1, H, W)."""
        f = self.bn(self.conv(x))
        return F.normalize(f, dim=1), F.softplus(self.score(F.relu(f)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed, score = self.attention(x)
        return normed * score


class DOLG(nn.Module):
    """A timm CNN's last two stages → DOLG's orthogonally fused descriptor (B, 2C), not normalised.

    Args:
        backbone: timm CNN name (any model with a ``features_only`` form of at least two stages).
        pretrained_file: timm-keyed checkpoint of the CNN, or ``None`` (random init).
        dim: C, the width of both branches (``dolg_dim``).
        gem_p: initial exponent of the global branch's GeM (learnable).
        last_stride: stride 1 in the CNN's last stage (ResNet family).
        backbone_args: more ``timm.create_model`` arguments for the CNN (``drop_path_rate`` …).

    Attributes:
        backbone: the timm CNN (the backbone learning rate applies to it; everything else is new).
        num_features: 2C.
    """

    def __init__(self, backbone: str, pretrained_file: str | None = None, dim: int = 512, gem_p: float = 3.0,
                 last_stride: bool = False, backbone_args: dict[str, Any] | None = None):
        super().__init__()
        if dim < 1:
            raise InputError(f"dolg_dim: expected an integer >= 1, got {dim}")
        self.backbone = cnn_features(backbone, pretrained_file, (-2, -1), last_stride, backbone_args)
        local_chs, global_chs = self.backbone.feature_info.channels()
        self.local_conv = MultiAtrous(local_chs, dim)
        self.local_att = SpatialAttention(dim)
        self.global_conv = nn.Conv2d(global_chs, dim, 1)
        self.global_bn = nn.BatchNorm2d(dim, eps=1e-3)  # Henkel's eps
        self.global_act = nn.SiLU()
        self.global_pool = GeM(gem_p)
        self.num_features = 2 * dim

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) → the local map (B, C, H/16, W/16) and the global descriptors (B, C)
        (for a CNN whose last two stages have strides 16 and 32)."""
        f_local, f_global = self.backbone(x)
        local = self.local_att(self.local_conv(f_local))
        fg = self.global_pool(self.global_act(self.global_bn(self.global_conv(f_global))))
        return local, fg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, 2C) fused descriptors."""
        return orthogonal_fusion(*self.branches(x))


@register_arch("dolg")
def dolg(backbone: str, pretrained_file: str | None = None, dolg_dim: int = 512, gem_p: float = 3.0,
         last_stride: bool = False, backbone_args: dict[str, Any] | None = None, **_: Any) -> DOLG:
    """The ``dolg`` architecture (see :class:`DOLG`; other options are ignored)."""
    return DOLG(backbone, pretrained_file, dim=dolg_dim, gem_p=gem_p, last_stride=last_stride,
                backbone_args=backbone_args)
