"""The model in a process of its own, seen through the same `Engine` interface
(nxtrec.inference.engine) as a model loaded in this process.

In the server's process, the event loop, the request threads and the batching worker run
Python code nearly all the time, and a model there waits for the GIL between its operators:
under load it ran at about half its speed alone. In a child process it has no GIL to share.
The batching worker writes each batch's pixels into a file both processes map, sends a
short message and waits (the GIL released) for the labels, which come back pickled.

The child ignores SIGINT and SIGTERM (a Ctrl-C or a service manager signals the whole
process group): the server lets in-flight requests finish, then closes the engine. The
child also ends when its connection closes, so a killed server leaves no model process
behind.
"""

from __future__ import annotations

import math
import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from nxtrec.engines import load_engine
from nxtrec.errors import NxtrecError
from nxtrec.inference.calibration import Calibration
from nxtrec.inference.engine import Capabilities, DecodeOptions, Preprocessing
from nxtrec.inference.ranking import Label
from nxtrec.inference.threads import threads_per_process

STOP = None  # the message that ends the child
PING = "ping"  # ("ping", n) is answered ("pong", n) between batches (see _Pool.ping)
SHM = "/dev/shm"  # memory-backed files on Linux; elsewhere the pixels file is an ordinary temporary file


@dataclass
class EngineInfo:
    name: str
    preprocessing: Preprocessing
    capabilities: Capabilities
    vocab_size: int
    calibration: Calibration | None = None  # the model's (nxtrec.inference.calibration)


class ModelProcesses:
    """An `Engine` whose model runs in `processes` child processes: each batch is split
    between them. `alive()` is False once one of them has ended, and then every batch is
    refused (the server answers 503; a dead process is not restarted). `ping()` is /readyz's
    check that each one still answers."""

    def __init__(self, info: EngineInfo, pool: _Pool):
        self.name, self.preprocessing = info.name, info.preprocessing
        self.capabilities, self.vocab_size = info.capabilities, info.vocab_size
        self.calibration = info.calibration
        self.pool = pool

    def predict_batch(self, pixels: np.ndarray, options: DecodeOptions | None = None, **changes) -> list[list[Label]]:
        return self.pool.predict(pixels, DecodeOptions.of(options, **changes))

    def alive(self) -> bool:
        return self.pool.alive()

    def ping(self, timeout: float = 2.0, busy_limit: float = 60.0) -> str | None:
        """None when every model process answers within `timeout` seconds, else why not."""
        return self.pool.ping(timeout, busy_limit)

    def close(self) -> None:
        self.pool.close()


def start_engine_process(model: str | None = None, onnx: str | None = None, device: str = "cpu",
                         dtype: str = "float32", processes: int = 1, calibration: str | None = None,
                         adapter: str | None = None) -> ModelProcesses:
    """`load_engine` in `processes` child processes; raises `NxtrecError` with a child's message
    when the model cannot be loaded. With several, each runs its share of a batch on
    cores/processes threads (or $OMP_NUM_THREADS). A child is a fresh interpreter (`python -m`,
    not multiprocessing's spawn, which would re-run the caller's main script)."""
    load = {"model": model, "onnx": onnx, "device": device, "dtype": dtype}
    load.update({"calibration": calibration} if calibration else {})
    if adapter:  # a folder of `nxtrec teach`, merged at load
        load["adapter"] = adapter
    threads = threads_per_process(processes) if processes > 1 else None
    clients = [_Client.start(load, threads) for _ in range(processes)]  # they load at the same time
    pool = _Pool(clients)
    try:
        info = pool.receive_all()[0]
    except NxtrecError:
        pool.close()
        raise
    return ModelProcesses(info, pool)


class _Pool:
    """The server's end: one batch at a time (the batching worker is one thread), split in
    contiguous shares, one per model process."""

    def __init__(self, clients: list[_Client]):
        self.clients = clients
        self.lock = threading.Lock()  # one batch or one ping at a time: replies come back in order
        self.batch_started: float | None = None  # time.monotonic() of the batch running now
        self.pings = 0

    def alive(self) -> bool:
        return self.dead() is None

    def dead(self) -> str | None:
        """Why the pool cannot serve: a model process has ended (None while all run). Every
        batch is refused then, whether or not its share would have gone to that process."""
        for i, client in enumerate(self.clients):
            code = client.process.poll()
            if code is not None:
                which = "the model process" if len(self.clients) == 1 else f"model process {i + 1} of {len(self.clients)}"
                return f"{which} ended unexpectedly (exit code {code})"
        return None

    def ping(self, timeout: float, busy_limit: float) -> str | None:
        """Readiness: each model process must answer a ping within `timeout` seconds. While a
        batch runs, its end within `timeout` is the answer; a batch that runs on past that is
        taken as work in progress unless a process is stopped (SIGSTOP) or the batch has run
        longer than `busy_limit` seconds (the request timeout). A ping never interleaves with a
        batch (both hold the lock); a late pong is skipped by whoever reads next."""
        deadline = time.monotonic() + timeout
        if not self.lock.acquire(timeout=timeout):
            started = self.batch_started
            for i, client in enumerate(self.clients):
                if _stopped(client.process.pid):
                    return f"model process {i + 1} is stopped (not answering)"
            if started is not None and time.monotonic() - started > busy_limit:
                return f"the model processes are not answering (one batch has run {time.monotonic() - started:.0f} s)"
            return self.dead()
        try:
            problem = self.dead()
            if problem:
                return problem
            self.pings += 1
            for client in self.clients:
                client.send_message((PING, self.pings))
            for i, client in enumerate(self.clients):
                if not client.wait_pong(self.pings, deadline):
                    return self.dead() or f"model process {i + 1} is not answering (no reply within {timeout:g} s)"
            return None
        finally:
            self.lock.release()

    def receive_all(self, clients: list[_Client] | None = None) -> list:
        """One reply from each client, all read before any error is raised (so that no reply
        is left unread for the next batch)."""
        replies, error = [], None
        for client in clients or self.clients:
            try:
                replies.append(client.receive())
            except NxtrecError as e:
                error = error or e
        if error is not None:
            raise error
        return replies

    def predict(self, pixels: np.ndarray, options: DecodeOptions) -> list:
        shares = np.array_split(pixels, min(len(self.clients), len(pixels)))
        with self.lock:
            problem = self.dead()
            if problem:
                raise NxtrecError(problem)
            self.batch_started = time.monotonic()
            try:
                busy = self.clients[: len(shares)]
                for client, share in zip(busy, shares):
                    client.send(share, options)
                return [labels for reply in self.receive_all(busy) for labels in reply]
            finally:
                self.batch_started = None

    def close(self) -> None:
        with self.lock:
            for client in self.clients:
                client.stop()
            for client in self.clients:
                client.close()


