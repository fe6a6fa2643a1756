"""`porter finetune` as a user runs it: summary on stdout, progress on stderr, one-line errors, exit codes."""

from __future__ import annotations

import json

import pytest

from porter.cli import build_parser, finetune_options

from conftest import run_porter
from model_builders import build, make_folder, report_files, save


def test_cli_builds_the_same_options_the_api_takes():
    from porter.transfer import FinetuneOptions

    args = build_parser().parse_args(
        ["finetune", "m.onnx", "data", "-o", "o.onnx", "--epochs", "7", "--head", "mlp", "--hidden", "32",
         "--dropout", "0.1", "--val-split", "0.25", "--seed", "3", "--cut", "t", "--image-size", "24,32",
         "--preprocess", "torch", "--mean", "0.5", "--std", "0.25,0.5,1", "--balance", "--no-cache", "--quiet",
         "--device", "cpu", "--hub-arg", "pretrained=False", "--trust-repo", "--force"])
    opts = FinetuneOptions.from_kwargs(**finetune_options(args))
    assert (opts.epochs, opts.head, opts.hidden, opts.dropout, opts.val_split, opts.seed) == (7, "mlp", 32, 0.1, 0.25, 3)
    assert opts.cut == "t" and opts.image_size == (24, 32) and opts.preprocess == "torch"
    assert opts.mean == (0.5,) and opts.std == (0.25, 0.5, 1.0)
    assert opts.balance and not opts.cache and not opts.progress and opts.force and opts.device == "cpu"
    assert opts.convert_options == {"hub_args": {"pretrained": False}, "trust_repo": True}


@pytest.mark.slow
def test_cli_finetune_writes_model_and_report(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", n=6)
    src = save(build("gemm"), tmp_path / "m.onnx")
    out = tmp_path / "tuned.onnx"
    monkeypatch.setenv("PORTER_CACHE", str(tmp_path / "cache"))  # the subprocess inherits it
    r = run_porter("finetune", src, data, "-o", out, "--epochs", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"fine-tuned test:gemm on {data}: 3 classes, 15 train / 3 val examples -> {out}")
    assert "check: merged model == backbone + head" in r.stdout
    assert "features [" in r.stderr and "probe l2 " in r.stderr
    assert all(p.is_file() for p in report_files(out))
    assert json.loads(report_files(out)[1].read_text())["training"]["seed"] == 1
    again = run_porter("finetune", src, data, "-o", out, "--epochs", "3")
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [f"porter: error: output {out} already exists; use --force "
                                                 f"(force=True) to overwrite it"]


def test_cli_errors_are_one_line_with_exit_codes(tmp_path):
    src = save(build("gemm"), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    r = run_porter("finetune", src, tmp_path / "missing", "-o", out)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"porter: error: data not found: {tmp_path / 'missing'} (no such file or "
                                             f"directory); give an image folder with one subfolder per class, or a CSV file"]
    r = run_porter("finetune", src, tmp_path, "-o", out, "--val-split", "1.5")
    assert r.returncode == 2
    assert r.stderr.strip() == "porter: error: --val-split must be between 0 and 1 (exclusive), got 1.5"
    assert not out.exists()
