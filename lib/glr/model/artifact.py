"""Self-describing artifacts: weights + model args + data config (+ head), rebuilt with no training config.

Format ``glr-artifact-v2`` (what :func:`save_artifact` writes, conventionally ``*.safetensors``):
one safetensors file. Its tensors are the network's state dict as ``net.<key>`` and the margin
head's as ``head.<key>``; its header metadata holds one JSON string under ``"glr"``::

    {"format": "glr-artifact-v2", "model_args": {...}, "data_config": {...},
     "head_args": {...} | null, "meta": {..., "versions": {"torch", "timm", "numpy", "glr"}}}

Reading it parses JSON and raw tensor bytes: nothing in the file is ever executed. The format
is told by content, not by name: a safetensors file starts with an 8-byte little-endian header
length followed by ``{``; a torch file is a zip (``PK``) or a bare pickle.

Legacy ``glr-artifact-v1`` files (a ``torch.save`` of plain dicts, lists, tensors and numbers)
still load, through ``torch.load(weights_only=True)``; a pickle naming anything else is refused
with a one-line error pointing at ``glr weights convert`` (:func:`convert_legacy`, the only
place that unpickles, and only when the user asks for it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import safetensors.torch
import timm
import torch
from torch import nn

import glr
from glr.model.net import EmbeddingNet, build_net
from glr.utils import InputError, atomic_write, file_sha256

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "glr-artifact-v2"
#: The ``torch.save`` format of earlier versions (read with ``weights_only=True``).
LEGACY_FORMAT = "glr-artifact-v1"
#: The conventional file suffix of :data:`ARTIFACT_FORMAT` (any name loads: the content decides).
ARTIFACT_SUFFIX = ".safetensors"
METADATA_KEY = "glr"

#: Model-argument keys that name files: never taken from an artifact (a crafted file could point
#: timm at a pickle elsewhere on disk).
_FILE_ARGS = ("pretrained", "pretrained_file", "cache_dir")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _convert_hint(path: str | os.PathLike) -> str:
    return f"convert a file you trust with `glr weights convert {path} <out>`"


def jsonable(v: Any) -> Any:
    """A JSON-friendly copy of ``v`` (tuples → lists, tensor / numpy scalars → Python numbers,
    ``Path`` and other objects → ``str``); dict keys become strings."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    item = getattr(v, "item", None)
    if callable(item):
        with contextlib.suppress(Exception):
            return jsonable(item())
    return str(v)


def library_versions() -> dict[str, str]:
    """``{"torch", "timm", "numpy", "glr"}`` versions of the running environment (stored in
    ``meta["versions"]`` by :func:`save_artifact`)."""
    return {"torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__,
            "glr": str(getattr(glr, "__version__", "unknown"))}


def _plain_tensors(state: Mapping[str, Any], prefix: str, out: dict[str, torch.Tensor], seen: set[int],
                   what: str) -> None:
    """Add ``state``'s tensors to ``out`` as ``prefix + key``: on the CPU, contiguous, and each
    with its own storage (safetensors refuses shared memory: a tied weight is cloned)."""
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what} entry {k!r} is a {type(v).__name__}, not a tensor: it cannot be saved")
        t = v.detach().cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[prefix + k] = t


def save_artifact(path: str | os.PathLike, net: EmbeddingNet, data_config: dict[str, Any],
                  meta: dict[str, Any] | None = None,
                  head: nn.Module | None = None) -> Path:
    """Save a self-describing ``glr-artifact-v2`` file (safetensors + JSON header; written atomically).

    Args:
        path: target file, conventionally ``*.safetensors``.
        net: the trained network (its ``model_args`` rebuild it; the weights are inside).
        data_config: at least ``image_size``, ``mean``, ``std`` (see
            ``glr.train.datamodule.GLDv2DataModule.data_config``).
        meta: free-form provenance (experiment id, epochs, figures), stored as JSON (values
            that are not JSON become strings, tuples lists). ``meta["versions"]`` is set to
            :func:`library_versions` unless ``meta`` already has one.
        head: optionally the margin head (class centres); a later stage copies its rows
            for the classes it keeps (:func:`glr.model.heads.expand_head_state`).
    """
    path = Path(path)
    meta = dict(meta or {})
    meta.setdefault("versions", library_versions())
    header = {
        "format": ARTIFACT_FORMAT,
        "model_args": jsonable(dict(net.model_args)),
        "data_config": jsonable(dict(data_config)),
        "head_args": None if head is None else jsonable(dict(getattr(head, "head_args", {}))),
        "meta": jsonable(meta),
    }
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    _plain_tensors(net.state_dict(), "net.", tensors, seen, "network state")
    if head is not None:
        _plain_tensors(head.state_dict(), "head.", tensors, seen, "head state")
    data = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(header)})
    with atomic_write(path, "wb") as f:
        f.write(data)
    return path


