"""GitHub hub references (torchhub:OWNER/REPO[:REF]:ENTRY): trust, torch.hub's cache, offline behaviour.

torch.hub's cache is a temporary TORCH_HOME holding a copy of the fixture repo under the name torch.hub gives
a downloaded repo (OWNER_REPO_REF); nothing of torch.hub is mocked for the cached cases. Offline is simulated
by making every socket connection fail at once.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import porter
from porter.errors import NetworkError, SourceError, UnsafeModelError

import torch  # noqa: E402

HUB = Path(__file__).resolve().parent.parent / "fixtures" / "torchhub"
OWNER, REPO = "porter-fixtures", "tinyhub"


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    import torch.hub

    assert Path(torch.hub.get_dir()) == home / "hub"
    return home / "hub"


def _cache(hub_dir: Path, ref: str = "main") -> Path:
    target = hub_dir / f"{OWNER}_{REPO}_{ref}"
    shutil.copytree(HUB, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)


def test_cached_remote_repo_through_the_cli(porter_cli, torch_home, tmp_path, monkeypatch):
    _cache(torch_home)
    out = tmp_path / "remote.onnx"
    res = porter_cli("convert", f"torchhub:{OWNER}/{REPO}:small_cnn", "-o", out, "--trust-repo")
    assert res.returncode == 0, res.stderr
    assert "parity passed" in res.stdout
    model = onnx.load(out)
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 32, 32]
    card = porter.ModelCard.from_onnx(model)
    assert card.provenance["hub_repo"] == f"{OWNER}/{REPO}" and card.provenance["hub_ref"] == "main"
    assert card.source == f"torchhub:{OWNER}/{REPO}:small_cnn"
    golden = np.load(HUB / "golden.npz")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": golden["small_cnn.input"]})[0]
    assert np.abs(got - golden["small_cnn.output"]).max() <= 1e-5


def test_cached_remote_repo_at_a_ref_offline(torch_home, offline, tmp_path):
    _cache(torch_home, "v1.0")
    start = time.perf_counter()
    result = porter.convert(f"torchhub:{OWNER}/{REPO}:v1.0:multi_head", tmp_path / "m.onnx", trust_repo=True,
                            input_shapes={None: (3, 16, 16)}, validation_batch_sizes=(1, 2, 6))
    assert result.parity.passed and result.parity.max_scaled <= 1e-4
    assert [o.name for o in result.model.graph.output] == ["output_0", "output_1", "output_2"]
    assert result.card.provenance["hub_ref"] == "v1.0"
    assert time.perf_counter() - start < 60


def test_untrusted_remote_repo_runs_no_code(torch_home, tmp_path):
    repo = _cache(torch_home)
    marker = tmp_path / "hubconf-ran"
    (repo / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').close()\n" + (repo / "hubconf.py").read_text())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UnsafeModelError, match=rf"GitHub repo {OWNER}/{REPO}, which is not in torch.hub's trusted "
                                               rf"list .*trusted_list\); pass --trust-repo"):
        porter.convert(f"torchhub:{OWNER}/{REPO}:small_cnn", out_dir / "m.onnx")
    assert not marker.exists()  # hubconf.py was never imported
    assert list(out_dir.iterdir()) == []


def test_untrusted_remote_repo_through_the_cli(porter_cli, torch_home, tmp_path):
    _cache(torch_home)
    out = tmp_path / "m.onnx"
    res = porter_cli("convert", f"torchhub:{OWNER}/{REPO}:small_cnn", "-o", out)
    assert res.returncode == 1 and "pass --trust-repo" in res.stderr and not out.exists()


def test_repo_in_torch_hub_trusted_list_needs_no_flag(torch_home):
    _cache(torch_home)
    (torch_home / "trusted_list").write_text(f"someone_else\n{OWNER}_{REPO}\n")
    result = porter.convert(f"torchhub:{OWNER}/{REPO}:small_cnn")
    assert result.parity.passed and result.card.provenance["exporter"] == "dynamo"


def test_missing_entry_point_in_a_remote_repo(torch_home):
    _cache(torch_home)
    with pytest.raises(SourceError, match=rf"hub repo {OWNER}/{REPO}:main has no entry point 'nope'; its entry "
                                          r"points are: .*small_cnn"):
        porter.convert(f"torchhub:{OWNER}/{REPO}:nope", trust_repo=True)


def test_uncached_remote_repo_offline(torch_home, offline, tmp_path):
    start = time.perf_counter()
    with pytest.raises(NetworkError) as err:
        porter.convert(f"torchhub:{OWNER}/{REPO}:small_cnn", tmp_path / "m.onnx", trust_repo=True)
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert msg.startswith("offline:") and f"not in torch.hub's cache ({torch_home})" in msg
    assert str(torch_home / f"{OWNER}_{REPO}_main") in msg
    assert list(tmp_path.iterdir()) == [tmp_path / "torch_home"]  # no output, nothing half-written
    assert [p.name for p in torch_home.iterdir()] == []  # torch.hub was never asked to download


def test_uncached_remote_repo_download_failure(torch_home, offline, monkeypatch, tmp_path):
    """The probe says GitHub is reachable, then torch.hub's own download fails: still a NetworkError."""
    from porter.importers.torchhub import hub

    monkeypatch.setattr(hub, "github_reachable", lambda timeout=hub.PROBE_TIMEOUT_S: True)
    with pytest.raises(NetworkError, match=rf"(offline|unreachable).*{OWNER}/{REPO}:v2.*torch.hub's cache"):
        porter.convert(f"torchhub:{OWNER}/{REPO}:v2:small_cnn", trust_repo=True)
