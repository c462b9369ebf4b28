"""Load test of `nxtrec serve` on loopback: dynamic batching against --max-batch 1, queue
overflow, and bad uploads mixed into good traffic.

    flock /tmp/nxtrec-heavy.lock python benchmarks/bench_serve.py [--model DIR] [--duration 60]

Phases, each against a fresh `nxtrec serve` process on 127.0.0.1 (the bundled demo model
unless --model): (1) `--clients` concurrent clients posting real scene images
(examples/scene.jpg and `nxtrec synth` scenes generated into --work) for `--duration` s with
the default batching and (2) the same against `--max-batch 1`, the two loaded in turns;
(3) `--queue 4` and a burst of
64 simultaneous requests: the overflow must be answered 503, and the service stay healthy;
(4) the clients again with `--bad` bad uploads (truncated, huge-dimension headers,
decompression bombs, wrong types, over the size limit) mixed in: all must be 4xx while the
good requests keep succeeding. Reports p50/p99 latency, throughput, mean batch size and the
RSS of the server with its model process (sampled, and its peak) per phase; writes them to
--out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: the bundled demo model)")
    p.add_argument("--processes", type=int, default=1, help="nxtrec serve --processes (model processes) of every server")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load on each of the two servers")
    p.add_argument("--rounds", type=int, default=3, help="turns the duration is split into")
    p.add_argument("--bad", type=int, default=1000, help="bad uploads mixed into the last phase")
    p.add_argument("--bad-duration", type=float, default=30.0, help="seconds of good load with the bad uploads")
    p.add_argument("--scenes", type=int, default=30, help="synthetic scenes to generate")
    p.add_argument("--work", default="/tmp/nxtrec-bench-serve", help="folder for generated scenes")
    p.add_argument("--out", default="/tmp/nxtrec-bench-serve/results.json")
    args = p.parse_args()
    args.server_args = ["--processes", str(args.processes)]
    return args


# -- inputs --------------------------------------------------------------------------------


def scene_images(work: Path, n: int) -> list[bytes]:
    folder = work / "synth"
    if not (folder / "images").is_dir():
        subprocess.run([sys.executable, "-m", "nxtrec", "synth", "--out", str(folder), "--n", str(n), "--val", "2",
                        "--seed", "7", "--workers", "1"], check=True, stdout=subprocess.DEVNULL)
    files = sorted((folder / "images").rglob("*.jpg"))[:n]
    return [(ROOT / "examples" / "scene.jpg").read_bytes()] + [f.read_bytes() for f in files]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no data."""
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = b"IDAT" + zlib.compress(b"\0" * 256)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat)))


