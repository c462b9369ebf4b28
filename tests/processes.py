"""Processes and ports, read from /proc, for the tests of servers and killed jobs."""

from __future__ import annotations

import socket
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_processes(parent: int) -> list[int]:
    """The pids of `parent`'s model processes (nxtrec.serving.model_process children), oldest first."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # ended meanwhile
        if ppid == parent and b"nxtrec.serving.model_process" in cmdline:
            found.append(int(proc.name))
    return sorted(found)


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_naming(text: str, wait: float) -> list[str]:
    """The pids of processes whose command line contains `text`, once none is left or after
    `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        left = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    left.append(proc.name)
            except OSError:
                continue  # ended meanwhile
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