def artifact_kind(path: str | os.PathLike) -> str:
    """``"safetensors"`` or ``"torch"``, from the file's first bytes (not its name).

    Raises:
        InputError: the file is missing, unreadable, or neither (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("model artifact not found", path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read model artifact ({e.strerror or e})", path) from None
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= min(size - 8, _MAX_HEADER):
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch's zip, or its older bare-pickle format
        return "torch"
    raise InputError("not a glr model artifact (neither a safetensors nor a torch file)", path)


def read_artifact(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                  sha256: str | None = None) -> dict[str, Any]:
    """The artifact payload, format-checked, never unpickling anything but plain data.

    Args:
        path: a ``glr-artifact-v2`` file, or a legacy ``glr-artifact-v1`` ``.pt``.
        map_location: where the tensors go.
        sha256: the digest a manifest records for the file: the bytes read are checked against
            it before they are parsed.

    Returns:
        ``{"format", "model_args", "data_config", "meta", "state_dict", "head_state_dict",
        "head_args", "source"}`` (``head_*`` are ``None`` without a head; ``source`` is
        ``{"file": name, "sha256": digest}`` of the bytes read: how a later stage's meta names
        its parent without recording a path).

    Raises:
        InputError: missing, unreadable, truncated or foreign file; a legacy pickle naming
            anything but plain data; a digest other than ``sha256``; model args naming files.
    """
    kind = artifact_kind(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read model artifact ({e.strerror or e})", path) from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise InputError(f"sha256 {digest[:12]}… differs from the manifest's {sha256[:12]}… "
                         "(the file changed after it was recorded)", path)
    payload = _read_v2(data, path) if kind == "safetensors" else _read_legacy(data, path, map_location)
    _check_payload(payload, path)
    if kind == "safetensors" and str(map_location) != "cpu":
        for key in ("state_dict", "head_state_dict"):
            if payload[key] is not None:
                payload[key] = {k: v.to(map_location) for k, v in payload[key].items()}
    payload["source"] = {"file": Path(path).name, "sha256": digest}
    return payload


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _read_v2(data: bytes, path: str | os.PathLike) -> dict[str, Any]:
    """The payload of a safetensors artifact held in ``data``."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        tensors = safetensors.torch.load(data)
    except Exception as e:  # truncated or malformed: json, safetensors errors alike
        raise InputError(f"cannot read model artifact ({_one_line(e)})", path) from None
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY) if isinstance(header, dict) else None
    if raw is None:
        raise InputError(f"a safetensors file without glr metadata: not a {ARTIFACT_FORMAT} file "
                         "(timm-keyed backbone weights go to `pretrained`)", path)
    try:
        info = json.loads(raw)
    except ValueError as e:
        raise InputError(f"corrupt {ARTIFACT_FORMAT} metadata ({e})", path) from None
    if not isinstance(info, dict) or info.get("format") != ARTIFACT_FORMAT:
        raise InputError(f"not a {ARTIFACT_FORMAT} file", path)
    state: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        group, _, key = k.partition(".")
        if group not in ("net", "head") or not key:
            raise InputError(f"unexpected tensor {k!r} (expected net.<key> or head.<key>)", path)
        (state if group == "net" else head)[key] = v
    return {"format": ARTIFACT_FORMAT, "model_args": info.get("model_args"),
            "data_config": info.get("data_config"), "meta": info.get("meta") or {}, "state_dict": state,
            "head_state_dict": head or None, "head_args": info.get("head_args")}


