"""Sharded embedding stores: GLDv2-scale extraction that survives a kill, read without loading it all.

A store is a folder::

    manifest.json        format, rows, dim, dtype, shard size, ids hash, the job's fingerprint
    ids.txt              every id, one per line, in row order
    shard_00000.npy      (rows, D) float16 | float32 embedding rows of shard 0 (np.save format)
    shard_00000.json     shard 0's commit record: rows, unreadable ids with their errors, seconds
    …

Each shard file is written to a temporary name and renamed; the ``.json`` is renamed last and
is what says the shard is complete, so a job killed at any instant leaves complete shards and
at most some temporary files. :func:`extract_shards` run again on the same folder with the
same job recomputes only the shards without a valid commit record; the result is the same,
bit for bit, as an uninterrupted run (each shard is embedded from its own images alone).
Shard ``s`` belongs to worker ``s % world``, so ``torchrun``/SLURM processes each write their
own shards with no collective, and a resumed job may use another number of workers.

:class:`ShardedEmbeddings` reads a store through memory maps: :meth:`~ShardedEmbeddings.blocks`
yields one shard at a time as float32 and :meth:`~ShardedEmbeddings.take` gathers rows, so
:func:`glr.search.knn` and the αQE/DBA functions of :mod:`glr.postprocess.expansion` work on a
store with one shard in memory. :class:`ArrayRows` gives an in-memory array the same face.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from glr.embeddings.npz import load_embeddings
from glr.utils import InputError, atomic_write, read_json_object

log = logging.getLogger(__name__)

STORE_FORMAT = "glr-embedding-shards-v1"


DTYPES = ("float16", "float32")


DEFAULT_SHARD_SIZE = 50_000


def _shard_name(s: int) -> str:
    return f"shard_{s:05d}"


def _ids_sha256(ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _num_shards(n: int, shard_size: int) -> int:
    return -(-n // shard_size)


class ShardedEmbeddings:
    """A store folder opened for reading (memory-mapped shards; nothing loaded up front but the ids).

    Attributes:
        path: the folder. ids: row ids. dim: D. dtype: stored dtype name.
        shard_size: rows per shard (the last may be shorter). ok: (N,) bool, False for
        images that could not be read (their rows are zeros). failed: ``{id: error}``.
        info: the manifest's ``info`` (the job: model, split, image size, TTA…).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], ids: list[str], done: list[dict[str, Any]]):
        self.path = path
        self.manifest = manifest
        self.ids = ids
        self.dim = int(manifest["dim"])
        self.dtype = str(manifest["dtype"])
        self.shard_size = int(manifest["shard_size"])
        self.info = dict(manifest.get("info", {}))
        self.failed: dict[str, str] = {i: err for rec in done for i, err in rec.get("failed", {}).items()}
        self.ok = np.ones(len(ids), bool)
        if self.failed:
            self.ok[[r for r, i in enumerate(ids) if i in self.failed]] = False
        self._maps: dict[int, np.ndarray] = {}

    # ---- opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> "ShardedEmbeddings":
        """Open a complete store.

        Raises:
            InputError: not a store, a corrupt manifest / ids file, or shards missing (named,
                with the command that computes them).
        """
        path = Path(path)
        manifest, ids = _read_head(path)
        status = _scan(path, manifest, ids)
        if status["missing"]:
            miss = status["missing"]
            shown = ", ".join(_shard_name(s) for s in miss[:5]) + (", …" if len(miss) > 5 else "")
            raise InputError(f"{len(miss)} of {manifest['num_shards']} shards are not written ({shown}); "
                             "run the same extraction again to compute only those", path)
        return cls(path, manifest, ids, status["records"])

    # ---- sizes
    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ids), self.dim

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_shards(self) -> int:
        return _num_shards(len(self.ids), self.shard_size)

    def nbytes(self) -> int:
        """Bytes of the stored embeddings (as float32 in memory: ``N · D · 4``)."""
        return len(self.ids) * self.dim * np.dtype(self.dtype).itemsize

    # ---- reading
    def shard(self, s: int) -> np.ndarray:
        """Shard ``s`` as a read-only memory map, stored dtype, (rows, D)."""
        if s not in self._maps:
            self._maps[s] = np.load(self.path / f"{_shard_name(s)}.npy", mmap_mode="r")
        return self._maps[s]

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, (rows, D) float32)`` one shard at a time, in row order."""
        for s in range(self.num_shards):
            yield s * self.shard_size, np.array(self.shard(s), dtype=np.float32)  # a copy: writable, in memory

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any shape of int indices) → float32 ``rows.shape + (D,)``; reads only
        the pages holding them."""
        rows = np.asarray(rows, np.int64)
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self.ids)):
            raise IndexError(f"row indices must lie in [0, {len(self.ids)})")
        out = np.empty((len(flat), self.dim), np.float32)
        shard = flat // self.shard_size
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.shard(int(s))[flat[sel] - s * self.shard_size]
        return out.reshape(rows.shape + (self.dim,))

    def to_array(self) -> np.ndarray:
        """Every row as one (N, D) float32 array (loads the whole store)."""
        out = np.empty((len(self.ids), self.dim), np.float32)
        for a, block in self.blocks():
            out[a:a + len(block)] = block
        return out

    # ---- writing a derived store
    def write_like(self, path: str | os.PathLike, rows: Callable[[int, int], np.ndarray],
                   note: str) -> "ShardedEmbeddings":
        """A new store at ``path`` with this store's ids, dim, dtype and shard size, written shard
        by shard from ``rows(a, b)`` (the (b - a, D) float32 rows ``a:b``, e.g. a DBA of
        :mod:`glr.postprocess.expansion`); unreadable rows stay zero and flagged, ``note`` is
        appended to ``info["postprocess"]``. Returns the new store, opened."""
        info = {**self.info, "postprocess": [*self.info.get("postprocess", []), note]}
        manifest = create_store(path, self.ids, self.dim, self.dtype, self.shard_size, info, resume=False)
        for s in range(manifest["num_shards"]):
            a = s * self.shard_size
            b = min(len(self), a + self.shard_size)
            block = rows(a, b)
            block[~self.ok[a:b]] = 0.0
            failed = {self.ids[r]: self.failed.get(self.ids[r], "unreadable") for r in range(a, b) if not self.ok[r]}
            write_shard(path, manifest, self.ids, s, block, failed)
        return ShardedEmbeddings.open(path)


