"""The house rules, read from the code: every module of lib/glr parsed with ``ast`` (imports at
module level and inside functions alike), nothing imported or run.

Each failure names ``file:line``. ``python ../shared/tools/house.py`` prints the same facts.
"""

from __future__ import annotations

import ast
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "lib"
PKG = LIB / "glr"
MAX_LINES = 80

#: The layers, bottom to top (why this order: :func:`test_imports_point_down_the_layers`).
LAYERS = ("glr", "utils", "arrays", "metrics", "submission", "search", "data", "model", "postprocess", "embeddings",
          "predict", "eval", "train", "report", "kaggle", "workflows", "cli")
RANK = {name: i for i, name in enumerate(LAYERS)}

#: Where a package module may be imported inside a function: the command line (a command imports
#: what it runs, so ``glr --help`` stays light) and the kernel runtime (its imports are the bundle's).
FUNCTION_IMPORTS_ALLOWED = ("glr/cli/", "glr/kaggle/kernel/runtime.py")

#: The post-processing modules that must stay pure arrays (no file opened, read or written):
#: every module of postprocess/ but the graph cache, the config files and spatial verification
#: (which reads images).
POSTPROCESS_WITH_FILES = ("cache.py", "config.py", "spatial.py")

#: Calls that open, read or write files (``Path.read_text``, ``np.load``, ``json.dump``,
#: ``yaml.safe_load``, ``Image.open``, ``Store.open`` ...), by attribute name.
FILE_CALLS = frozenset({
    "open", "load", "loadtxt", "genfromtxt", "fromfile", "memmap", "save", "savez",
    "savez_compressed", "savetxt", "tofile", "dump", "safe_load", "safe_dump", "read_text", "read_bytes",
    "write_text", "write_bytes", "read_csv", "to_csv", "read_parquet", "to_parquet", "imread", "imwrite",
    "mkdir", "makedirs", "unlink", "rmtree", "touch",
})
#: Modules whose only business is files (a pure-array module has no use for them).
FILE_MODULES = frozenset({"yaml", "pickle", "csv", "shutil", "tempfile", "h5py", "glob", "zipfile"})
#: Package modules (and names of ``glr.utils``) that read or write files on the caller's behalf.
FILE_PACKAGE_MODULES = frozenset({"glr.embeddings.store", "glr.embeddings.npz", "glr.embeddings.sharded"})
FILE_UTILS = frozenset({"atomic_write", "read_json_object", "file_sha256"})

#: Functions allowed over MAX_LINES lines: ``"path/in/lib:function" -> reason``. Keep it short.
LONG_FUNCTION_EXEMPTIONS: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    """One imported name: ``module`` is the importing module, ``target`` the package module it
    resolves to (None for a third-party import, then ``top`` is its top-level name)."""

    module: str
    path: str  # relative to lib/, e.g. glr/cli/infer.py
    line: int
    target: str | None
    top: str
    in_function: bool
    names: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"lib/{self.path}:{self.line}"


@dataclass(frozen=True)
class Function:
    path: str
    line: int
    name: str
    lines: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest package module that the dotted name ``name`` lies in."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _inside_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    p = parents.get(node)
    while p is not None:
        if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
        p = parents.get(p)
    return False


@functools.lru_cache(maxsize=None)
def scan() -> tuple[dict[str, Path], tuple[Import, ...], tuple[Function, ...], dict[str, ast.Module]]:
    """Every module of the package, every import (a ``from X import a, b`` of package modules
    gives one Import per module named), every function (methods and nested ones included)."""
    files = sorted(PKG.rglob("*.py"))
    modules = {_module_name(p): p for p in files}
    known = set(modules)
    imports: list[Import] = []
    functions: list[Function] = []
    trees: dict[str, ast.Module] = {}
    for mod, path in modules.items():
        rel = path.relative_to(LIB).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        trees[mod] = tree
        parents = _parents(tree)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append(Function(rel, node.lineno, node.name, node.end_lineno - node.lineno + 1))
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            inside = _inside_function(node, parents)
            if isinstance(node, ast.Import):
                for a in node.names:
                    target = _resolve(a.name, known) if a.name.split(".")[0] == "glr" else None
                    imports.append(Import(mod, rel, node.lineno, target, a.name.split(".")[0], inside))
                continue
            if node.level:
                base_parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = tuple(a.name for a in node.names)
            if base.split(".")[0] != "glr":
                imports.append(Import(mod, rel, node.lineno, None, base.split(".")[0], inside, names))
                continue
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            rest = tuple(n for n in names if f"{base}.{n}" not in known)
            for sub in submodules:
                imports.append(Import(mod, rel, node.lineno, sub, "glr", inside))
            if rest or not submodules:
                imports.append(Import(mod, rel, node.lineno, _resolve(base, known), "glr", inside, rest))
    return modules, tuple(imports), tuple(functions), trees


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "glr"
    return "cli" if parts[1] == "__main__" else parts[1]


