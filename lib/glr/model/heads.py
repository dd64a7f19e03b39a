"""Metric-learning margin heads for landmark retrieval training (GLDv2).

Every top GLDv2 solution trains the embedding with a cosine-softmax head whose target logit
is penalised by a margin:

* :class:`ArcFace` — additive angular margin, ``s · cos(θ_y + m_y)`` (Deng et al., CVPR 2019),
  optionally with ``k`` sub-centres per class (sub-center ArcFace, Deng et al., ECCV 2020),
  which absorbs noisy / multi-view classes such as those of GLDv2-full.
* :class:`CosFace` — large margin cosine loss, ``s · (cos θ_y − m_y)`` (Wang et al., CVPR 2018).

Both heads take a scalar margin or one margin per class. :func:`dynamic_margins` derives
per-class margins from the class sizes (larger margins for rarer classes; 1st place GLR2021,
Henkel & Singer) and :func:`class_weights` derives per-class loss weights. :func:`build_head`
builds a head by name (from the registry :func:`register_head` fills: a new head is a
builder function plus its decorator) and attaches a JSON-serialisable ``head_args`` description;
:func:`expand_head_state` carries the class centres of a head trained on a smaller class set
(GLDv2-clean) into a head for a larger one (GLDv2-full).

Label smoothing is not part of the heads: pass ``label_smoothing=`` to ``F.cross_entropy``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glr.utils import InputError

#: A head builder: ``(in_features, num_classes, s, m, k, easy_margin) -> nn.Module``; ``m`` is a
#: float or a (C,) tensor of per-class margins, ``k`` the sub-centres asked for (a builder that
#: has one centre per class ignores it). The head's ``k`` attribute (default 1) is reported in
#: ``head_args``.
HeadBuilder = Callable[[int, int, float, "float | torch.Tensor", int, bool], nn.Module]

_HEADS: dict[str, HeadBuilder] = {}

#: Head kinds understood by :func:`build_head`: a live, read-only view of the registry.
HEADS = _HEADS.keys()


def register_head(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Register the decorated builder under ``name`` (see :data:`HeadBuilder`)::

        @register_head("cosface")
        def _cosface(in_features, num_classes, s, m, k, easy_margin):
            return CosFace(in_features, num_classes, s=s, m=m)

    Raises:
        ValueError: ``name`` is taken.
    """

    def decorate(builder: HeadBuilder) -> HeadBuilder:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is already registered (by {_HEADS[name].__module__})")
        _HEADS[name] = builder
        return builder

    return decorate


def unregister_head(name: str) -> HeadBuilder:
    """Remove a head (a test's or a plugin's); returns its builder. ``KeyError`` if unknown."""
    return _HEADS.pop(name)


# --------------------------------------------------------------------------- helpers
def _as_margins(m: float | Sequence[float] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Scalar or per-class margin → (C,) float32 tensor (validated: finite and ≥ 0)."""
    t = torch.as_tensor(m.detach().cpu() if isinstance(m, torch.Tensor) else m, dtype=torch.float64)
    if t.dim() == 0:
        t = t.expand(num_classes)
    elif t.shape != (num_classes,):
        raise ValueError(f"margin must be a scalar or have shape ({num_classes},), got {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any():
        bad = int(torch.nonzero(~torch.isfinite(t) | (t < 0))[0])
        raise ValueError(f"margins must be finite and >= 0; class {bad} has {t[bad].item()}")
    return t.to(torch.float32).clone()


def _as_counts(counts: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per-class image counts → (C,) float64 tensor; every count must be ≥ 1."""
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu()
    c = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    if c.dim() != 1 or c.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {tuple(c.shape)}")
    bad = ~torch.isfinite(c) | (c < 1)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"class counts must be >= 1; class {i} has count {c[i].item():g}")
    return c


