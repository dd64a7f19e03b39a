"""Architectures: what turns a timm backbone's output into the pooled descriptor the neck sees.

An architecture is a factory registered under a name (``arch`` in the training config and in an
artifact's model args), in the way of timm's ``register_model``::

    @register_arch("dolg")
    def dolg(backbone: str, pretrained_file: str | None, **options) -> nn.Module: ...

The module it returns maps (B, 3, H, W) normalised images to (B, F) pooled, un-normalised
features, and has two attributes: ``backbone`` (the timm module whose parameters get the
backbone learning rate) and ``num_features`` (F). ``options`` are the network's arch options
(``gem_p``, ``last_stride``, ``token_pool`` and the arch's own); a factory takes the ones it knows
and ignores the rest (``**_``). Adding an architecture is one module plus one registration,
imported by ``glr/model/__init__.py``.

``gem`` (registered here, :class:`PooledBackbone`) is the plain one: any timm backbone, CNN or token
model (:func:`create_backbone`, :func:`feature_layout`), pooled by
:class:`~glr.model.layers.BackbonePool`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import timm
import torch
from torch import nn

from glr.model.adapters import apply_last_stride_1
from glr.model.layers import BackbonePool
from glr.utils import InputError

#: ``factory(backbone, pretrained_file, **options) -> module`` (see the module docstring).
ArchFactory = Callable[..., nn.Module]

ARCHS: dict[str, ArchFactory] = {}


def register_arch(name: str) -> Callable[[ArchFactory], ArchFactory]:
    """Register an architecture factory under ``name`` (a decorator)."""
    def deco(factory: ArchFactory) -> ArchFactory:
        if name in ARCHS and ARCHS[name] is not factory:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHS[name] = factory
        return factory
    return deco


def build_arch(name: str, backbone: str, pretrained_file: str | None = None, **options: Any) -> nn.Module:
    """The registered architecture ``name`` around timm backbone ``backbone``.

    Raises:
        InputError: ``name`` is not registered (the message lists the registered ones).
    """
    if name not in ARCHS:
        raise InputError(f"arch: expected one of {', '.join(sorted(ARCHS))}, got {name!r}")
    return ARCHS[name](backbone, pretrained_file, **options)


def feature_stages(backbone: str) -> list[dict[str, Any]]:
    """The stages timm's ``features_only`` model of ``backbone`` offers: ``feature_info`` entries
    (``num_chs``, ``reduction``, ``module``), read from a model built on the meta device (no weights).

    Raises:
        InputError: ``backbone`` is not a timm model, or has no ``features_only`` form.
    """
    if not timm.is_model(backbone):
        raise InputError(f"backbone: {backbone!r} is not a timm model (timm.list_models() lists them)")
    try:
        with torch.device("meta"):
            model = timm.create_model(backbone, features_only=True)
    except Exception:  # an init that reads tensor values fails on meta: build it on the CPU (random weights)
        try:
            model = timm.create_model(backbone, features_only=True)
        except Exception as e:  # timm raises RuntimeError/TypeError/AssertionError for models without maps
            raise InputError(f"backbone: {backbone} has no features_only form in timm "
                             f"({type(e).__name__}: {e})") from e
    return [dict(info) for info in model.feature_info.info]


def cnn_features(backbone: str, pretrained_file: str | None, out_indices: Sequence[int],
                 last_stride: bool = False, backbone_args: dict[str, Any] | None = None) -> nn.Module:
    """A timm CNN as a ``features_only`` model returning the feature maps of ``out_indices``.

    Args:
        backbone: timm model name.
        pretrained_file: timm-keyed checkpoint loaded through ``pretrained_cfg_overlay=dict(file=...)``;
            ``None`` for random init.
        out_indices: indices into the model's ``feature_info`` (negative from the end); the model
            stops at the deepest one, so it has no parameter without a gradient.
        last_stride: stride 1 in the last stage (:func:`glr.model.adapters.apply_last_stride_1`).
        backbone_args: more ``timm.create_model`` arguments (``drop_path_rate`` …).

    Returns:
        A module mapping (B, 3, H, W) to a list of (B, C_i, H_i, W_i) maps; its ``feature_info``
        gives ``C_i`` and the reductions.
    """
    feature_stages(backbone)  # a clear error for a non-timm or map-less backbone
    kwargs: dict[str, Any] = dict(backbone_args or {}, features_only=True, out_indices=tuple(out_indices))
    if pretrained_file:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained_file)))
    model = timm.create_model(backbone, **kwargs)
    _drop_blocks_after_last_output(model)
    if last_stride:
        apply_last_stride_1(model, backbone)
    return model


def _drop_blocks_after_last_output(model: nn.Module) -> None:
    """timm's ``EfficientNetFeatures`` / ``MobileNetV3Features`` run every block whatever ``out_indices``
    says (``FeatureListNet`` stops at the last output): cut the blocks after the deepest output, whose
    parameters would get no gradient (and make DDP look for unused parameters)."""
    stages = getattr(model, "_stage_out_idx", None)
    blocks = getattr(model, "blocks", None)
    if stages and isinstance(blocks, nn.Sequential) and getattr(model, "feature_hooks", None) is None:
        model.blocks = blocks[:max(stages)]  # stage s is the output of block s - 1 (0: the stem)


# --------------------------------------------------------------------------- "gem": a timm backbone pooled
def create_backbone(backbone: str, pretrained_file: str | None = None, **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model(backbone, num_classes=0, global_pool='')`` (``forward_features`` gives the
    un-pooled output), weights from ``pretrained_file`` (timm-keyed, through
    ``pretrained_cfg_overlay=dict(file=...)``; ``None``: random init).

    Token backbones (ViT, DeiT, EVA) and Swin are created with ``dynamic_img_size=True`` so a later
    stage may run them at another image size (position embeddings interpolated, Swin's attention
    masks built per input size). Whether a model takes the flag is whether its class accepts the
    keyword: CNN classes raise ``TypeError`` before building anything, and are then created
    without it (the random-number state is restored, so a CNN's initial weights are the same as
    without the attempt).
    """
    kwargs: dict[str, Any] = dict(num_classes=0, global_pool="", **timm_kwargs)
    if pretrained_file:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained_file)))
    rng = torch.random.get_rng_state()
    try:
        return timm.create_model(backbone, dynamic_img_size=True, **kwargs)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise
    torch.random.set_rng_state(rng)
    return timm.create_model(backbone, **kwargs)


