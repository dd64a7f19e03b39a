"""The inference chain: load and embed an ensemble -> search -> post-process -> rows.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from glr.arrays import ArrayRows
from glr.embed.store import ShardedEmbeddings, open_embeddings
from glr.postprocess.expansion import qe_dba_joint
from glr.search import knn
from glr.submission import retrieval_rows, write_submission
from glr.utils import InputError

log = logging.getLogger(__name__)

def search_embeddings(query: str | os.PathLike, index: str | os.PathLike, out: str | os.PathLike,
                      k: int = 100, expansion: tuple[int, float] | None = None,
                      work: str | os.PathLike | None = None, backend: str = "auto",
                      progress: bool = True) -> dict[str, Any]:
    """Retrieval submission from saved embeddings, the index read shard by shard.

    ``query`` and ``index`` are ``.npz`` files (:func:`glr.embeddings.save_embeddings`) or
    sharded stores (``glr embed --shards``); a store is never loaded whole: the kNN runs over
    its shards and joint αQE+DBA (``expansion = (k, α)``) writes the expanded index as a new
    store in ``work`` (default: ``<out>.work/``). Queries whose image was unreadable get an
    empty row; unreadable index images are never returned. ``out`` is written atomically,
    so an earlier file there stays whole if anything fails.

    Returns:
        ``{"queries", "index", "unreadable_queries", "unreadable_index", "seconds", "out"}``.
    """

    t0 = time.perf_counter()
    out = Path(out)
    q_ids, q = open_embeddings(query)
    db_ids, db = open_embeddings(index)
    # zero rows of an .npz are unreadable images too (glr cv's convention)
    q_ok = q.ok if isinstance(q, ShardedEmbeddings) else np.linalg.norm(q, axis=1) > 0
    db_ok = db.ok if isinstance(db, ShardedEmbeddings) else np.linalg.norm(db, axis=1) > 0
    if not isinstance(db, ShardedEmbeddings) and not db_ok.all():
        db = ArrayRows(db, ok=db_ok)  # searched without its unreadable rows
    q = q.to_array() if isinstance(q, ShardedEmbeddings) else q  # the queries fit in memory (118k × D)
    if len(q_ids) and len(db_ids) and q.shape[1] != db.shape[1]:
        raise InputError(f"query embeddings are {q.shape[1]}-d, index embeddings {db.shape[1]}-d "
                         "(embedded by different models?)", index)
    if expansion is not None and len(q_ids) and len(db_ids):
        ek, alpha = expansion
        dest = None
        if isinstance(db, ShardedEmbeddings):
            dest = Path(work) if work is not None else out.parent / f"{out.name}.work"
            dest = dest / "index_qe_dba"
            if dest.exists():
                import shutil  # noqa: PLC0415

                shutil.rmtree(dest)  # derived data of an earlier run of this command
        q, db = qe_dba_joint(q, db, k=int(ek), alpha=float(alpha), qe=True, dba=True, backend=backend, out=dest)
    I = (knn(q, db, k, backend=backend, progress=progress)[1] if len(q_ids) and len(db_ids)
         else np.full((len(q_ids), 0), -1, np.int64))
    I[~q_ok] = -1
    rows = retrieval_rows(q_ids, db_ids, I)
    write_submission(out, rows, "retrieval", expected_ids=q_ids, index_ids=db_ids)
    return {"queries": len(q_ids), "index": len(db_ids), "unreadable_queries": int((~q_ok).sum()),
            "unreadable_index": int((~db_ok).sum()), "seconds": round(time.perf_counter() - t0, 2),
            "out": str(out)}
