"""porter export --node: the npm package gives porter predict's answers under node (onnxruntime-node)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

import porter
from porter.errors import DataError, UsageError
from porter.imaging import preprocess
from porter.spec import PreprocessSpec
from runtime_models import classifier, feature_model, save, write_images

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (shutil.which("node") and shutil.which("npm")),
                                                   reason="needs node and npm")]


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory):
    """onnxruntime-node, jpeg-js and pngjs installed once (``--ignore-scripts``: onnxruntime-node's install script
    fetches GPU binaries; its CPU binaries ship inside the package)."""
    from porter.export.node import DEPENDENCIES

    d = tmp_path_factory.mktemp("npm")
    (d / "package.json").write_text(json.dumps({"name": "deps", "private": True, "dependencies": DEPENDENCIES}))
    r = subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=d, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"npm install failed (no registry?): {r.stderr.strip().splitlines()[-1:]}")
    return d / "node_modules"


def run_node(package, node_modules, script: str):
    (package / "node_modules").symlink_to(node_modules, target_is_directory=True)
    r = subprocess.run(["node", "-e", script], cwd=package, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("layout, preset", [("NCHW", "torch"), ("NHWC", "tf")])
def test_the_package_predicts_what_porter_predicts(tmp_path, node_modules, porter_cli, layout, preset):
    spec = PreprocessSpec.preset(preset, layout=layout, size=(8, 8), channels=3)
    src = save(classifier(layout=layout, size=(8, 8), classes=4, preprocess=spec, labels=("a", "b", "c", "d")),
               tmp_path / "clf.onnx")
    r = porter_cli("export", src, "--node", tmp_path / "pkg")
    assert r.returncode == 0, r.stderr
    pngs = write_images(tmp_path / "png", 4, size=(13, 11), seed=1) + write_images(tmp_path / "same", 2, size=(8, 8))
    jpgs = write_images(tmp_path / "jpg", 3, size=(20, 16), seed=2, ext=".jpg")
    files = [str(p) for p in pngs + jpgs]
    got = run_node(tmp_path / "pkg", node_modules, f"""
        const pkg = require('./index.js');
        (async () => {{
          const m = await pkg.load();
          const files = {json.dumps(files)};
          const t = pkg.toTensor(files.slice(0, {len(pngs)}).map(pkg.decode));
          const out = await m.predict(files, {{ topK: 3 }});
          console.log(JSON.stringify({{ tensor: Array.from(t.data), dims: t.dims, out }}));
        }})();""")
    expected = porter.load(src, device="cpu").predict(files, top_k=3)
    x = preprocess([str(p) for p in pngs], spec, channels=3)  # Pillow's resize: the package's, bit for bit
    assert got["dims"] == list(x.shape)
    np.testing.assert_allclose(np.asarray(got["tensor"], np.float32).reshape(x.shape), x, rtol=0, atol=1e-6)
    for g, e, name in zip(got["out"], expected, files):
        if name.endswith(".png"):
            assert g["label"] == e.label and abs(g["score"] - e.score) <= 1e-4, name
            assert [k["label"] for k in g["topK"]] == [k[0] for k in e.top_k]
        else:  # jpeg-js and libjpeg may differ by a level on a pixel
            assert abs(g["score"] - e.score) <= 2e-2, name


def test_export_node_mistakes(tmp_path, porter_cli):
    with pytest.raises(DataError):
        porter.export_node(feature_model(preprocess=None), tmp_path / "pkg")  # no preprocessing metadata
    src = save(classifier(size=None, classes=3), tmp_path / "any.onnx")
    with pytest.raises(UsageError, match="any image size"):
        porter.export_node(src, tmp_path / "pkg2")
    ok = save(classifier(size=(8, 8), classes=3), tmp_path / "ok.onnx")
    assert porter_cli("export", ok, "--node", tmp_path / "pkg3").returncode == 0
    r = porter_cli("export", ok, "--node", tmp_path / "pkg3")
    assert r.returncode != 0 and "--force" in r.stderr and r.stderr.count("\n") == 1
    r = porter_cli("export", ok, "--node", tmp_path / "a", "--triton", tmp_path / "b")
    assert r.returncode != 0 and "not allowed with" in r.stderr and r.stderr.count("\n") == 1
