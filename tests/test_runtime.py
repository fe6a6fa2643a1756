"""porter.load / Predictor on the CPU: answers equal the model computed by hand, scores, batching, bad inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import porter.runtime.session as S
from porter.errors import DataError, InferenceError, ModelLoadError, RuntimeSetupError, SourceError, UsageError
from porter.imaging import load_image, to_tensor
from porter.runtime import Prediction, load
from porter.runtime.predictor import compare_precision, convert_to_fp16
from porter.spec import PreprocessSpec

from runtime_models import classifier, feature_model, random_images, save, tabular_model, write_images


pytestmark = pytest.mark.usefixtures("isolated_cache")


def by_hand(model, images, spec: PreprocessSpec) -> np.ndarray:
    """The reference: porter's documented preprocessing, then a plain onnxruntime session."""
    x = to_tensor([load_image(im, spec.size) for im in images], spec)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("layout, preset", [("NCHW", "torch"), ("NHWC", "tf"), ("NHWC", "caffe")])
def test_predict_images_equals_model_by_hand(tmp_path, layout, preset):
    labels = ["cat", "dog", "eel", "fox", "gnu"]
    model = classifier(layout=layout, preprocess=preset, labels=labels)
    path = save(model, tmp_path / "m.onnx")
    files = write_images(tmp_path / "imgs", 7, size=(20, 14))
    p = load(path, device="cpu", batch_size=3)
    assert p.providers == ["CPUExecutionProvider"] and p.device == "cpu"
    assert p.is_classifier and p.score_transform == "none" and p.labels == tuple(labels)
    preds = p.predict(files, top_k=3)
    expected = by_hand(model, files, p.preprocess)
    assert [r.source for r in preds] == [str(f) for f in files]
    for r, row in zip(preds, expected):
        assert r.index == int(np.argmax(row)) and r.label == labels[r.index]
        assert r.score == pytest.approx(float(row.max()), abs=1e-6)
        assert [s for _, s in r.top_k] == pytest.approx(sorted(row, reverse=True)[:3], abs=1e-6)
        assert [lab for lab, _ in r.top_k] == [labels[j] for j in np.argsort(-row)[:3]]


def test_pil_images_arrays_and_a_batch_array_agree(tmp_path):
    from PIL import Image

    model = classifier()
    p = load(model, device="cpu")
    images = random_images(4, size=(8, 8))
    a = p.predict(images)
    b = p.predict([Image.fromarray(im) for im in images])
    c = p.predict(np.stack(images))
    d = p.predict(images[0])
    assert [x.index for x in a] == [x.index for x in b] == [x.index for x in c]
    assert [x.score for x in a] == pytest.approx([x.score for x in c])
    assert len(d) == 1 and d[0].index == a[0].index
    assert a[0].label == a[0].index  # no labels in the metadata: the index is the label


def test_preprocessed_tensors(tmp_path):
    model = classifier(layout="NHWC", preprocess="unit")
    p = load(model, device="cpu", batch_size=4)
    x = p.example_inputs(10)["image"]
    preds = p.predict(x, preprocessed=True, top_k=1)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"image": x})[0]
    assert len(preds) == 10
    assert [r.index for r in preds] == list(expected.argmax(1))
    assert [r.score for r in preds] == pytest.approx(list(expected.max(1)), abs=1e-6)
    assert len(preds[0].top_k) == 1
    out = p.run_batched({"image": x.astype(np.float64)}, batch_size=3)  # float64 is cast, batches concatenated
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-6)


def test_logits_get_softmax_and_log_probs_get_exp():
    images = random_images(3, size=(8, 8))
    logits = load(classifier(head="logits"), device="cpu")
    assert logits.score_transform == "softmax"
    probs = load(classifier(head="softmax"), device="cpu")
    logp = load(classifier(head="logsoftmax"), device="cpu")
    assert logp.score_transform == "exp"
    a, b, c = logits.predict(images, top_k=5), probs.predict(images, top_k=5), logp.predict(images, top_k=5)
    for x, y, z in zip(a, b, c):
        assert sum(s for _, s in x.top_k) == pytest.approx(1.0, abs=1e-6)
        assert [s for _, s in x.top_k] == pytest.approx([s for _, s in y.top_k], abs=1e-6)
        assert [s for _, s in z.top_k] == pytest.approx([s for _, s in y.top_k], abs=1e-5)
    raw = load(classifier(head="logits"), device="cpu", scores="raw").predict(images, top_k=5)
    assert sum(s for _, s in raw[0].top_k) != pytest.approx(1.0)
    assert raw[0].index == a[0].index


