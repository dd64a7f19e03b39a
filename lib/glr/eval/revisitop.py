"""Revisited Oxford and Paris (Radenović et al., CVPR 2018): the academic evaluation of the GLDv2 paper's Table 3.

Ground truth is revisitop's ``gnd_<dataset>.pkl``: ``imlist`` (database image names),
``qimlist`` (query names) and ``gnd``, one dict per query with 0-based database indices
``easy``, ``hard``, ``junk`` and the query box ``bbx`` (x1, y1, x2, y2; queries are cropped to
it before extraction). Images are ``<root>/jpg/<name>.jpg``.

Scores follow ``GLDV2_SPEC.md`` section 6, i.e. revisitop's ``compute_map``: per protocol
(Easy: ok = easy, junk + hard ignored; Medium: ok = easy + hard, junk ignored; Hard: ok = hard,
junk + easy ignored) the AP is the trapezoid rule over the ranks of the positives after
removing the ignored images before them, divided by ``|ok|``; mP@k uses the last positive's
rank when that comes before k. Queries without positives are left out of every mean. Where the
reference crashes we decide: a query whose positives are all missing from a truncated ranking
gets P@k = 0 (the reference raises ``ValueError``), and no query with positives at all raises
:class:`~glr.utils.InputError` (the reference divides by zero).
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from glr.data.images import IMAGENET_MEAN, IMAGENET_STD, load_image, make_transforms, preprocessing
from glr.embeddings.extract import extract_embeddings
from glr.postprocess.expansion import combine_embeddings
from glr.predict import load_member
from glr.search import knn
from glr.utils import InputError

PROTOCOLS = {"easy": (("easy",), ("junk", "hard")),
             "medium": (("easy", "hard"), ("junk",)),
             "hard": (("hard",), ("junk", "easy"))}
KAPPAS = (1, 5, 10)


#: The only globals a ground-truth pickle may name: numpy's array and scalar reconstruction.
_PICKLE_GLOBALS = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                   for n in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _DataUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dicts, lists, strings, numbers, numpy arrays): a pickle that
    names any other callable is refused before anything of it runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a ground-truth file holds data only")
        return super().find_class(module, name)


def read_gnd(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``gnd_<dataset>.pkl``; checks the keys and that every index is inside ``imlist``.

    Only plain data is unpickled (:class:`_DataUnpickler`): a file naming any other callable is an
    :class:`~glr.utils.InputError`, and nothing of it runs.

    Returns:
        ``{"imlist": [...], "qimlist": [...], "gnd": [{"easy", "hard", "junk", "bbx"}, ...]}``
        with index lists as int arrays (a missing ``junk`` is empty, a missing ``bbx`` None).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            cfg = _DataUnpickler(f).load()
    except FileNotFoundError:
        raise InputError("revisitop ground truth not found", path) from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign pickle
        raise InputError(f"cannot read revisitop ground truth ({type(e).__name__}: {e})", path) from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise InputError("expected a dict with imlist, qimlist and gnd (revisitop's gnd_*.pkl)", path)
    n_db, queries = len(cfg["imlist"]), cfg["gnd"]
    if len(queries) != len(cfg["qimlist"]):
        raise InputError(f"{len(cfg['qimlist'])} query names but {len(queries)} ground-truth entries", path)
    out = []
    for q, g in enumerate(queries):
        if not isinstance(g, Mapping) or not ({"easy", "hard"} <= set(g) or "ok" in g):
            raise InputError(f"query {q}: expected easy and hard index lists", path)
        entry: dict[str, Any] = {"bbx": g.get("bbx")}
        for key in ("easy", "hard", "junk", "ok"):
            if key not in g:
                continue
            idx = np.asarray(g[key], dtype=np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= n_db):
                raise InputError(f"query {q}: {key} holds an index outside 0..{n_db - 1}", path)
            entry[key] = idx
        entry.setdefault("junk", np.zeros(0, np.int64))
        out.append(entry)
    return {"imlist": [str(x) for x in cfg["imlist"]], "qimlist": [str(x) for x in cfg["qimlist"]], "gnd": out}


def compute_ap(ranks: np.ndarray, nres: int) -> float:
    """AP of one query by the trapezoid rule: ``ranks`` are the 0-based positions of its
    positives (junk removed), sorted; ``nres`` the number of positives."""
    ap = 0.0
    step = 1.0 / nres
    for j, r in enumerate(np.asarray(ranks).tolist()):
        precision_0 = 1.0 if r == 0 else j / r
        precision_1 = (j + 1) / (r + 1)
        ap += (precision_0 + precision_1) * step / 2.0
    return ap


def compute_map(ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = ()
                ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop's ``compute_map``.

    Args:
        ranks: (n_ranked, n_queries) int: column q is query q's database indices, best first.
        gnd: per query ``ok`` (positives) and optionally ``junk`` (ignored) index arrays.
        kappas: the k of mP@k.

    Returns:
        ``(map, aps, pr, prs)``: mean AP over queries with positives; per-query AP (NaN for
        queries without positives); mP@k (len(kappas),); per-query P@k (NaN rows likewise).
    """
    ranks = np.asarray(ranks)
    nq = len(gnd)
    if ranks.ndim != 2 or ranks.shape[1] != nq:
        raise ValueError(f"ranks must be (n_ranked, {nq}), got {ranks.shape}")
    kappas = [int(k) for k in kappas]
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for q in range(nq):
        ok = np.asarray(gnd[q]["ok"], np.int64)
        if ok.size == 0:
            continue
        junk = np.asarray(gnd[q].get("junk", ()), np.int64)
        col = ranks[:, q]
        pos = np.flatnonzero(np.isin(col, ok))
        junk_pos = np.flatnonzero(np.isin(col, junk))
        # junk positions strictly before each positive; an index both ok and junk counts as a
        # positive and does not push itself down (it does push later positives, as in the reference)
        adjusted = pos - np.searchsorted(junk_pos, pos, side="left")
        aps[q] = compute_ap(adjusted, len(ok))
        if kappas:
            if adjusted.size == 0:
                prs[q] = 0.0  # the reference raises here (max of an empty array)
                continue
            pos1 = adjusted + 1
            for j, k in enumerate(kappas):
                cut = min(int(pos1.max()), k)
                prs[q, j] = (pos1 <= cut).sum() / cut
    valid = ~np.isnan(aps)
    if not valid.any():
        raise InputError("no query has positives under this protocol: nothing to average")
    pr = prs[valid].mean(axis=0) if kappas else np.zeros(0)
    return float(aps[valid].mean()), aps, pr, prs


