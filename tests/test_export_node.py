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
    jpgs = write_images(tmp_path / "jpg", 3, size=(20, 16), seed=2, ext=".jpg") + jpeg_variants(tmp_path / "jpgv")
    files = [str(p) for p in pngs + jpgs]
    got = run_node(tmp_path / "pkg", node_modules, f"""
        const pkg = require('./index.js');
        (async () => {{
          const m = await pkg.load();
          const files = {json.dumps(files)};
          const t = pkg.toTensor(await Promise.all(files.map(pkg.decode)));
          const out = await m.predict(files, {{ topK: 3 }});
          console.log(JSON.stringify({{ tensor: Array.from(t.data), dims: t.dims, out }}));
        }})();""")
    expected = porter.load(src, device="cpu").predict(files, top_k=3)
    # decoding (libjpeg-turbo as WebAssembly for JPEGs: IDCT, fancy upsampling, colour conversion, EXIF
    # orientation) and Pillow's resize: the package's tensor is porter's, bit for bit, for PNGs and JPEGs alike
    x = preprocess(files, spec, channels=3)
    assert got["dims"] == list(x.shape)
    np.testing.assert_allclose(np.asarray(got["tensor"], np.float32).reshape(x.shape), x, rtol=0, atol=1e-6)
    for g, e, name in zip(got["out"], expected, files):
        assert g["label"] == e.label and abs(g["score"] - e.score) <= 1e-4, name
        assert [k["label"] for k in g["topK"]] == [k[0] for k in e.top_k]


def jpeg_variants(folder):
    """The JPEGs cameras and tools write: 4:2:0, 4:2:2 and 4:4:4 chroma at odd sizes, progressive, greyscale, and an
    EXIF orientation (6: rotated 90 degrees) that porter applies."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:27, 0:35]
    a = np.stack([np.sin(xx / 3) * 120 + 128, np.cos(yy / 4) * 120 + 128, (xx * yy) % 255], -1)
    a = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)  # strong colour edges: chroma matters
    im, paths = Image.fromarray(a), []
    for name, kw in (("s420", {"subsampling": 2}), ("s422", {"subsampling": 1}), ("s444", {"subsampling": 0}),
                     ("progressive", {"progressive": True})):
        paths.append(folder / f"{name}.jpg")
        im.save(paths[-1], quality=85, **kw)
    paths.append(folder / "grey.jpg")
    im.convert("L").save(paths[-1], quality=85)
    exif = im.getexif()
    exif[0x0112] = 6
    paths.append(folder / "exif6.jpg")
    im.save(paths[-1], quality=85, exif=exif.tobytes())
    return paths


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


def test_the_package_decodes_cmyk_and_refuses_bombs_and_non_images(tmp_path, node_modules):
    from PIL import Image

    ok = save(classifier(size=(8, 8), classes=3), tmp_path / "ok.onnx")
    porter.export_node(ok, tmp_path / "pkg")
    rgb = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    # a PNG whose header claims 20000 x 20000 pixels (400 M, over Pillow's bomb limit) in a few hundred bytes
    Image.new("L", (20000, 20000)).save(tmp_path / "bomb.png", optimize=True)
    (tmp_path / "text.jpg").write_text("not an image")
    # a JPEG whose frame header claims 14000 x 14000 behind a stray byte libjpeg skips (so would a naive parser)
    Image.fromarray(rgb).save(tmp_path / "small.jpg", quality=90)
    data = bytearray((tmp_path / "small.jpg").read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (14000).to_bytes(2, "big") * 2
    (tmp_path / "bomb.jpg").write_bytes(bytes(data[:sof]) + b"\x00" + bytes(data[sof:]))
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "small.jpg").read_bytes()[:200])  # truncated in its headers
    names = ("cmyk.jpg", "bomb.png", "text.jpg", "bomb.jpg", "cut.jpg")
    got = run_node(tmp_path / "pkg", node_modules, f"""
        const pkg = require('./index.js');
        (async () => {{
          const out = {{}};
          for (const f of {json.dumps([str(tmp_path / n) for n in names])}) {{
            try {{ const d = await pkg.decode(f); out[f] = [d.width, d.height]; }}
            catch (e) {{ out[f] = e.message; }}
          }}
          console.log(JSON.stringify(out));
        }})();""")
    assert got[str(tmp_path / "cmyk.jpg")] == [11, 9]  # jpeg-js (close to Pillow's conversion, not exact)
    assert "refused, image too large (20000 x 20000 pixels" in got[str(tmp_path / "bomb.png")]
    assert got[str(tmp_path / "text.jpg")].endswith("not a PNG or JPEG file")
    assert "refused, image too large (14000 x 14000 pixels" in got[str(tmp_path / "bomb.jpg")]
    assert got[str(tmp_path / "cut.jpg")].startswith(f"{tmp_path / 'cut.jpg'}: can't decode JPEG")
    with pytest.raises(DataError, match="too large"):  # what porter itself says of the same file
        porter.load(ok, device="cpu").predict([tmp_path / "bomb.png"])