def test_label_output_is_ignored_and_top_k_clipped():
    p = load(classifier(extra_label_output=True, classes=3), device="cpu")
    assert p.score_output == "probabilities" and p.num_classes == 3
    r = p.predict(random_images(1, size=(8, 8)), top_k=10)[0]
    assert len(r.top_k) == 3 and [s for _, s in r.top_k] == sorted([s for _, s in r.top_k], reverse=True)


def test_labels_that_dont_fit_are_dropped_with_a_note():
    p = load(classifier(classes=5, labels=["a", "b"]), device="cpu")
    assert p.labels is None and any("2 labels for 5 classes" in n for n in p.notes)


def test_non_classifier_returns_named_outputs():
    model = feature_model()
    p = load(model, device="cpu", batch_size=2)
    assert not p.is_classifier
    images = random_images(5, size=(8, 8))
    out = p.predict(images)
    assert set(out) == {"features", "mean"} and out["features"].shape == (5, 4, 8, 8) and out["mean"].shape == (5, 1, 1, 1)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = to_tensor(images, p.preprocess)
    np.testing.assert_allclose(out["features"], sess.run(None, {"image": x})[0], atol=1e-5)
    it = list(p.iter_predictions(images[:2]))
    assert it[0].outputs["features"].shape == (1, 4, 8, 8) and it[0].to_dict()["outputs"]["mean"]


def test_fixed_batch_model_pads_the_last_batch():
    model = classifier(batch=4)
    p = load(model, device="cpu", batch_size=16)
    assert p.batch_size == 4 and any("exactly 4" in n for n in p.notes)
    images = random_images(6, size=(8, 8))
    preds = p.predict(images)
    assert len(preds) == 6
    x = to_tensor(images, p.preprocess)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {"image": x[:4]})[0],
                          sess.run(None, {"image": np.concatenate([x[4:], np.zeros_like(x[:2])])})[0][:2]])
    assert [r.index for r in preds] == list(ref.argmax(1))
    assert [r.score for r in preds] == pytest.approx(list(ref.max(1)), abs=1e-6)


def test_dynamic_size_model_keeps_image_sizes_and_groups_them():
    model = classifier(size=None, preprocess="unit")
    p = load(model, device="cpu")
    images = random_images(2, size=(8, 8)) + random_images(1, size=(16, 12)) + random_images(1, size=(8, 8), seed=3)
    preds = p.predict(images)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for im, r in zip(images, preds):
        ref = sess.run(None, {"image": to_tensor([im], p.preprocess)})[0][0]
        assert r.index == int(ref.argmax()) and r.score == pytest.approx(float(ref.max()), abs=1e-6)


def test_iter_predictions_reports_bad_files_and_goes_on(tmp_path):
    files = write_images(tmp_path, 3, size=(8, 8))
    write_images(tmp_path / "big", 1, size=(64, 64))
    (tmp_path / "broken.png").write_bytes((tmp_path / "big" / "img000.png").read_bytes()[:300])  # truncated
    p = load(classifier(), device="cpu", batch_size=2)
    sources = [files[0], tmp_path / "broken.png", files[1], tmp_path / "gone.png", files[2]]
    out = list(p.iter_predictions(sources, top_k=2))
    assert [r.ok for r in out] == [True, False, True, False, True]
    assert "can't decode image" in out[1].error and not out[1].error.startswith(str(tmp_path))
    assert out[3].error == "no such file"
    assert out[1].to_dict() == {"path": str(tmp_path / "broken.png"), "error": out[1].error}
    with pytest.raises(DataError, match=r"broken\.png: can't decode image"):
        p.predict(sources)


def test_pipeline_stats_say_whether_decoding_keeps_up(tmp_path, monkeypatch):
    import time

    import porter.runtime.pipeline as P

    files = write_images(tmp_path, 6, size=(8, 8))
    p = load(classifier(), device="cpu", batch_size=2)
    out = list(p.iter_predictions(files + [tmp_path / "gone.png"]))
    st = p.last_stats
    assert (st.images, st.failed, len(out)) == (7, 1, 7)
    assert 0 < st.inference_seconds and st.first_batch_seconds + st.decode_wait_seconds + st.inference_seconds <= st.seconds
    assert st.throughput == pytest.approx(7 / st.seconds)
    assert "7 images, 1 failed in" in st.describe() and st.to_dict()["images"] == 7

    def slow_decode(*args, **kwargs):  # decoding 40x slower than this tiny model: inference must wait for it
        time.sleep(0.04)
        return load_image(*args, **kwargs)

    monkeypatch.setattr(P, "load_image", slow_decode)
    p.decode_workers = 1
    list(p.iter_predictions(files))
    st = p.last_stats
    assert st.images == 6 and st.first_batch_seconds >= 0.07  # two images decoded before anything can run
    assert st.decode_wait_seconds / st.seconds > 0.5 > st.inference_seconds / st.seconds


