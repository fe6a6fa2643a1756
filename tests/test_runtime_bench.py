"""porter.runtime.bench: timing statistics, the side-by-side table, and --against-source wiring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import porter.importers as importers
from porter.errors import SourceError, UsageError
from porter.importers import ImportedModel
from porter.runtime import load
from porter.sources import SourceRef
from porter.conversion import rebuild_source as load_source
from porter.runtime.bench import BenchReport, Timing, bench, measure, measure_streams, parse_batch_sizes, summarize

from runtime_models import card_for, classifier, write_images


pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_measure_and_summarize():
    calls = []
    times = measure(lambda: calls.append(1), warmup=2, min_seconds=0.0, min_runs=7)
    assert len(times) == 7 and len(calls) == 9
    t = summarize([0.010, 0.020, 0.030, 0.040, 1.0], batch_size=8)
    assert t.p50_ms == pytest.approx(30.0) and t.throughput == pytest.approx(8 / 0.03)
    assert t.p95_ms == pytest.approx(np.percentile([10, 20, 30, 40, 1000], 95))


def test_parse_batch_sizes():
    assert parse_batch_sizes("1, 8,32") == (1, 8, 32)
    assert parse_batch_sizes([4]) == (4,)
    for bad in ("", "0", "a,b", "-1"):
        with pytest.raises(UsageError, match="batch sizes"):
            parse_batch_sizes(bad)


def test_bench_report_and_table():
    p = load(classifier(), device="cpu")
    report = bench(p, "1,3", warmup=1, min_seconds=0.0, min_runs=5)
    assert [r.batch_size for r in report.rows] == [1, 3] and all(r.runs >= 5 and r.throughput > 0 for r in report.rows)
    assert report.engine == "onnxruntime cpu" and report.providers == ["CPUExecutionProvider"]
    table = report.to_table()
    assert table.splitlines()[1].split() == ["batch", "p50", "ms", "p95", "ms", "items/s"]
    side = BenchReport("m.onnx", "onnxruntime cpu", ["CPUExecutionProvider"], [Timing(8, 2.0, 3.0, 4000.0, 10)],
                       source_engine="keras", source_rows=[Timing(8, 10.0, 12.0, 800.0, 5)], max_abs_diff={8: 1e-7})
    assert side.speedup(8) == pytest.approx(5.0)
    row = side.to_table().splitlines()[2].split()
    assert row == ["8", "2.00", "3.00", "4000.0", "10.00", "12.00", "800.0", "5.00x", "1e-07"]
    assert side.to_dict()["speedup"] == {8: 5.0}


def test_fixed_batch_model_times_its_batch_only():
    report = bench(load(classifier(batch=2), device="cpu"), "1,8", min_seconds=0.0, warmup=0)
    assert [r.batch_size for r in report.rows] == [2] and "exactly 2" in report.notes[0]


def test_against_source_runs_the_importer_on_the_same_inputs(tmp_path, monkeypatch):
    """The wiring, with a stand-in importer: parse the card's source, rebuild, time, compare outputs."""
    src = tmp_path / "model.keras"
    src.write_bytes(b"PK\x03\x04")  # only its existence matters: the importer is a stand-in
    model = classifier(card=card_for(None, source=f"keras:{src}", framework="keras"))
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    seen = {}

    def fake_importer(ref, opts):
        seen["ref"], seen["opts"] = ref, opts
        return ImportedModel(onnx_model=model, framework="fakeflow",
                             run_source=lambda arrays: sess.run(None, {"image": arrays[0]}))

    monkeypatch.setattr(importers, "get_importer", lambda name: fake_importer)
    monkeypatch.setattr("porter.sources._detect_path",
                        lambda path, text: SourceRef("keras", "keras-file", str(path), text=text))
    p = load(model, device="cpu")
    report = bench(p, "1,2", min_seconds=0.0, warmup=0, source=lambda: load_source(p))
    assert seen["ref"].location == str(src) and seen["opts"].validate is False
    assert seen["opts"].input_shapes.unnamed == (3, 8, 8)
    assert report.source_engine == "fakeflow" and [r.batch_size for r in report.source_rows] == [1, 2]
    assert report.max_abs_diff == {1: 0.0, 2: 0.0}
    assert "fakeflow p50 ms" in report.to_table() and "x" in report.to_table().splitlines()[2]


