"""TF.js models over http: a local server on 127.0.0.1 started by the test (a thread, stopped at the end).

Covers shard URLs relative to model.json (query kept), the cache keyed by URL, HTTP errors, timeouts, the size
limit, the progress bar, redirects, and shard paths that try to leave the origin. No other address is contacted.
"""

from __future__ import annotations

import gzip
import http.server
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import porter
from porter.errors import ModelLoadError, NetworkError
from porter.importers.tfjs import fetch

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tfjs"


class Handler(http.server.SimpleHTTPRequestHandler):
    log: list[str] = []
    slow_seconds = 2.0
    moved: dict[str, str] = {}  # path -> where a 302 sends it

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        Handler.log.append(self.path)
        if self.path.startswith("/slow/"):
            time.sleep(self.slow_seconds)
            self.path = self.path[len("/slow"):]
        if self.path in Handler.moved:
            self.send_response(302)
            self.send_header("Location", Handler.moved[self.path])
            self.end_headers()
            return
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect"):])
            self.end_headers()
            return
        return super().do_GET()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    for name in ("layers_functional", "graph_convnet"):
        shutil.copytree(FIXTURES / name, root / name)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: Handler(*a, directory=str(root), **k))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def download_defaults(isolated_cache, monkeypatch):
    """conftest's isolated $PORTER_CACHE, the download limits at their defaults, the server's request log empty."""
    monkeypatch.delenv("PORTER_HTTP_TIMEOUT", raising=False)
    monkeypatch.delenv("PORTER_MAX_DOWNLOAD_MB", raising=False)
    Handler.log.clear()


def golden_check(onnx_path: Path, name: str) -> float:
    meta = json.loads((FIXTURES / name / "golden.json").read_text())
    ins = {i["name"]: np.load(FIXTURES / name / i["file"]) for i in meta["inputs"]}
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for o, got in zip(meta["outputs"], sess.run(None, ins)):
        want = np.load(FIXTURES / name / o["file"])
        worst = max(worst, float(np.abs(got - want).max() / max(1.0, np.abs(want).max())))
    return worst


@pytest.mark.parametrize("name", ["layers_functional", "graph_convnet"])
def test_convert_by_url_matches_tfjs_and_uses_cache(server, tmp_path, isolated_cache, name):
    base, _ = server
    url = f"{base}/{name}/model.json?v=3"
    out = tmp_path / "m.onnx"
    result = porter.convert(f"tfjs:{url}", out)
    assert result.parity.passed
    assert golden_check(out, name) <= 1e-4
    # shards were fetched next to model.json, with model.json's query string
    shards = [p for p in Handler.log if ".bin" in p]
    assert shards and all(p.startswith(f"/{name}/group1-shard") and p.endswith("?v=3") for p in shards)
    assert len(list(isolated_cache.glob("tfjs/*.bin"))) == 1 + len(shards)
    # again: everything from the cache, no request at all
    Handler.log.clear()
    porter.convert(url, tmp_path / "again.onnx")
    assert Handler.log == []


def test_http_error_names_url_and_status(server, tmp_path):
    base, root = server
    d = root / "missing_shard"
    if not d.exists():
        shutil.copytree(root / "layers_functional", d)
        (d / "group1-shard1of1.bin").unlink()
    out = tmp_path / "out.onnx"
    with pytest.raises(NetworkError, match=rf"^{base}/missing_shard/group1-shard1of1.bin: HTTP 404 File not found$"):
        porter.convert(f"{base}/missing_shard/model.json", out)
    assert not out.exists()
    with pytest.raises(NetworkError, match=r"/nope/model.json: HTTP 404"):
        porter.convert(f"{base}/nope/model.json")


def test_timeout(server, monkeypatch):
    base, _ = server
    monkeypatch.setenv("PORTER_HTTP_TIMEOUT", "0.3")
    Handler.slow_seconds = 1.5
    start = time.perf_counter()
    with pytest.raises(NetworkError, match=r"/slow/layers_functional/model.json: timed out after 0.3 s"):
        porter.convert(f"{base}/slow/layers_functional/model.json")
    assert time.perf_counter() - start < 1.4


def test_size_limit(server, monkeypatch, isolated_cache):
    base, root = server
    d = root / "gz"  # a gzip-compressed model.json (detected by content) of 1.5 KiB; its shard is 8 KiB
    if not d.exists():
        shutil.copytree(root / "layers_functional", d)
        (d / "model.json").write_bytes(gzip.compress((d / "model.json").read_bytes()))
    monkeypatch.setenv("PORTER_MAX_DOWNLOAD_MB", str(4096 / 2**20))  # 4 KiB
    with pytest.raises(NetworkError, match=r"gz/group1-shard1of1.bin is 8.2 KiB, over the 4.0 KiB download limit"):
        porter.convert(f"{base}/gz/model.json")
    assert not any("shard" in p.name for p in isolated_cache.glob("tfjs/*"))