def _read_legacy(data: bytes, path: str | os.PathLike, map_location: str | torch.device) -> dict[str, Any]:
    """The payload of a legacy ``torch.save`` artifact, unpickled with ``weights_only=True``."""
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise InputError(f"not a plain-data artifact (refusing to unpickle it); {_convert_hint(path)}",
                             path) from None
        raise InputError(f"cannot read model artifact ({_one_line(e)})", path) from None
    except Exception as e:  # a truncated or foreign file: zip or torch errors alike
        raise InputError(f"cannot read model artifact ({_one_line(e)})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != LEGACY_FORMAT:
        raise InputError(f"not a {LEGACY_FORMAT} file", path)
    return {"format": LEGACY_FORMAT, "model_args": payload.get("model_args"),
            "data_config": payload.get("data_config"), "meta": payload.get("meta") or {},
            "state_dict": payload.get("state_dict"), "head_state_dict": payload.get("head_state_dict"),
            "head_args": payload.get("head_args")}


def _check_payload(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """The fields every reader relies on have their types; model args name no file."""
    args = payload["model_args"]
    if not isinstance(args, dict) or not isinstance(args.get("backbone"), str):
        raise InputError("model_args must be a mapping with a backbone name", path)
    named = [k for k in _FILE_ARGS if k in args]
    if named:
        raise InputError(f"model_args name a file ({', '.join(named)}): an artifact carries its own weights; "
                         "refusing to load files it points at", path)
    for key in ("data_config", "meta"):
        if not isinstance(payload[key], dict):
            raise InputError(f"{key} must be a mapping, not {type(payload[key]).__name__}", path)
    for key in ("state_dict", "head_state_dict"):
        state = payload[key]
        if key == "head_state_dict" and state is None:
            continue
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{key} must be a mapping of tensors", path)


def load_state(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
               what: str = "state dict") -> None:
    """``module.load_state_dict(state)`` after checking that it fits: every key present, none
    extra, every shape equal.

    Raises:
        InputError: naming ``path`` and the first bad key in the module's order (then the
            file's), with how many other keys are wrong.
    """
    own = module.state_dict()
    problems = [f"missing key {k!r}" for k in own if k not in state]
    problems += [f"size mismatch for {k!r}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
                 for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems += [f"unexpected key {k!r}" for k in state if k not in own]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{what} does not fit its model args: {problems[0]}{more}", path)
    module.load_state_dict(state)


def net_from_payload(payload: Mapping[str, Any], path: str | os.PathLike) -> EmbeddingNet:
    """The network of an artifact payload (:func:`read_artifact`), its weights loaded.

    Raises:
        InputError: model args that build no network, or a state dict that does not fit them.
    """
    try:
        net = build_net(dict(payload["model_args"]))
    except InputError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # unknown argument, unknown backbone…
        raise InputError(f"model_args {payload['model_args']} build no network ({_one_line(e)})", path) from None
    load_state(net, payload["state_dict"], path)
    return net


def load_artifact(path: str | os.PathLike, map_location: str | torch.device = "cpu", sha256: str | None = None
                  ) -> tuple[EmbeddingNet, dict[str, Any], dict[str, Any]]:
    """Rebuild a network from an artifact alone (``sha256``: as in :func:`read_artifact`).

    Returns:
        ``(net, data_config, meta)`` with ``net`` in eval mode.
    """
    payload = read_artifact(path, map_location, sha256)
    net = net_from_payload(payload, path)
    net.eval()
    return net, payload["data_config"], payload.get("meta", {})


def convert_legacy(src: str | os.PathLike, dst: str | os.PathLike, trust: bool = False) -> Path:
    """Rewrite a legacy ``glr-artifact-v1`` file as ``glr-artifact-v2``, bit for bit the same tensors.

    Args:
        src: the legacy ``.pt``.
        dst: the new file (written atomically; must not be ``src``).
        trust: unpickle ``src`` with ``weights_only=False`` (runs whatever its pickle says:
            only for a file you trust). Without it, only plain-data files convert.

    Returns:
        ``dst``. Its meta records ``converted_from: {"file", "sha256"}`` of ``src``.
    """
    src, dst = Path(src), Path(dst)
    if artifact_kind(src) != "torch":
        raise InputError(f"already a {ARTIFACT_FORMAT} file: nothing to convert", src)
    if dst.resolve() == src.resolve():
        raise InputError("the output would overwrite the input; give another file", dst)
    if dst.is_dir():
        raise InputError("is a folder; give the file to write", dst)
    if trust:
        log.warning("unpickling %s with weights_only=False (this runs any code the file holds)", src)
        try:
            raw = torch.load(src, map_location="cpu", weights_only=False)
        except Exception as e:
            raise InputError(f"cannot read model artifact ({_one_line(e)})", src) from None
        if not isinstance(raw, dict) or raw.get("format") != LEGACY_FORMAT:
            raise InputError(f"not a {LEGACY_FORMAT} file", src)
        payload = {k: raw.get(k) for k in ("model_args", "data_config", "meta", "state_dict",
                                           "head_state_dict", "head_args")}
        payload["meta"] = payload["meta"] or {}
        _check_payload(payload, src)
    else:
        try:
            payload = read_artifact(src)
        except InputError as e:
            if "refusing to unpickle" not in str(e):
                raise
            raise InputError("not a plain-data artifact (refusing to unpickle it); if you trust the file, "
                             "convert it with --trust (`glr weights convert --trust IN OUT`)", src) from None
    try:
        return _write_converted(payload, src, dst)
    except OSError as e:
        raise InputError(f"cannot write the converted artifact ({e.strerror or e})", dst) from None


class _Holder(nn.Module):
    """A module that hands a fixed state dict (and args) to :func:`save_artifact`."""

    def __init__(self, state: Mapping[str, torch.Tensor], model_args: dict | None = None,
                 head_args: dict | None = None):
        super().__init__()
        self._state = dict(state)
        self.model_args = model_args
        self.head_args = head_args

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self._state


def _write_converted(payload: dict[str, Any], src: Path, dst: Path) -> Path:
    """Save ``payload`` (read from ``src``) as a v2 file at ``dst``, after checking it rebuilds."""
    net_from_payload(payload, src)  # the state dict fits its model args, or a one-line error
    meta = dict(payload["meta"])
    meta["converted_from"] = {"file": src.name, "sha256": file_sha256(src)}
    head = payload.get("head_state_dict")
    return save_artifact(dst, _Holder(payload["state_dict"], dict(payload["model_args"])),  # type: ignore[arg-type]
                         payload["data_config"], meta,
                         head=None if head is None else _Holder(head, head_args=payload.get("head_args") or {}))