def test_against_source_errors(tmp_path):
    moved = classifier(card=card_for(None, source=str(tmp_path / "gone.keras"), framework="keras"))
    with pytest.raises(SourceError, match=r"--against-source: the source '.*gone\.keras' recorded in model can't be reached"):
        load_source(load(moved, device="cpu"))
    tuned = classifier(card=card_for(None, source="keras:MobileNetV2", framework="keras", cut="pool"))
    with pytest.raises(SourceError, match="fine-tuned by porter"):
        load_source(load(tuned, device="cpu"))
    in_memory = classifier(card=card_for(None, source="keras-object:mobilenetv2_1.00_224", framework="keras",
                                            source_form="object"))
    with pytest.raises(SourceError, match=r"^model was converted from an in-memory keras model \(keras-object:"
                                          r"mobilenetv2_1\.00_224\), which porter can't rebuild; --against-source"):
        load_source(load(in_memory, device="cpu"))
    module = classifier(card=card_for(None, source="module:SmallCNN", framework="torch", source_form="module"))
    with pytest.raises(SourceError, match=r"in-memory torch model \(module:SmallCNN\), which porter can't rebuild"):
        load_source(load(module, device="cpu"))
    bare = classifier(preprocess=None)
    with pytest.raises(SourceError, match="no porter metadata"):
        load_source(load(bare, device="cpu"))


@pytest.mark.slow
def test_keras_fixture_end_to_end(tmp_path, capsys):
    """convert a real Keras fixture, then predict (same answers as by hand) and bench it against Keras."""
    import porter
    from porter.cli import main
    from porter.imaging import load_image, to_tensor

    fixture = Path(__file__).parent.parent / "fixtures" / "keras" / "cnn_bn.keras"
    out = tmp_path / "cnn.onnx"
    porter.convert(str(fixture.resolve()), out, preprocess="unit")
    files = write_images(tmp_path / "imgs", 5, size=(20, 24))
    p = porter.load(out, device="cpu")
    preds = p.predict(files, top_k=4)
    import keras

    km = keras.saving.load_model(fixture)
    x = to_tensor([load_image(f, (16, 16)) for f in files], p.preprocess)
    ref = np.asarray(km(x, training=False))
    assert [r.index for r in preds] == list(ref.argmax(1))
    assert [r.score for r in preds] == pytest.approx(list(ref.max(1)), abs=1e-5)
    assert main(["bench", str(out), "--batch-sizes", "1,4", "--device", "cpu", "--seconds", "0.1", "--against-source"]) == 0
    table = capsys.readouterr().out
    assert "keras p50 ms" in table and "speed-up" in table
    row = table.splitlines()[3].split()
    assert row[0] == "4" and row[-2].endswith("x") and float(row[-1]) < 1e-4


def test_measure_streams_runs_every_stream_beside_the_others():
    import threading

    seen: dict[str, int] = {}
    inside = [0]
    overlap = [0]
    lock = threading.Lock()

    def fn():
        name = threading.current_thread().name
        with lock:
            seen[name] = seen.get(name, 0) + 1
            inside[0] += 1
            overlap[0] = max(overlap[0], inside[0])
        threading.Event().wait(0.002)
        with lock:
            inside[0] -= 1

    per_stream = measure_streams(fn, 3, warmup=2, min_seconds=0.05, min_runs=12)
    assert len(per_stream) == 3 and sum(map(len, per_stream)) >= 12 and all(per_stream)
    assert sorted(seen) == ["porter-bench-0", "porter-bench-1", "porter-bench-2"]
    assert all(n == 2 + len(t) for n, t in zip((seen[f"porter-bench-{i}"] for i in range(3)), per_stream))  # + warm-up
    assert overlap[0] == 3  # the streams really ran at the same time

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure_streams(broken, 2, warmup=1)