def test_long_cpu_runs_use_single_threaded_streams_with_the_same_answers(tmp_path, monkeypatch):
    import porter.runtime.predictor as P

    model = classifier(layout="NHWC", preprocess="tf")
    files = write_images(tmp_path, 21, size=(12, 10))
    sources = files[:5] + [tmp_path / "gone.png"] + files[5:]
    p = load(model, device="cpu", batch_size=2, threads=2)
    assert [p.pipeline_streams(n) for n in (1, 7, 8, 40)] == [1, 1, 2, 2]  # at least 4 batches per stream
    opened = []
    create = P.S.create_session
    monkeypatch.setattr(P.S, "create_session", lambda src, config, **kw: opened.append(config) or create(src, config, **kw))
    out = list(p.iter_predictions(sources, top_k=3))  # 11 batches of 2: two streams
    assert p.last_stats.streams == 2 and "(2 streams)" in p.last_stats.describe()
    assert [(c.threads, c.spin) for c in opened] == [(1, False)]  # one single-threaded session, built once
    list(p.iter_predictions(sources))
    assert len(opened) == 1
    assert [r.source for r in out] == [str(s) for s in sources] and out[5].error == "no such file"
    expected = by_hand(model, files, p.preprocess)
    good = [r for r in out if r.ok]
    assert [r.index for r in good] == list(expected.argmax(1))
    assert [r.score for r in good] == pytest.approx(list(expected.max(1)), abs=1e-6)
    one = load(model, device="cpu", batch_size=2, threads=2, streams=1)
    opened.clear()
    assert [r.to_dict() for r in one.iter_predictions(sources, top_k=3)] == [r.to_dict() for r in out]
    assert one.last_stats.streams == 1 and not opened  # streams=1: the predictor's own session
    with pytest.raises(DataError, match=r"gone\.png: no such file"):
        p.predict(sources)
    it = p.iter_predictions(sources)
    assert next(it).ok
    it.close()  # a consumer that stops early: the pools shut down, nothing hangs
    assert load(model, device="cpu", threads=2, fp16=True).pipeline_streams(100) == 1
    limit = P.STREAMS_MAX_MODEL_BYTES
    monkeypatch.setattr(P, "STREAMS_MAX_MODEL_BYTES", 100)  # a "big" model: streams only when asked
    assert p.pipeline_streams(40) == 1 and load(model, device="cpu", threads=2, streams=2).pipeline_streams(40) == 2
    monkeypatch.setattr(P, "STREAMS_MAX_MODEL_BYTES", limit)
    free_size = classifier(size=None, preprocess="unit")  # no ring buffers: tensors grouped by size, then streams
    mixed = random_images(5, size=(8, 8)) + random_images(4, size=(12, 10), seed=2)
    fs = load(free_size, device="cpu", batch_size=1, threads=2)
    got = fs.predict(mixed)
    assert fs.last_stats.streams == 2
    sess = ort.InferenceSession(free_size.SerializeToString(), providers=["CPUExecutionProvider"])
    for im, r in zip(mixed, got):
        ref = sess.run(None, {"image": to_tensor([im], fs.preprocess)})[0][0]
        assert r.index == int(ref.argmax()) and r.score == pytest.approx(float(ref.max()), abs=1e-6)
    many = load(model, device="cpu", threads=8, batch_size=1)  # 8 threads: 4 streams of 2, not 8 of 1
    assert (many.pipeline_streams(15), many.pipeline_streams(16)) == (1, P.MAX_STREAMS) == (1, 4)
    opened.clear()
    assert [r.to_dict() for r in many.iter_predictions(sources, top_k=3)] == [r.to_dict() for r in out]
    assert many.last_stats.streams == 4 and [c.threads for c in opened] == [2]
    with pytest.raises(UsageError, match="streams must be a positive integer"):
        load(model, device="cpu", streams=0)


