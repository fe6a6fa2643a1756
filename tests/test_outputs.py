"""porter.outputs: atomic writes that never replace what isn't a regular file, with the mode open() would give."""

from __future__ import annotations

import os
import stat

import pytest

from porter.errors import OutputError
from porter.outputs import check_output, write_bytes


def test_a_fifo_is_never_replaced_even_with_force(tmp_path):
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match=r"is a FIFO, not a regular file; .* never replaces a FIFO, even with --force"):
        write_bytes(fifo, b"x", force=True)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]  # no temp file left


def test_symlinks_are_refused_dangling_or_not(tmp_path):
    target = tmp_path / "real.onnx"
    target.write_bytes(b"keep")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="is a symbolic link, not a regular file"):
        write_bytes(link, b"new", force=True)
    assert target.read_bytes() == b"keep" and link.is_symlink()
    dangling = tmp_path / "dangling.onnx"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="is a symbolic link"):
        check_output(dangling, force=False)  # it "exists" as a link: not silently replaced
    assert dangling.is_symlink()


def test_outputs_get_the_mode_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        out = write_bytes(tmp_path / "m.onnx", b"1", force=False)
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        os.chmod(out, 0o640)
        write_bytes(out, b"2", force=True)  # replaced: the new file is 0644 again, as open() would make it
        assert stat.S_IMODE(out.stat().st_mode) == 0o644 and out.read_bytes() == b"2"
        os.umask(0o077)
        private = write_bytes(tmp_path / "p.onnx", b"3", force=False)
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_an_unwritable_place_is_one_error_line(tmp_path):
    with pytest.raises(OutputError) as e:
        write_bytes("/proc/porter-test.onnx", b"x", force=False)
    assert "\n" not in str(e.value) and "/proc" in str(e.value)


def test_cli_refuses_a_fifo_output_with_force(tmp_path, porter_cli, fixtures_dir):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    r = porter_cli("convert", fixtures_dir / "tfjs" / "graph_int32" / "model.json", "-o", fifo, "--force")
    assert r.returncode != 0 and r.stderr.startswith("porter: error: output") and "FIFO" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and stat.S_ISFIFO(fifo.lstat().st_mode)
