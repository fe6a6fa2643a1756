"""porter on Ray Data: ``porter predict --ray`` / ``porter.ray.predict`` and ``porter finetune --ray`` give the
answers of the local commands; prediction records and ``--output FILE``; one-line errors for a missing Ray, an
unreachable cluster, an existing output.

The Ray tests run on a local Ray (``num_cpus=2``), slow-marked, each bounded by an alarm. The command-line ones
come first: they start their own Ray in a subprocess, before this module's in-process Ray is up.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from porter.imaging import load_image
from porter.runtime import load
from porter.runtime.records import ParquetPredictions, from_record, to_record
from porter.runtime.results import Prediction

from conftest import run_main as run
from conftest import run_porter
from runtime_models import ANIMALS, classifier, feature_model, labelled_classifier, save, write_images

LABELS = list(ANIMALS)
RAY_TEST_SECONDS = 240

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def model_path(tmp_path):
    return save(labelled_classifier(), tmp_path / "clf.onnx")


@pytest.fixture
def image_dir(tmp_path):
    write_images(tmp_path / "imgs", 7, size=(16, 12))
    write_images(tmp_path / "imgs" / "nested", 3, size=(9, 9), seed=5, ext=".jpg")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path / "imgs"


@pytest.fixture
def bounded():
    """A Ray test that hangs fails after RAY_TEST_SECONDS instead of stalling the suite."""
    def expire(signum, frame):
        raise TimeoutError(f"a Ray test ran past {RAY_TEST_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(RAY_TEST_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def local_predictions(model_path, image_dir):
    code_paths = sorted(str(p) for p in image_dir.rglob("*") if p.suffix in (".png", ".jpg"))
    predictor = load(model_path, device="cpu")
    return code_paths, list(predictor.iter_predictions(code_paths, top_k=3, errors="report"))


# --- without Ray: records, --output, encoded bytes ---------------------------------------------------------------

def test_a_record_comes_back_as_the_prediction():
    p = Prediction(source="a.png", label="bee", index=1, score=0.75, top_k=(("bee", 0.75), ("ant", 0.25)))
    r = to_record(p, 4)
    assert r["row"] == 4 and r["label"] == "bee" and r["class_index"] == 1 and r["error"] is None
    assert r["top_k"] == [{"label": "bee", "score": 0.75}, {"label": "ant", "score": 0.25}]
    assert from_record(r) == p
    bad = to_record(Prediction(source="b.png", error="not an image"), 5)
    assert bad["label"] is None and bad["score"] is None and bad["top_k"] == [] and bad["error"] == "not an image"
    assert from_record(bad).error == "not an image"
    raw = Prediction(source="c.png", outputs={"mean": np.array([[0.5]], np.float32)})
    back = from_record(to_record(raw), raw_outputs=True)
    np.testing.assert_array_equal(back.outputs["mean"], [[0.5]])


def test_parquet_writer_is_atomic_and_never_overwrites(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "p.parquet"
    sink = ParquetPredictions(out)
    sink.write(Prediction(source="a.png", label="ant", index=0, score=0.9, top_k=(("ant", 0.9),)), 0)
    assert not out.exists()  # only close() puts the file in place
    sink.close()
    table = pq.read_table(out)
    assert table.column_names == ["row", "path", "label", "class_index", "score", "top_k", "outputs", "error"]
    assert table.column("label").to_pylist() == ["ant"]
    with pytest.raises(Exception, match="already exists"):
        ParquetPredictions(out)
    aborted = ParquetPredictions(tmp_path / "q.parquet")
    aborted.write(Prediction(source="a.png", error="x"))
    aborted.abort()
    assert not (tmp_path / "q.parquet").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]


def test_predict_output_files_hold_what_predict_prints(capsys, tmp_path, model_path, image_dir):
    pq = pytest.importorskip("pyarrow.parquet")
    code, out, err = run(capsys, "predict", model_path, image_dir, "--format", "json", "--top-k", "3")
    assert code == 1  # broken.png failed
    printed = {r["path"]: r for r in json.loads(out)}
    assert run(capsys, "predict", model_path, image_dir, "--top-k", "3", "-o", tmp_path / "p.parquet")[0] == 1
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert [r["path"] for r in rows] == list(printed)
    for r in rows:
        want = printed[r["path"]]
        if "error" in want:
            assert r["error"] == want["error"] and r["label"] is None
        else:
            assert r["label"] == want["label"] and r["score"] == pytest.approx(want["score"], abs=1e-6)
            assert [t["label"] for t in r["top_k"]] == [t["label"] for t in want["top_k"]]
    assert run(capsys, "predict", model_path, image_dir, "-o", tmp_path / "p.json")[0] == 1
    assert [r["path"] for r in json.loads((tmp_path / "p.json").read_text())] == list(printed)
    assert run(capsys, "predict", model_path, image_dir, "-o", tmp_path / "p.csv")[0] == 1
    csv_rows = list(csv.DictReader(io.StringIO((tmp_path / "p.csv").read_text())))
    assert [r["path"] for r in csv_rows] == list(printed)
    # an existing output is kept without --force, and the refusal comes before any work
    before = (tmp_path / "p.csv").read_bytes()
    code, out, err = run(capsys, "predict", model_path, image_dir, "-o", tmp_path / "p.csv")
    assert code == 1 and err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert (tmp_path / "p.csv").read_bytes() == before
    assert run(capsys, "predict", model_path, image_dir, "-o", tmp_path / "p.csv", "--force")[0] == 1
    code, out, err = run(capsys, "predict", model_path, image_dir, "-o", tmp_path / "p.txt")
    assert code == 2 and "name a .parquet, .csv or .json file" in err and not (tmp_path / "p.txt").exists()


def test_an_encoded_file_decodes_as_its_path_does(tmp_path):
    paths = write_images(tmp_path, 2, size=(13, 7), ext=".jpg") + write_images(tmp_path, 1, seed=3)
    for p in paths:
        np.testing.assert_array_equal(load_image(p.read_bytes(), (8, 8)), load_image(p, (8, 8)))
    with pytest.raises(Exception, match="encoded image"):
        load_image(b"not an image")


def test_ray_arguments_are_refused_in_one_line_before_ray_starts(capsys, tmp_path, model_path, image_dir):
    for argv, message in [(["--actors", "2"], "give it with --ray"),
                          (["--ray", str(image_dir)], "is not a Ray cluster address"),
                          (["--ray", "--actors", "0"], "--actors must be a positive integer"),
                          (["--ray", "--streams", "2"], "--streams is for a run on this machine")]:
        code, out, err = run(capsys, "predict", model_path, image_dir, *argv)
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    code, out, err = run(capsys, "finetune", model_path, image_dir, "-o", tmp_path / "x.onnx", "--actors", "2")
    assert code == 2 and "give it with --ray" in err and not (tmp_path / "x.onnx").exists()
    # --ray takes an optional ADDRESS: written before the inputs it swallows the first one, and says so
    for argv in (["predict", "--ray", model_path, image_dir], ["finetune", "--ray", model_path, image_dir, "-o", "x"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and err == (f"porter: error: --ray {str(model_path)!r} is not a Ray cluster address; give "
                                     f"auto, HOST:PORT or ray://HOST:PORT, or --ray alone for a local Ray (write "
                                     f"--ray=ADDRESS, or put --ray after the inputs)\n"), err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_without_ray_installed_the_error_names_the_extra(tmp_path, model_path, image_dir):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from porter.cli import main\n"
            f"sys.exit(main(['predict', {str(model_path)!r}, {str(image_dir)!r}, '--ray']))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert got.returncode == 1, got.stderr
    assert got.stderr.strip() == ("porter: error: Ray is not installed (import of ray halted; None in sys.modules); "
                                  "install porter's Ray extra: pip install 'porter[ray]'")


def test_the_cli_does_not_import_ray():
    code = ("import sys\nfrom porter.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow')))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "[]"


# --- on Ray, from the command line (each starts its own local Ray) ------------------------------------------------

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="porter[ray] is not installed")


@pytest.mark.slow
@needs_ray
def test_predict_on_ray_writes_the_local_answers_as_parquet(tmp_path, model_path, image_dir, bounded):
    pq = pytest.importorskip("pyarrow.parquet")
    paths, want = local_predictions(model_path, image_dir)
    out = tmp_path / "preds.parquet"
    got = run_porter("predict", model_path, image_dir, "--ray", "--top-k", "3", "-o", out, timeout=200)
    assert got.returncode == 1, got.stderr  # broken.png
    assert "on Ray: 2 Ray actors x 1 CPU thread" in got.stderr and f"{len(paths)} images in" in got.stderr
    rows = pq.read_table(out).to_pylist()
    assert [r["path"] for r in rows] == paths and [r["row"] for r in rows] == list(range(len(paths)))
    for r, w in zip(rows, want):
        back = from_record(r)
        assert back.error == w.error
        if w.error is None:
            assert (back.label, back.index) == (w.label, w.index) and back.score == pytest.approx(w.score, abs=1e-6)
            assert [t[0] for t in back.top_k] == [t[0] for t in w.top_k]
    # again without --force: refused in one line before Ray starts, the file kept
    before = out.read_bytes()
    again = run_porter("predict", model_path, image_dir, "--ray", "-o", out, timeout=60)
    assert again.returncode == 1 and "already exists" in again.stderr and again.stderr.count("\n") == 1
    assert out.read_bytes() == before


@pytest.mark.slow
@needs_ray
def test_an_unreachable_cluster_is_one_line_at_once(tmp_path, model_path, image_dir, bounded):
    want = ["porter: error: can't reach the Ray cluster at 127.0.0.1:1: [Errno 111] Connection refused; check the "
            "address (ray status on the head node prints it), or give --ray without an address for a local Ray"]
    got = run_porter("predict", model_path, image_dir, "--ray", "127.0.0.1:1", timeout=60)
    assert got.returncode == 1 and got.stderr.strip().splitlines() == want
    # finetune says it before reading the data or loading the model (a conversion can take minutes)
    write_images(tmp_path / "train" / "a", 3)
    write_images(tmp_path / "train" / "b", 3, seed=1)
    got = run_porter("finetune", model_path, tmp_path / "train", "-o", tmp_path / "x.onnx", "--ray=127.0.0.1:1",
                     timeout=60)
    assert got.returncode == 1 and got.stderr.strip().splitlines() == want
    assert not (tmp_path / "x.onnx").exists()


# --- on Ray, in process ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    from porter.ray import session

    with session(num_cpus=2) as r:
        yield r


@pytest.mark.slow
@needs_ray
def test_ray_predict_gives_the_local_predictions(local_ray, model_path, image_dir, bounded):
    import ray

    import porter.ray
    from porter.ray.jobs import plan_predict

    paths, want = local_predictions(model_path, image_dir)
    run = plan_predict(model_path, image_dir, top_k=3)
    got = list(run)
    assert [p.source for p in got] == paths
    for g, w in zip(got, want):
        assert (g.label, g.index, g.error) == (w.label, w.index, w.error)
        if w.error is None:
            assert g.score == pytest.approx(w.score, abs=1e-6)
            np.testing.assert_allclose([s for _, s in g.top_k], [s for _, s in w.top_k], atol=1e-6)
    assert "broken.png" in [p.source for p in got if p.error][0]
    # the API's lazy Dataset, fed by Ray Data's own reader: the same rows, keyed by path
    files = ray.data.read_binary_files([str(p) for p in paths if not p.endswith("broken.png")], include_paths=True)
    rows = porter.ray.predict(model_path, files, top_k=3).take_all()
    by_path = {w.source: w for w in want}
    assert len(rows) == len(paths) - 1
    for r in rows:
        w = by_path[r["path"]]
        assert r["label"] == w.label and r["score"] == pytest.approx(w.score, abs=1e-6)


@pytest.mark.slow
@needs_ray
def test_ray_predict_of_a_feature_model_returns_its_outputs(local_ray, tmp_path, image_dir, bounded):
    from porter.ray.jobs import plan_predict

    path = save(feature_model(), tmp_path / "features.onnx")
    images = sorted(image_dir.glob("img*.png"))
    want = list(load(path, device="cpu").iter_predictions(images))
    got = list(plan_predict(path, images))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.outputs["mean"], w.outputs["mean"], atol=1e-6)
        assert g.outputs["features"].shape == w.outputs["features"].shape


@pytest.fixture
def class_folders(tmp_path):
    root = tmp_path / "train"
    for c in range(3):
        write_images(root / f"class{c}", 12, size=(10 + c, 9), seed=10 + c)
    (root / "class1" / "broken.png").write_bytes(b"nope")
    return root


@pytest.mark.slow
@needs_ray
def test_ray_features_equal_the_local_ones(local_ray, class_folders, bounded):
    from porter.graph.cuts import plan_cuts
    from porter.ray.cluster import Connection
    from porter.transfer.data import load_data
    from porter.transfer.features import compute_features
    from porter.transfer.inputs import input_geometry, resolve_preprocess
    from porter.transfer.options import FinetuneOptions
    from porter.spec import ModelCard

    model = classifier(preprocess="torch", labels=LABELS)
    card = ModelCard.from_onnx(model)
    opts = FinetuneOptions()
    geometry = input_geometry(model, opts, card)
    spec, _ = resolve_preprocess(card, opts, geometry)
    data = load_data(class_folders)
    cuts = plan_cuts(model, "backbone")
    local = compute_features(model, cuts, data, geometry, spec, cache=False, progress=False, batch_size=8)
    on_ray = compute_features(model, cuts, data, geometry, spec, cache=False, progress=False, batch_size=8,
                              ray=Connection(), actors=2)
    for c in cuts:
        a, b = local[c.key], on_ray[c.key]
        np.testing.assert_array_equal(a.index, b.index)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.features, b.features, rtol=0, atol=1e-6)
        assert a.skipped == b.skipped and len(b.skipped) == 1 and "broken.png" in b.skipped[0][0]
        assert "Ray actors" in b.device


@pytest.mark.slow
@needs_ray
def test_finetune_on_ray_trains_the_local_head_and_caches_its_features(local_ray, tmp_path, class_folders,
                                                                       monkeypatch, bounded):
    import porter

    model = classifier(preprocess="torch", labels=LABELS)
    kw = dict(cut="backbone", augment="flip,crop", progress=False, seed=1)
    local = porter.finetune(model, class_folders, cache=False, **kw)
    cache = tmp_path / "feature-cache"
    on_ray = porter.finetune(model, class_folders, ray="local", cache_dir=cache, **kw)
    assert on_ray.metrics.final == local.metrics.final
    assert on_ray.metrics.features.device.startswith("cpu, 2 Ray actors")
    assert len(list(cache.glob("*.npz"))) == 2  # the training images and their augmented views
    # a second run finds every feature in the cache and never reaches Ray
    from porter.ray import jobs

    monkeypatch.setattr(jobs, "RayBackbone", lambda *a, **k: pytest.fail("Ray ran although the cache holds it all"))
    again = porter.finetune(model, class_folders, ray="local", cache_dir=cache, **kw)
    assert again.features_cached and again.metrics.final == local.metrics.final
