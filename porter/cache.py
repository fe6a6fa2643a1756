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


def cache_dir(kind: str) -> Path:
    """The cache folder for one kind of thing: ``tfjs`` downloads, ``features``, ``ort`` optimized models."""
    return cache_root() / kind