def bomb_png(side: int = 10_000) -> bytes:
    """A real, valid PNG of side x side black pixels: ~100 KB that decode to side^2 pixels."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def bad_uploads(good: list[bytes], n: int, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """(kind, body, content type), n of them, in a shuffled mix of kinds."""
    rng = random.Random(seed)
    bomb = bomb_png()
    over_limit = b"\xff\xd8" + bytes(21 * 1024 * 1024)  # over the default 20 MB upload limit
    makers = [
        ("truncated", lambda: (g := rng.choice(good))[: rng.randrange(16, len(g) // 2)], "image/jpeg"),
        ("huge header", lambda: png_header(rng.randrange(20_000, 200_000), rng.randrange(20_000, 200_000)), "image/png"),
        ("bomb", lambda: bomb, "image/png"),
        ("wrong type", lambda: b"%PDF-1.4 " + rng.randbytes(2000), "application/pdf"),
        ("not an image", lambda: rng.randbytes(rng.randrange(1, 5000)), "application/octet-stream"),
    ]
    out = []
    for i in range(n):
        if i % 100 == 99:
            out.append(("over limit", over_limit, "image/jpeg"))
            continue
        kind, make, ctype = rng.choice(makers)
        out.append((kind, make(), ctype))
    return out


# -- the server ------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class Server:
    def __init__(self, model: str | None, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "nxtrec", "serve", "--port", str(self.port), *args]
        if model:
            cmd += ["--model", model]
        # the server's stderr (a pipe could fill up); closed in close()
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.rss_samples: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"nxtrec serve exited: {self.log.read().strip()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise SystemExit("nxtrec serve did not become ready")

    def memory(self, field: str) -> int:
        """VmRSS (now) or VmHWM (peak) of the server and its model process together, bytes
        (the sum of the two peaks for VmHWM: an upper bound of their joint peak)."""
        total = 0
        for pid in (self.proc.pid, *_children(self.proc.pid)):
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(rf"{field}:\s+(\d+) kB", status)[1]) * 1024
        return total

    async def sample_rss(self, stop: asyncio.Event):
        while not stop.is_set():
            self.rss_samples.append(self.memory("VmRSS"))
            await asyncio.sleep(0.5)

    def batch_mean(self) -> float:
        text = httpx.get(self.url + "/metrics").text
        total = float(re.search(r"nxtrec_batch_size_sum (\S+)", text)[1])
        count = float(re.search(r"nxtrec_batch_size_count (\S+)", text)[1])
        return total / max(count, 1)

    def close(self):
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


# -- load ------------------------------------------------------------------------------------


async def good_client(client, images, until, results, offset):
    i = offset
    while time.monotonic() < until:
        start = time.perf_counter()
        try:
            r = await client.post("/v1/tag", content=images[i % len(images)], headers={"Content-Type": "image/jpeg"})
            status = r.status_code if r.status_code != 200 or r.json()["results"][0]["labels"] else -1
        except httpx.HTTPError as e:
            status = type(e).__name__
        results.append((status, time.perf_counter() - start))
        i += 1


async def bad_client(client, queue: list, answers: list):
    while queue:
        kind, body, ctype = queue.pop()
        try:
            r = await client.post("/v1/tag", content=body, headers={"Content-Type": ctype})
            answers.append((kind, r.status_code))
        except httpx.HTTPError as e:  # the server may close the connection after a 413
            answers.append((kind, type(e).__name__))


async def load_phase(server: Server, images, clients: int, duration: float, bad=None) -> tuple[list, list, float]:
    """(good results as (status, seconds), bad answers as (kind, status), elapsed seconds)."""
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(server.sample_rss(stop))
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    results, bad_answers = [], []
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        start = time.monotonic()
        tasks = [good_client(client, images, start + duration, results, i) for i in range(clients)]
        if bad:
            queue = list(bad)
            tasks += [bad_client(client, queue, bad_answers) for _ in range(4)]
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    stop.set()
    await sampler
    return results, bad_answers, elapsed


def summary(server: Server, results: list, elapsed: float, bad_answers: list | None = None) -> dict:
    ok = [t for s, t in results if s == 200]
    out = {
        "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "error_kinds": sorted({str(s) for s, _ in results if s != 200}),
        "seconds": round(elapsed, 1),
        "throughput_per_s": round(len(ok) / elapsed, 2),
        "p50_ms": round(float(np.percentile(ok, 50)) * 1000, 1) if ok else None,
        "p99_ms": round(float(np.percentile(ok, 99)) * 1000, 1) if ok else None,
        "mean_batch": round(server.batch_mean(), 2),
        "rss_max_sampled_mb": round(max(server.rss_samples) / 2**20, 1),
        "rss_peak_mb": round(server.memory("VmHWM") / 2**20, 1),
    }
    if bad_answers is not None:
        by_kind: dict[str, dict[str, int]] = {}
        for kind, status in bad_answers:
            by_kind.setdefault(kind, {}).setdefault(str(status), 0)
            by_kind[kind][str(status)] += 1
        out["bad"] = {"sent": len(bad_answers), "all_4xx": all(isinstance(s, int) and 400 <= s < 500 for _, s in bad_answers),
                      "by_kind": by_kind}
    return out


def compare_batching(args, images) -> dict:
    """Both servers run side by side and are loaded in turns (`--rounds` slices each), so that
    a change in the machine's other load does not favour one of them."""
    servers = {name: Server(args.model, "--max-batch", size, *args.server_args) for name, size in (("batched", "16"), ("max_batch_1", "1"))}
    totals = {name: ([], 0.0) for name in servers}
    try:
        for _ in range(args.rounds):
            for name, server in servers.items():
                results, _, elapsed = asyncio.run(load_phase(server, images, args.clients, args.duration / args.rounds))
                totals[name] = (totals[name][0] + results, totals[name][1] + elapsed)
        return {name: summary(servers[name], *totals[name]) for name in servers}
    finally:
        for server in servers.values():
            server.close()


async def overflow_phase(server: Server, image: bytes, burst: int = 64) -> dict:
    async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                 limits=httpx.Limits(max_connections=burst + 4)) as client:
        answers = await asyncio.gather(*(client.post("/v1/tag", content=image, headers={"Content-Type": "image/jpeg"})
                                         for _ in range(burst)))
        health = (await client.get("/healthz")).status_code
        after = (await client.post("/v1/tag", content=image)).status_code
    codes = [a.status_code for a in answers]
    retry_after = all(a.headers.get("Retry-After") for a in answers if a.status_code == 503)
    return {"burst": burst, "200": codes.count(200), "503": codes.count(503), "other": len(codes) - codes.count(200) - codes.count(503),
            "retry_after_on_503": retry_after, "healthz_after": health, "tag_after": after}


def main():
    args = parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    images = scene_images(work, args.scenes)
    report = {"clients": args.clients, "processes": args.processes, "duration_s": args.duration, "rounds": args.rounds,
              "images": len(images)}
    report.update(compare_batching(args, images))
    report["speedup"] = round(report["batched"]["throughput_per_s"] / report["max_batch_1"]["throughput_per_s"], 2)
    for name in ("batched", "max_batch_1"):
        print(name, json.dumps(report[name]), flush=True)
    server = Server(args.model, "--queue", "4", "--max-images", "4", *args.server_args)
    try:
        report["overflow"] = asyncio.run(overflow_phase(server, images[0]))
    finally:
        server.close()
    print("overflow", json.dumps(report["overflow"]), flush=True)
    server = Server(args.model, *args.server_args)
    try:
        bad = bad_uploads(images, args.bad)
        results, bad_answers, elapsed = asyncio.run(load_phase(server, images, args.clients, args.bad_duration, bad))
        report["with_bad_uploads"] = summary(server, results, elapsed, bad_answers)
    finally:
        server.close()
    print("with_bad_uploads", json.dumps(report["with_bad_uploads"]), flush=True)
    print(f"speed-up of batching: {report['speedup']}x")
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
