"""Ctrl-C anywhere in `porter finetune` ends it promptly: exit 130, one line, nothing written, nothing left hanging."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from model_builders import build, make_folder, save


def ctrl_c_as_in_a_terminal() -> None:
    """The child's SIGINT at its default, as a terminal's foreground command has it: a suite started in the
    background by a non-interactive shell (``cmd &``) runs with SIGINT and SIGQUIT ignored (POSIX), every child
    inherits that, and Python keeps an inherited SIG_IGN (found when every run "finished" although signalled)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_interrupting_finetune_at_random_moments(tmp_path):
    model = save(build("gemm"), tmp_path / "m.onnx")
    data = make_folder(tmp_path / "data", n=40)
    env = dict(os.environ, PORTER_CACHE=str(tmp_path / "cache"))
    # the moments are spread over the command's own run time, measured first (it varies with the machine's load):
    # the faster of two runs (the first pays cold caches), and the first 70% of it (a run can end sooner than that)
    took = []
    for _ in range(2):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "porter", "finetune", str(model), str(data), "-o",
                        str(tmp_path / "full.onnx"), "--no-cache", "--quiet", "--force"], check=True, env=env,
                       capture_output=True)
        took.append(time.perf_counter() - t)
    rng = np.random.default_rng(7)
    delays = sorted(rng.uniform(0.3, max(0.6, 0.7 * min(took)), size=6))
    outcomes = []
    for i, delay in enumerate(delays):
        out = tmp_path / f"out{i}.onnx"
        proc = subprocess.Popen([sys.executable, "-m", "porter", "finetune", str(model), str(data), "-o", str(out),
                                 "--no-cache"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                preexec_fn=ctrl_c_as_in_a_terminal)
        time.sleep(delay)
        alive = proc.poll() is None  # what a "finished" outcome means: over before the signal, or not
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)  # a hang fails here
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"porter finetune did not end within 60 s of Ctrl-C at {delay:.1f} s")
        if proc.returncode == 0:  # it had finished before the signal: a complete output, nothing half-done
            assert out.is_file()
            outcomes.append(f"finished ({'signalled while running' if alive else 'before the signal'})")
            continue
        assert proc.returncode == 130, (delay, proc.returncode, stderr[-500:])
        assert stderr.strip().splitlines()[-1] == "porter: interrupted" and "Traceback" not in stderr, stderr[-500:]
        assert not out.exists() and not list(tmp_path.glob(f".out{i}.onnx.*"))  # no output, no temp file
        outcomes.append("interrupted")
    assert outcomes.count("interrupted") >= 3, (outcomes, [round(d, 2) for d in delays], took)