class _MarginHead(nn.Module):
    """Shared part of the cosine heads: ``k`` sub-centres per class and per-class margins.

    Args:
        in_features: embedding size D.
        num_classes: number of classes C.
        s: logit scale.
        m: margin, a scalar or one value per class (C,).
        k: sub-centres per class (1: a single centre per class).
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0,
                 m: float | Sequence[float] | torch.Tensor = 0.3, k: int = 1):
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
        if k < 1:
            raise ValueError(f"k (sub-centres per class) must be >= 1, got {k}")
        self.in_features, self.num_classes, self.k, self.s = in_features, num_classes, int(k), float(s)
        #: (C·k, D) class centres, class-major: rows ``c·k … c·k + k − 1`` belong to class ``c``
        self.weight = nn.Parameter(torch.empty(num_classes * self.k, in_features))
        nn.init.xavier_uniform_(self.weight)
        #: (C,) float32 per-class margins (a scalar margin is broadcast), saved in the state dict
        self.margins = nn.Buffer(_as_margins(m, num_classes))

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """Cosine to each class.

        Computed in float32 (autocast is disabled inside) with the embeddings and centres
        L2-normalised; with ``k > 1`` each class takes its closest sub-centre.

        Args:
            emb: (B, D) embeddings (need not be normalised).

        Returns:
            (B, C) cosines, the maximum over each class's ``k`` sub-centre cosines.
        """
        with torch.autocast(device_type=emb.device.type, enabled=False):
            cos = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))
        if self.k > 1:
            cos = cos.view(cos.shape[0], self.num_classes, self.k).max(dim=-1).values
        return cos

    def _target_margins(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) labels → (B,) float32 margins of each sample's target class."""
        return self.margins[labels]

    def _targets(self, emb: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cos (B, C), labels (B, 1), target cosines (B,), target margins (B,))``."""
        cos = self.cosine(emb)
        labels = labels.long().view(-1, 1)
        return cos, labels, cos.gather(1, labels).squeeze(1), self._target_margins(labels.squeeze(1))

    def _with_targets(self, cos: torch.Tensor, labels: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``s · cos`` with each row's target column replaced by ``s · phi``."""
        return (self.s * cos).scatter(1, labels, (self.s * phi).unsqueeze(1))

    def _margin_range(self) -> str:
        lo, hi = self.margins.min().item(), self.margins.max().item()
        return f"m={lo:g}" if lo == hi else f"m=[{lo:.4g}, {hi:.4g}]"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, k={self.k}, "
                f"s={self.s:g}, {self._margin_range()}")


# --------------------------------------------------------------------------- heads
class ArcFace(_MarginHead):
    """Additive angular margin head (ArcFace), optionally with sub-centres.

    ``logits = s · cos(θ_y + m_y)`` for the target class ``y`` and ``s · cos θ_j`` elsewhere,
    where ``cos θ_j`` is the cosine between the embedding and class ``j`` (its closest
    sub-centre when ``k > 1``). Where ``θ_y + m_y`` would pass π (``cos θ_y ≤ cos(π − m_y)``)
    the target logit falls back to ``s · (cos θ_y − sin(π − m_y) · m_y)`` so it keeps
    decreasing with θ. With ``m = 0`` the head reduces exactly to ``s · cos θ``.

    Args:
        in_features: embedding size D.
        num_classes: number of classes C.
        s: logit scale.
        m: additive angular margin in radians: a scalar, or one value per class (C,) for
            dynamic margins (see :func:`dynamic_margins`). Stored as the ``margins`` buffer.
        k: sub-centres per class (1: plain ArcFace; 3 in sub-center ArcFace).
        easy_margin: apply the margin only where ``cos θ_y > 0`` (no fallback branch).
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0,
                 m: float | Sequence[float] | torch.Tensor = 0.3, k: int = 1, easy_margin: bool = False):
        super().__init__(in_features, num_classes, s=s, m=m, k=k)
        self.easy_margin = bool(easy_margin)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Margin logits.

        Args:
            emb: (B, D) embeddings.
            labels: (B,) int class indices in ``[0, C)``; ``None`` for plain ``s · cos`` logits
                (evaluation).

        Returns:
            (B, C) float32 logits.
        """
        if labels is None:
            return self.s * self.cosine(emb)
        cos, labels, c, m = self._targets(emb, labels)
        m = m.double()
        cos_m, sin_m = torch.cos(m).float(), torch.sin(m).float()
        sin = (1.0 - c.pow(2)).clamp(min=1e-9).sqrt()
        phi = c * cos_m - sin * sin_m                              # cos(θ + m)
        if self.easy_margin:
            phi = torch.where(c > 0, phi, c)
        else:
            th = torch.cos(math.pi - m).float()                    # beyond θ + m > π …
            mm = (torch.sin(math.pi - m) * m).float()              # … fall back to a CosFace-like form
            phi = torch.where(c > th, phi, c - mm)
        return self._with_targets(cos, labels, phi)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", easy_margin=True" if self.easy_margin else "")