def test_progress_bar_for_large_downloads(server, monkeypatch, capfd):
    base, _ = server
    monkeypatch.setattr(fetch, "PROGRESS_MIN_BYTES", 1024)
    data = fetch.fetch(f"{base}/layers_functional/group1-shard1of1.bin")
    err = capfd.readouterr().err
    assert len(data) == (FIXTURES / "layers_functional" / "group1-shard1of1.bin").stat().st_size
    assert "downloading group1-shard1of1.bin [##############################]" in err and "100%" in err
    fetch.fetch(f"{base}/layers_functional/model.json")  # 8 KiB too, but cached shard shows nothing
    fetch.fetch(f"{base}/layers_functional/group1-shard1of1.bin")
    assert "group1-shard1of1.bin" not in capfd.readouterr().err


def test_redirect_on_same_server_is_followed(server):
    base, _ = server
    data = fetch.fetch(f"{base}/redirect/layers_functional/model.json", use_cache=False)
    assert json.loads(data)["format"] == "layers-model"


@pytest.mark.parametrize("bad, message", [
    ("http://127.0.0.2:1/group1-shard1of1.bin", r"is a URL, not a path relative to model.json"),
    ("//127.0.0.2/group1-shard1of1.bin", r"is a URL"),
    ("../graph_convnet/group1-shard1of4.bin", r"climbs out with '\.\.'"),
    ("%2e%2e/graph_convnet/group1-shard1of4.bin", r"climbs out with '\.\.'"),
    ("/graph_convnet/group1-shard1of4.bin", r"is absolute"),
])
def test_shard_urls_may_not_leave_the_origin_or_directory(server, tmp_path, bad, message):
    base, root = server
    name = f"escape_{abs(hash(bad))}"
    shutil.copytree(root / "layers_functional", root / name)
    doc = json.loads((root / name / "model.json").read_text())
    doc["weightsManifest"][0]["paths"] = [bad]
    (root / name / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match=message):
        porter.convert(f"{base}/{name}/model.json", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    assert not any("127.0.0.2" in p or "graph_convnet" in p for p in Handler.log)


def test_shard_url_resolution():
    assert fetch.shard_url("http://h:8/a/b/model.json?x=1", "./g1.bin") == "http://h:8/a/b/g1.bin?x=1"
    assert fetch.shard_url("https://h/a/model.json", "sub/g1.bin") == "https://h/a/sub/g1.bin"
    with pytest.raises(NetworkError, match=r"not an http\(s\) URL"):
        fetch.check_model_url("ftp://h/model.json")


def test_truncated_download_is_not_left_in_cache(server, isolated_cache):
    base, root = server
    d = root / "short_shard"
    if not d.exists():
        shutil.copytree(root / "layers_functional", d)
        data = (d / "group1-shard1of1.bin").read_bytes()
        (d / "group1-shard1of1.bin").write_bytes(data[:-8])
    with pytest.raises(ModelLoadError, match=r"a shard is shorter than the manifest says"):
        porter.convert(f"{base}/short_shard/model.json")
    assert list(isolated_cache.glob("tfjs/*.bin")) == []  # a retry downloads afresh


class Dripping(Handler):
    """Sends a body one byte every 0.2 s: each read stays under the timeout, the whole never ends."""

    def do_GET(self):
        if not self.path.startswith("/drip/"):
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(100000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def drip_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: Dripping(*a, directory="/nonexistent", **k))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_dripping_server_hits_the_per_file_deadline(drip_server, monkeypatch):
    monkeypatch.setenv("PORTER_HTTP_TIMEOUT", "1")
    monkeypatch.setenv("PORTER_HTTP_DEADLINE", "1.5")
    start = time.monotonic()
    with pytest.raises(NetworkError, match=r"still downloading after 1.5 s .* PORTER_HTTP_DEADLINE"):
        fetch.fetch(f"{drip_server}/drip/model.json", use_cache=False)
    assert time.monotonic() - start < 4


def test_a_shard_redirected_to_another_origin_is_refused(server, tmp_path):
    """Same host, other port: another origin. The shard's path stays on the origin; its redirect may not leave."""
    base, root = server
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: Handler(*a, directory=str(root), **k))
    other.daemon_threads = True
    threading.Thread(target=other.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        elsewhere = f"http://127.0.0.1:{other.server_address[1]}"
        d = root / "redirected_shards"
        shutil.copytree(root / "layers_functional", d, dirs_exist_ok=True)
        shard = json.loads((d / "model.json").read_text())["weightsManifest"][0]["paths"][0]
        Handler.moved[f"/redirected_shards/{shard}"] = f"{elsewhere}/layers_functional/{shard}"
        with pytest.raises(NetworkError, match=r"redirects to http://127\.0\.0\.1:\d+/layers_functional/.*outside "
                                               r"the model's origin"):
            porter.convert(f"{base}/redirected_shards/model.json")
        assert f"/layers_functional/{shard}" not in Handler.log  # the other server was never asked
        Handler.moved.clear()
    finally:
        other.shutdown()
        other.server_close()


def test_a_fifo_is_never_opened_as_a_model_or_shard(tmp_path):
    import os

    fifo = tmp_path / "model.json"
    os.mkfifo(fifo)
    with pytest.raises(porter.PorterError, match="not a regular file"):
        porter.convert(str(fifo))
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "layers_functional", d)
    shard = json.loads((d / "model.json").read_text())["weightsManifest"][0]["paths"][0]
    (d / shard).unlink()
    os.mkfifo(d / shard)
    with pytest.raises(porter.PorterError, match="not a regular file"):
        porter.convert(f"tfjs:{d / 'model.json'}")