def test_a_consumer_that_stops_early_does_not_wait_for_queued_decoding(tmp_path, monkeypatch):
    import threading
    import time

    import porter.runtime.pipeline as P

    files = write_images(tmp_path, 12, size=(8, 8))
    decoded = []
    lock = threading.Lock()

    def slow_decode(*args, **kwargs):
        time.sleep(0.2)  # far longer than the consumer's step from its first result to close()
        with lock:
            decoded.append(args[0])
        return load_image(*args, **kwargs)

    monkeypatch.setattr(P, "load_image", slow_decode)
    p = load(classifier(), device="cpu", batch_size=2, decode_workers=1, streams=1)
    it = p.iter_predictions(files)
    assert next(it).ok  # batch 0 done; batches 1-3 queued for decoding
    it.close()
    assert len(decoded) <= 4  # batch 0 and at most the image in the decoder's hands: the queued ones were dropped


def test_fast_decode_reaches_the_decoder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(coarse).resize((256, 192), Image.Resampling.BICUBIC).save(path, quality=90)
    model = classifier()  # 8x8 input: the 256x192 JPEG is decoded at 1/8 scale
    spec = PreprocessSpec.preset("unit", layout="NCHW", size=(8, 8))
    fast = load(model, device="cpu", preprocess=spec, scores="raw", fast_decode=True)
    exact = load(model, device="cpu", preprocess=spec, scores="raw")
    x = to_tensor([load_image(path, (8, 8), fast_decode=True)], spec)
    assert fast.predict([path])[0].top_k[0][1] == pytest.approx(float(fast.run(x)[fast.score_output].max()), abs=1e-6)
    assert fast.predict([path])[0].score != exact.predict([path])[0].score
    with pytest.raises(UsageError, match="decode workers must be a positive integer"):
        load(model, device="cpu", decode_workers=0)


def test_predictor_facts_and_repr():
    p = load(classifier(), device="cpu", threads=1)
    assert "on cpu" in repr(p) and p.num_classes == 5
    assert isinstance(p.predict(random_images(1, size=(8, 8)))[0], Prediction)
    with p as q:
        assert q is p


# --- bad inputs ---------------------------------------------------------------------------------------------------

def test_a_file_that_is_not_onnx(tmp_path):
    (tmp_path / "notes.onnx").write_text("hello")
    with pytest.raises(ModelLoadError, match=r"notes\.onnx is not an ONNX model"):
        load(tmp_path / "notes.onnx", device="cpu")
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match=r"is a Keras HDF5 model, not ONNX; convert it first: porter convert"):
        load(tmp_path / "model.h5", device="cpu")
    with pytest.raises(SourceError, match="model not found"):
        load(tmp_path / "missing.onnx")
    with pytest.raises(UsageError, match="porter.load takes a path"):
        load(12)


def test_model_without_metadata_fed_images_says_what_is_needed():
    model = classifier(preprocess=None)
    p = load(model, device="cpu")
    assert p.card is None and p.preprocess is None
    with pytest.raises(DataError, match=r"no porter preprocessing metadata.*--preprocess.*preprocessed=True"):
        p.predict(random_images(1))
    fixed = load(model, device="cpu", preprocess="torch")  # the override makes it work
    assert fixed.preprocess.layout == "NCHW" and fixed.preprocess.size == (8, 8)
    assert fixed.predict(random_images(1))[0].score > 0
    x = fixed.example_inputs(2)["image"]
    assert len(p.predict(x, preprocessed=True)) == 2  # tensors work without metadata


def test_non_image_model_fed_images():
    p = load(tabular_model(), device="cpu")
    assert p.is_classifier and p.score_transform == "softmax"
    with pytest.raises(DataError, match=r"features: float32\[batch, 10\], not one image tensor"):
        p.predict(random_images(1))
    with pytest.raises(UsageError, match="needs a model whose one input is an image"):
        load(tabular_model(), device="cpu", preprocess="unit")


@pytest.mark.parametrize("x, needle", [
    (np.zeros((2, 3, 9, 9), np.float32), r"expects float32\[batch, 3, 8, 8\], received float32\[2, 3, 9, 9\]"),
    (np.zeros((3, 8, 8), np.float32), r"received float32\[3, 8, 8\]; add the batch axis"),
    (np.zeros((2, 8, 8, 3), np.float32), r"looks channels-last where the model is channels-first"),
    (np.zeros((2, 3, 8, 8), np.uint8), r"expects float32\[batch, 3, 8, 8\], received uint8.*leave out preprocessed=True"),
])
def test_tensor_shape_and_dtype_mismatch(x, needle):
    p = load(classifier(), device="cpu")
    with pytest.raises(DataError, match=needle):
        p.predict(x, preprocessed=True)


