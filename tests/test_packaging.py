"""The package as a user installs it: the wheel, what it declares, ``glr --version``.

Every third-party module that ``lib/glr`` imports (an ``ast`` walk: module level and inside functions,
``if TYPE_CHECKING:`` blocks left out, since they never run) must map, through
``importlib.metadata.packages_distributions()``, to a distribution that ``pyproject.toml`` declares: in the core
``dependencies`` when the importing module is core, in the extra its layer belongs to otherwise
(:data:`EXTRAS_OF`). Every module that the core commands reach through module-level imports imports only core
distributions at module level, so ``pip install glr`` without extras runs ``glr score``, ``glr search``,
``glr cv`` and the kernel. ``requirements.txt`` (the lock ``make`` installs) pins every declared distribution
within its declared bound, and ``requires-python`` is what the pins need.
"""

from __future__ import annotations

import ast
import email
import email.message
import functools
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import glr
from glr.cli import EXTRA_OF_MODULE, main, version

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "lib"
PKG = LIB / "glr"
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.txt"

#: The extras a module may import from besides the core (longest matching prefix wins; a module not
#: listed is core). Its layer decides: Lightning only under train/, the kaggle client under kaggle/...
EXTRAS_OF: dict[str, tuple[str, ...]] = {
    "glr.train": ("train",),
    "glr.workflows.experiment": ("train",),
    "glr.workflows.demo": ("train", "kaggle", "report"),
    "glr.kaggle": ("kaggle",),
    "glr.kaggle.kernel.runtime": (),  # the kernel: runs on Kaggle's image with the bundle alone
    "glr.report": ("report",),  # matplotlib inside functions: glr cv without it skips sweep.png
}

#: Where the core commands start (``glr score | search | cv | embed``, submissions, post-processing, the kernel).
#: A package stands for all its modules; the kernel runtime's function-level ``glr`` imports are followed too
#: (it imports the bundle inside functions).
CORE_ROOTS = ("glr.cli", "glr.metrics", "glr.submission", "glr.search", "glr.postprocess", "glr.embeddings",
              "glr.predict", "glr.workflows.cv", "glr.kaggle.kernel.runtime")
FOLLOW_FUNCTION_IMPORTS = ("glr.kaggle.kernel.runtime",)

#: Declared though ``lib/glr`` imports none of them: who does, and why they are ours to declare.
DECLARED_NOT_IMPORTED = {
    "safetensors": "the artifact format (glr.model.artifact)",
    "six": "imported by kaggle 2.2 (kaggle/models/upload_file.py), which does not declare it",
    "pandas": "the notebooks (notebooks/*.ipynb)",
    "tensorboardx": "Lightning's TensorBoardLogger imports it",
    "mlflow": "Lightning's MLFlowLogger imports it",
    "wandb": "Lightning's WandbLogger imports it",
}
#: Test requirements no test module imports: the notebooks' kernel and pandas, the wheel's build backend.
TEST_NOT_IMPORTED = {"ipykernel", "pandas", "setuptools"}
#: Declared extras that the lock does not pin: loggers a user opts into, never installed by ``make``.
UNPINNED_EXTRAS = ("mlflow", "wandb")