def _package_edges() -> dict[str, dict[str, Import]]:
    """module -> {imported package module -> the first import of it}."""
    _, imports, _, _ = scan()
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.target and imp.target != imp.module:
            edges.setdefault(imp.module, {}).setdefault(imp.target, imp)
    return edges


def _cycles(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:  # one cycle through the component, found by a walk inside it
        members, start = set(comp), min(comp)
        path, seen = [start], {start}
        while True:
            nxt = sorted(w for w in edges.get(path[-1], {}) if w in members)
            back = [w for w in nxt if w == start]
            if back and len(path) > 1:
                break
            fresh = [w for w in nxt if w not in seen]
            if not fresh:  # dead end inside the component: close on the first member seen again
                loop = next(w for w in nxt if w in seen)
                path = path[path.index(loop):]
                start = loop
                break
            path.append(fresh[0])
            seen.add(fresh[0])
        cycles.append(path + [start])
    return cycles


def test_the_scan_sees_the_package():
    modules, imports, functions, _ = scan()
    assert {"glr", "glr.cli", "glr.predict", "glr.train.fit", "glr.postprocess.chain"} <= set(modules)
    assert any(i.top == "numpy" for i in imports) and any(i.target == "glr.utils" for i in imports)
    assert any(f.name == "main" and f.path == "glr/cli/__init__.py" for f in functions)
    # the cycle finder finds a planted cycle, with the lines of its imports
    def edge(a: str, b: str, line: int) -> dict[str, Import]:
        return {b: Import(a, f"{a}.py", line, b, "glr", False)}

    fake = {"a": edge("a", "b", 1), "b": edge("b", "c", 2), "c": edge("c", "a", 3), "d": edge("d", "a", 4)}
    assert _cycles(fake) == [["a", "b", "c", "a"]]
    assert _cycle_lines(fake) == ["a -> b -> c -> a\n    lib/a.py:1, lib/b.py:2, lib/c.py:3"]


def _cycle_lines(edges: dict[str, dict[str, Import]]) -> list[str]:
    """Each cycle as ``a -> b -> a`` and, below it, the file:line of each of its imports."""
    return [" -> ".join(c) + "\n    " + ", ".join(edges[a][b].where for a, b in zip(c, c[1:]))
            for c in _cycles(edges)]


def test_no_import_cycles():
    lines = _cycle_lines(_package_edges())
    assert not lines, "import cycles (module-level and function-level imports):\n  " + "\n  ".join(lines)


def _third_party(tops: set[str]) -> list[Import]:
    _, imports, _, _ = scan()
    return [i for i in imports if i.target is None and i.top in tops]


def test_only_train_imports_lightning():
    bad = [i for i in _third_party({"lightning", "pytorch_lightning", "lightning_fabric"})
           if not i.path.startswith("glr/train/")]
    assert not bad, "Lightning imported outside glr/train/ (the kernel must not need it):\n  " + "\n  ".join(
        f"{i.where} imports {i.top}" for i in bad)


def test_only_cli_imports_argparse():
    bad = [i for i in _third_party({"argparse"}) if not i.path.startswith("glr/cli/")]
    assert not bad, "argparse imported outside glr/cli/:\n  " + "\n  ".join(i.where for i in bad)


def _pure_postprocess_modules() -> list[str]:
    modules, _, _, _ = scan()
    return sorted(m for m, p in modules.items()
                  if m.startswith("glr.postprocess.") and p.name not in POSTPROCESS_WITH_FILES)


def test_postprocess_steps_open_no_files():
    modules, imports, _, trees = scan()
    pure = _pure_postprocess_modules()
    assert {"glr.postprocess.expansion", "glr.postprocess.kreciprocal", "glr.postprocess.labels",
            "glr.postprocess.chain"} <= set(pure)
    bad = []
    for mod in pure:
        rel = modules[mod].relative_to(LIB).as_posix()
        for node in ast.walk(trees[mod]):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id == "open":
                    bad.append(f"lib/{rel}:{node.lineno} calls open()")
                elif isinstance(f, ast.Attribute) and f.attr in FILE_CALLS:
                    bad.append(f"lib/{rel}:{node.lineno} calls {ast.unparse(f)}()")
        for i in imports:
            if i.module != mod:
                continue
            if i.target is None and i.top in FILE_MODULES:
                bad.append(f"{i.where} imports {i.top}")
            elif i.target in FILE_PACKAGE_MODULES:
                bad.append(f"{i.where} imports {i.target} (a file store)")
            elif i.target == "glr.utils" and FILE_UTILS & set(i.names):
                bad.append(f"{i.where} imports {', '.join(sorted(FILE_UTILS & set(i.names)))} from glr.utils")
    assert not bad, ("post-processing steps are pure arrays (files belong to postprocess/cache.py, config.py, "
                     "or the callers):\n  " + "\n  ".join(bad))


def test_package_imports_at_module_level():
    _, imports, _, _ = scan()
    bad = [i for i in imports if i.target and i.in_function and not i.path.startswith(FUNCTION_IMPORTS_ALLOWED)]
    assert not bad, ("package modules imported inside a function (allowed only in glr/cli/ and the kernel "
                     "runtime):\n  " + "\n  ".join(f"{i.where} imports {i.target}" for i in bad))


def test_imports_point_down_the_layers():
    """A module imports its own layer and the layers below it (:data:`LAYERS`), never one above.

    Why this order, bottom to top:

    * ``glr`` is the package's ``__init__``: a lazy facade with no import statement of the package
      (:func:`test_package_root_imports_no_module`), so anything may import it (the kernel build does,
      to find the package's folder and version).
    * ``utils`` … ``search``: the small shared pieces (errors and atomic files; row sources; the
      official metrics; submission files; kNN) that everything else builds on; ``data`` reads GLDv2
      roots (its readers share ``metrics``' solution reader); ``model`` builds networks.
    * ``postprocess`` below ``embeddings``: the post-processing steps are pure functions of arrays,
      so they need neither images, networks nor stores (a step reading a store would also need
      files); ``embeddings`` turns images into rows with a model and keeps them in stores.
    * ``predict`` is THE inference chain over the layers below; ``eval`` (sweep, revisitop) and then
      ``train`` build on it. ``train`` is the only importer of Lightning, so it sits above every
      module the Kaggle kernel bundles: nothing below may import it.
    * ``report`` draws and tabulates results; ``kaggle`` packs and sends them (the kernel bundles
      ``predict``'s closure); ``workflows`` (cv, experiment, demo: what a user runs end to end) are
      built from all of these: cv writes the sweep's figure, the demo builds and runs the kernel and
      writes the report.
    * ``cli`` (with ``glr.__main__``) parses command lines for all of them: the top.
    """
    modules, imports, _, _ = scan()
    unknown = sorted({_layer(m) for m in modules} - set(RANK))
    assert not unknown, f"modules of no layer: {unknown}; add them to LAYERS"
    bad = [i for i in imports if i.target and RANK[_layer(i.target)] > RANK[_layer(i.module)]]
    assert not bad, ("imports pointing up the layers " + " < ".join(LAYERS) + ":\n  " + "\n  ".join(
        f"{i.where}: {i.module} ({_layer(i.module)}) imports {i.target} ({_layer(i.target)})" for i in bad))


def test_package_root_imports_no_module():
    """``import glr`` stays light and the kernel bundles ``glr/__init__.py`` as it is: the facade
    imports its names by string on first use, never with an import statement."""
    _, imports, _, _ = scan()
    bad = [i for i in imports if i.module == "glr" and i.target]
    assert not bad, "glr/__init__.py imports package modules:\n  " + "\n  ".join(i.where for i in bad)


def test_no_function_over_80_lines():
    _, _, functions, _ = scan()
    long = [f for f in functions if f.lines > MAX_LINES and f"{f.path}:{f.name}" not in LONG_FUNCTION_EXEMPTIONS]
    long.sort(key=lambda f: -f.lines)
    assert not long, f"functions over {MAX_LINES} lines (split them):\n  " + "\n  ".join(
        f"lib/{f.path}:{f.line} {f.name}: {f.lines} lines" for f in long)
    stale = [k for k in LONG_FUNCTION_EXEMPTIONS
             if not any(f"{f.path}:{f.name}" == k and f.lines > MAX_LINES for f in functions)]
    assert not stale, f"exemptions no longer needed: {stale}"


#: rule -> (file of a small fake package, its text, the test that must fail, the file:line it must name)
PLANTED = {
    "layers": ("utils.py", "import numpy\n\nfrom glr.search import knn\n", "test_imports_point_down_the_layers",
               "utils.py:3"),
    "function imports": ("search.py", "def knn():\n    from glr import utils\n", "test_package_imports_at_module_level",
                         "search.py:2"),
    "files": ("postprocess/expansion.py", "import numpy as np\n\n\ndef f(p):\n    return np.load(p)\n",
              "test_postprocess_steps_open_no_files", "postprocess/expansion.py:5"),
    "lightning": ("search.py", "import lightning\n", "test_only_train_imports_lightning", "search.py:1"),
    "argparse": ("utils.py", "import argparse\n", "test_only_cli_imports_argparse", "utils.py:1"),
}


@pytest.mark.parametrize("rule", sorted(PLANTED))
def test_the_rules_catch_a_planted_violation(rule, tmp_path, monkeypatch):
    """Each check fails, naming file:line, on a small package that breaks it."""
    pkg = tmp_path / "glr"
    for name in ("__init__.py", "utils.py", "search.py", "cli/__init__.py", "postprocess/__init__.py",
                 "postprocess/expansion.py", "postprocess/kreciprocal.py", "postprocess/labels.py",
                 "postprocess/chain.py"):
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text("")
    name, text, test, where = PLANTED[rule]
    (pkg / name).write_text(text)
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "LIB", tmp_path)
    monkeypatch.setattr(here, "PKG", pkg)
    scan.cache_clear()
    try:
        with pytest.raises(AssertionError) as e:
            getattr(here, test)()
        assert f"lib/glr/{where}" in str(e.value)
    finally:
        scan.cache_clear()