def test_feed_names_must_match():
    p = load(classifier(), device="cpu")
    with pytest.raises(DataError, match=r"takes inputs \['image'\]; missing \['image'\]; unknown \['x'\]"):
        p.run({"x": np.zeros((1, 3, 8, 8), np.float32)})


def test_bad_options():
    m = classifier()
    with pytest.raises(UsageError, match="unknown device 'gpu'"):
        load(m, device="gpu")
    with pytest.raises(UsageError, match="batch size must be a positive integer"):
        load(m, batch_size=0)
    with pytest.raises(UsageError, match="unknown scores mode"):
        load(m, scores="logits")
    with pytest.raises(UsageError, match="top-k must be at least 1"):
        load(m, device="cpu").predict(random_images(1), top_k=0)


@pytest.mark.skipif(S.cuda_problem() is None, reason="CUDA works here")
def test_cuda_without_cuda_names_what_is_missing():
    with pytest.raises(RuntimeSetupError, match=r"device 'cuda' is not available: .*(driver|libraries|CPU-only|GPU)"):
        load(classifier(), device="cuda")
    with pytest.raises(RuntimeSetupError, match="device 'tensorrt' is not available"):
        load(classifier(), device="tensorrt")
    p = load(classifier(), device="auto")
    assert p.device == "cpu" and any(n.startswith("auto: running on CPU; CUDA is unavailable") for n in p.notes)


def test_cpu_only_wheel_is_named(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    S.cuda_problem.cache_clear()
    S.tensorrt_problem.cache_clear()
    try:
        assert "CPU-only wheel" in S.cuda_problem() and "pip install onnxruntime-gpu" in S.cuda_problem()
        with pytest.raises(RuntimeSetupError, match="CPU-only wheel"):
            S.resolve_device("cuda")
        assert "no TensorRT provider" in S.tensorrt_problem()
    finally:
        S.cuda_problem.cache_clear()
        S.tensorrt_problem.cache_clear()


def test_missing_driver_is_named(monkeypatch):
    import ctypes

    real = ctypes.CDLL

    def fake(name, *a, **k):
        if str(name).startswith("libcuda.so"):
            raise OSError(f"{name}: cannot open shared object file")
        return real(name, *a, **k)

    monkeypatch.setattr(ctypes, "CDLL", fake)
    assert "no NVIDIA driver (libcuda.so.1 not found" in S._driver_problem()


# --- sessions, cache, fp16 ----------------------------------------------------------------------------------------

def test_optimized_model_is_cached_per_device(tmp_path):
    model = classifier()
    first = load(model, device="cpu", cache_dir=tmp_path / "c")
    assert not first.session_info.optimized_from_cache and first.session_info.cache_path
    second = load(model, device="cpu", cache_dir=tmp_path / "c")
    assert second.session_info.optimized_from_cache
    x = first.example_inputs(3)
    np.testing.assert_allclose(first.run(x)["probabilities"], second.run(x)["probabilities"], atol=1e-6)
    files = list((tmp_path / "c" / "ort").glob("*.onnx"))
    assert len(files) == 1 and "-cpu-" in files[0].name
    files[0].write_bytes(b"garbage")  # a corrupt entry is rebuilt, not fatal
    third = load(model, device="cpu", cache_dir=tmp_path / "c")
    assert not third.session_info.optimized_from_cache and third.predict(random_images(1))[0].score > 0
    off = load(model, device="cpu", cache=False, cache_dir=tmp_path / "d")
    assert off.session_info.cache_path is None and not (tmp_path / "d").exists()


def test_session_options_fit_the_machine(tmp_path):
    cfg = S.SessionConfig(device="cpu")
    so = S.session_options(cfg)
    assert so.intra_op_num_threads == S.cpu_threads() >= 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert S.session_options(S.SessionConfig(device="cpu", threads=1, spin=False)).intra_op_num_threads == 1
    cuda = dict(S.providers_for(S.SessionConfig(device="cuda"))[0][1])
    assert cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    profiles = dict(S.providers_for(S.SessionConfig(device="tensorrt", cache_dir=str(tmp_path), max_batch=64, opt_batch=32),
                                    {"image": ("batch", 224, 224, 3)})[0][1])
    assert profiles["trt_profile_max_shapes"] == "image:64x224x224x3"
    assert profiles["trt_profile_min_shapes"] == "image:1x224x224x3"


def test_fp16_is_checked_against_fp32_before_use():
    model = classifier(head="softmax")
    p = load(model, device="cpu", fp16=True)
    r = p.precision_report
    assert r.passed and r.top1_agreement == 1.0 and r.max_abs_diff["probabilities"] < 5e-3
    assert any("fp16 on CPU" in n for n in p.notes) and any("fp16 vs fp32" in n for n in p.notes)
    ref = load(model, device="cpu")
    images = random_images(6, size=(8, 8))
    assert [a.index for a in p.predict(images)] == [b.index for b in ref.predict(images)]
    half = convert_to_fp16(model)
    assert half.graph.input[0].type.tensor_type.elem_type == 1  # float32 I/O kept
    assert any(i.data_type == 10 for i in half.graph.initializer)  # weights in float16


@pytest.mark.skipif(S.cuda_problem() is None, reason="CUDA works here")
def test_fp16_with_auto_on_a_cpu_machine_is_ignored_with_a_note():
    p = load(classifier(), device="auto", fp16=True)
    assert not p.fp16 and any("fp16 ignored" in n for n in p.notes)


def test_compare_precision_catches_overflow_and_flips():
    ref = {"p": np.array([[0.1, 0.9], [0.6, 0.4], [0.5, 0.5]], np.float32)}
    ok = compare_precision(ref, {"p": ref["p"] + 1e-4}, "p")
    assert ok.passed and ok.top1_agreement == 1.0
    flip = compare_precision(ref, {"p": np.array([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]], np.float32)}, "p")
    assert not flip.passed and "top-1 differs on 1 of 3" in " ".join(flip.problems)
    tie = compare_precision(ref, {"p": np.array([[0.1, 0.9], [0.6, 0.4], [0.5, 0.5001]], np.float32)}, "p")
    assert tie.passed  # a near tie flipping is not a disagreement
    inf = compare_precision(ref, {"p": np.array([[np.inf, 0], [0, 0], [0, 0]], np.float32)}, "p")
    assert not inf.passed and "non-finite" in inf.problems[0]


