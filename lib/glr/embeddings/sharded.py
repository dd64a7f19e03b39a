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

from glr.data.root import GLDv2Root
from glr.embeddings.extract import embed_images
from glr.embeddings.store import DEFAULT_SHARD_SIZE, _scan, _shard_rows, clean_temporaries, create_store, write_shard
from glr.model.artifact import load_artifact
from glr.utils import InputError, file_sha256

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


def embed_to_shards(artifact: str | os.PathLike, root: str | os.PathLike, split: str, out: str | os.PathLike,
                    ids: Sequence[str] | None = None, image_size: int | None = None,
                    dtype: str = "float16", shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 64,
                    num_workers: int = 2, device: str | None = None, flip: bool = False,
                    scales: Sequence[float] = (1.0,), rank: int | None = None, world: int | None = None,
                    progress: bool = True,
                    on_shard: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Embed a split of a GLDv2 root with a model artifact into a resumable store.

    Unreadable images are recorded in their shard (zero rows, ``ok`` False) and counted; the
    job goes on. ``rank``/``world`` default to the ``RANK``/``WORLD_SIZE`` environment
    variables of ``torchrun`` / SLURM (``LOCAL_RANK`` picks the GPU), so ``torchrun
    --nproc-per-node 8 -m glr embed --shards …`` runs eight workers on disjoint shards.

    Returns:
        :func:`extract_shards`'s summary plus ``"path"``.
    """
    import torch  # noqa: PLC0415

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))) if world is None else world
    net, data_config, _ = load_artifact(artifact)
    ids = GLDv2Root.open(root).embedding_ids(split) if ids is None else [str(i) for i in ids]
    size = int(image_size or data_config["image_size"])
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    info = {"artifact_sha256": file_sha256(artifact), "split": split, "image_size": size, "flip": bool(flip),
            "scales": [float(s) for s in scales], "mean": list(data_config["mean"]), "std": list(data_config["std"])}
    dim = int(getattr(net, "embedding_size", 0)) or int(net(torch.zeros(1, 3, size, size)).shape[1])

    def embed(chunk: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return embed_images(net, root, split, chunk, size, batch_size, num_workers, device=device,
                            progress=False, flip=flip, scales=scales, mean=data_config["mean"],
                            std=data_config["std"], skip_unreadable=True)

    summary = extract_shards(embed, ids, out, dim, dtype, shard_size, info, rank, world, progress, on_shard)
    summary["path"] = str(out)
    return summary