def _read_head(path: Path) -> tuple[dict[str, Any], list[str]]:
    if not path.is_dir():
        raise InputError("embedding store not found (expected a folder with manifest.json)", path)
    manifest = read_json_object(path / "manifest.json", "embedding store manifest")
    if manifest.get("format") != STORE_FORMAT:
        raise InputError(f"not a {STORE_FORMAT} manifest (format {manifest.get('format')!r})", path / "manifest.json")
    for key in ("rows", "dim", "dtype", "shard_size", "num_shards", "ids_sha256"):
        if key not in manifest:
            raise InputError(f"corrupt manifest: no {key!r}", path / "manifest.json")
    for key in ("rows", "dim", "shard_size", "num_shards"):
        value = manifest[key]
        low = 1 if key == "shard_size" else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"corrupt manifest: {key!r} is {value!r}, not an integer >= {low}", path / "manifest.json")
    if manifest["num_shards"] != _num_shards(manifest["rows"], manifest["shard_size"]):
        raise InputError(f"corrupt manifest: {manifest['num_shards']} shards of {manifest['shard_size']} rows cannot "
                         f"hold {manifest['rows']} rows", path / "manifest.json")
    if manifest["dtype"] not in DTYPES:
        raise InputError(f"unknown dtype {manifest['dtype']!r} (expected {' or '.join(DTYPES)})",
                         path / "manifest.json")
    ids_path = path / "ids.txt"
    try:
        ids = ids_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the ids ({e})", ids_path) from None
    if len(ids) != manifest["rows"] or _ids_sha256(ids) != manifest["ids_sha256"]:
        raise InputError(f"the ids file does not match the manifest ({len(ids)} ids, manifest says "
                         f"{manifest['rows']})", ids_path)
    return manifest, ids


def _shard_rows(n: int, shard_size: int, s: int) -> int:
    return min(shard_size, n - s * shard_size)


