"""The kernel against other library versions: the packed timm preferred over the image's, the
version warning of a member trained with other versions, and what ``glr kernel wheels`` packs."""

import importlib
import importlib.metadata
import json
import logging
import sys
import tempfile
import zipfile

import numpy as np
import pytest
import torch

from glr.data.images import IMAGENET_MEAN, IMAGENET_STD
from glr.data.synth import make_synthetic_gldv2
from glr.kaggle.kernel import runtime
from glr.kaggle.publish import pack
from glr.kaggle.kernel.wheels import default_packages, model_timm_version
from glr.model.artifact import save_artifact
from glr.model.net import build_net

PKG = "glrpreferpkg"  # a stand-in for timm: a pure-Python distribution imported under its own name


def _wheel(folder, version, body):
    """A minimal pure-Python wheel of :data:`PKG` at ``version`` whose module runs ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    whl = folder / f"{PKG}-{version}-py3-none-any.whl"
    info = f"{PKG}-{version}.dist-info"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{PKG}/__init__.py", body)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PKG}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return whl


@pytest.fixture
def image(tmp_path, monkeypatch):
    """:data:`PKG` 1.0 'on the image' (a folder on ``sys.path``); temporary folders under ``tmp_path``."""
    site = tmp_path / "image"
    (site / PKG).mkdir(parents=True)
    (site / PKG / "__init__.py").write_text("__version__ = '1.0'\nVALUE = 1\n")
    (site / f"{PKG}-1.0.dist-info").mkdir()
    (site / f"{PKG}-1.0.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PKG}\nVersion: 1.0\n")
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    importlib.invalidate_caches()
    yield site
    sys.modules.pop(PKG, None)


def test_the_packed_version_replaces_the_images_when_it_differs(image, tmp_path):
    wheels = tmp_path / "wheels"
    _wheel(wheels, "2.0", "__version__ = '2.0'\nVALUE = 2\n")
    assert runtime.packed_wheels(wheels)[PKG] == ("2.0", wheels / f"{PKG}-2.0-py3-none-any.whl")
    assert runtime.prefer_packed([PKG], wheels) == [PKG]
    assert importlib.import_module(PKG).VALUE == 2
    assert importlib.metadata.version(PKG) == "2.0"
    assert sys.path[0].startswith(str(tmp_path / "tmp" / "glr_wheels_"))


def test_the_same_version_is_not_installed_and_an_imported_one_is_kept(image, tmp_path, caplog):
    wheels = tmp_path / "wheels"
    _wheel(wheels, "1.0", "VALUE = 'packed'\n")
    assert runtime.prefer_packed([PKG], wheels) == []
    assert not any((tmp_path / "tmp").iterdir())  # nothing installed
    assert importlib.import_module(PKG).VALUE == 1
    _wheel(wheels, "2.0", "VALUE = 2\n")
    (wheels / f"{PKG}-1.0-py3-none-any.whl").unlink()
    with caplog.at_level(logging.WARNING, logger="glr.kaggle.kernel"):
        assert runtime.prefer_packed([PKG], wheels) == []  # already imported: it stays the image's
    assert "already imported" in caplog.text and sys.modules[PKG].VALUE == 1


def test_a_packed_version_that_does_not_import_leaves_the_images(image, tmp_path, caplog):
    wheels = tmp_path / "wheels"
    _wheel(wheels, "2.0", "raise ImportError('needs a newer torch')\n")
    path_before = list(sys.path)
    with caplog.at_level(logging.WARNING, logger="glr.kaggle.kernel"):
        assert runtime.prefer_packed([PKG], wheels) == []
    assert "does not import" in caplog.text and "needs a newer torch" in caplog.text
    assert sys.path == path_before and PKG not in sys.modules
    assert importlib.import_module(PKG).VALUE == 1


def test_a_missing_module_gets_the_other_wheels_but_not_the_preferred_one(image, tmp_path):
    wheels = tmp_path / "wheels"
    _wheel(wheels, "1.0", "VALUE = 'packed'\n")  # same version as the image's: not installed
    other = "glrmissingpkg"
    with zipfile.ZipFile(wheels / f"{other}-0.1-py3-none-any.whl", "w") as z:
        z.writestr(f"{other}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{other}-0.1.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {other}\nVersion: 0.1\n")
        z.writestr(f"{other}-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{other}-0.1.dist-info/RECORD", "")
    try:
        assert runtime.ensure_modules([other], wheels, prefer=[PKG]) == []
        assert importlib.import_module(other).VALUE == 42
        assert importlib.import_module(PKG).VALUE == 1  # the image's: the packed one was not installed
    finally:
        sys.modules.pop(other, None)


def test_version_warnings_compare_major_minor_for_torch_and_timm_and_major_for_numpy():
    running = {"torch": "2.14.1+cu130", "timm": "1.0.31", "numpy": "2.4.6"}
    assert runtime.version_warnings("m", {"torch": "2.14.0", "timm": "1.0.15", "numpy": "2.0.2"}, running) == []
    got = runtime.version_warnings("exp1__s2", {"torch": "2.3.1", "timm": "0.9.16", "numpy": "1.26.4"}, running)
    assert len(got) == 3 and all(line.startswith("member exp1__s2 was trained with") for line in got)
    assert "torch 2.3.1; the kernel runs torch 2.14.1+cu130" in got[0] and "timm 0.9.16" in got[1]
    assert runtime.version_warnings("m", {}, running) == []  # an artifact that records nothing


def test_the_kernel_warns_for_a_member_trained_with_other_versions(tmp_path, caplog):
    root = tmp_path / "root"
    make_synthetic_gldv2(root, n_landmarks=4, scale=0.05, image_size=32, progress=False)
    torch.manual_seed(0)
    net = build_net(dict(backbone="test_resnet", embedding_size=8)).eval()
    versions = {"torch": "1.13.1", "timm": "0.6.12", "numpy": np.__version__}  # what an old machine trained with
    data_config = {"image_size": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    arts = [save_artifact(tmp_path / "a.pt", net, data_config, meta={"experiment": "old", "stage": "s1",
                                                                     "versions": versions}),
            save_artifact(tmp_path / "b.pt", net, data_config, meta={"experiment": "new", "stage": "s1"})]
    weights = pack(arts, tmp_path / "weights", "me/glr-versions-weights")  # as the kernel gets them
    files = [e["file"] for e in json.loads((weights / "manifest.json").read_text())["entries"]]
    settings = {**runtime.SETTINGS_DEFAULTS, "members": [{"file": f} for f in files],
                "batch_size": 8, "num_workers": 0, "progress": False}
    test_ids, _ = runtime.list_images(root, "test")
    index_ids, _ = runtime.list_images(root, "index")
    warnings: list[str] = []
    with caplog.at_level(logging.WARNING, logger="glr.kaggle.kernel"):
        runtime.predict(settings, root, weights, tmp_path / "submission.csv", test_ids, index_ids,
                        runtime.StepTimer(), warnings)
    assert [w.split(" was")[0] for w in warnings] == ["member old__s1", "member old__s1"]
    assert f"torch 1.13.1; the kernel runs torch {torch.__version__.split('+')[0]}" in warnings[0] and "timm 0.6.12" in warnings[1]
    assert warnings[0] in caplog.text


def test_wheels_pack_the_timm_that_built_the_models(tmp_path):
    import timm

    assert default_packages() == ["faiss-cpu==1.15.1", f"timm=={timm.__version__}"]
    from glr.kaggle.kernel.build import build_kernel

    torch.manual_seed(0)
    net = build_net(dict(backbone="test_resnet", embedding_size=8)).eval()
    arts = [save_artifact(tmp_path / f"m{i}.pt", net, {"image_size": 32}, meta={"experiment": f"e{i}", "stage": "s1",
                                                                                "versions": {"timm": v}})
            for i, v in enumerate(("1.0.15", "1.0.15"))]
    ens = tmp_path / "ensemble.yaml"
    ens.write_text("members:\n" + "".join(f"  - artifact: {a}\n" for a in arts))
    kernel = build_kernel(ens, tmp_path / "k", "me/glr-wheels-kernel", "me/glr-wheels-weights")
    assert model_timm_version(kernel) == "1.0.15"
    assert default_packages(kernel)[1] == "timm==1.0.15"