class _Client:
    """One model process: a connection to it and the file its batches are written into."""

    def __init__(self, conn: Connection, process: subprocess.Popen, pixels_file):
        self.conn, self.process = conn, process
        self.pixels = _SharedPixels(pixels_file.fileno())
        self.pixels_file = pixels_file

    @classmethod
    def start(cls, load: dict, threads: str | None) -> _Client:
        ours, theirs = socket.socketpair()
        pixels_file = tempfile.TemporaryFile(dir=SHM if os.path.isdir(SHM) else None)  # noqa: SIM115 - closed by close()
        fds = (theirs.fileno(), pixels_file.fileno())
        env = dict(os.environ, **({"OMP_NUM_THREADS": threads} if threads else {}))
        with theirs:
            process = subprocess.Popen([sys.executable, "-m", __name__, *map(str, fds)], pass_fds=fds, env=env)
        client = cls(Connection(ours.detach()), process, pixels_file)
        client.conn.send(load)
        return client

    def receive(self):
        while True:
            try:
                kind, value = self.conn.recv()
            except (EOFError, OSError):
                try:
                    code = self.process.wait(5)
                except subprocess.TimeoutExpired:
                    code = "none yet"
                raise NxtrecError(f"the model process ended unexpectedly (exit code {code})") from None
            if kind != "pong":  # a ping's late answer
                break
        if kind == "error":
            raise NxtrecError(value)
        return value

    def send(self, pixels: np.ndarray, options: DecodeOptions) -> None:
        np.copyto(self.pixels.view(pixels.shape, grow=True), pixels)
        self.send_message((pixels.shape, options))

    def send_message(self, message) -> None:
        try:
            self.conn.send(message)
        except OSError:
            pass  # the child is gone; receive() says so

    def wait_pong(self, n: int, deadline: float) -> bool:
        """True when ("pong", n) arrives before `deadline` (older pongs are skipped)."""
        try:
            while self.conn.poll(max(0.0, deadline - time.monotonic())):
                kind, value = self.conn.recv()
                if kind == "pong" and value == n:
                    return True
        except (EOFError, OSError):
            pass
        return False

    def stop(self) -> None:
        if not self.conn.closed:
            try:
                self.conn.send(STOP)
            except OSError:
                pass

    def close(self, timeout: float = 10.0) -> None:
        if self.conn.closed:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()
        self.pixels.close()
        self.pixels_file.close()


class _SharedPixels:
    """A float32 batch in a file mapped by both processes: the pixels cross without a copy
    through the connection (which, written in chunks, would take the GIL back per chunk).
    The server grows the file before it sends a larger batch; the model process maps it
    again when it sees one."""

    def __init__(self, fd: int):
        self.fd, self.map = fd, None

    def view(self, shape: tuple[int, ...], grow: bool = False) -> np.ndarray:
        size = 4 * math.prod(shape)
        if self.map is None or len(self.map) < size:
            if grow:
                os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size)  # the old one is unmapped once no array uses it
        return np.ndarray(shape, dtype=np.float32, buffer=self.map)

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None


def _stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP, a debugger): state T or t in /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _serve(conn: Connection, pixels: _SharedPixels) -> None:
    """The child: load the engine named by the first message, then answer batches until told
    to stop or the server is gone."""
    load = conn.recv()
    try:
        engine = load_engine(**load)
    except Exception as e:  # noqa: BLE001 - the server reports it and exits
        conn.send(("error", str(e) if isinstance(e, NxtrecError) else f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", EngineInfo(engine.name, engine.preprocessing, engine.capabilities, engine.vocab_size,
                                getattr(engine, "calibration", None))))  # fmt: skip
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        if message is STOP:
            return
        if message[0] == PING:
            conn.send(("pong", message[1]))
            continue
        shape, options = message
        try:
            reply = ("ok", engine.predict_batch(pixels.view(shape), options))
        except Exception as e:  # noqa: BLE001 - answered as a failed batch (500); the model lives on
            reply = ("error", f"{type(e).__name__}: {e}")
        conn.send(reply)


if __name__ == "__main__":
    # Run the importable module's own code, so that what is pickled back (EngineInfo) names
    # nxtrec.serving.model_process, not __main__.
    from nxtrec.serving import model_process

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with Connection(int(sys.argv[1])) as connection:
        model_process._serve(connection, model_process._SharedPixels(int(sys.argv[2])))