def protocol_gnd(gnd: Sequence[Mapping[str, Any]], protocol: str) -> list[dict[str, np.ndarray]]:
    """The ``ok`` / ``junk`` lists of one protocol (easy, medium, hard)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    ok_keys, junk_keys = PROTOCOLS[protocol]
    out = []
    for g in gnd:
        ok = np.concatenate([np.asarray(g.get(k, ()), np.int64) for k in ok_keys])
        junk = np.concatenate([np.asarray(g.get(k, ()), np.int64) for k in junk_keys])
        out.append({"ok": ok, "junk": junk})
    return out


def evaluate(ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = KAPPAS
             ) -> dict[str, dict[str, Any]]:
    """Easy, Medium and Hard mAP and mP@k (fractions, not percent) of a ranking.

    Args:
        ranks: (n_ranked, n_queries) database indices, best first (revisitop's layout);
            a (n_queries, k) ``I`` from :func:`glr.search.knn` is ``I.T``.
    """
    out = {}
    for protocol in PROTOCOLS:
        m, aps, pr, _ = compute_map(ranks, protocol_gnd(gnd, protocol), kappas)
        out[protocol] = {"map": m, "mp@k": {int(k): float(v) for k, v in zip(kappas, pr)},
                         "n_queries": int((~np.isnan(aps)).sum())}
    return out


def format_result(result: Mapping[str, Mapping[str, Any]], name: str = "") -> str:
    """revisitop's report lines, in percent with 2 decimals."""
    head = f"{name}: " if name else ""
    lines = [head + "mAP E: {:.2f}, M: {:.2f}, H: {:.2f}".format(
        *(100 * result[p]["map"] for p in ("easy", "medium", "hard")))]
    ks = list(result["easy"]["mp@k"])
    for p, short in (("easy", "E"), ("medium", "M"), ("hard", "H")):
        vals = " ".join(f"{100 * result[p]['mp@k'][k]:.2f}" for k in ks)
        lines.append(f"{head}mP@k{ks} {short}: [{vals}]")
    return "\n".join(lines)


# --------------------------------------------------------------------------- with a model
def _crop_box(bbx: Any) -> tuple[int, int, int, int] | None:
    if bbx is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in bbx)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        return None
    return int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2))


