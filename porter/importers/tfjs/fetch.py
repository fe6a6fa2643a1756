"""Downloading TF.js models over http(s): timeouts, a size limit, a progress bar, and a cache keyed by URL.

Shard URLs are resolved relative to the model.json URL (as TF.js's ``http`` handler does, query string
included) and must stay on its origin (scheme, host and port): a manifest can't send porter elsewhere.
Redirects are followed (CDNs use them) but never to a non-http(s) scheme or from https down to http.

Settings (environment): ``PORTER_CACHE`` (cache root; files go to ``$PORTER_CACHE/tfjs``, default
``~/.cache/porter/tfjs``), ``PORTER_HTTP_TIMEOUT`` (seconds per connection/read, default 30),
``PORTER_MAX_DOWNLOAD_MB`` (per file, default 2048). A cached file is used as is; delete the directory to
download again.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ...cache import cache_dir
from ...errors import ModelLoadError, NetworkError

MIB = 1024 * 1024
PROGRESS_MIN_BYTES = 4 * MIB  # downloads at least this large show a progress bar on stderr
CHUNK = 256 * 1024
USER_AGENT = "porter-tfjs/1 (+https://github.com/; python urllib)"




def default_timeout() -> float:
    """Seconds one read may wait (a server that stops sending)."""
    return _env_number("PORTER_HTTP_TIMEOUT", 30.0)


def default_deadline() -> float:
    """Seconds one whole file may take (a server that drips bytes keeps every read under the timeout)."""
    return _env_number("PORTER_HTTP_DEADLINE", 600.0)


def default_max_bytes() -> int:
    return int(_env_number("PORTER_MAX_DOWNLOAD_MB", 2048.0) * MIB)


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise NetworkError(f"${name}={raw!r} is not a number") from None
    if value <= 0:
        raise NetworkError(f"${name} must be positive, got {raw}")
    return value


def origin(url: str) -> tuple[str, str, int | None]:
    p = urllib.parse.urlsplit(url)
    port = p.port or {"http": 80, "https": 443}.get(p.scheme)
    return p.scheme.lower(), (p.hostname or "").lower(), port


def check_model_url(url: str) -> str:
    p = urllib.parse.urlsplit(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise NetworkError(f"{url!r} is not an http(s) URL; porter downloads TF.js models over http or https only")
    return url


def shard_url(model_url: str, path: str) -> str:
    """The URL of a shard: ``path`` resolved against the model.json URL, with model.json's query appended."""
    from .manifest import check_shard_path

    check_shard_path(path, model_url)
    base = urllib.parse.urlsplit(model_url)
    joined = urllib.parse.urljoin(urllib.parse.urlunsplit((base.scheme, base.netloc, base.path, "", "")), path)
    if base.query and "?" not in path:
        joined = f"{joined}?{base.query}"
    if origin(joined) != origin(model_url):
        raise ModelLoadError(f"{model_url}: shard path {path!r} resolves to {joined}, outside the model's origin "
                             f"{base.scheme}://{base.netloc}; porter refuses to fetch it")
    return joined


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Every hop re-checked: http(s) only, never https -> http, and within ``same_origin`` when one is set (a
    shard may not be redirected off its model's origin any more than its path may point there)."""

    def __init__(self, same_origin: tuple[str, str, int | None] | None = None):
        super().__init__()
        self.same_origin = same_origin

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        newurl = urllib.parse.urljoin(req.full_url, newurl)
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if new.scheme not in ("http", "https") or (old.scheme == "https" and new.scheme == "http"):
            raise NetworkError(f"{req.full_url} redirects to {newurl}; porter follows redirects only to "
                               f"http(s) and never from https to http")
        if self.same_origin is not None and origin(newurl) != self.same_origin:
            scheme, host, port = self.same_origin
            raise NetworkError(f"{req.full_url} redirects to {newurl}, outside the model's origin "
                               f"{scheme}://{host}:{port}; porter refuses to fetch a shard from elsewhere")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(same_origin=None) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_Redirects(same_origin))


def cached_path(url: str) -> Path:
    """Where the download of ``url`` is cached (keyed by the whole URL)."""
    return cache_dir("tfjs") / (hashlib.sha256(url.encode("utf-8")).hexdigest() + ".bin")


