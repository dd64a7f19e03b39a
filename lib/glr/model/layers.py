"""Pooling layers: generalized-mean (GeM) pooling as a function and a module (cirtorch's split).
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