def test_bench_with_streams(tmp_path, capsys):
    from porter.cli import main

    from runtime_models import save

    p = load(classifier(), device="cpu", threads=4)
    report = bench(p, "1,4", warmup=1, min_seconds=0.0, min_runs=6, streams=2)
    assert report.engine == "onnxruntime cpu, 2 concurrent streams of 2 threads"
    assert [r.batch_size for r in report.rows] == [1, 4] and all(r.runs >= 6 and r.throughput > 0 for r in report.rows)
    assert p.stream_session(2) is p.stream_session(2)  # the streams share one session, made once
    for kwargs, message in (({"streams": 0}, "streams must be a positive integer"),
                            ({"warmup": -1}, "can't be negative"), ({"min_seconds": -0.5}, "can't be negative"),
                            ({"streams": 2, "source": lambda: load_source(p)}, "--streams and --against-source")):
        with pytest.raises(UsageError, match=message):
            bench(p, "1", **kwargs)
    p.device = "cuda"  # as if on a GPU: streams are refused before anything runs
    with pytest.raises(UsageError, match="--streams is for the CPU"):
        bench(p, "1", streams=2)
    model = save(classifier(), tmp_path / "m.onnx")
    assert main(["bench", str(model), "--device", "cpu", "--batch-sizes", "2", "--seconds", "0", "--streams", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 concurrent streams of" in out.splitlines()[0] and out.splitlines()[2].split()[0] == "2"
    assert main(["bench", str(model), "--device", "cpu", "--streams", "0"]) == 2
    assert "streams must be a positive integer, got 0" in capsys.readouterr().err


def test_streams_throughput_adds_up_the_streams_rates(monkeypatch):
    import porter.runtime.bench as B

    monkeypatch.setattr(B, "measure_streams", lambda fn, streams, **kw: [[0.1, 0.1], [0.2]])
    (row,) = bench(load(classifier(), device="cpu", threads=2), "4", streams=2).rows
    assert row.throughput == pytest.approx(2 * 4 / 0.2 + 4 / 0.2) and row.p50_ms == pytest.approx(100.0)
    assert row.runs == 3


def test_the_card_records_an_in_memory_source_as_a_typed_field(tmp_path):
    keras = pytest.importorskip("keras")
    import porter

    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="p")(inp))
    r = porter.convert(model, tmp_path / "m.onnx")
    assert r.card.source_form == "object" and r.card.in_memory and r.card.weights is None
    with pytest.raises(SourceError, match="in-memory keras model"):
        load_source(load(tmp_path / "m.onnx", device="cpu"))


def test_rebuilding_a_hub_source_named_by_metadata_needs_trust(tmp_path, monkeypatch):
    """A received model's porter.source naming torchhub code is no consent to run that hubconf.py."""
    from porter.errors import UnsafeModelError

    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text("raise SystemExit('hubconf.py ran')\n")
    model = classifier(card=card_for(None, source=f"torchhub:{hub}:net", framework="torch"))
    p = load(model, device="cpu")
    with pytest.raises(UnsafeModelError, match=r"metadata names the source torchhub:.*hub:net; rebuilding it runs "
                                               r"that repo's hubconf\.py.* pass --trust-repo"):
        load_source(p)
    called = {}

    def fake_importer(ref, opts):
        called["trust"] = opts.trust_repo
        raise SourceError("stop here")

    monkeypatch.setattr(importers, "get_importer", lambda name: fake_importer)
    with pytest.raises(SourceError, match="stop here"):
        load_source(p, trust_repo=True)
    assert called == {"trust": True}


def test_cli_bench_against_a_hub_source_without_trust_is_one_line(tmp_path, porter_cli):
    hub = tmp_path / "hub"
    hub.mkdir()
    marker = tmp_path / "ran"
    (hub / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    from runtime_models import save

    path = save(classifier(card=card_for(None, source=f"torchhub:{hub}:net", framework="torch")), tmp_path / "m.onnx")
    r = porter_cli("bench", path, "--against-source", "--batch-sizes", "1", "--seconds", "0")
    assert r.returncode != 0 and "--trust-repo" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists()  # the hubconf.py never ran


def test_against_a_source_file_replaced_since_conversion_is_one_line(tmp_path, porter_cli):
    """The card records the source's sha256: a different model at the recorded path is named, not compared."""
    import shutil

    import porter

    fixtures = Path(__file__).parent.parent / "fixtures"
    src = tmp_path / "m.keras"
    shutil.copy(fixtures / "keras" / "cnn_bn.keras", src)
    out = tmp_path / "m.onnx"
    card = porter.convert(str(src), out, preprocess="unit").card
    assert card.source_sha256 and len(card.source_sha256) == 64
    from porter.spec import ModelCard
    import onnx

    assert ModelCard.from_onnx(onnx.load(out)).source_sha256 == card.source_sha256  # round trip
    shutil.copy(fixtures / "backbone" / "backbone.keras", src)  # another model, same path
    r = porter_cli("bench", out, "--against-source", "--batch-sizes", "1", "--seconds", "0")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"--against-source: {src} has changed since m.onnx was converted from it" in r.stderr


def test_the_source_digest_covers_what_decides_the_model(tmp_path):
    import shutil

    from porter.sources import parse_source, source_digest

    folder = tmp_path / "tfjs"
    shutil.copytree(Path(__file__).parent.parent / "fixtures" / "tfjs" / "graph_int32", folder)
    ref = parse_source(str(folder / "model.json"))
    first = source_digest(ref)
    (folder / "notes.txt").write_text("unrelated")
    assert source_digest(ref) == first
    shard = next(folder.glob("*.bin"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # other weights, the same model.json
    shard.write_bytes(bytes(data))
    assert source_digest(ref) != first
    assert source_digest(parse_source("keras:MobileNetV2")) is None  # an application: nothing local to hash