def feature_layout(model: nn.Module) -> str:
    """The layout of ``model.forward_features``: ``NLC`` for token backbones (they have timm's
    ``num_prefix_tokens``), else timm's ``output_fmt`` (``NHWC`` for Swin, MambaOut …; ``NCHW`` when
    the model does not say)."""
    if hasattr(model, "num_prefix_tokens"):
        return "NLC"
    fmt = getattr(model, "output_fmt", None) or "NCHW"
    return "NHWC" if str(getattr(fmt, "value", fmt)) == "NHWC" else "NCHW"


def backbone_pool(model: nn.Module, token_pool: str = "gem", gem_p: float = 3.0, name: str = "") -> BackbonePool:
    """The :class:`~glr.model.layers.BackbonePool` of ``model``'s layout (prefix tokens and class token
    read from timm's ``num_prefix_tokens`` / ``cls_token``).

    Raises:
        InputError: ``token_pool`` is unknown, or ``cls`` for a backbone with no class token.
    """
    layout = feature_layout(model)
    has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    try:
        return BackbonePool(token_pool, layout, int(getattr(model, "num_prefix_tokens", 0) or 0), has_cls, p=gem_p)
    except ValueError as e:
        raise InputError(f"{e}; {name or 'the backbone'} gives {layout}") from None


def head_has_parameters(model: nn.Module) -> bool:
    """Whether a timm model built with ``num_classes=0`` keeps parameters in its ``head``: the final norm
    (and pre-logits MLP) of ConvNeXt, MambaOut, MaxViT … live there, outside ``forward_features``."""
    head = getattr(model, "head", None)
    return isinstance(head, nn.Module) and any(True for _ in head.parameters())


class PooledBackbone(nn.Module):
    """Architecture ``gem``: a timm backbone → :class:`~glr.model.layers.BackbonePool` (GeM over a CNN's
    map, over a Swin / MambaOut map's positions or over a ViT's patch tokens; or the class token).

    When the backbone's head keeps parameters (:func:`head_has_parameters`: ConvNeXt's final
    LayerNorm, MambaOut's norm + pre-logits MLP) the output of ``forward_features`` goes through
    ``forward_head(x, pre_logits=True)`` first: with ``global_pool=''`` that applies them per
    position, so the pretrained final norm is used and every parameter is trained. Other backbones
    (EfficientNet, ResNet, ViT, Swin …) pool ``forward_features`` as it is.

    :class:`~glr.model.net.EmbeddingNet` adopts the two children as its own (``backbone.*``,
    ``pool.p``: the keys of every artifact before architectures existed).
    """

    def __init__(self, backbone: str, pretrained_file: str | None = None, gem_p: float = 3.0,
                 last_stride: bool = False, token_pool: str = "gem", backbone_args: dict[str, Any] | None = None):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained_file, **(backbone_args or {}))
        if last_stride:
            apply_last_stride_1(self.backbone, backbone)
        self.pool = backbone_pool(self.backbone, token_pool, gem_p, backbone)
        self.through_head = head_has_parameters(self.backbone)
        width = getattr(self.backbone, "head_hidden_size", None) if self.through_head else None
        self.num_features = int(width or self.backbone.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, F) pooled features."""
        return self.pool(backbone_features(self.backbone, x, self.through_head))


def backbone_features(backbone: nn.Module, x: torch.Tensor, through_head: bool = False) -> torch.Tensor:
    """(B, 3, H, W) → a timm backbone's un-pooled output (a map or tokens, :func:`feature_layout`); with
    ``through_head``, passed through ``forward_head(…, pre_logits=True)`` (see :class:`PooledBackbone`)."""
    out = backbone.forward_features(x)
    return backbone.forward_head(out, pre_logits=True) if through_head else out


@register_arch("gem")
def _gem(backbone: str, pretrained_file: str | None = None, gem_p: float = 3.0, last_stride: bool = False,
         token_pool: str = "gem", backbone_args: dict[str, Any] | None = None, **_: Any) -> PooledBackbone:
    return PooledBackbone(backbone, pretrained_file, gem_p, last_stride, token_pool, backbone_args)