def embed_images_at(net: Any, paths: Sequence[Path], image_size: int, boxes: Sequence[Any] | None = None,
                    batch_size: int = 32, progress: bool = True, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, interpolation: str = "bilinear",
                    crop_pct: float = 1.0) -> np.ndarray:
    """Embed image files (cropped to ``boxes`` when given) at ``image_size``; (N, D) float32
    (preprocessing as :func:`glr.data.images.make_transforms`; default: ImageNet's mean / std, bilinear
    square resize)."""
    import torch  # noqa: PLC0415
    from torch.utils.data import DataLoader, Dataset  # noqa: PLC0415

    transform = make_transforms(image_size, train=False, mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD,
                                interpolation=interpolation, crop_pct=crop_pct)

    class _Files(Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> dict[str, Any]:
            im = load_image(paths[i])
            box = _crop_box(boxes[i]) if boxes is not None else None
            if box is not None:
                im = im.crop(box)
            return {"image": transform(im), "index": i}

    loader = DataLoader(_Files(), batch_size=batch_size, shuffle=False, num_workers=0,
                        pin_memory=torch.cuda.is_available())
    return extract_embeddings(net, loader, progress=progress, desc="embed")


def evaluate_model(root: str | os.PathLike, gnd_path: str | os.PathLike, artifacts: Sequence[str | os.PathLike],
                   image_size: int | None = None, batch_size: int = 32, kappas: Sequence[int] = KAPPAS,
                   progress: bool = True) -> dict[str, Any]:
    """Embed a revisitop dataset (queries cropped to their boxes) with one model or an ensemble
    (blocks concatenated as in :func:`glr.postprocess.expansion.combine_embeddings`), rank the
    whole database by cosine similarity and score Easy / Medium / Hard."""

    cfg = read_gnd(gnd_path)
    jpg = Path(root) / "jpg"
    db_paths = [jpg / f"{n}.jpg" for n in cfg["imlist"]]
    q_paths = [jpg / f"{n}.jpg" for n in cfg["qimlist"]]
    missing = [p for p in db_paths + q_paths if not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} images of the ground truth are missing (e.g. {missing[0].name})", jpg)
    q_blocks, db_blocks = [], []
    for a in artifacts:
        m = load_member(a, image_size=image_size)
        kw = dict(batch_size=batch_size, progress=progress, **preprocessing(m.data_config))
        db_blocks.append(embed_images_at(m.net, db_paths, m.size, **kw))
        q_blocks.append(embed_images_at(m.net, q_paths, m.size, boxes=[g["bbx"] for g in cfg["gnd"]], **kw))
    q, db = combine_embeddings(q_blocks), combine_embeddings(db_blocks)
    _, I = knn(q, db, k=len(db))
    result = evaluate(I.T, cfg["gnd"], kappas)
    return {"dataset": Path(gnd_path).stem.removeprefix("gnd_"), "n_db": len(db), "n_queries": len(q), **result}
