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
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

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
