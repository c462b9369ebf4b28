"""`nxtrec tag --processes N`: the same command as N ranks on this machine, as torchrun would
start them (RANK, WORLD_SIZE, MASTER_ADDR on loopback), each on cores/N threads (or
$OMP_NUM_THREADS).

Several single-threaded model processes beat one process with several threads on a CPU: a
thread of a multi-threaded model waits for the others at every operation, and whenever
image decoding takes one of the cores. The ranks take every N-th part (nxtrec.tagging.job)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from nxtrec.inference.threads import threads_per_process

# exit codes of `nxtrec tag` that are results, not failures: 1 = some images could not be read
RESULT_CODES = (0, 1)


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
    ranks = [
        subprocess.Popen([sys.executable, "-m", "nxtrec", *argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
        for r in range(processes)
    ]
    codes: dict[int, int] = {}
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
