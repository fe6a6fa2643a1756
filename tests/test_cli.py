"""The CLI as a user meets it: subprocesses, exit codes, one-line errors, no TensorFlow at start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import run_porter


def test_help_does_not_import_tensorflow_or_torch():
    code = ("import sys, contextlib, io\n"
            "from porter import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: cli.main(['--help'])\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'torch', 'keras', 'tf2onnx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_convert_end_to_end_then_inspect(fixtures_dir, tmp_path):
    out = tmp_path / "cnn.onnx"
    r = run_porter("convert", fixtures_dir / "keras" / "cnn_bn.keras", "-o", out, "--preprocess", "tf")
    assert r.returncode == 0, r.stderr
    assert "input  image: float32[batch, 16, 16, 3]" in r.stdout
    assert "output probs: float32[batch, 4]" in r.stdout
    assert "parity passed at batch sizes 1, 3" in r.stdout and "opset 17" in r.stdout
    r = run_porter("inspect", out)
    assert r.returncode == 0, r.stderr
    assert "opset 17" in r.stdout and "536 parameters" in r.stdout
    assert "preprocess: tf (NHWC, 16x16" in r.stdout and "parity: passed" in r.stdout
    r = run_porter("inspect", out, "--json")
    import json

    doc = json.loads(r.stdout)
    assert doc["inputs"][0]["shape"] == ["batch", 16, 16, 3] and doc["porter"]["porter.framework"] == "keras"


def test_errors_are_one_line_without_traceback(fixtures_dir, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_text("keep me")
    r = run_porter("convert", fixtures_dir / "keras" / "two_outputs.h5", "-o", out)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"porter: error: output {out} already exists; use --force (force=True) to overwrite it"
    assert "Traceback" not in r.stderr
    assert out.read_text() == "keep me"
    r = run_porter("convert", tmp_path / "missing.h5", "-o", tmp_path / "x.onnx")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"porter: error: model not found: {tmp_path / 'missing.h5'} (no such file or directory); check the path, or use a reference such as keras:MobileNetV2 or torchhub:OWNER/REPO:ENTRY"


def test_debug_shows_the_traceback(tmp_path):
    r = run_porter("--debug", "convert", tmp_path / "missing.h5", "-o", tmp_path / "x.onnx")
    assert r.returncode != 0 and "Traceback" in r.stderr and "SourceError" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["convert", "keras:MobileNetV2", "-o", "x.onnx", "--input-shape", "a,b"], "bad shape 'a,b'"),
    (["convert", "torchhub:x/y:e", "-o", "x.onnx", "--hub-arg", "pretrained=maybe"], "is not a Python literal"),
    (["inspect", "no-such.onnx"], "model not found: no-such.onnx"),
])
def test_bad_arguments(tmp_path, args, message):
    r = run_porter(*args, cwd=tmp_path)
    assert r.returncode in (1, 2) and message in r.stderr and "Traceback" not in r.stderr


def test_inspect_rejects_non_onnx(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_text("hello, not a protobuf")
    r = run_porter("inspect", bad)
    assert r.returncode == 1 and "is not an ONNX model" in r.stderr


def test_python_dash_m_and_version():
    r = run_porter("--version")
    assert r.returncode == 0 and r.stdout.startswith("porter ")


def test_inspect_does_not_import_tensorflow_or_torch(fixtures_dir, tmp_path):
    import porter

    out = tmp_path / "m.onnx"
    porter.convert(str(fixtures_dir / "keras" / "two_outputs.h5"), out)
    code = ("import sys, contextlib, io\n"
            "from porter import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()) as buf:\n"
            f"    rc = cli.main(['inspect', {str(out)!r}, '--cuts'])\n"
            "assert rc == 0 and 'class_probs' in buf.getvalue(), buf.getvalue()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'torch', 'keras', 'tf2onnx')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("argv, message", [
    (["finetune", "m.onnx", "data", "-o", "x.onnx", "--cut"],
     "porter: error: argument --cut: expected one argument (see porter finetune --help)"),
    (["convert"], "porter: error: the following arguments are required: source, -o/--output "
                  "(see porter convert --help)"),
    (["finetune", "m.onnx", "data", "-o", "x.onnx", "--lr", "fast"],
     "porter: error: argument --lr: invalid float value: 'fast' (see porter finetune --help)"),
])
def test_argparse_mistakes_are_one_line(argv, message):
    r = run_porter(*argv)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [message]


def test_the_decoding_tip_names_fast_decode_only_for_jpegs(monkeypatch):
    from porter.cli.run import decoding_tip
    from porter.runtime.pipeline import PipelineStats

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    slow = PipelineStats(images=100, seconds=4.0, first_batch_seconds=0.5, decode_wait_seconds=1.0)
    assert decoding_tip(slow, 2, False, ["a.png", "b.PNG"]) == "decoding is the bottleneck; try more --decode-workers (now 2)"
    assert decoding_tip(slow, 4, False, ["a.png"]) is None  # every core decodes already, and --fast-decode can't help
    assert decoding_tip(slow, 4, False, ["a.png", "c.JPG"]) == "decoding is the bottleneck; try --fast-decode for large JPEGs"
    assert decoding_tip(slow, 4, True, ["c.jpg"]) is None
    quick = PipelineStats(images=100, seconds=4.0, first_batch_seconds=0.1, decode_wait_seconds=0.5)
    assert decoding_tip(quick, 1, False, ["c.jpg"]) is None  # decoding kept up


def test_the_cli_defaults_are_the_options_defaults():
    """porter finetune / convert flags take their defaults from FinetuneOptions / ConvertOptions (one place)."""
    from dataclasses import fields

    from porter.cli import build_parser
    from porter.options import ConvertOptions
    from porter.transfer.options import FinetuneOptions

    args = build_parser().parse_args(["finetune", "m.onnx", "data", "-o", "x.onnx"])
    defaults = {f.name: f.default for f in fields(FinetuneOptions)}
    for name in ("epochs", "patience", "batch_size", "head", "hidden", "val_split", "seed", "unfreeze",
                 "finetune_epochs", "train_precision", "max_drop", "path_column", "label_column", "device",
                 "feature_batch_size"):
        assert getattr(args, name) == defaults[name], name
    text = run_porter("convert", "--help").stdout
    assert f"ONNX opset (default {ConvertOptions().opset})" in " ".join(text.split())
