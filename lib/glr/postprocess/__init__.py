"""Post-processing: what happens between the embeddings and the submission.

Plain functions on float32 ``(N, D)`` arrays and ``(S, I)`` rankings (``S`` float32 scores,
higher is better, ``I`` int64 database rows, best first):

* :mod:`glr.postprocess.expansion`: ensemble combination, PCA whitening, αQE / DBA
  (the joint Kaggle form and the classic form of ``GLDV2_SPEC.md`` §5.1-5.2);
* :mod:`glr.postprocess.kreciprocal`: k-reciprocal re-ranking (§5.3), exact and scalable;
* :mod:`glr.postprocess.labels`: re-ranking through train-set neighbours (landmark–country
  aware re-ranking, train-label sort/insert, non-landmark penalty);
* :mod:`glr.postprocess.spatial`: local-feature spatial verification of the top results.

Each step of the chain is declared once, next to its numerics, with
:func:`glr.postprocess.registry.register_step`; :mod:`glr.postprocess.chain` runs them,
:mod:`glr.postprocess.config` reads and checks their settings, :mod:`glr.eval.sweep` tunes
them. The import below is the list of step modules: importing one registers its steps (a new
re-ranker is one new module plus its name here).
"""

from glr.postprocess import expansion, kreciprocal, labels, spatial  # noqa: F401  (the step modules)