def _check_shard(path: Path, manifest: Mapping[str, Any], ids: Sequence[str], s: int) -> dict[str, Any] | None:
    """Shard ``s``'s commit record when the shard is complete and sound, else None (recompute it)."""
    name = _shard_name(s)
    rec_path, npy = path / f"{name}.json", path / f"{name}.npy"
    if not rec_path.is_file():
        return None
    rows = _shard_rows(len(ids), int(manifest["shard_size"]), s)
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
        arr = np.load(npy, mmap_mode="r")
        sound = (isinstance(rec, dict) and rec.get("rows") == rows and arr.shape == (rows, manifest["dim"])
                 and arr.dtype == np.dtype(manifest["dtype"]) and isinstance(rec.get("failed", {}), dict)
                 and rec.get("first_id") == ids[s * int(manifest["shard_size"])])
        if sound:
            names = set(ids[s * int(manifest["shard_size"]): s * int(manifest["shard_size"]) + rows])
            sound = all(i in names for i in rec.get("failed", {}))
    except (OSError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("%s: shard %s is unreadable (%s); it will be recomputed", path, name, e)
        return None
    if not sound:
        log.warning("%s: shard %s does not match the manifest; it will be recomputed", path, name)
        return None
    return rec


def _scan(path: Path, manifest: Mapping[str, Any], ids: Sequence[str]) -> dict[str, Any]:
    records, missing = [], []
    for s in range(int(manifest["num_shards"])):
        rec = _check_shard(path, manifest, ids, s)
        (missing.append(s) if rec is None else records.append(rec))
    return {"records": records, "missing": missing}


def open_embeddings(path: str | os.PathLike) -> tuple[list[str], Any]:
    """``(ids, rows)`` from an ``.npz`` (:func:`glr.embeddings.npz.save_embeddings`; rows an array)
    or a store folder (rows a :class:`ShardedEmbeddings`)."""
    path = Path(path)
    if path.is_dir():
        store = ShardedEmbeddings.open(path)
        return store.ids, store

    if not path.is_file():
        raise InputError("embeddings not found (an .npz file or a shard folder)", path)
    return load_embeddings(path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def create_store(path: str | os.PathLike, ids: Sequence[str], dim: int, dtype: str = "float16",
                 shard_size: int = DEFAULT_SHARD_SIZE, info: Mapping[str, Any] | None = None,
                 resume: bool = True) -> dict[str, Any]:
    """Create (or, with ``resume``, re-open) a store folder for ``ids``; returns its manifest.

    An existing store is resumed only when its ids, dim, dtype, shard size and ``info`` (the
    job: model hash, split, image size, TTA…) all equal the new ones; otherwise
    :class:`InputError` names the first difference and nothing is touched.
    """
    path = Path(path)
    ids = [str(i) for i in ids]
    if dtype not in DTYPES:
        raise InputError(f"dtype must be {' or '.join(DTYPES)}, got {dtype!r}")
    if isinstance(shard_size, bool) or int(shard_size) != shard_size or shard_size < 1:
        raise InputError(f"shard size must be an integer >= 1, got {shard_size!r}")
    bad = [i for i in ids if not i or "\n" in i or "\r" in i or i != i.strip()]
    if bad:
        raise InputError(f"ids cannot be empty or hold line breaks / outer spaces: {bad[0]!r}")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise InputError(f"duplicate id {dup!r} in the ids to embed")
    manifest = {"format": STORE_FORMAT, "rows": len(ids), "dim": int(dim), "dtype": dtype,
                "shard_size": int(shard_size), "num_shards": _num_shards(len(ids), int(shard_size)),
                "ids_sha256": _ids_sha256(ids), "info": json.loads(json.dumps(dict(info or {})))}
    if (path / "manifest.json").exists():
        old, _ = _read_head(path)
        if not resume:
            raise InputError("an embedding store is already here (resume it, or choose another folder)", path)
        for key in ("rows", "ids_sha256", "dim", "dtype", "shard_size", "info"):
            if old.get(key) != manifest[key]:
                raise InputError(f"this store was written by another job: {key} is {old.get(key)!r} here, "
                                 f"{manifest[key]!r} now (choose another folder, or delete this one)", path)
        return old
    # ids.txt alone: a creation killed before its manifest, or another worker creating it now
    if path.exists() and (not path.is_dir() or any(p for p in path.iterdir()
                                                   if not p.name.startswith(".") and p.name != "ids.txt")):
        raise InputError("the output exists and is not an embedding store; refusing to write into it", path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_write(path / "ids.txt", "w", encoding="utf-8") as f:
        f.writelines(i + "\n" for i in ids)
    _write_json(path / "manifest.json", manifest)  # last: a store is a store once its manifest exists
    return manifest


def write_shard(path: str | os.PathLike, manifest: Mapping[str, Any], ids: Sequence[str], s: int,
                emb: np.ndarray, failed: Mapping[str, str] | None = None, seconds: float = 0.0) -> None:
    """Write shard ``s`` (its rows ``emb``, (rows, D)) then its commit record, each atomically."""
    path = Path(path)
    rows = _shard_rows(len(ids), int(manifest["shard_size"]), s)
    emb = np.asarray(emb)
    if emb.shape != (rows, int(manifest["dim"])):
        raise ValueError(f"shard {s} must be ({rows}, {manifest['dim']}), got {emb.shape}")
    _save_npy(path / f"{_shard_name(s)}.npy", np.ascontiguousarray(emb, dtype=manifest["dtype"]))
    _write_json(path / f"{_shard_name(s)}.json",
                {"rows": rows, "first_id": ids[s * int(manifest["shard_size"])], "failed": dict(failed or {}),
                 "seconds": round(float(seconds), 3)})


def clean_temporaries(path: str | os.PathLike) -> int:
    """Remove the temporary files a killed writer left in a store folder; returns how many."""
    n = 0
    for p in Path(path).glob(".*.tmp"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def save_store(path: str | os.PathLike, ids: Sequence[str], emb: np.ndarray, dtype: str = "float32",
               shard_size: int = DEFAULT_SHARD_SIZE, info: Mapping[str, Any] | None = None,
               ok: np.ndarray | None = None) -> ShardedEmbeddings:
    """Write an in-memory (N, D) array as a new store (e.g. DBA'd rows); returns it opened."""
    emb = np.asarray(emb)
    if emb.ndim != 2 or len(emb) != len(ids):
        raise ValueError(f"{len(ids)} ids for embeddings of shape {emb.shape}")
    manifest = create_store(path, ids, emb.shape[1], dtype, shard_size, info, resume=False)
    ids = [str(i) for i in ids]
    for s in range(manifest["num_shards"]):
        a = s * int(shard_size)
        b = a + _shard_rows(len(ids), int(shard_size), s)
        failed = {} if ok is None else {ids[r]: "unreadable" for r in range(a, b) if not ok[r]}
        write_shard(path, manifest, ids, s, emb[a:b], failed)
    return ShardedEmbeddings.open(path)
