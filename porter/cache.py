"""The one place that says where porter caches things: ``$PORTER_CACHE`` (default ``~/.cache/porter``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("PORTER_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "porter"


def cache_dir(kind: str, root: str | os.PathLike | None = None) -> Path:
    """The cache folder for one kind of thing (``tfjs`` downloads, ``features``, ``ort`` optimized models,
    ``tensorrt`` engines) under ``root`` (a caller's override), else under ``$PORTER_CACHE``."""
    return (Path(root).expanduser() if root is not None else cache_root()) / kind
