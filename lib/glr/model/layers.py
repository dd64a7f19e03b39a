"""Pooling layers: generalized-mean (GeM) pooling as a function and a module (cirtorch's split), and
:class:`BackbonePool`, which pools a timm backbone's output whatever its layout (maps or tokens).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

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


def gem_tokens(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling over tokens: (B, N, C) → (B, C) ``(mean_n x^p)^(1/p)``, clamped at ``eps``
    as :func:`gem`."""
    return x.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


#: How :class:`BackbonePool` reduces a backbone's output: ``gem`` (GeM, learnable p), ``avg`` (plain mean,
#: signs kept), ``cls`` (the class token of a token backbone).
TOKEN_POOLS: tuple[str, ...] = ("gem", "avg", "cls")
#: Layouts of ``forward_features``: a feature map (``NCHW``; ``NHWC`` for Swin, MambaOut …) or tokens
#: (``NLC``: ViT, DeiT, EVA …, the first ``num_prefix_tokens`` being class / register tokens).
LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC", "NLC")


class BackbonePool(nn.Module):
    """A timm backbone's ``forward_features`` output of any layout → (B, C) pooled descriptors.

    * ``NCHW`` maps: :func:`gem` over H, W (exactly today's GeM; the parameter is ``p``).
    * ``NHWC`` maps: the H·W positions as tokens.
    * ``NLC`` tokens: the ``num_prefix_tokens`` prefix (class, register, distillation tokens) is
      dropped and the patch tokens are pooled; ``cls`` takes token 0 instead.

    Tokens are pooled as they come out of ``forward_features``, i.e. after the backbone's final
    LayerNorm, so they are signed; ``gem`` clamps them at ``eps`` like CNN activations (the
    negative part contributes nothing and gets no gradient; the fine-tuned backbone and the neck
    adapt to it, as GeM over post-norm tokens is commonly used), ``avg`` keeps the sign (GeM with
    p = 1 without the clamp), ``cls`` is the ViT recipe's own descriptor.

    Args:
        mode: one of :data:`TOKEN_POOLS`; only ``gem`` has a parameter (``p``).
        layout: one of :data:`LAYOUTS`.
        num_prefix_tokens: prefix tokens of an ``NLC`` output.
        has_class_token: whether token 0 is a class token (``cls`` needs it).
        p: initial GeM exponent (learnable).
        eps: GeM clamp.

    Raises:
        ValueError: an unknown mode or layout, or ``cls`` without a class token.
    """

    def __init__(self, mode: str = "gem", layout: str = "NCHW", num_prefix_tokens: int = 0,
                 has_class_token: bool = False, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        if mode not in TOKEN_POOLS:
            raise ValueError(f"token_pool: expected one of {', '.join(TOKEN_POOLS)}, got {mode!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
        if mode == "cls" and not (layout == "NLC" and has_class_token):
            raise ValueError("token_pool cls needs a token backbone with a class token (ViT, DeiT, EVA …)")
        self.mode, self.layout, self.eps = mode, layout, eps
        self.num_prefix_tokens = int(num_prefix_tokens) if layout == "NLC" else 0
        if mode == "gem":
            self.p = nn.Parameter(torch.ones(1) * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, H, W, C) or (B, N, C) as :attr:`layout` says → (B, C)."""
        if x.ndim == 4 and self.layout == "NCHW":
            return gem(x, self.p, self.eps) if self.mode == "gem" else x.mean(dim=(-2, -1))
        if x.ndim == 4 and self.layout == "NHWC":
            x = x.flatten(1, 2)
        elif x.ndim != 3 or self.layout != "NLC":
            raise ValueError(f"{self.layout} backbone output expected, got shape {tuple(x.shape)}")
        elif self.mode == "cls":
            return x[:, 0]
        else:
            x = x[:, self.num_prefix_tokens:]
        return gem_tokens(x, self.p, self.eps) if self.mode == "gem" else x.mean(dim=1)

    def extra_repr(self) -> str:
        p = f", p={self.p.item():.4f}" if self.mode == "gem" else ""
        return f"mode={self.mode}, layout={self.layout}, num_prefix_tokens={self.num_prefix_tokens}{p}"
