"""`nxtrec tag --processes N`: the same command as N ranks on this machine, as torchrun would
start them (RANK, WORLD_SIZE, MASTER_ADDR on loopback), each on cores/N threads (or
$OMP_NUM_THREADS).

Several single-threaded model processes beat one process with several threads on a CPU: a
thread of a multi-threaded model waits for the others at every operation, and whenever
image decoding takes one of the cores. The ranks take every N-th part (nxtrec.tagging.job).

The ranks end with the launcher: on Linux the kernel kills each rank when the launcher dies
(PR_SET_PDEATHSIG, also for kill -9), and every rank also watches its parent (other systems);
a SIGTERM to the launcher stops the ranks first. The launcher holds no lock: rank 0 holds
the output folder's, as under torchrun."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from nxtrec.inference.threads import threads_per_process

# exit codes of `nxtrec tag` that are results, not failures: 1 = some images could not be read
RESULT_CODES = (0, 1)
LAUNCHER_ENV = "NXTREC_TAG_LAUNCHER"  # the launcher's pid, in each rank's environment
PR_SET_PDEATHSIG = 1


class _Terminated(Exception):
    pass


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """For Popen(preexec_fn=): in the child, ask Linux to SIGKILL it when `parent` dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, before fork
    except (OSError, AttributeError):
        return None

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the request took effect
            os._exit(1)

    return setup


def watch_launcher() -> None:
    """In a rank started by run_ranks: end when the launcher is gone (where the kernel does
    not do it for us), as the decoding workers end with their process."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher or not launcher.isdigit() or os.getppid() != int(launcher):
        return

    def watch() -> None:
        while os.getppid() == int(launcher):
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-launcher").start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv: list[str], processes: int) -> int:
    """Run `nxtrec ARGV` as `processes` ranks; the exit code is the worst of theirs. When one
    rank fails, the others are stopped (their finished parts are kept for a rerun)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(processes),
               LOCAL_WORLD_SIZE=str(processes))  # fmt: skip
    env["OMP_NUM_THREADS"] = threads_per_process(processes)
    env[LAUNCHER_ENV] = str(os.getpid())
    setup = _die_with_parent(os.getpid())
    on_term = _on_sigterm()
    # preexec_fn only makes one prctl call (looked up before the fork), which is safe with threads
    ranks = [
        subprocess.Popen([sys.executable, "-m", "nxtrec", *argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                         preexec_fn=setup)  # noqa: PLW1509
        for r in range(processes)
    ]
    codes: dict[int, int] = {}
    try:
        return _wait(ranks, codes)
    except _Terminated:
        _stop(ranks)
        return 128 + signal.SIGTERM
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


def _on_sigterm():
    """SIGTERM to the launcher stops its ranks (raises _Terminated); the handler it replaces."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated

    return signal.signal(signal.SIGTERM, handler)


def _wait(ranks: list[subprocess.Popen], codes: dict[int, int]) -> int:
    try:
        while len(codes) < len(ranks):
            for r, proc in enumerate(ranks):
                if r not in codes and proc.poll() is not None:
                    codes[r] = proc.returncode
                    if proc.returncode not in RESULT_CODES:
                        _stop(ranks)
            time.sleep(0.1)
    except KeyboardInterrupt:  # the ranks got the terminal's SIGINT too
        _stop(ranks)
        return 130
    failures = [c if c >= 0 else 128 - c for c in codes.values() if c not in RESULT_CODES]  # -N: killed by signal N
    return failures[0] if failures else max(codes.values())


def _stop(ranks: list[subprocess.Popen]) -> None:
    for proc in ranks:
        if proc.poll() is None:
            proc.terminate()
    for proc in ranks:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
