"""The notebooks: stored without outputs, defining no library code, and executed for real on a tiny root."""

import ast
from pathlib import Path

import nbformat
import pytest
import torch
from IPython.core.inputtransformer2 import TransformerManager

from glr.data.images import IMAGENET_MEAN, IMAGENET_STD
from glr.model.net import build_net
from glr.model.artifact import save_artifact

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("01_eda", "02_cv_review", "03_kernel_iteration")


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs_and_without_library_code(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    for c in code:
        tree = ast.parse(TransformerManager().transform_cell(c.source))  # IPython magics as Python
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        assert not defs, f"{name} defines {[d.name for d in defs]}: library code belongs in glr"
    assert any("import glr" in c.source or "from glr" in c.source for c in code)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny synthetic root, a CV run on it, and a one-model ensemble."""
    from glr.workflows.cv import cv
    from glr.data.synth import make_synthetic_gldv2

    tmp = tmp_path_factory.mktemp("nb")
    root = tmp / "root"
    make_synthetic_gldv2(root, n_landmarks=12, scale=0.12, image_size=32, progress=False)
    cv(root, tmp / "cv", kind="thumbnail", recognition=False, progress=False, num_workers=0)
    torch.manual_seed(0)
    art = save_artifact(tmp / "m.pt", build_net(dict(backbone="test_resnet", embedding_size=16)).eval(),
                        {"image_size": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                        meta={"experiment": "nb", "stage": "s1"})
    (tmp / "ensemble.yaml").write_text(f"members:\n  - artifact: {art}\n")
    return {"GLR_NB_DATA": str(root), "GLR_NB_CV": str(tmp / "cv"), "GLR_NB_ENSEMBLE": str(tmp / "ensemble.yaml"),
            "GLR_NB_POST": str(tmp / "none.yaml"), "GLR_NB_WEIGHTS": str(tmp), "GLR_NB_KERNEL": str(tmp / "kernel"),
            "GLR_NB_LIMIT_TEST": "12", "GLR_NB_LIMIT_INDEX": "20", "tmp": tmp}


def _execute(name, env, monkeypatch):
    from nbclient import NotebookClient

    out = env["tmp"] / "out" / name
    for k, v in env.items():
        if k.startswith("GLR_NB_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("GLR_NB_OUT", str(out))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    text = "\n".join(o.get("text", "") or str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    return out, text, images


@pytest.mark.slow
def test_eda_notebook_draws_the_papers_figures(env, monkeypatch):
    out, text, images = _execute("01_eda", env, monkeypatch)
    assert {p.name for p in out.glob("*.png")} == {"long_tail.png", "continents.png", "samples.png"}
    assert images == 3 and "train images of" in text


@pytest.mark.slow
def test_cv_review_notebook_shows_scores_grids_and_distributions(env, monkeypatch):
    out, text, images = _execute("02_cv_review", env, monkeypatch)
    assert {p.name for p in out.glob("*.png")} == {"stages.png", "grid.png", "worst.png", "scores.png"}
    assert images == 4 and "public" in text and "private" in text


@pytest.mark.slow
def test_kernel_iteration_notebook_runs_the_kernel_on_a_subset(env, monkeypatch):
    out, text, images = _execute("03_kernel_iteration", env, monkeypatch)
    assert "status ok, 12 rows" in text and "projected" in text
    assert (Path(env["GLR_NB_KERNEL"]) / "kernel-metadata.json").is_file() and images == 1