# --- GPU (skipped without CUDA) -----------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_provider_matches_cpu():
    model = classifier()
    images = random_images(9, size=(8, 8))
    gpu = load(model, device="cuda", batch_size=4)
    assert gpu.providers[0] == "CUDAExecutionProvider"
    cpu = load(model, device="cpu")
    for a, b in zip(gpu.predict(images), cpu.predict(images)):
        assert a.index == b.index and a.score == pytest.approx(b.score, abs=1e-4)
    auto = load(model)
    assert auto.device == "cuda" and auto.notes == ["auto: running on CUDA"]


@pytest.mark.gpu
def test_io_binding_keeps_tensors_on_the_gpu():
    model = classifier()
    p = load(model, device="cuda")
    x = p.example_inputs(4)
    ref = load(model, device="cpu").run(x)["probabilities"]
    on_gpu = {"image": ort.OrtValue.ortvalue_from_numpy(x["image"], "cuda", 0)}
    out = p.run(on_gpu, output_device="cuda")["probabilities"]
    assert isinstance(out, ort.OrtValue) and out.device_name().lower() == "cuda"
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-4)
    np.testing.assert_allclose(p.run(x)["probabilities"], ref, atol=1e-4)  # host in, host out
    import torch
    if torch.cuda.is_available():
        t = torch.from_numpy(x["image"]).cuda()
        got = p.run({"image": t}, output_device="cuda")["probabilities"]
        np.testing.assert_allclose(torch.from_dlpack(got).cpu().numpy(), ref, atol=1e-4)
        preds = p.predict(t, preprocessed=True)
        assert [r.index for r in preds] == list(ref.argmax(1))


@pytest.mark.gpu
def test_fp16_on_cuda():
    model = classifier()
    p = load(model, device="cuda", fp16=True)
    assert p.fp16 and p.precision_report.passed and p.providers[0] == "CUDAExecutionProvider"
    images = random_images(8, size=(8, 8))
    ref = load(model, device="cpu").predict(images)
    got = p.predict(images)
    assert [a.index for a in got] == [b.index for b in ref]
    assert max(abs(a.score - b.score) for a, b in zip(got, ref)) < 5e-3


