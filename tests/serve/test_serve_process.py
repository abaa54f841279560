"""`dsv4 serve` as a process: the port is checked before the model loads, a bad port is a one-line
error, and SIGTERM shuts down promptly with exit code 0, ending a long stream with a readable error
after the grace period (issue 20, items 4 and 5)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tiny_dir, port, *extra):
    cmd = [sys.executable, "-m", "dsv4", "serve", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32",
           "--numerics", "plain", "--port", str(port), "--max-model-len", "512", "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _wait_healthy(proc, base, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("server did not become healthy")


def test_port_in_use_is_reported_before_loading(tiny_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = _serve(tiny_dir, port)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err, err
    assert "dsv4: serving" not in err  # it stopped before loading the model


def test_bad_port_is_a_one_line_error(tiny_dir):
    proc = _serve(tiny_dir, 99999)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "not a TCP port" in err and "Traceback" not in err, err


def test_sigterm_idle_exits_zero(tiny_dir):
    port = _free_port()
    proc = _serve(tiny_dir, port)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}")
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, (proc.returncode, err)
    assert time.time() - t0 < 10 and "Traceback" not in err, err


def test_sigterm_ends_a_long_stream_readably_then_exits_zero(tiny_dir):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _serve(tiny_dir, port, "--shutdown-grace", "1")
    events: list[str] = []
    try:
        _wait_healthy(proc, base)

        def stream():
            with httpx.stream("POST", base + "/v1/completions", timeout=120,
                              json={"prompt": [0, 9], "max_tokens": 500, "ignore_eos": True, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])

        t = threading.Thread(target=stream)
        t.start()
        while not events:
            time.sleep(0.02)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.time() - t0
        t.join(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, (proc.returncode, err)
    assert took < 10, took
    assert "Traceback" not in err and "CancelledError" not in err, err
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "engine_unavailable"
