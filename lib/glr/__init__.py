"""glr: instance-level landmark retrieval and recognition on GLDv2.

The package is layered on the data's path, bottom to top: ``utils``, ``arrays``, ``metrics``,
``submission``, ``search``, ``data`` (readers, root, images, geo, synth), ``model``,
``postprocess``, ``embeddings``, ``predict`` (the one inference chain), ``eval``, ``train``
(the only importer of Lightning), ``workflows`` (cv, experiment, demo), ``report``, ``kaggle``
and ``cli``; a module only imports the layers below its own.

For notebooks, ``import glr`` gives the main entry points by name, each imported on first use
(PEP 562), so that ``import glr`` itself imports no torch and no ``glr`` module::

    glr.cv(root, out, ...)                 glr.workflows.cv.cv: embed, search, post-process, score
    glr.embed(members, root, splits)       glr.predict.embed_ensemble: an ensemble's (N, D) rows per split
    glr.knn(q, db, k)                      glr.search.knn: (S, I) of the k nearest rows
    glr.retrieve(q, db, config)            glr.postprocess.chain.retrieve: kNN + post-processing
    glr.score(task, solution, submission)  glr.metrics.score: the official GLDv2 metrics
    glr.search_embeddings(q, index, out)   glr.predict.search_embeddings: saved stores to a submission
    glr.demo(...)                          glr.workflows.demo.demo
    glr.report                             the glr.report module: figures (returned), tables, HTML page

Training is ``glr.train.fit.train`` (``glr.train`` is the package: a function of that name
would be shadowed as soon as the package is imported).
"""

import importlib as _importlib
from typing import Any as _Any

#: The one place the version is written: pyproject.toml reads it (``[tool.setuptools.dynamic]``), ``glr --version``
#: prints the installed distribution's (the same string once installed).
__version__ = "0.1.0"

#: Facade name -> (module, attribute; None: the module itself).
_LAZY: dict[str, tuple[str, str | None]] = {
    "cv": ("glr.workflows.cv", "cv"),
    "embed": ("glr.predict", "embed_ensemble"),
    "knn": ("glr.search", "knn"),
    "retrieve": ("glr.postprocess.chain", "retrieve"),
    "score": ("glr.metrics", "score"),
    "search_embeddings": ("glr.predict", "search_embeddings"),
    "demo": ("glr.workflows.demo", "demo"),
    "report": ("glr.report", None),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> _Any:
    """Import a facade name's module on first use and keep the value in the package namespace."""
    if name not in _LAZY:
        raise AttributeError(f"module 'glr' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = _importlib.import_module(module)
    if attr is not None:
        try:
            value = getattr(value, attr)
        except AttributeError:
            raise AttributeError(f"glr.{name}: {module} has no {attr!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The facade's names, the version and the submodules imported so far (tab completion)."""
    return sorted({n for n in globals() if not n.startswith("_")} | set(_LAZY) | {"__version__"})