def fetch(url: str, *, timeout: float | None = None, max_bytes: int | None = None, use_cache: bool = True,
          what: str | None = None, same_origin: tuple[str, str, int | None] | None = None) -> bytes:
    """The bytes at ``url``, from the cache when present; otherwise downloaded (then cached atomically).
    ``same_origin``: redirects must stay on it (shards)."""
    check_model_url(url)
    timeout = default_timeout() if timeout is None else timeout
    max_bytes = default_max_bytes() if max_bytes is None else max_bytes
    cached = cached_path(url)
    if use_cache and cached.is_file():
        return cached.read_bytes()
    data = _download(url, timeout, max_bytes, what or url.rsplit("/", 1)[-1].split("?")[0] or url, same_origin)
    if use_cache:
        _store(cached, data)
    return data


def _download(url: str, timeout: float, max_bytes: int, label: str, same_origin=None) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    deadline = default_deadline()
    started = time.monotonic()
    try:
        with _opener(same_origin).open(req, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            if total is not None and total > max_bytes:
                raise NetworkError(f"{url} is {_size(total)}, over the {_size(max_bytes)} download limit; raise "
                                   f"$PORTER_MAX_DOWNLOAD_MB if you trust it")
            bar = _Progress(label, total) if (total or 0) >= PROGRESS_MIN_BYTES else None
            chunks, got = [], 0
            while True:
                chunk = resp.read1(CHUNK)  # what has arrived (read() would wait for a whole chunk)
                if not chunk:
                    break
                got += len(chunk)
                if time.monotonic() - started > deadline:
                    raise NetworkError(f"{url}: still downloading after {deadline:g} s ({_size(got)} so far), the "
                                       f"per-file deadline; set PORTER_HTTP_DEADLINE to allow longer")
                if got > max_bytes:
                    raise NetworkError(f"{url} sent more than the {_size(max_bytes)} download limit; raise "
                                       f"$PORTER_MAX_DOWNLOAD_MB if you trust it")
                chunks.append(chunk)
                if bar is None and total is None and got >= PROGRESS_MIN_BYTES:
                    bar = _Progress(label, None)
                if bar:
                    bar.update(got)
            if bar:
                bar.done(got)
            if total is not None and got < total:
                raise NetworkError(f"{url}: connection closed after {got} of {total} bytes; try again")
            return b"".join(chunks)
    except NetworkError:
        raise
    except urllib.error.HTTPError as e:
        raise NetworkError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise NetworkError(f"{url}: timed out after {timeout:g} s (set PORTER_HTTP_TIMEOUT to wait longer)") from None
        raise NetworkError(f"{url}: can't connect ({reason})") from None
    except TimeoutError:
        raise NetworkError(f"{url}: timed out after {timeout:g} s (set PORTER_HTTP_TIMEOUT to wait longer)") from None
    except (OSError, ValueError) as e:  # connection reset, http.client.IncompleteRead, bad URL parts
        raise NetworkError(f"{url}: download failed ({type(e).__name__}: {e})") from None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} MiB"


def _store(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dl-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # a cache that can't be written only costs a download next time


class _Progress:
    """A one-line progress bar on stderr (a final line only when stderr is not a terminal)."""

    def __init__(self, label: str, total: int | None):
        self.label, self.total = label, total
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.start = time.perf_counter()

    def _line(self, got: int) -> str:
        if self.total:
            frac = min(1.0, got / self.total)
            filled = int(frac * 30)
            return (f"downloading {self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                    f"{got / MIB:.1f}/{self.total / MIB:.1f} MiB {frac * 100:3.0f}%")
        return f"downloading {self.label} {got / MIB:.1f} MiB"

    def update(self, got: int) -> None:
        now = time.perf_counter()
        if self.tty and now - self.last > 0.1:
            self.last = now
            sys.stderr.write("\r" + self._line(got))
            sys.stderr.flush()

    def done(self, got: int) -> None:
        secs = time.perf_counter() - self.start
        sys.stderr.write(("\r" if self.tty else "") + self._line(got) + f" in {secs:.1f} s\n")
        sys.stderr.flush()
