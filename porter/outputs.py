"""Writing results: never half-written, never over an existing file without ``force``, never over anything that
is not a regular file (a device, a FIFO, a socket, a symlink), and with the mode a plain ``open()`` would give."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError

TWO_GB = 2 * 1024**3
EXTERNAL_THRESHOLD = 1024  # tensors smaller than this stay inline even in an external-data model


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """Fail early (before any work) if ``path`` can't be written."""
    out = Path(path).expanduser()
    try:
        st = out.lstat()  # the link itself, not what it points to: a dangling symlink exists too
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"can't use output {out}: {e.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output {out} is a directory; give a file name such as {out / 'model.onnx'}")
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = _special_kind(st.st_mode)
        raise OutputError(f"output {out} is {kind}, not a regular file; porter writes only regular files and never "
                          f"replaces a {kind.split(' ', 1)[1]}, even with --force: give another file name")
    if st is not None and not force:
        raise OutputError(f"output {out} already exists; use --force (force=True) to overwrite it")
    if not out.parent.exists():
        raise OutputError(f"output directory {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"output directory {out.parent} is not writable")
    return out


def _special_kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield a temporary path in the target directory; rename it onto ``path`` only if the block succeeds."""
    out = check_output(path, force)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:  # /proc, a read-only or full file system ...
        raise OutputError(f"can't write into {out.parent}: {e.strerror}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; an output gets what open() would give
        check_output(out, force)  # something appeared meanwhile, or became a device or a link: refuse it now
        os.replace(tmp_path, out)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes, force: bool) -> Path:
    with atomic_path(path, force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_onnx(model, path: str | os.PathLike, force: bool) -> Path:
    """Save one ONNX file; weights go to external data (``NAME.data`` beside it) only over 2 GB."""
    import onnx

    out = Path(path)
    if model.ByteSize() < TWO_GB:
        return write_bytes(out, model.SerializeToString(), force)
    data_name = out.name + ".data"
    check_output(out.parent / data_name, force)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model moves tensors out of the proto it is given; keep the caller's whole
    with atomic_path(out, force) as tmp:
        onnx.save_model(copy, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=EXTERNAL_THRESHOLD)
    return out


def save_onnx_with_files(model, path: str | os.PathLike, files: "dict[Path, bytes]", force: bool) -> Path:
    """The model and the files beside it (a report), all or nothing: every temp file is written, then all are
    renamed, so a failure leaves none; a model over 2 GB goes through ``save_onnx`` (external data) last."""
    import contextlib

    out = Path(path)
    blobs = dict(files)
    small = model.ByteSize() < TWO_GB
    if small:
        blobs[out] = model.SerializeToString()
    with contextlib.ExitStack() as stack:
        temps = {p: stack.enter_context(atomic_path(p, force)) for p in blobs}
        for p, data in blobs.items():
            temps[p].write_bytes(data)
    if not small:
        save_onnx(model, out, force)
    return out