def test_auto_falls_back_to_cpu_when_the_gpu_provider_does_not_start(monkeypatch):
    """auto resolved to CUDA, but the session came up without it: run on CPU and say why."""
    monkeypatch.setattr(S, "resolve_device", lambda requested: ("cuda", "auto: running on CUDA"))
    real = S.create_session

    def fake(model, config, **kw):
        if config.device == "cuda":
            raise RuntimeSetupError("onnxruntime could not start CUDAExecutionProvider for this model")
        return real(model, config, **kw)

    monkeypatch.setattr(S, "create_session", fake)
    p = load(classifier(), device="auto")
    assert p.device == "cpu" and p.providers == ["CPUExecutionProvider"]
    assert p.notes == ["auto: running on CPU; the cuda provider did not start (onnxruntime could not start "
                       "CUDAExecutionProvider for this model)"]
    with pytest.raises(RuntimeSetupError):
        load(classifier(), device="cuda")


def test_io_binding_path_on_cpu_with_numpy_ortvalue_and_dlpack_inputs():
    """The GPU code path (IO binding) also runs on the CPU provider: exercise it here with every input kind."""
    import torch

    from porter.runtime.feeds import bind_and_run
    p = load(classifier(), device="cpu")
    x = p.example_inputs(3)["image"]
    ref = p.run({"image": x})["probabilities"]
    for value in (x, ort.OrtValue.ortvalue_from_numpy(x), torch.from_numpy(x)):
        checked = p.check_feeds({"image": value})
        out = bind_and_run(p.session, checked, p.output_names, "cpu")["probabilities"]
        np.testing.assert_allclose(out, ref, atol=1e-6)
    assert p.run({"image": torch.from_numpy(x)})["probabilities"].shape == (3, 5)  # torch on the plain path
    with pytest.raises(DataError, match=r"expects float32\[batch, 3, 8, 8\], received float64"):
        p.run({"image": torch.from_numpy(x.astype(np.float64))})
    with pytest.raises(DataError, match=r"received float32\[3, 8, 8\]; add the batch axis"):
        p.run({"image": ort.OrtValue.ortvalue_from_numpy(x[0, :, :, :8].copy())})
    with pytest.raises(UsageError, match="output_device='cuda' needs a GPU device"):
        p.run({"image": x}, output_device="cuda")


def test_batches_spread_their_tail_over_the_streams():
    from porter.runtime.predictor import plan_batches

    def sizes(*args, **kw):
        batches = plan_batches(*args, **kw)
        assert [i for b in batches for i in b] == list(range(args[0]))  # every index once, in order
        return [len(b) for b in batches]

    assert sizes(1000, 32) == [32] * 31 + [8]  # one stream: only the last batch is short
    assert sizes(1000, 32, 2) == [32] * 30 + [20, 20]  # two streams finish together
    assert sizes(1001, 32, 4) == [32] * 28 + [27, 26, 26, 26]
    assert sizes(1024, 32, 2) == [32] * 32  # nothing short: unchanged
    assert sizes(1000, 32, 2, padded=True) == [32] * 31 + [8]  # a fixed-batch model pads: spreading adds padding
    assert sizes(33, 32, 2) == [17, 16] and sizes(5, 2, 4) == [2, 2, 1] and sizes(0, 4, 2) == []


def test_a_spread_tail_gives_the_same_answers(tmp_path, monkeypatch):
    import porter.runtime.predictor as P

    model = classifier(layout="NHWC", preprocess="tf")
    files = write_images(tmp_path, 41, size=(12, 10))
    p = load(model, device="cpu", batch_size=5, threads=2)
    seen = []
    run = P.Predictor._run_padded
    monkeypatch.setattr(P.Predictor, "_run_padded", lambda self, feeds, n, *a: seen.append(n) or run(self, feeds, n, *a))
    out = p.predict(files)
    assert p.last_stats.streams == 2 and sorted(seen) == [3, 3] + [5] * 7  # 8 x 5 + 1 -> 7 x 5 + 3 + 3
    expected = by_hand(model, files, p.preprocess)
    assert [r.index for r in out] == list(expected.argmax(1))
    assert [r.score for r in out] == pytest.approx(list(expected.max(1)), abs=1e-6)


