"""The CNN→Swin hybrid: a timm CNN's feature map as the patch embedding of a Swin transformer (arch ``hybrid``).

Henkel & Singer's hybrid of the 1st place of the Google Landmark Retrieval 2021
(``models/ch_mdl_hybrid_transformer_2x.py`` of ChristofHenkel/kaggle-landmark-2021-1st-place): timm's
``HybridEmbed`` puts an EfficientNet's stride-8 feature map (``out_indices=[2]``, or ``[3]`` with a stride-1
stem) through a 1×1 projection in place of Swin's 4×4 patch embedding, so a 448 px image gives the 56×56
token grid that Swin sees at 224 px; the Swin's average-pooled output feeds the neck.

Here the Swin is timm's :class:`~timm.models.swin_transformer.SwinTransformer` built with ``patch_size=1`` and
``in_chans`` = the CNN stage's channels (its patch embedding *is* the 1×1 projection, with LayerNorm) and
``strict_img_size=False``: each block pads its map to a multiple of the window and builds the shifted-window
mask for the size it sees, and patch merging pads odd sizes, so any image size works (staged training).
The windows are fixed at build time (never shrunk to a small map), so one artifact runs at every size.

The Swin part is new (random init, head/neck learning rate); only the CNN is pretrained. Its
shape: ``hybrid_stages`` stages of ``hybrid_depth`` blocks; stage 1 works at the CNN's grid with width
``hybrid_dim`` and ``hybrid_heads`` heads, each later stage halves the grid and doubles width and heads
(Swin's rule). Tokens are averaged after the final LayerNorm (timm's Swin head and Henkel's model do the
same; GeM would clamp the LayerNorm's negative outputs).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from glr.model.archs import cnn_features, feature_stages, register_arch
from glr.utils import InputError

#: Default CNN stage: the first of stride >= 8 (Henkel's stride-8 map).
DEFAULT_STRIDE = 8


def resolve_stage(backbone: str, stage: int | None) -> int:
    """The index into ``backbone``'s feature stages that ``hybrid_stage`` names (``None``: the
    first stage of stride >= :data:`DEFAULT_STRIDE`, else the last; negative: from the end).

    Raises:
        InputError: the index is out of range (the message lists the stages' strides).
    """
    stages = feature_stages(backbone)
    strides = [int(s["reduction"]) for s in stages]
    if stage is None:
        return next((i for i, r in enumerate(strides) if r >= DEFAULT_STRIDE), len(stages) - 1)
    if not -len(stages) <= stage < len(stages):
        raise InputError(f"hybrid_stage: {backbone} has {len(stages)} feature stages (strides "
                         f"{', '.join(map(str, strides))}), got index {stage}")
    return stage % len(stages)


class HybridSwin(nn.Module):
    """A timm CNN's stage ``stage`` → 1×1 projection → Swin stages → LayerNorm → token mean (B, F).

    Args:
        backbone: timm CNN name.
        pretrained_file: timm-keyed checkpoint of the CNN, or ``None`` (random init).
        stage: index into the CNN's feature stages (see :func:`resolve_stage`).
        dim: width of the first Swin stage (``hybrid_dim``).
        depth: blocks per Swin stage (``hybrid_depth``).
        stages: Swin stages (``hybrid_stages``).
        heads: attention heads of the first stage (``hybrid_heads``; must divide ``dim``).
        window: window side in tokens (``hybrid_window``).
        last_stride: stride 1 in the CNN's last stage (ResNet family; matters when ``stage`` is the last).
        backbone_args: more ``timm.create_model`` arguments for the CNN (``drop_path_rate`` …).

    Attributes:
        backbone: the timm CNN, cut after ``stage`` (the backbone learning rate applies to it).
        transformer: the Swin (its ``patch_embed`` is the 1×1 projection).
        num_features: ``dim * 2 ** (stages - 1)``.
    """

    def __init__(self, backbone: str, pretrained_file: str | None = None, stage: int | None = None,
                 dim: int = 128, depth: int = 2, stages: int = 2, heads: int = 4, window: int = 7,
                 last_stride: bool = False, backbone_args: dict[str, Any] | None = None):
        super().__init__()
        for name, value in (("hybrid_dim", dim), ("hybrid_depth", depth), ("hybrid_stages", stages),
                            ("hybrid_heads", heads), ("hybrid_window", window)):
            if value < 1:
                raise InputError(f"{name}: expected an integer >= 1, got {value}")
        if dim % heads:
            raise InputError(f"hybrid_heads: must divide hybrid_dim ({dim}), got {heads}")
        self.backbone = cnn_features(backbone, pretrained_file, (resolve_stage(backbone, stage),), last_stride,
                                     backbone_args)
        grid = window * 2 ** (stages - 1)  # the build-time grid: every stage at least one window wide
        self.transformer = SwinTransformer(
            img_size=grid, patch_size=1, in_chans=self.backbone.feature_info.channels()[-1], num_classes=0,
            global_pool="", embed_dim=dim, depths=(depth,) * stages,
            num_heads=tuple(heads * 2 ** i for i in range(stages)), window_size=window, strict_img_size=False,
            drop_path_rate=0.0)
        self.num_features = int(self.transformer.num_features)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, h, w, F) Swin output tokens after the final LayerNorm (NHWC)."""
        return self.transformer.forward_features(self.backbone(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, F) token means."""
        return self.tokens(x).mean(dim=(1, 2))


@register_arch("hybrid")
def hybrid(backbone: str, pretrained_file: str | None = None, hybrid_stage: int | None = None,
           hybrid_dim: int = 128, hybrid_depth: int = 2, hybrid_stages: int = 2, hybrid_heads: int = 4,
           hybrid_window: int = 7, last_stride: bool = False, backbone_args: dict[str, Any] | None = None,
           **_: Any) -> HybridSwin:
    """The ``hybrid`` architecture (see :class:`HybridSwin`; other options are ignored)."""
    return HybridSwin(backbone, pretrained_file, stage=hybrid_stage, dim=hybrid_dim, depth=hybrid_depth,
                      stages=hybrid_stages, heads=hybrid_heads, window=hybrid_window, last_stride=last_stride,
                      backbone_args=backbone_args)
