"""Resumable sharded extraction: a split embedded shard by shard into a store (``glr embed --shards``).

Each shard is committed atomically (:mod:`glr.embeddings.store`); a killed job rerun computes only the
missing shards. Shard ``s`` belongs to worker ``s % WORLD_SIZE`` (torchrun / SLURM), no collective.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from glr.embeddings.store import DEFAULT_SHARD_SIZE, _scan, _shard_rows, clean_temporaries, create_store, write_shard
from glr.utils import InputError

log = logging.getLogger(__name__)

def extract_shards(embed: Callable[[list[str]], tuple[np.ndarray, np.ndarray]],
                   ids: Sequence[str], out: str | os.PathLike, dim: int, dtype: str = "float16",
                   shard_size: int = DEFAULT_SHARD_SIZE, info: Mapping[str, Any] | None = None,
                   rank: int = 0, world: int = 1, progress: bool = True,
                   on_shard: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Embed ``ids`` into the store ``out`` shard by shard, resuming what an earlier run left.

    Args:
        embed: ``ids → (emb (n, dim) float32, ok (n,) bool)`` for one shard's ids (``ok`` False:
            the image could not be read; it is recorded in the shard as unreadable).
        ids: every id of the job, in row order.
        out: the store folder (created, or resumed when it holds the same job).
        dim, dtype, shard_size, info: see :func:`create_store`.
        rank, world: this worker computes the missing shards ``s`` with ``s % world == rank``.
        on_shard: called ``(shard, shards written by this call)`` after each shard is committed.

    Returns:
        ``{"shards": total, "present": already complete, "computed": by this call,
        "missing": still missing (other workers' shards), "unreadable": failed images in
        this call's shards, "seconds": time}``.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    if not (0 <= rank < world):
        raise InputError(f"rank must lie in [0, {world}), got {rank}")
    t0 = time.perf_counter()
    out = Path(out)
    ids = [str(i) for i in ids]
    manifest = create_store(out, ids, dim, dtype, shard_size, info)
    leftovers = clean_temporaries(out) if world == 1 else 0  # several workers: a temp may be alive
    status = _scan(out, manifest, ids)
    mine = [s for s in status["missing"] if s % world == rank]
    present = manifest["num_shards"] - len(status["missing"])
    if present or leftovers:
        log.info("%s: %d of %d shards already written%s; computing %d", out, present, manifest["num_shards"],
                 f" ({leftovers} temporary files of a killed run removed)" if leftovers else "", len(mine))
    unreadable = 0
    bar = tqdm(total=len(mine), desc=f"shards {out.name}", unit="shard", disable=not progress)
    try:
        for n_done, s in enumerate(mine, 1):
            ts = time.perf_counter()
            a = s * int(manifest["shard_size"])
            chunk = ids[a:a + _shard_rows(len(ids), int(manifest["shard_size"]), s)]
            emb, ok = embed(chunk)
            emb = np.asarray(emb, np.float32)
            if len(chunk) and emb.shape != (len(chunk), int(dim)):
                raise ValueError(f"the embedder returned {emb.shape} for {len(chunk)} ids of dim {dim}")
            failed = {chunk[j]: "unreadable" for j in np.flatnonzero(~np.asarray(ok, bool))}
            unreadable += len(failed)
            write_shard(out, manifest, ids, s, emb, failed, time.perf_counter() - ts)
            bar.update(1)
            if on_shard is not None:
                on_shard(s, n_done)
    finally:
        bar.close()
    return {"shards": manifest["num_shards"], "present": present, "computed": len(mine),
            "missing": len(status["missing"]) - len(mine),
            "unreadable": unreadable, "seconds": round(time.perf_counter() - t0, 3)}
