"""`porter predict` and `porter bench` from the command line: formats, per-file errors, exit codes, bad inputs."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import onnxruntime as ort
import pytest

import porter.runtime.session as S
from porter.cli import main
from porter.imaging import load_image, to_tensor
from porter.spec import ModelCard

from conftest import run_main as run
from conftest import run_porter
from runtime_models import ANIMALS, classifier, feature_model, labelled_classifier, save, write_images

LABELS = list(ANIMALS)


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def model_path(tmp_path):
    return save(labelled_classifier(), tmp_path / "clf.onnx")


@pytest.fixture
def image_dir(tmp_path):
    write_images(tmp_path / "imgs", 4, size=(16, 12))
    write_images(tmp_path / "imgs" / "nested", 2, size=(9, 9), seed=5, ext=".jpg")
    (tmp_path / "imgs" / "readme.txt").write_text("not an image, skipped by extension")
    return tmp_path / "imgs"


def expected_rows(model_path, paths):
    model = ModelCard.from_onnx(__import__("onnx").load(str(model_path)))
    spec = model.preprocess
    x = to_tensor([load_image(p, spec.size) for p in paths], spec)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})[0]


def test_predict_json_matches_the_model_by_hand(capsys, model_path, image_dir):
    code, out, err = run(capsys, "predict", model_path, image_dir, "--format", "json", "--top-k", "3", "--device", "cpu",
                         "--batch-size", "4")
    assert code == 0, err
    rows = json.loads(out)
    paths = sorted(p for p in image_dir.rglob("*") if p.suffix in (".png", ".jpg"))
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # recursive, sorted, .txt skipped
    expected = expected_rows(model_path, paths)
    for r, e in zip(rows, expected):
        assert set(r) == {"path", "label", "score", "top_k"}
        assert r["label"] == LABELS[int(e.argmax())] and r["score"] == pytest.approx(float(e.max()), abs=1e-6)
        assert [t["label"] for t in r["top_k"]] == [LABELS[j] for j in np.argsort(-e)[:3]]
        assert [t["score"] for t in r["top_k"]] == pytest.approx(sorted(e, reverse=True)[:3], abs=1e-6)
    assert "clf.onnx on cpu (CPU)" in err


def test_predict_reports_unreadable_files_and_exits_non_zero(capsys, model_path, image_dir):
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    code, out, err = run(capsys, "predict", model_path, image_dir, "--format", "json", "--device", "cpu")
    assert code == 1
    rows = json.loads(out)
    bad = [r for r in rows if "error" in r]
    assert len(rows) == 7 and len(bad) == 1
    assert bad[0]["path"].endswith("broken.jpg") and "label" not in bad[0] and "decode" in bad[0]["error"]
    assert "1 of 7 inputs failed; see their error fields" in err
    assert "porter: 7 images, 1 failed in " in err and "waiting for decoding" in err


def test_predict_csv_and_table(capsys, model_path, image_dir):
    code, out, _ = run(capsys, "predict", model_path, image_dir, "--format", "csv", "--top-k", "2", "--device", "cpu")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["path", "label", "score", "label_2", "score_2", "error"]
    assert len(rows) == 7 and all(r[1] in LABELS and r[3] in LABELS and r[5] == "" for r in rows[1:])
    assert all(float(r[2]) >= float(r[4]) for r in rows[1:])
    code, out, _ = run(capsys, "predict", model_path, image_dir / "img000.png", "--top-k", "1", "--device", "cpu")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["path", "label", "score"] and len(lines) == 2
    assert lines[1].split()[1] in LABELS


def test_predict_raw_outputs_for_a_non_classifier(capsys, tmp_path, image_dir):
    path = save(feature_model(size=(8, 8)), tmp_path / "feat.onnx")
    code, out, _ = run(capsys, "predict", path, image_dir / "img000.png", "--format", "json", "--device", "cpu")
    assert code == 0
    (row,) = json.loads(out)
    assert np.array(row["outputs"]["features"]).shape == (1, 4, 8, 8)
    code, out, _ = run(capsys, "predict", path, image_dir / "img000.png", "--device", "cpu")
    assert "features[1, 4, 8, 8]:" in out and "mean[1, 1, 1, 1]:" in out


@pytest.mark.parametrize("case, needle", [
    ("not_onnx", "is not an ONNX model"),
    ("empty_dir", "directory has no images"),
    ("no_metadata", "no porter preprocessing metadata"),
    ("missing_input", "no such file or directory"),
    ("bad_top_k", "--top-k must be at least 1"),
    ("bad_decode_workers", "decode workers must be a positive integer"),
    ("bad_streams", "streams must be a positive integer"),
])
def test_predict_bad_inputs(capsys, tmp_path, model_path, image_dir, case, needle):
    model, inputs, extra = model_path, [image_dir], []
    if case == "not_onnx":
        model = tmp_path / "model.onnx"
        model.write_text("{}")
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        inputs = [tmp_path / "empty"]
    elif case == "no_metadata":
        model = save(classifier(preprocess=None), tmp_path / "bare.onnx")
    elif case == "missing_input":
        inputs = [tmp_path / "nowhere"]
    elif case == "bad_top_k":
        extra = ["--top-k", "0"]
    elif case == "bad_decode_workers":
        extra = ["--decode-workers", "0"]
    elif case == "bad_streams":
        extra = ["--streams", "-1"]
    code, out, err = run(capsys, "predict", model, *inputs, "--device", "cpu", *extra)
    assert code != 0 and out == ""
    assert err.startswith("porter: error: ") and needle in err and len(err.strip().splitlines()) == 1


def test_predict_fast_decode_and_decode_workers(capsys, monkeypatch, model_path, tmp_path):
    from PIL import Image

    import porter.runtime.pipeline as P

    coarse = np.random.default_rng(4).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    photo = tmp_path / "photo.jpg"  # 32x the model's 8x8 input: decoded at 1/8 scale with --fast-decode
    Image.fromarray(coarse).resize((256, 192), Image.Resampling.BICUBIC).save(photo, quality=90)
    pools = []

    class RecordingPool(P.ThreadPoolExecutor):
        def __init__(self, max_workers=None, thread_name_prefix="", **kwargs):
            pools.append((thread_name_prefix, max_workers))
            super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix, **kwargs)

    monkeypatch.setattr(P, "ThreadPoolExecutor", RecordingPool)
    plain = run(capsys, "predict", model_path, photo, "--format", "json", "--device", "cpu")
    fast = run(capsys, "predict", model_path, photo, "--format", "json", "--device", "cpu", "--fast-decode",
               "--decode-workers", "3")
    assert plain[0] == fast[0] == 0 and ("porter-decode", 3) in pools[len(pools) // 2:]
    for (_, out, _), fast_decode in ((plain, False), (fast, True)):
        model = ModelCard.from_onnx(__import__("onnx").load(str(model_path)))
        x = to_tensor([load_image(photo, model.preprocess.size, fast_decode=fast_decode)], model.preprocess)
        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        expected = sess.run(None, {"image": x})[0][0]
        assert json.loads(out)[0]["score"] == pytest.approx(float(expected.max()), abs=1e-6)
    assert json.loads(fast[1])[0]["score"] != json.loads(plain[1])[0]["score"]


def test_predict_streams(capsys, model_path, tmp_path):
    paths = write_images(tmp_path / "many", 10, size=(16, 12))
    code, out, err = run(capsys, "predict", model_path, tmp_path / "many", "--format", "json", "--device", "cpu",
                         "--batch-size", "1", "--streams", "2")
    assert code == 0, err
    assert "10 images in" in err and "(2 streams)" in err  # 10 batches: enough for 2 streams
    rows = json.loads(out)
    expected = expected_rows(model_path, paths)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert [r["score"] for r in rows] == pytest.approx([float(e.max()) for e in expected], abs=1e-6)
    code, out1, err = run(capsys, "predict", model_path, tmp_path / "many", "--format", "json", "--device", "cpu",
                          "--batch-size", "1", "--streams", "1")
    assert code == 0 and "streams" not in err and json.loads(out1) == rows


def test_output_pipe_closed_early_ends_quietly(capsys, monkeypatch, model_path, image_dir):
    import os
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # like `porter predict ... | head -1` once head has exited
    with open(write_end, "w", buffering=1) as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        code = main(["predict", str(model_path), str(image_dir), "--format", "csv", "--device", "cpu"])
        monkeypatch.undo()
    assert code == 141
    assert "Traceback" not in capsys.readouterr().err


def test_predict_with_preprocess_for_a_bare_model(capsys, tmp_path, image_dir):
    model = save(classifier(preprocess=None), tmp_path / "bare.onnx")
    code, out, _ = run(capsys, "predict", model, image_dir, "--preprocess", "torch", "--format", "json", "--device", "cpu")
    assert code == 0 and len(json.loads(out)) == 6


@pytest.mark.skipif(S.cuda_problem() is None, reason="CUDA works here")
def test_predict_device_cuda_without_cuda(capsys, model_path, image_dir):
    code, out, err = run(capsys, "predict", model_path, image_dir, "--device", "cuda")
    assert code != 0 and out == ""
    assert "device 'cuda' is not available" in err and "--device cpu" in err


def test_bench_prints_a_table(capsys, model_path):
    code, out, err = run(capsys, "bench", model_path, "--batch-sizes", "1,4", "--device", "cpu", "--seconds", "0.05")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("clf.onnx: onnxruntime cpu (CPU)")
    assert lines[1].split() == ["batch", "p50", "ms", "p95", "ms", "items/s"]
    assert [ln.split()[0] for ln in lines[2:4]] == ["1", "4"]
    assert all(float(ln.split()[3]) > 0 for ln in lines[2:4])
    code, out, _ = run(capsys, "bench", model_path, "--batch-sizes", "2", "--device", "cpu", "--seconds", "0.05", "--json")
    data = json.loads(out)
    assert data["rows"][0]["batch_size"] == 2 and data["rows"][0]["runs"] >= 5


def test_bench_bad_options_and_unreachable_source(capsys, tmp_path, model_path):
    code, _, err = run(capsys, "bench", model_path, "--batch-sizes", "1,x", "--device", "cpu")
    assert code == 2 and "bad batch sizes '1,x'" in err
    code, _, err = run(capsys, "bench", model_path, "--device", "cpu", "--against-source", "--seconds", "0.05")
    assert code == 1 and "--against-source" in err and "can't be reached" in err and "test:model" in err
    bare = save(classifier(preprocess=None), tmp_path / "bare.onnx")
    code, _, err = run(capsys, "bench", bare, "--device", "cpu", "--against-source")
    assert code == 1 and "no porter metadata" in err


def test_cli_subprocess_exit_codes(tmp_path, model_path, image_dir):
    ok = run_porter("predict", model_path, image_dir / "img001.png", "--format", "json", "--device", "cpu",
                    timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["label"] in LABELS
    bad = run_porter("predict", tmp_path / "nope.onnx", image_dir, timeout=120)
    assert bad.returncode == 1 and "porter: error: model not found" in bad.stderr and "Traceback" not in bad.stderr