def canonical(name: str) -> str:
    """PEP 503 name: ``Python_Slugify`` -> ``python-slugify``."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- the ast walk
@dataclass(frozen=True)
class ThirdParty:
    """One third-party import: ``top`` is its top-level name, ``module_level`` whether it runs at import."""

    module: str
    path: str  # relative to the walked root's parent, e.g. glr/search.py
    line: int
    top: str
    module_level: bool


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def modules_under(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package_dir`` (a package named by its folder)."""
    out = {}
    for f in sorted(package_dir.rglob("*.py")):
        parts = list(f.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def walk_imports(name: str, path: Path, local: frozenset[str]) -> tuple[list[ThirdParty], list[tuple[str, bool]]]:
    """The third-party imports of one module and the local modules it imports (``(dotted, module_level)``).

    ``local``: the top-level names that are not third-party (the package itself, test helpers).
    """
    third, own = [], []
    is_pkg = path.name == "__init__.py"
    rel = str(path.relative_to(path.parents[len(name.split(".")) - (0 if is_pkg else 1)]))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".")[: len(name.split(".")) - child.level + (1 if is_pkg else 0)]
                    targets = [".".join(base + ([child.module] if child.module else []))]
                else:
                    targets = [child.module or ""]
                targets += [f"{targets[0]}.{a.name}" for a in child.names]
            for target in targets:
                top = target.split(".")[0]
                if top in local:
                    own.append((target, not in_function))
                elif top not in sys.stdlib_module_names and top != "__future__" and target == targets[0]:
                    third.append(ThirdParty(name, rel, child.lineno, top, not in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return third, own


# --------------------------------------------------------------------------- what is declared
def declared_from_requires(requires: list[str], name: str = "glr") -> dict[str, dict[str, Requirement]]:
    """Extra ('' for the core) -> canonical distribution name -> requirement, from ``Requires-Dist`` lines
    (or ``dependencies`` + each extra's list, marked the same way); ``glr[a,b]`` self-references are expanded."""
    raw: dict[str, list[Requirement]] = {}
    for line in requires:
        req = Requirement(line)
        extra = ""
        if req.marker is not None:
            found = re.findall(r'extra\s*==\s*"([^"]+)"', str(req.marker))
            extra = found[0] if found else ""
        raw.setdefault(extra, []).append(req)

    def resolve(extra: str, seen: frozenset[str] = frozenset()) -> dict[str, Requirement]:
        out: dict[str, Requirement] = {}
        for req in raw.get(extra, []):
            if canonical(req.name) == name:
                for sub in req.extras - seen:
                    out.update(resolve(sub, seen | {extra}))
            else:
                out[canonical(req.name)] = req
        return out

    return {extra: resolve(extra) for extra in raw}


def declared_in_pyproject(path: Path = PYPROJECT) -> dict[str, dict[str, Requirement]]:
    """:func:`declared_from_requires` of ``pyproject.toml``'s ``[project]`` table."""
    project = tomllib.loads(path.read_text(encoding="utf-8"))["project"]
    lines = list(project.get("dependencies", []))
    for extra, reqs in project.get("optional-dependencies", {}).items():
        lines += [f'{r}; extra == "{extra}"' for r in reqs]
    return declared_from_requires(lines, canonical(project["name"]))


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()  # reads every installed RECORD: once


def distributions_of(top: str) -> set[str]:
    """The canonical names of the installed distributions that provide top-level module ``top`` (a module of
    an uninstalled distribution maps to the distribution of the same name, e.g. ``wandb``)."""
    return {canonical(d) for d in _packages_distributions().get(top, [])} or {canonical(top)}


def extras_of(module: str) -> tuple[str, ...]:
    """:data:`EXTRAS_OF` for one dotted module name (longest matching prefix; core when none matches)."""
    best = max((p for p in EXTRAS_OF if module == p or module.startswith(p + ".")), key=len, default=None)
    return EXTRAS_OF[best] if best is not None else ()


def undeclared_imports(modules: dict[str, Path], declared: dict[str, dict[str, Requirement]],
                       roots: tuple[str, ...] = CORE_ROOTS) -> list[str]:
    """Every problem, one line each naming ``file:line``: a third-party import that maps to no distribution
    declared where its module may use it, or a module reached from ``roots`` through module-level imports
    whose module-level imports are not all core."""
    local = frozenset(name.split(".")[0] for name in modules)
    walked = {name: walk_imports(name, path, local) for name, path in modules.items()}
    core = set(declared.get("", {}))
    problems = []
    for name, (third, _) in walked.items():
        allowed = core.union(*(declared.get(e, {}) for e in extras_of(name)))
        where = " + ".join(("core",) + tuple(f"[{e}]" for e in extras_of(name)))
        for imp in third:
            if not distributions_of(imp.top) & allowed:
                problems.append(f"{imp.path}:{imp.line}: imports {imp.top} ({'/'.join(sorted(distributions_of(imp.top)))}),"
                                f" not declared in {where}")
    for name in sorted(reached_at_module_level(walked, roots)):
        for imp in walked[name][0]:
            if imp.module_level and not distributions_of(imp.top) & core:
                problems.append(f"{imp.path}:{imp.line}: imports {imp.top} at module level, not a core dependency, "
                                f"and a core command reaches {name}")
    return problems


def reached_at_module_level(walked: dict[str, tuple[list[ThirdParty], list[tuple[str, bool]]]],
                            roots: tuple[str, ...]) -> set[str]:
    """The modules that importing ``roots`` (a package: all its modules) imports, parents included."""
    todo = [m for m in walked for r in roots if m == r or m.startswith(r + ".")]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in walked:
            continue
        seen.add(name)
        for target, module_level in walked[name][1]:
            if module_level or name in FOLLOW_FUNCTION_IMPORTS:
                parts = target.split(".")
                todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return seen


# --------------------------------------------------------------------------- the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (setuptools writes build/ and *.egg-info where it builds)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    shutil.copy2(PYPROJECT, src / "pyproject.toml")
    shutil.copytree(LIB, src / "lib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "-w", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (found,) = (tmp / "dist").glob("glr-*.whl")
    return found


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(name))


@pytest.mark.slow
def test_wheel_holds_every_module_and_data_file(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    shipped = {str(f.relative_to(LIB)) for f in PKG.rglob("*")
               if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"}
    assert {"glr/resources/country_continent.csv", "glr/resources/README.md"} <= shipped
    assert any(n.startswith("glr/resources/demo/") and n.endswith(".yaml") for n in shipped)
    assert sorted(shipped - names) == []
    assert "glr = glr.cli:main" in entry_points
    meta = _wheel_metadata(wheel)
    assert meta["Name"] == "glr" and meta["Version"] == glr.__version__
    assert meta["Requires-Python"] == tomllib.loads(PYPROJECT.read_text())["project"]["requires-python"]


@pytest.mark.slow
def test_the_wheels_requirements_declare_every_import(wheel):
    """The check on what a user gets: the wheel's ``Requires-Dist`` against the ast walk of lib/glr."""
    declared = declared_from_requires(_wheel_metadata(wheel).get_all("Requires-Dist"))
    assert declared == declared_in_pyproject()
    assert {"train", "kaggle", "report", "test", "tensorboard", "mlflow", "wandb"} <= set(declared)
    assert undeclared_imports(modules_under(PKG), declared) == []


def test_every_import_is_declared_where_its_layer_may_use_it():
    declared = declared_in_pyproject()
    assert undeclared_imports(modules_under(PKG), declared) == []
    assert {"torch", "numpy", "faiss-cpu", "pyyaml", "safetensors"} <= set(declared[""])
    assert "lightning" in declared["train"] and "lightning" not in declared[""]
    assert {"kaggle", "requests", "python-slugify"} <= set(declared["kaggle"])
    assert "matplotlib" in declared["report"] and "matplotlib" not in declared[""]


def test_every_declared_distribution_is_imported_or_says_why():
    """The other way round: nothing declared that nobody imports (a dependency dropped from the code is
    dropped from pyproject.toml too)."""
    walked = [walk_imports(n, p, frozenset({"glr"}))[0] for n, p in modules_under(PKG).items()]
    imported = set().union(*(distributions_of(i.top) for third in walked for i in third))
    declared = declared_in_pyproject()
    lib_declared = set().union(*(reqs for extra, reqs in declared.items() if extra not in ("test", "all")))
    assert sorted(lib_declared - imported - set(DECLARED_NOT_IMPORTED)) == []
    assert set(DECLARED_NOT_IMPORTED) <= lib_declared


def test_tests_and_benches_import_only_declared_distributions():
    """What tests/ imports is in the core or ``[test]`` (which pulls the other extras in); bench/ may use any."""
    declared = declared_in_pyproject()
    local = frozenset({"glr", "conftest"} | {p.stem for p in (ROOT / "tests").iterdir()}
                      | {p.stem for p in (ROOT / "bench").iterdir()})
    tested = set(declared[""]) | set(declared["test"])
    everything = set().union(*declared.values())
    used: set[str] = set()
    problems = []
    for folder, allowed in (("tests", tested), ("bench", everything)):
        for f in sorted((ROOT / folder).rglob("*.py")):
            for imp in walk_imports(f.stem, f, local)[0]:
                dists = distributions_of(imp.top)
                used |= dists if folder == "tests" else set()
                if not dists & allowed:
                    problems.append(f"{folder}/{f.relative_to(ROOT / folder)}:{imp.line}: {imp.top}")
    assert problems == []
    only_test = set(declared["test"]) - set().union(*(r for e, r in declared.items() if e not in ("test", "all")))
    assert sorted(only_test - used - TEST_NOT_IMPORTED) == []


def test_the_check_fails_on_an_undeclared_import(tmp_path):
    """A planted package: a core module importing the kaggle client's ``requests``, a training module importing
    an undeclared distribution, a core command reaching a module that imports Lightning at module level,
    and the same imports in the places that allow them (no complaint there)."""
    pkg = tmp_path / "glr"
    (pkg / "train").mkdir(parents=True)
    (pkg / "kaggle").mkdir()
    files = {
        "__init__.py": "",
        "search.py": "import numpy\nfrom glr import helper\n\ndef f():\n    import requests\n",
        "helper.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import matplotlib\n"
                     "import lightning.pytorch as pl\n",
        "train/__init__.py": "import lightning\nimport yaml\n",
        "train/fit.py": "import not_a_real_distribution_xyz\nfrom . import samplers\n",
        "train/samplers.py": "import torch\n",
        "kaggle/__init__.py": "def f():\n    import requests, slugify\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    problems = undeclared_imports(modules_under(pkg), declared_in_pyproject(), roots=("glr.search",))
    assert len(problems) == 4, problems
    assert any(p.startswith("glr/search.py:5: imports requests") and "not declared in core" in p for p in problems)
    assert any(p.startswith("glr/helper.py:4: imports lightning") and "not declared in core" in p for p in problems)
    assert any(p.startswith("glr/helper.py:4: imports lightning at module level") and "glr.helper" in p
               for p in problems)
    assert any(p.startswith("glr/train/fit.py:1: imports not_a_real_distribution_xyz")
               and "core + [train]" in p for p in problems)
    assert not any("matplotlib" in p or "slugify" in p or "glr/train/__init__" in p for p in problems)


# --------------------------------------------------------------------------- the lock and the interpreter
def _lock() -> dict[str, Requirement]:
    reqs = [Requirement(line.split("#")[0]) for line in LOCK.read_text().splitlines() if line.split("#")[0].strip()]
    return {canonical(r.name): r for r in reqs}


def test_the_lock_pins_every_declared_distribution_within_its_bound():
    lock = _lock()
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in lock.values())
    declared = {}
    for reqs in declared_in_pyproject().values():
        declared.update(reqs)
    assert sorted(set(declared) - set(lock) - set(UNPINNED_EXTRAS)) == []
    assert sorted(set(lock) - set(declared)) == []
    for name, pin in lock.items():
        pinned = next(iter(pin.specifier)).version
        assert declared[name].specifier.contains(pinned, prereleases=True), (name, pinned, declared[name])
        # the declared floor is a tested version: the pin itself
        floors = [s.version for s in declared[name].specifier if s.operator == ">="]
        assert floors == [pinned], (name, str(declared[name].specifier), pinned)


def test_requires_python_is_what_the_pins_need():
    """Every pinned distribution installed here accepts our floor, and at least one refuses the minor before it
    (so the floor is not higher than the pins need, nor lower than they allow)."""
    ours = SpecifierSet(tomllib.loads(PYPROJECT.read_text())["project"]["requires-python"])
    (floor,) = [Version(s.version) for s in ours if s.operator == ">="]
    before = Version(f"{floor.major}.{floor.minor - 1}")
    refusing = []
    for name in _lock():
        needs = metadata.metadata(name).get("Requires-Python")
        if needs:
            assert SpecifierSet(needs).contains(floor), (name, needs)
            if not SpecifierSet(needs).contains(before):
                refusing.append(name)
    running = Version(".".join(map(str, sys.version_info[:2])))
    assert ours.contains(running) and refusing, refusing
    assert {"numpy", "pandas", "scipy"} <= set(refusing)


# --------------------------------------------------------------------------- glr --version
def test_version_is_the_installed_metadata_and_the_source_string(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"glr {metadata.version('glr')}\n"
    assert metadata.version("glr") == glr.__version__ == version()
    script = Path(sys.executable).with_name("glr")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "glr"]
    out = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0 and out.stdout == f"glr {glr.__version__}\n", out


def test_version_falls_back_to_the_source_string_when_not_installed(monkeypatch):
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    monkeypatch.setattr(glr, "__version__", "9.8.7")
    assert version() == "9.8.7"


def test_a_command_whose_extra_is_missing_says_which_to_install(tmp_path):
    """``pip install glr`` without ``[train]``: ``glr train`` ends with one line naming the extra, exit 1 (Lightning
    hidden in a fresh interpreter: ``sys.modules['lightning'] = None`` makes importing it fail like a missing one)."""
    code = ("import sys\nsys.modules['lightning'] = None\nfrom glr.cli import main\n"
            f"sys.exit(main(['train', '--data', {str(tmp_path)!r}, '--out', {str(tmp_path / 'out')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [
        "glr train: error: needs lightning, which glr's core does not install: pip install 'glr[train]'"]
    assert not (tmp_path / "out").exists()
    assert set(EXTRA_OF_MODULE.values()) <= set(declared_in_pyproject())
    for top, extra in EXTRA_OF_MODULE.items():
        assert distributions_of(top) & set(declared_in_pyproject()[extra]), (top, extra)
