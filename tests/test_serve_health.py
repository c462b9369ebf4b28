"""`nxtrec serve` as a real process under bad clients and failures: a client that disconnects
mid-upload (499, one log line, no traceback), idle connections (closed after the keep-alive
timeout), slow bodies (408 after --body-timeout), SIGTERM during a slow upload (exit 0 at
once, model processes gone), a frozen model process (/readyz 503) and a dead one among two
(503 for every request)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from processes import free_port, model_processes, running

SCENE = Path(__file__).resolve().parents[1] / "examples" / "scene.jpg"
NXTREC = [sys.executable, "-m", "nxtrec"]
KEEP_ALIVE_S, BODY_TIMEOUT_S = 1.0, 1.5


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text


@contextmanager
def server(tmp_path: Path, *args: str):
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*NXTREC, "serve", "--port", str(port), "-q", *args], stdout=out, stderr=subprocess.STDOUT)
    s = Server(proc, port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"nxtrec serve exited: {s.stderr()}")
            try:
                if httpx.get(s.url + "/readyz", timeout=3).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "nxtrec serve did not become ready in 60 s"
            time.sleep(0.2)
        yield s
    finally:
        for pid in model_processes(proc.pid):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with server(tmp_path_factory.mktemp("serve"), "--keep-alive-timeout", str(KEEP_ALIVE_S),
                "--body-timeout", str(BODY_TIMEOUT_S)) as s:
        yield s


def upload_head(length: int) -> bytes:
    return (f"POST /v1/tag HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {length}\r\n\r\n").encode()


def read_until_closed(conn: socket.socket, timeout: float) -> bytes:
    conn.settimeout(timeout)
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def test_client_disconnect_mid_upload_is_one_499_line_no_traceback_no_500(served):
    body = SCENE.read_bytes()
    part = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + body + b"\r\n--b--\r\n")
    multipart = (f"POST /v1/tag HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 f"Content-Length: {len(part)}\r\n\r\n").encode() + part[: len(part) // 2]
    for request in (upload_head(len(body)) + body[: len(body) // 2], multipart, upload_head(len(body))):
        with served.connect() as conn:
            conn.sendall(request)
            time.sleep(0.2)
    deadline = time.monotonic() + 5
    while 'code="499"' not in (metrics := served.metrics()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 'nxtrec_requests_total{path="/v1/tag",code="499"} 3' in metrics
    assert 'code="500"' not in metrics
    log = served.stderr()
    assert "Traceback" not in log and "ClientDisconnect" not in log
    lines = [line for line in log.splitlines() if "499" in line]
    assert len(lines) == 3 and all("client disconnected" in line for line in lines), log
    # the service is fine afterwards
    r = httpx.post(served.url + "/v1/tag", content=body, headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert r.status_code == 200 and r.json()["results"][0]["labels"][0]["label"] == "snake"


def test_idle_connection_is_closed_after_the_keep_alive_timeout(served):
    with served.connect() as never_sends, served.connect() as after_a_request:
        after_a_request.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        start = time.monotonic()
        assert read_until_closed(never_sends, KEEP_ALIVE_S + 5) == b""
        assert time.monotonic() - start < KEEP_ALIVE_S + 3
        assert read_until_closed(after_a_request, KEEP_ALIVE_S + 5).startswith(b"HTTP/1.1 200")


def test_slow_body_gets_408_after_the_body_timeout(served):
    body = SCENE.read_bytes()
    with served.connect() as conn:
        start = time.monotonic()
        conn.sendall(upload_head(len(body)) + body[:1000])
        response = read_until_closed(conn, BODY_TIMEOUT_S + 10)
        elapsed = time.monotonic() - start
    assert response.startswith(b"HTTP/1.1 408"), response
    assert b"--body-timeout" in response
    assert BODY_TIMEOUT_S - 0.2 < elapsed < BODY_TIMEOUT_S + 3
    assert 'nxtrec_requests_total{path="/v1/tag",code="408"} 1' in served.metrics()
    assert "Traceback" not in served.stderr()


def test_readyz_is_503_within_the_deadline_when_the_model_process_is_frozen(served):
    (model,) = model_processes(served.proc.pid)
    assert httpx.get(served.url + "/readyz", timeout=10).status_code == 200
    os.kill(model, signal.SIGSTOP)
    try:
        start = time.monotonic()
        r = httpx.get(served.url + "/readyz", timeout=10)
        assert r.status_code == 503 and "not answering" in r.json()["reason"], r.text
        assert time.monotonic() - start < 4
        assert httpx.get(served.url + "/healthz", timeout=10).status_code == 200
    finally:
        os.kill(model, signal.SIGCONT)
    # the late answers to the pings are not taken for a batch's labels
    assert httpx.get(served.url + "/readyz", timeout=10).status_code == 200
    r = httpx.post(served.url + "/v1/tag?top_k=3", content=SCENE.read_bytes(), headers={"Content-Type": "image/jpeg"},
                   timeout=30)
    assert r.status_code == 200 and r.json()["results"][0]["labels"][0]["label"] == "snake"


def test_sigterm_during_a_slow_upload_exits_0_at_once_and_ends_the_model_process(tmp_path):
    with server(tmp_path) as s:  # the default --body-timeout and --timeout (60 s)
        model = model_processes(s.proc.pid)
        assert len(model) == 1
        body = SCENE.read_bytes()
        with s.connect() as slow, s.connect() as idle:
            slow.sendall(upload_head(len(body)) + body[:1000])
            time.sleep(0.3)
            start = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            assert s.proc.wait(timeout=10) == 0
            assert time.monotonic() - start < 5
            response = read_until_closed(slow, 5)
            assert response == b"" or response.startswith(b"HTTP/1.1 503"), response
            assert read_until_closed(idle, 5) == b""
        assert not any(running(pid) for pid in model)
        log = s.stderr()
        assert "Traceback" not in log and "CancelledError" not in log, log


def test_a_dead_model_process_among_two_makes_every_request_503(tmp_path):
    with server(tmp_path, "--processes", "2") as s:
        first, second = model_processes(s.proc.pid)
        os.kill(second, signal.SIGKILL)  # the one a 1-image batch does not use
        deadline = time.monotonic() + 10
        while running(second) and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.post(s.url + "/v1/tag", content=SCENE.read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert r.status_code == 503, r.text
        assert "model process 2 of 2 ended unexpectedly (exit code -9)" in r.json()["detail"]
        assert httpx.get(s.url + "/readyz", timeout=10).status_code == 503
        assert httpx.get(s.url + "/healthz", timeout=10).status_code == 200
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=20) == 0
        assert not running(first)
