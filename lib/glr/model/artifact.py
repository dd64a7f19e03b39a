"""Self-describing artifacts: weights + model args + data config (+ head), rebuilt with no training config.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glr.model.net import EmbeddingNet
from glr.utils import InputError

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "glr-artifact-v1"


def save_artifact(path: str | os.PathLike, net: EmbeddingNet, data_config: dict[str, Any],
                  meta: dict[str, Any] | None = None,
                  head: nn.Module | None = None) -> Path:
    """Save a self-describing model artifact (written atomically).

    Args:
        path: target ``.pt`` file.
        net: the trained network (its ``model_args`` rebuild it; the weights are inside).
        data_config: at least ``image_size``, ``mean``, ``std`` (see ``glr.train.datamodule.GLDv2DataModule.data_config``).
        meta: free-form provenance (experiment id, epochs, figures).
        head: optionally the margin head (class centres); a later stage copies its rows
            for the classes it keeps (:func:`glr.model.heads.expand_head_state`).
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