def valid_conv_classifier():
    """A classifier of any image size whose 3x3 convolution has no padding: images under 3x3 make it fail."""
    from onnx import helper

    model = classifier(size=None, preprocess="unit")
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("pads", [0, 0, 0, 0]))
    return model


def test_an_image_the_model_fails_on_is_reported_with_the_rest_going_on(tmp_path):
    p = load(valid_conv_classifier(), device="cpu")
    tiny = random_images(1, size=(2, 2))[0]
    good = random_images(3, size=(9, 9), seed=3)
    out = list(p.iter_predictions([good[0], tiny, good[1], good[2]]))
    assert [r.ok for r in out] == [True, False, True, True]
    assert out[1].error.startswith("model failed on image 1x3x2x2: ")
    assert "Invalid input shape" in out[1].error and "[ONNXRuntimeError]" not in out[1].error
    ref = p.predict(good)
    assert [r.index for r in ref] == [out[0].index, out[2].index, out[3].index]
    assert p.last_stats is not None and "1 failed" not in p.last_stats.describe()  # the last pass had none
    list(p.iter_predictions([good[0], tiny]))
    assert "2 images, 1 failed in" in p.last_stats.describe()
    with pytest.raises(InferenceError, match=r"^array 1 \(in a batch of 1\): model failed on image 1x3x2x2: "):
        p.predict([good[0], tiny])
    # the same mechanism under run() and preprocessed tensors: one InferenceError, not onnxruntime's exception
    x = to_tensor([tiny], p.preprocess)
    with pytest.raises(InferenceError, match=r"^model failed on image 1x3x2x2: .*Invalid input shape"):
        p.run(x)
    with pytest.raises(InferenceError, match=r"^model failed on image 1x3x2x2: "):
        p.predict(x, preprocessed=True)


@pytest.mark.parametrize("streams", [1, 2])
def test_images_resized_to_a_size_the_model_does_not_take_fail_once(tmp_path, streams):
    """A preprocessing size that doesn't fit the model's fixed input is one clear error, with or without streams."""
    model = classifier(layout="NHWC", preprocess="tf")
    spec = PreprocessSpec.preset("tf", layout="NHWC", size=(12, 12), channels=3)
    p = load(model, device="cpu", batch_size=1, threads=2, streams=streams, preprocess=spec)
    files = write_images(tmp_path, 8, size=(12, 10))
    with pytest.raises(DataError, match=r"input 'image' of model expects float32\[batch, 8, 8, 3\], received "
                                        r"float32\[1, 12, 12, 3\]"):
        list(p.iter_predictions(files))
    assert p.last_stats.streams == streams


def test_iter_outputs_yields_every_output_row_in_order_with_named_errors(tmp_path):
    model = classifier(layout="NHWC", preprocess="tf")
    files = write_images(tmp_path, 5, size=(12, 10))
    sources = files[:2] + [tmp_path / "gone.png"] + files[2:]
    p = load(model, device="cpu", batch_size=2)
    got = list(p.iter_outputs(sources, names=[f"n{i}" for i in range(6)]))
    assert [i for i, _, _ in got] == list(range(6))
    i, row, error = got[2]
    assert row is None and isinstance(error, DataError) and str(error) == "n2: no such file"
    expected = by_hand(model, files, p.preprocess)
    rows = [r for _, r, e in got if e is None]
    assert all(set(r) == {"probabilities"} and r["probabilities"].shape == (1, 5) for r in rows)
    np.testing.assert_allclose(np.concatenate([r["probabilities"] for r in rows]), expected, atol=1e-6)
    with pytest.raises(UsageError, match="2 names for 6 inputs"):
        list(p.iter_outputs(sources, names=["a", "b"]))
    with pytest.raises(DataError, match="^n2: no such file"):
        list(p.iter_outputs(sources, names=[f"n{i}" for i in range(6)], errors="raise"))


def test_tensorrt_unavailable_without_cuda_suggests_the_cpu(monkeypatch):
    from porter.runtime import session as S

    monkeypatch.setattr(S, "tensorrt_problem", lambda: "no NVIDIA driver")
    monkeypatch.setattr(S, "cuda_problem", lambda: "no NVIDIA driver")
    with pytest.raises(RuntimeSetupError, match=r"not available: no NVIDIA driver; use --device cpu$"):
        S.resolve_device("tensorrt")
    monkeypatch.setattr(S, "cuda_problem", lambda: "")
    with pytest.raises(RuntimeSetupError, match=r"use --device cuda or cpu$"):
        S.resolve_device("tensorrt")