class CosFace(_MarginHead):
    """Large margin cosine head (CosFace), optionally with sub-centres.

    ``logits = s · (cos θ_j − m_y · [j = y])``: the margin is subtracted from the target
    cosine only.

    Args:
        in_features: embedding size D.
        num_classes: number of classes C.
        s: logit scale.
        m: additive cosine margin: a scalar, or one value per class (C,). Stored as the
            ``margins`` buffer.
        k: sub-centres per class.
    """

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Margin logits.

        Args:
            emb: (B, D) embeddings.
            labels: (B,) int class indices in ``[0, C)``; ``None`` for plain ``s · cos`` logits.

        Returns:
            (B, C) float32 logits.
        """
        if labels is None:
            return self.s * self.cosine(emb)
        cos, labels, c, m = self._targets(emb, labels)
        return self._with_targets(cos, labels, c - m)


# --------------------------------------------------------------------------- class statistics
def dynamic_margins(counts: Sequence[int] | np.ndarray | torch.Tensor, a: float = 0.45, b: float = 0.05,
                    scaling: str = "minmax") -> torch.Tensor:
    """Per-class margins that grow as classes get rarer (1st place GLR2021, Henkel & Singer).

    With ``t = count^(-1/4)``:

    * ``scaling="raw"``: ``m = a · t + b``;
    * ``scaling="minmax"`` (their code): ``m = a · (t − min t) / (max t − min t) + b``, so the
      margins span ``[b, a + b]`` (the rarest class gets ``a + b``, the largest ``b``). When
      every count is equal the range is empty and every margin is ``b``.

    Args:
        counts: (C,) training images per class, each ≥ 1.
        a: margin span (minmax) or slope (raw).
        b: margin offset (the smallest margin under minmax).
        scaling: ``"minmax"`` or ``"raw"``.

    Returns:
        (C,) float32 margins.

    Raises:
        ValueError: a count below 1 (the message names the first such class index), or an
            unknown ``scaling``.
    """
    c = _as_counts(counts)
    t = c.pow(-0.25)
    if scaling == "raw":
        m = a * t + b
    elif scaling == "minmax":
        span = t.max() - t.min()
        unit = (t - t.min()) / span if span > 0 else torch.zeros_like(t)
        m = a * unit + b
    else:
        raise ValueError(f"unknown scaling {scaling!r}; expected 'minmax' or 'raw'")
    return m.to(torch.float32)


def class_weights(counts: Sequence[int] | np.ndarray | torch.Tensor, power: float = 0.25) -> torch.Tensor:
    """Per-class loss weights ``w_c ∝ count_c^(-power)`` (rarer classes weigh more).

    The weights are normalised so that the image-weighted mean weight is 1,
    ``Σ count_c · w_c / Σ count_c = 1``: averaged over the training images the loss keeps the
    scale of the unweighted loss, so the learning rate needs no retuning. ``power = 0`` gives
    all ones.

    Args:
        counts: (C,) training images per class, each ≥ 1.
        power: exponent (0.25 in several GLDv2 solutions).

    Returns:
        (C,) float32 weights, e.g. for ``F.cross_entropy(..., weight=w)``.

    Raises:
        ValueError: a count below 1 (the message names the first such class index).
    """
    c = _as_counts(counts)
    w = c.pow(-float(power))
    w = w * (c.sum() / (c * w).sum())
    return w.to(torch.float32)


# --------------------------------------------------------------------------- factory
@register_head("arcface")
def _arcface(in_features: int, num_classes: int, s: float, m: float | torch.Tensor, k: int,
             easy_margin: bool) -> nn.Module:
    """:class:`ArcFace` with one centre per class (``k`` unused)."""
    return ArcFace(in_features, num_classes, s=s, m=m, k=1, easy_margin=easy_margin)


@register_head("subcenter_arcface")
def _subcenter_arcface(in_features: int, num_classes: int, s: float, m: float | torch.Tensor, k: int,
                       easy_margin: bool) -> nn.Module:
    """:class:`ArcFace` with ``k`` sub-centres per class."""
    return ArcFace(in_features, num_classes, s=s, m=m, k=int(k), easy_margin=easy_margin)


@register_head("cosface")
def _cosface(in_features: int, num_classes: int, s: float, m: float | torch.Tensor, k: int,
             easy_margin: bool) -> nn.Module:
    """:class:`CosFace` with one centre per class (``k`` unused; no ``easy_margin``)."""
    if easy_margin:
        raise ValueError("easy_margin applies to ArcFace heads only, not cosface")
    return CosFace(in_features, num_classes, s=s, m=m, k=1)


def build_head(kind: str, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.3, k: int = 3,
               dynamic_margin: bool = False, margin_a: float = 0.45, margin_b: float = 0.05,
               counts: Sequence[int] | np.ndarray | torch.Tensor | None = None,
               easy_margin: bool = False) -> nn.Module:
    """Build a margin head by name, from the head registry (:func:`register_head`).

    ``"arcface"`` is :class:`ArcFace` with one centre per class, ``"subcenter_arcface"`` is
    :class:`ArcFace` with ``k`` sub-centres, ``"cosface"`` is :class:`CosFace` with one centre
    per class (``k`` is used by ``"subcenter_arcface"`` only).

    The head gets an attribute ``head_args``: a JSON-serialisable dict with ``kind``, ``s``,
    ``m``, ``k`` (the effective number of sub-centres), ``dynamic_margin``, ``margin_a``,
    ``margin_b`` and ``easy_margin``, so that
    ``build_head(**head_args, in_features=D, num_classes=C, counts=counts)`` rebuilds it.

    Args:
        kind: one of :data:`HEADS`.
        in_features: embedding size D.
        num_classes: number of classes C.
        s: logit scale.
        m: scalar margin (unused when ``dynamic_margin``).
        k: sub-centres per class for ``"subcenter_arcface"``.
        dynamic_margin: use ``dynamic_margins(counts, margin_a, margin_b)`` (minmax scaling)
            as per-class margins instead of ``m``.
        margin_a, margin_b: see :func:`dynamic_margins`.
        counts: (C,) training images per class; required when ``dynamic_margin``.
        easy_margin: ArcFace ``easy_margin`` (not available for CosFace).

    Raises:
        InputError: unknown ``kind`` (the message lists the known ones; a ``ValueError``).
        ValueError: ``dynamic_margin`` without ``counts`` (or with counts of the wrong
            length), or ``easy_margin`` with ``"cosface"``.
    """
    builder = _HEADS.get(kind)
    if builder is None:
        raise InputError(f"unknown head kind {kind!r}; expected one of {', '.join(HEADS)}")
    if dynamic_margin:
        if counts is None:
            raise ValueError("dynamic_margin=True needs the per-class train image counts (counts=)")
        margin: float | torch.Tensor = dynamic_margins(counts, margin_a, margin_b)
        if margin.shape != (num_classes,):
            raise ValueError(f"counts has {margin.numel()} classes, the head {num_classes}")
    else:
        margin = float(m)
    head = builder(in_features, num_classes, s, margin, k, easy_margin)
    head.head_args = dict(kind=kind, s=float(s), m=float(m), k=int(getattr(head, "k", 1)),
                          dynamic_margin=bool(dynamic_margin), margin_a=float(margin_a),
                          margin_b=float(margin_b), easy_margin=bool(easy_margin))
    return head


# --------------------------------------------------------------------------- staged training
def expand_head_state(old_state: dict[str, torch.Tensor], old_label_map: dict[int, int], new_head: nn.Module,
                      new_label_map: dict[int, int]) -> int:
    """Copy the class centres of a trained head into a head over a larger class set.

    For staged training (GLDv2-clean's 81k classes, then GLDv2-full's 203k): for every
    landmark id in both label maps, that class's ``k`` rows of ``old_state["weight"]`` are
    copied into ``new_head.weight`` in place; classes only in the new map keep their fresh
    initialisation. The ``margins`` buffer is not copied (recompute it for the new counts).

    Args:
        old_state: the old head's state dict (needs ``"weight"``, shape (C_old·k, D)).
        old_label_map: landmark id → class index of the old head.
        new_head: the new head (an :class:`ArcFace` / :class:`CosFace`), modified in place.
        new_label_map: landmark id → class index of the new head.

    Returns:
        The number of classes copied.

    Raises:
        ValueError: ``old_state`` has no ``weight``; the old row count is not a multiple of
            ``len(old_label_map)``; the row width (D) or ``k`` differs from the new head's; or a
            label map's indices fall outside its head.
    """
    if "weight" not in old_state:
        raise ValueError("old head state has no 'weight'")
    old_w = old_state["weight"]
    new_w = new_head.weight
    if old_w.dim() != 2 or not old_label_map:
        raise ValueError(f"old weight must be 2-D with a non-empty label map, got {tuple(old_w.shape)} "
                         f"and {len(old_label_map)} classes")
    if old_w.shape[1] != new_w.shape[1]:
        raise ValueError(f"embedding size differs: old head {old_w.shape[1]}, new head {new_w.shape[1]}")
    n_old = len(old_label_map)
    if old_w.shape[0] % n_old:
        raise ValueError(f"old weight has {old_w.shape[0]} rows, not a multiple of its {n_old} classes")
    k_old = old_w.shape[0] // n_old
    k_new = int(getattr(new_head, "k", new_w.shape[0] // max(1, len(new_label_map))))
    if k_old != k_new:
        raise ValueError(f"sub-centres per class differ: old head k={k_old}, new head k={k_new}")
    n_new = new_w.shape[0] // k_new
    for name, lmap, n in (("old", old_label_map, n_old), ("new", new_label_map, n_new)):
        if lmap and (min(lmap.values()) < 0 or max(lmap.values()) >= n):
            raise ValueError(f"{name} label map has class indices outside [0, {n})")
    shared = [lid for lid in new_label_map if lid in old_label_map]
    if not shared:
        return 0
    sub = torch.arange(k_new)
    old_rows = (torch.tensor([old_label_map[i] for i in shared]).unsqueeze(1) * k_new + sub).flatten()
    new_rows = (torch.tensor([new_label_map[i] for i in shared]).unsqueeze(1) * k_new + sub).flatten()
    with torch.no_grad():
        new_w[new_rows.to(new_w.device)] = old_w[old_rows.to(old_w.device)].to(device=new_w.device,
                                                                                 dtype=new_w.dtype)
    return len(shared)
