"""The post-processing step registry: every step declared once, in its own module.

A step is one :class:`Step`: its name (the key of a post-processing config), its typed
options with their defaults, the :class:`Context` fields it needs, its kind and position in
the chain, its label in sweep tables, how it describes a setting and how it is applied. The
chain (:mod:`glr.postprocess.chain`), the config (:mod:`glr.postprocess.config`) and the sweep
(:mod:`glr.eval.sweep`) only iterate over the registry (timm's ``register_model`` in
``timm/models/_registry.py`` is the model). A step module registers its steps at import time
with :func:`register_step`; ``glr/postprocess/__init__.py`` imports the built-in step modules,
so importing anything of :mod:`glr.postprocess` fills the registry.

Kinds, in chain order (``order`` sorts the steps of one kind):

* ``"features"``: transforms the descriptors, ``apply(q, db, opts, env) -> (q', db')``
  (whitening, αQE/DBA). Its result is memoised by the options, so it may not depend on
  :class:`Context` (``needs`` must be empty).
* ``"shortlist"``: ranks the whole index from the transformed descriptors instead of the
  plain kNN, ``apply(q', db', opts, n, env) -> (S, I)`` with ``n`` columns (k-reciprocal
  re-ranking); at most one is on in a config.
* ``"rerank"``: re-ranks the shortlist, ``apply(S, I, opts, env) -> (S, I)`` or
  ``(S, I, info)`` (``info``, plain numbers, lands in ``retrieve``'s info under the step's
  name); ``env.q`` / ``env.db`` are the original descriptors.

``prewarm(cands, q, db, env)`` (optional) lets a sweep search, once, the graphs at the
largest size a stage's candidates need (they then take slices of it); ``q, db`` are what
the step's ``apply`` works on (the transformed descriptors for ``features`` and
``shortlist`` steps, the original ones for re-rankers).

The smallest example is ``nonlandmark`` at the end of :mod:`glr.postprocess.labels`.

Every search a step runs is one of the chain's :data:`GRAPHS`; it asks its graph's
:class:`~glr.search.IndexSpec` with ``env.index(graph)`` (None: exact, the default) and passes
it to the cache, so the config's ``search`` setting makes that graph approximate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from glr.search import IndexSpec, parse_index_spec
from glr.utils import InputError

#: Kinds of steps, in the order the chain applies them.
KINDS = ("features", "shortlist", "rerank")

#: Top-level options of a post-processing config besides the steps (not step names);
#: ``search`` None: every graph is searched exactly.
TOP_DEFAULTS: dict[str, Any] = {"shortlist": 1000, "k": 100, "search": None}

#: The searches of the chain, by the name the ``search`` setting gives them, and what each searches.
GRAPHS: dict[str, str] = {
    "shortlist": "the plain kNN of the queries against the index (when no shortlist step is on)",
    "expansion": "the αQE/DBA graphs (joint: concat(q, db) against itself; classic: db → db and q → db)",
    "kreciprocal": "k-reciprocal's joint graph of concat(q, db) and its final search q → db",
    "train": "queries and index → train (landmark–country, train-label tagging, the recognition vote)",
    "nonlandmark": "index → distractors",
}

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# YAML 1.1 (PyYAML) reads 1e-3 as a string: a float option takes it as the number it spells.
_SCIENTIFIC_RE = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass
class Context:
    """What the re-ranking steps may need besides the query and index descriptors.

    All optional; a step that needs a missing piece raises :class:`InputError` naming it.
    ``train`` (Ntr, D) descriptors of the train set (same model as q/db),
    ``train_landmarks`` (Ntr,) int64 landmark ids, ``train_countries`` (Ntr,) int64 codes
    (-1 unknown; see :func:`glr.postprocess.labels.encode_labels`), ``distractors``
    (Nd, D) out-of-domain descriptors, ``q_paths`` / ``db_paths`` the image files of the
    query and index rows (spatial verification); ``extra``: inputs of steps registered
    outside this package, by the name their ``needs`` gives.
    """

    train: np.ndarray | None = None
    train_landmarks: np.ndarray | None = None
    train_countries: np.ndarray | None = None
    distractors: np.ndarray | None = None
    q_paths: Sequence[str] | None = None
    db_paths: Sequence[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        """The input ``name`` (a field, else an ``extra`` entry), None if not given."""
        if name in _CONTEXT_FIELDS:
            return getattr(self, name)
        return self.extra.get(name)


_CONTEXT_FIELDS = frozenset(f.name for f in fields(Context)) - {"extra"}


class Graphs(Protocol):
    """What steps use of :class:`glr.postprocess.cache.GraphCache` (graphs and memos)."""

    memo: dict[str, Any]

    def knn(self, q: np.ndarray, db: np.ndarray, k: int,
            index: IndexSpec | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def joint(self, x: np.ndarray, k: int,
              index: IndexSpec | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def fp(self, x: np.ndarray) -> str: ...


@dataclass(frozen=True)
class Env:
    """What a step's ``apply`` / ``prewarm`` sees besides its own options.

    ``q`` (Nq, D), ``db`` (Ndb, D): the original (untransformed) descriptors; ``ctx`` the
    :class:`Context`; ``cache`` the graph cache; ``config`` the whole normalised config (a
    step may look at another's options, e.g. to share a graph); ``progress``: show bars.
    """

    q: np.ndarray
    db: np.ndarray
    ctx: Context
    cache: Graphs
    config: Mapping[str, Any]
    progress: bool = False

    def index(self, graph: str) -> IndexSpec | None:
        """How the config searches ``graph`` (one of :data:`GRAPHS`): None when exactly."""
        return graph_index(self.config, graph)


def _search_form(search: Any) -> str:
    """``"one"`` (one spec for every graph), ``"per graph"`` or ``"exact"``, of a normalised ``search``."""
    if not search or search == "exact":
        return "exact"
    return "per graph" if set(search) <= set(GRAPHS) else "one"


def search_setting(config: Mapping[str, Any], graph: str) -> str:
    """The name of the setting that says how ``graph`` is searched (``search`` or ``search.train``),
    as errors name it."""
    return "search" if _search_form(config.get("search")) == "one" else f"search.{graph}"


def graph_index(config: Mapping[str, Any], graph: str) -> IndexSpec | None:
    """The :class:`~glr.search.IndexSpec` of ``graph`` in a normalised config (its ``search``
    setting: one spec for every graph, or per graph, unlisted graphs exact); None when exact."""
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}; graphs are {list(GRAPHS)}")
    search = config.get("search")
    form = _search_form(search)
    if form == "exact" or (form == "per graph" and graph not in search):
        return None
    spec = parse_index_spec(search if form == "one" else search[graph], setting=search_setting(config, graph))
    return None if spec.exact else spec


@dataclass(frozen=True)
class Option:
    """One typed option of a step.

    ``type`` is ``int``, ``float``, ``bool`` or ``str``: a float option takes integers (made
    floats) and YAML 1.1's ``1e-3`` strings, an int option takes integers only, a bool option
    only true/false. ``nullable`` (implied by a ``None`` default) also takes null;
    ``choices`` restricts the values; ``minimum`` / ``maximum`` bound numbers (inclusive).
    """

    default: Any
    type: type = float
    nullable: bool = False
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""

    def expected(self) -> str:
        """The accepted values in words (for error messages)."""
        if self.choices:
            what = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            what = _TYPE_WORDS[self.type]
            if self.minimum is not None and self.maximum is not None:
                what += f" in [{self.minimum:g}, {self.maximum:g}]"
            elif self.minimum is not None:
                what += f" >= {self.minimum:g}"
            elif self.maximum is not None:
                what += f" <= {self.maximum:g}"
        return what + (" or null" if self.nullable or self.default is None else "")

    def coerce(self, value: Any) -> Any:
        """``value`` as this option's type; raises ``ValueError`` (no context) when it is not one."""
        if value is None and (self.nullable or self.default is None):
            return None
        out = _typed(value, self.type)
        if self.choices and out not in self.choices:
            raise ValueError(value)
        if self.type in (int, float) and ((self.minimum is not None and out < self.minimum)
                                          or (self.maximum is not None and out > self.maximum)):
            raise ValueError(value)
        return out


def _typed(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    elif kind is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return int(value)
    elif kind is float:
        if isinstance(value, str) and _SCIENTIFIC_RE.match(value.strip()):
            value = float(value)
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
            if math.isfinite(float(value)):
                return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"option type must be bool, int, float or str, got {kind!r}")
    raise ValueError(value)


def _generic_description(opts: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in opts.items())


@dataclass(frozen=True)
class Step:
    """One post-processing step (see the module docstring for ``kind``, ``apply``, ``prewarm``).

    Attributes:
        name: its key in a config (``[a-z][a-z0-9_]*``, not ``shortlist`` / ``k``).
        kind: ``"features"``, ``"shortlist"`` or ``"rerank"``.
        order: position among the steps of its kind (lower first).
        options: option name → :class:`Option`, in the order they are shown (at least one:
            a step that is on is a non-empty dict of options, off is None).
        apply: the function that runs it.
        label: its row label in sweep tables (``"+ k-reciprocal"``).
        needs: the :class:`Context` inputs it needs (re-rankers only).
        describe: opts → short label of a setting (default ``"k1=v1 k2=v2"``).
        prewarm: the sweep's graph warm-up for a stage of candidates, or None.
        module: the module that registered it.
    """

    name: str
    kind: str
    order: int
    options: Mapping[str, Option]
    apply: Callable[..., Any]
    label: str
    needs: tuple[str, ...] = ()
    describe: Callable[[Mapping[str, Any]], str] | None = None
    prewarm: Callable[..., None] | None = None
    module: str = ""

    @property
    def defaults(self) -> dict[str, Any]:
        """Option name → default (a fresh dict)."""
        return {k: o.default for k, o in self.options.items()}

    def normalize(self, value: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
        """Every option of the step, typed: ``value``'s, else the default.

        Raises:
            InputError: an unknown option, or a value of the wrong type (naming the step,
                the option, ``source`` and the expected type).
        """
        unknown = sorted(set(value) - set(self.options))
        if unknown:
            raise InputError(f"step {self.name!r}: unknown option(s) {unknown}; known: {sorted(self.options)}",
                             source)
        out: dict[str, Any] = {}
        for key, opt in self.options.items():
            if key not in value:
                out[key] = opt.default
                continue
            try:
                out[key] = opt.coerce(value[key])
            except ValueError:
                raise InputError(f"step {self.name!r}, option {key!r}: expected {opt.expected()}, "
                                 f"got {value[key]!r}", source) from None
        return out

    def summary(self, opts: Mapping[str, Any]) -> str:
        """A short label of one setting (for tables)."""
        return (self.describe or _generic_description)(opts)


# Steps by name, kept in chain order (the dicts are refilled in place, so views stay live).
_STEPS: dict[str, Step] = {}
_BY_KIND: dict[str, dict[str, Step]] = {k: {} for k in KINDS}


def _chain_order(step: Step) -> tuple[int, int]:
    return KINDS.index(step.kind), step.order


def _refill(steps: Sequence[Step]) -> None:
    _STEPS.clear()
    for kind in KINDS:
        _BY_KIND[kind].clear()
    for s in sorted(steps, key=_chain_order):
        _STEPS[s.name] = s
        _BY_KIND[s.kind][s.name] = s


def _check(step: Step) -> None:
    if not _NAME_RE.match(step.name) or step.name in TOP_DEFAULTS:
        raise ValueError(f"bad step name {step.name!r}: [a-z][a-z0-9_]*, not {sorted(TOP_DEFAULTS)}")
    if step.name in _STEPS:
        raise ValueError(f"step {step.name!r} is already registered (by {_STEPS[step.name].module})")
    if step.kind not in KINDS:
        raise ValueError(f"step {step.name!r}: kind must be one of {KINDS}, got {step.kind!r}")
    if step.needs and step.kind != "rerank":
        raise ValueError(f"step {step.name!r}: only re-rankers may need Context inputs (features and "
                         "shortlists are memoised by their options alone)")
    if not step.options:
        # an "on" step is a non-empty dict of options everywhere (configs, sweeps, tables)
        raise ValueError(f"step {step.name!r} needs at least one option")
    clash = [s.name for s in _BY_KIND[step.kind].values() if s.order == step.order]
    if clash:
        raise ValueError(f"step {step.name!r}: order {step.order} of kind {step.kind!r} is taken by {clash[0]!r}")
    for key, opt in step.options.items():
        if not isinstance(opt, Option):
            raise TypeError(f"step {step.name!r}: option {key!r} must be an Option, got {opt!r}")
        try:
            opt.coerce(opt.default)
        except ValueError:
            raise ValueError(f"step {step.name!r}: the default {opt.default!r} of option {key!r} is not "
                             f"{opt.expected()}") from None


def register_step(name: str, *, kind: str, order: int, label: str, options: Mapping[str, Option] | None = None,
                  needs: Sequence[str] = (), describe: Callable[[Mapping[str, Any]], str] | None = None,
                  prewarm: Callable[..., None] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the ``apply`` of a step (see :class:`Step`)::

        @register_step("nonlandmark", kind="rerank", order=30, label="+ non-landmark penalty",
                       needs=("distractors",), options={"weight": Option(1.0, float)})
        def _apply(S, I, opts, env):
            ...
            return S, I

    Returns the function unchanged.

    Raises:
        ValueError: a taken name or (kind, order), an unknown kind, a bad default.
    """

    def decorate(apply: Callable[..., Any]) -> Callable[..., Any]:
        step = Step(name=name, kind=kind, order=int(order), options=dict(options or {}), apply=apply, label=label,
                    needs=tuple(needs), describe=describe, prewarm=prewarm,
                    module=getattr(apply, "__module__", "") or "")
        _check(step)
        _refill([*_STEPS.values(), step])
        return apply

    return decorate


def unregister_step(name: str) -> Step:
    """Remove a step (a test's or a plugin's); returns it. Raises ``KeyError`` if unknown."""
    step = _STEPS[name]
    _refill([s for s in _STEPS.values() if s.name != name])
    return step


def get_step(name: str) -> Step:
    """The step called ``name``; raises :class:`InputError` listing the known steps."""
    try:
        return _STEPS[name]
    except KeyError:
        raise InputError(f"unknown post-processing step {name!r}; steps are {list(_STEPS)}") from None


def steps(kind: str | None = None) -> tuple[Step, ...]:
    """The registered steps (of one ``kind``), in chain order."""
    return tuple(_STEPS.values() if kind is None else _BY_KIND[kind].values())


#: Step names in chain order: a live, read-only view of the registry.
STEP_NAMES = _STEPS.keys()
#: Names of the ``rerank`` steps (live view).
RERANK_NAMES = _BY_KIND["rerank"].keys()


class LiveTable(Mapping[str, Any]):
    """A read-only mapping recomputed from the registry on every access."""

    def __init__(self, build: Callable[[], dict[str, Any]]):
        self._build = build

    def __getitem__(self, key: str) -> Any:
        return self._build()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return repr(self._build())
