"""`nxtrec serve`: the app through httpx (ASGI, in process), a real `nxtrec serve` process on
a loopback port (SIGTERM with a request in flight), and the web page in headless Chromium."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from processes import free_port, model_processes, running

from nxtrec.serving.app import ServeConfig, create_app
from nxtrec.serving.batcher import Batcher, QueueFull
from nxtrec.errors import NxtrecError
from nxtrec.engines import load_engine
from nxtrec.inference.engine import Capabilities, DecodeOptions, Engine, Preprocessing
from nxtrec.inference.ranking import Label
from nxtrec.serving.model_process import start_engine_process

SCENE = Path(__file__).resolve().parents[1] / "examples" / "scene.jpg"
NXTREC = [sys.executable, "-m", "nxtrec"]


@pytest.fixture(scope="module")
def engine():
    """The bundled demo model (real labels: "snake" first on the scene) in a model process of
    its own, as `nxtrec serve` runs it."""
    engine = start_engine_process()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def scenes():
    """Four different real images: the scene and three transformed copies, as JPEG bytes."""
    base = Image.open(SCENE).convert("RGB")
    out = [SCENE.read_bytes()]
    for img in (base.transpose(Image.FLIP_LEFT_RIGHT), base.rotate(90), base.resize((300, 200))):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@asynccontextmanager
async def serving(app):
    """An httpx client on the app, with its startup/shutdown (the inference worker) run."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client


def run(coro):
    return asyncio.run(coro)


def expected_labels(engine: Engine, data: bytes, top_k: int):
    """What `nxtrec predict` computes for the image: Recognizer.predict_batch on it alone."""
    from nxtrec.model.image import load_image

    pixels = engine.preprocessing.array(load_image(data))[None]
    return [lab.to_dict() for lab in engine.predict_batch(pixels, DecodeOptions(top_k=top_k))[0]]


def assert_same_labels(got, want):
    assert [x["label"] for x in got] == [x["label"] for x in want]
    np.testing.assert_allclose([x["prob"] for x in got], [x["prob"] for x in want], rtol=1e-5, atol=1e-7)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels (a decompression-bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat)))


# ---------------------------------------------------------------------------------------
# in process (httpx + ASGI)
# ---------------------------------------------------------------------------------------


def test_endpoints_and_results_equal_predict(engine, scenes):
    async def main():
        async with serving(create_app(engine)) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            assert (await client.get("/readyz")).json() == {"status": "ready", "model": "default-model"}
            r = await client.post("/v1/tag?top_k=5", files={"files": ("scene.jpg", scenes[0], "image/jpeg")})
            assert r.status_code == 200
            body = r.json()
            assert body["model"] == "default-model" and body["time_ms"] > 0
            [result] = body["results"]
            assert (result["width"], result["height"]) == (256, 256)
            assert result["labels"][0]["label"] == "snake"
            assert_same_labels(result["labels"], expected_labels(engine, scenes[0], 5))
            # a raw body, options as form fields, several files in one request, min_prob
            raw = await client.post("/v1/tag?top_k=5", content=scenes[1], headers={"Content-Type": "image/jpeg"})
            assert_same_labels(raw.json()["results"][0]["labels"], expected_labels(engine, scenes[1], 5))
            multi = await client.post("/v1/tag", data={"top_k": "3", "min_prob": "0.05"},
                                      files=[("files", ("a.jpg", scenes[0])), ("files", ("b.jpg", scenes[2]))])
            results = multi.json()["results"]
            assert len(results) == 2 and (results[1]["width"], results[1]["height"]) == (256, 256)
            for result, data in zip(results, (scenes[0], scenes[2])):
                want = [x for x in expected_labels(engine, data, 3) if x["prob"] >= 0.05]
                assert_same_labels(result["labels"], want)
            metrics = (await client.get("/metrics")).text
            assert 'nxtrec_requests_total{path="/v1/tag",code="200"} 3' in metrics
            assert "nxtrec_request_seconds_count 3" in metrics and "nxtrec_queue_depth 0" in metrics
            assert "/v1/tag" in (await client.get("/openapi.json")).json()["paths"]
            for path, marker in (("/", "app.js"), ("/docs", "docs.js"), ("/static/app.js", "/v1/tag")):
                page = await client.get(path)
                assert page.status_code == 200 and marker in page.text
                assert not re.search(r"(src=|href=|url\(|import )[\"']?(https?:)?//", page.text)  # no CDN

    run(main())


def test_same_labels_and_probabilities_as_predict_command(engine, capsys):
    from nxtrec.cli.main import main as nxtrec_main

    assert nxtrec_main(["predict", str(SCENE), "--top-k", "10", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)["labels"]

    async def main():
        async with serving(create_app(engine)) as client:
            r = await client.post("/v1/tag?top_k=10", files={"files": ("scene.jpg", SCENE.read_bytes(), "image/jpeg")})
            assert r.json()["results"][0]["labels"] == want  # one image per call in both: identical floats

    run(main())


def test_maps_option_adds_each_labels_grid(engine, scenes):
    async def main():
        async with serving(create_app(engine)) as client:
            plain = (await client.post("/v1/tag?top_k=5", content=scenes[0])).json()["results"][0]["labels"]
            mapped = (await client.post("/v1/tag?top_k=5&maps=true", content=scenes[0])).json()["results"][0]["labels"]
        assert_same_labels(mapped, plain)
        assert all("map" not in x for x in plain)
        for label in mapped:  # 112 px images, 16 px patches: a 7 x 7 grid that sums to 1
            grid = np.array(label["map"])
            assert grid.shape == (7, 7) and abs(grid.sum() - 1) < 1e-4

    run(main())


def test_tag_list_constrains_every_request(scenes, tmp_path):
    tags = tmp_path / "tags.txt"
    tags.write_text("ring\nstar | stars\ncrown\n")
    listed = load_engine()

    async def main():
        async with serving(create_app(listed, options=DecodeOptions(vocab=str(tags)))) as client:
            r = await client.post("/v1/tag?top_k=5", files={"files": ("scene.jpg", scenes[0], "image/jpeg")})
            assert r.status_code == 200
            labels = [x["label"] for x in r.json()["results"][0]["labels"]]
            assert labels and set(labels) <= {"ring", "star", "crown"}

    asyncio.run(main())


def test_exclude_replace_and_min_prob_of_the_command_line_apply_to_every_request(engine, scenes, tmp_path):
    """`nxtrec serve --exclude --replace --min-prob`: parsed once into the service's options
    (hashable: the batcher groups jobs by them), applied in the model process."""
    from nxtrec.cli.main import build_parser
    from nxtrec.cli.vocab_options import vocab_kwargs

    plain = expected_labels(engine, scenes[0], 8)
    assert len(plain) == 8 and plain[-2]["prob"] > plain[-1]["prob"]
    top, a, b = (x["label"] for x in plain[:3])  # the bundled model's labels are plain words
    (tmp_path / "ex.txt").write_text(f"# undesired\n{top}\n")
    (tmp_path / "re.txt").write_text(f"{a} | {b} -> merged thing\n")
    floor = (plain[-2]["prob"] + plain[-1]["prob"]) / 2
    args = build_parser().parse_args(["serve", "--dtype", "int8", "--exclude", str(tmp_path / "ex.txt"),
                                      "--replace", str(tmp_path / "re.txt"), "--min-prob", str(floor)])  # fmt: skip
    assert args.dtype == "int8"
    options = DecodeOptions(**vocab_kwargs(args))
    hash(options)
    merged = {"label": "merged thing", "prob": plain[1]["prob"] + plain[2]["prob"]}
    want = sorted([merged, *plain[3:-1]], key=lambda x: -x["prob"])

    async def main():
        async with serving(create_app(engine, options=options)) as client:
            got = (await client.post("/v1/tag?top_k=8", content=scenes[0])).json()["results"][0]["labels"]
            raised = (got[1]["prob"] + got[2]["prob"]) / 2  # a request's min_prob raises the floor
            high = (await client.post(f"/v1/tag?top_k=8&min_prob={raised}", content=scenes[0])).json()
        return got, high["results"][0]["labels"]

    got, high = run(main())
    assert_same_labels(got, want)
    assert high == got[:2]


def test_int8_model_process_gives_the_int8_recognizers_labels(scenes):
    """`nxtrec serve --dtype int8`: the model process quantises as `Recognizer` does."""
    from nxtrec.inference.recognizer import Recognizer
    from nxtrec.model.image import load_image

    int8 = start_engine_process(dtype="int8")
    try:
        pixels = int8.preprocessing.array(load_image(scenes[0]))[None]
        got = int8.predict_batch(pixels, DecodeOptions(top_k=5))[0]
    finally:
        int8.close()
    want = Recognizer.from_pretrained(dtype="int8").predict_batch(pixels, top_k=5)[0]
    assert got and [x.label for x in got] == [x.label for x in want]
    np.testing.assert_allclose([x.prob for x in got], [x.prob for x in want], rtol=1e-4)


def test_model_process_load_error_and_unexpected_end(scenes, tmp_path):
    before = set(model_processes(os.getpid()))  # the module's engine
    (tmp_path / "empty").mkdir()
    with pytest.raises(NxtrecError, match=r"empty: config.json is missing; a model directory holds"):
        start_engine_process(model=str(tmp_path / "empty"))
    assert set(model_processes(os.getpid())) == before  # the failed one has ended
    engine = start_engine_process()

    async def main():
        async with serving(create_app(engine)) as client:
            assert (await client.get("/readyz")).status_code == 200
            (pid,) = set(model_processes(os.getpid())) - before
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while engine.alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert (await client.get("/readyz")).status_code == 503
            r = await client.post("/v1/tag", content=scenes[0], headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 503
            assert r.json()["detail"] == "model failure: the model process ended unexpectedly (exit code -9)"
            assert (await client.get("/healthz")).status_code == 200  # the server itself is up

    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_two_model_processes_split_a_batch_and_give_the_same_labels(engine, scenes, monkeypatch):
    from nxtrec.model.image import load_image

    before = set(model_processes(os.getpid()))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins over cores/2
    pair = start_engine_process(processes=2)
    try:
        started = set(model_processes(os.getpid())) - before
        assert len(started) == 2
        for pid in started:
            assert b"OMP_NUM_THREADS=3\0" in Path(f"/proc/{pid}/environ").read_bytes()
        pixels = np.stack([engine.preprocessing.array(load_image(data)) for data in scenes[:3]])  # shares of 2 and 1
        for one, two in zip(engine.predict_batch(pixels, top_k=5), pair.predict_batch(pixels, top_k=5)):
            assert_same_labels([lab.to_dict() for lab in two], [lab.to_dict() for lab in one])
    finally:
        pair.close()
    assert set(model_processes(os.getpid())) == before


def test_concurrent_requests_run_as_one_batch(engine, scenes):
    # A long wait lets the four requests meet; each must still get its own image's labels.
    app = create_app(engine, ServeConfig(max_batch=4, max_wait_ms=1000))

    async def main():
        async with serving(app) as client:
            tasks = [client.post("/v1/tag?top_k=5", content=data, headers={"Content-Type": "image/jpeg"}) for data in scenes]
            answers = await asyncio.gather(*tasks)
            metrics = (await client.get("/metrics")).text
        assert "nxtrec_batch_size_count 1" in metrics and "nxtrec_batch_size_sum 4" in metrics
        for answer, data in zip(answers, scenes):
            assert_same_labels(answer.json()["results"][0]["labels"], expected_labels(engine, data, 5))
        assert answers[0].json()["results"][0]["labels"] != answers[2].json()["results"][0]["labels"]

    run(main())


def test_bad_input_is_4xx_never_500(engine, scenes):
    app = create_app(engine, ServeConfig(max_upload_mb=0.1, max_images=2))
    big = b"\xff" * 200_000
    cases = {
        "truncated": (scenes[0][:2000], "image/jpeg", 422),
        "garbage": (b"not an image at all" * 10, "application/octet-stream", 422),
        "wrong type": (b"hello", "text/plain", 415),
        "bomb header": (png_header_only(30_000, 30_000), "image/png", 422),
        "zero size": (png_header_only(0, 10), "image/png", 422),
        "empty": (b"", "image/jpeg", 422),
        "too big": (big, "image/jpeg", 413),
    }

    async def main():
        async with serving(app) as client:
            for name, (data, ctype, status) in cases.items():
                raw = await client.post("/v1/tag", content=data, headers={"Content-Type": ctype})
                part = await client.post("/v1/tag", files={"files": ("x", data, ctype)})
                assert (name, raw.status_code, part.status_code) == (name, status, status), raw.text
                assert isinstance(raw.json()["detail"], str)
            bomb = await client.post("/v1/tag", files={"files": ("bomb.png", png_header_only(30_000, 30_000), "image/png")})
            assert "bomb.png: image too large" in bomb.json()["detail"]

            async def chunks():  # no Content-Length: the limit applies while streaming
                for _ in range(10):
                    yield b"\xff" * 20_000

            assert (await client.post("/v1/tag", content=chunks(), headers={"Content-Type": "image/jpeg"})).status_code == 413
            three = [("files", (f"{i}.jpg", scenes[0][:30_000] if i else b"x")) for i in range(3)]
            assert (await client.post("/v1/tag", files=three)).status_code in (400, 413)
            for query in ("top_k=0", "top_k=101", "top_k=ten", "min_prob=2", "maps=maybe"):
                assert (await client.post(f"/v1/tag?{query}", content=scenes[0])).status_code == 422, query
            form = await client.post("/v1/tag", data={"top_k": "zero"}, files={"files": ("a.jpg", scenes[0])})
            assert form.status_code == 422 and "top_k" in form.json()["detail"]
            assert (await client.post("/v1/tag", data={"top_k": "3"})).status_code in (400, 422)  # no file
            metrics = (await client.get("/metrics")).text
        assert 'code="500"' not in metrics

    run(main())


def test_api_key(engine, scenes):
    app = create_app(engine, ServeConfig(api_key="s3cret"))

    async def main():
        async with serving(app) as client:
            assert (await client.get("/healthz")).status_code == 200
            for path in ("/", "/docs", "/static/app.js"):  # the page's files: no data behind them
                assert (await client.get(path)).status_code == 200
            for method, path in (("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("POST", "/v1/tag")):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                    r = await client.request(method, path, headers=headers)
                    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (path, headers)
            ok = await client.post("/v1/tag", content=scenes[0], headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200 and ok.json()["results"][0]["labels"][0]["label"] == "snake"

    run(main())


def test_info_says_which_model_and_whether_it_has_maps(engine):
    from nxtrec.model.directory import default_model_dir
    from nxtrec.serving.app import DEFAULT_MODEL_DIR

    assert DEFAULT_MODEL_DIR == default_model_dir()  # found without importing torch

    async def main(app):
        async with serving(app) as client:
            return (await client.get("/v1/info")).json(), (await client.get("/metrics")).text

    demo, metrics = run(main(create_app(engine)))
    assert {k: demo[k] for k in ("model", "demo", "maps")} == {"model": "default-model", "demo": True, "maps": True}
    assert "127 emoji categories" in demo["note"] and "--model" in demo["note"]
    assert 'nxtrec_requests_total{path="/v1/info",code="200"} 1' in metrics
    onnx_like, _ = run(main(create_app(onnx_like_engine())))
    assert onnx_like == {"model": "onnx-like", "demo": False, "maps": False, "note": None}


def test_docs_page_shows_this_servers_address_and_example_answers(engine):
    async def main():
        async with serving(create_app(engine)) as client:
            page = (await client.get("/docs")).text
            elsewhere = (await client.get("/docs", headers={"Host": "tagger.lan:8123"})).text
            hostile = (await client.get("/docs", headers={"Host": "x\"><script>alert(1)</script>"})).text
        async with serving(create_app(engine, ServeConfig(api_key="s3cret"))) as client:
            hidden = await client.get("/docs")  # public: no model name without the key
        return page, elsewhere, hostile, hidden

    page, elsewhere, hostile, hidden = run(main())
    assert "HOST:PORT" not in page and "{{" not in page
    assert "curl -F files=@photo.jpg -F files=@other.jpg 'http://test/v1/tag?top_k=10&amp;min_prob=0.01'" in page
    assert "curl 'http://test/v1/info'" in page
    assert "&quot;labels&quot;: [{&quot;label&quot;: &quot;snake&quot;" in page  # an example answer
    assert "&quot;model&quot;: &quot;default-model&quot;" in page and "&quot;demo&quot;: true" in page
    assert "'http://tagger.lan:8123/v1/tag" in elsewhere
    assert "<script>alert" not in hostile
    assert hidden.status_code == 200 and "default-model" not in hidden.text and "&quot;MODEL&quot;" in hidden.text


def onnx_like_engine() -> Engine:
    """A stand-in for an ONNX Runtime engine: labels at once, no maps."""

    class OnnxLike:
        name, vocab_size = "onnx-like", 32
        preprocessing = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
        capabilities = Capabilities(("one-shot",), maps=False, needs="the PyTorch path (--model)")

        def predict_batch(self, pixels, options):
            return [[Label("cat", 0.7), Label("dog", 0.2)][: options.top_k] for _ in pixels]

        def close(self):
            pass

    return OnnxLike()


def blocking_engine(release: threading.Event) -> Engine:
    """A stand-in model whose calls wait for `release`: holds the worker busy on purpose."""

    class Blocking:
        name, vocab_size = "blocking", 32
        preprocessing = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
        capabilities = Capabilities(("one-shot",), maps=False, needs="-")

        def predict_batch(self, pixels, options):
            release.wait(30)
            return [[] for _ in pixels]

        def close(self):
            pass

    return Blocking()


def test_queue_full_is_503_and_timeout_is_504(scenes):
    release = threading.Event()
    app = create_app(blocking_engine(release), ServeConfig(max_batch=1, max_wait_ms=0, queue=1, timeout_s=5))

    async def main():
        async with serving(app) as client:
            def post():
                return client.post("/v1/tag", content=scenes[0], headers={"Content-Type": "image/jpeg"})

            running = asyncio.ensure_future(post())  # taken by the worker, which blocks
            while "nxtrec_batch_size_count 1" not in (await client.get("/metrics")).text:
                await asyncio.sleep(0.01)
            queued = asyncio.ensure_future(post())  # fills the one queue slot
            while "nxtrec_queue_depth 1" not in (await client.get("/metrics")).text:
                await asyncio.sleep(0.01)
            full = await post()
            assert full.status_code == 503 and full.headers["Retry-After"] == "1"
            release.set()
            assert [(await t).status_code for t in (running, queued)] == [200, 200]

    run(main())
    stuck = threading.Event()
    slow = create_app(blocking_engine(stuck), ServeConfig(timeout_s=0.3))

    async def timeout():
        async with serving(slow) as client:
            r = await client.post("/v1/tag", content=scenes[0])
            assert r.status_code == 504 and "no result within" in r.json()["detail"]
            stuck.set()  # let the worker finish, so that shutdown does not wait

    run(timeout())


def test_client_that_disconnects_frees_its_queue_slot(scenes):
    import uvicorn

    release = threading.Event()
    app = create_app(blocking_engine(release), ServeConfig(max_batch=1, max_wait_ms=0, queue=4))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def queue_depth(expected):
        for _ in range(200):
            text = httpx.get(url + "/metrics").text
            if f"nxtrec_queue_depth {expected}" in text:
                return True
            time.sleep(0.02)
        return False

    def send(conn):
        conn.sendall(f"POST /v1/tag HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     f"Content-Length: {len(scenes[0])}\r\n\r\n".encode() + scenes[0])

    try:
        while not server.started:
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port)) as first:
            send(first)  # taken by the worker, which blocks
            assert queue_depth(0) and "nxtrec_batch_size_count 1" in httpx.get(url + "/metrics").text
            second = socket.create_connection(("127.0.0.1", port))
            send(second)
            assert queue_depth(1)
            second.close()  # the client goes away: its image leaves the queue
            assert queue_depth(0)
            release.set()
            assert first.recv(100).startswith(b"HTTP/1.1 200")
        assert 'code="499"' in httpx.get(url + "/metrics").text
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_cancelled_jobs_free_their_queue_slots():
    release = threading.Event()
    batcher = Batcher(lambda pixels, options: release.wait(30) and [None] * len(pixels), max_batch=1, max_wait=0, queue_size=2)
    batcher.start()
    image = np.zeros((3, 4, 4), np.float32)
    running = batcher.submit([image], 1)
    while batcher.depth:  # the worker holds the first job
        time.sleep(0.01)
    waiting = batcher.submit([image, image], 1)
    with pytest.raises(QueueFull):
        batcher.submit([image], 1)
    batcher.cancel(waiting)  # what the app does when the client disconnects
    assert batcher.depth == 0 and all(job.future.cancelled() for job in waiting)
    again = batcher.submit([image, image], 1)
    release.set()
    assert [job.future.result(10) for job in running + again] == [None] * 3
    batcher.stop(10)
    assert not batcher.alive


# ---------------------------------------------------------------------------------------
# a real `nxtrec serve` process
# ---------------------------------------------------------------------------------------


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([*NXTREC, "serve", "--port", str(port), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nxtrec serve exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("nxtrec serve did not become ready in 60 s")


@pytest.mark.slow
def test_real_server_finishes_in_flight_request_on_sigterm(engine):
    proc, url = start_server("--max-wait-ms", "5")
    try:
        answer = httpx.post(url + "/v1/tag?top_k=10", files={"files": ("scene.jpg", SCENE.read_bytes())}, timeout=60)
        assert_same_labels(answer.json()["results"][0]["labels"], expected_labels(engine, SCENE.read_bytes(), 10))
        model = model_processes(proc.pid)
        assert len(model) == 1
        # A request in flight: headers and half the body sent, then SIGTERM, then the rest.
        body = SCENE.read_bytes()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
            conn.sendall(f"POST /v1/tag?top_k=3 HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # waiting for the request
            conn.sendall(body[len(body) // 2 :])
            response = b""
            while chunk := conn.recv(65536):
                response += chunk
        head, _, payload = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(payload)["results"][0]["labels"][0]["label"] == "snake"
        # uvicorn ends by re-raising the signal after its graceful shutdown
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        # and the model process ends with it (it sees the server's end of the socket close)
        deadline = time.monotonic() + 20
        while running(model[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(model[0])
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------------------------
# the web page in a real browser
# ---------------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def chrome(tmp_path):
    """Headless Debian Chromium through its own chromedriver (nothing downloaded); the page's
    downloads go to tmp_path / "downloads"."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    downloads = tmp_path / "downloads"
    downloads.mkdir(exist_ok=True)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


def downloaded(path: Path, timeout: float = 20) -> str:
    """The text of a file the browser downloads, once complete (no .crdownload left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and not list(path.parent.glob("*.crdownload")):
            return path.read_text(encoding="utf-8")
        time.sleep(0.1)
    raise AssertionError(f"{path.name} was not downloaded in {timeout:g} s: {sorted(os.listdir(path.parent))}")


@contextmanager
def server_in_thread(app):
    """The app on uvicorn, in a thread, on a loopback port: its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.slow
@pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                    reason=f"no browser: install Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
def test_page_in_headless_chromium_shows_top_label(tmp_path):
    pytest.importorskip("selenium", reason="selenium is not installed (pip install 'nxtrec[dev]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    proc, url = start_server()
    driver = chrome(tmp_path)
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 20).until(lambda d: "default-model" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "files").send_keys(str(SCENE))
        first = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result .label .name"))
        assert first[0].text == "snake"
        rows = driver.find_elements(By.CSS_SELECTOR, ".result .label")
        assert len(rows) == 10  # the page's default top-k
        widths = [float(r.find_element(By.CSS_SELECTOR, ".bar span").get_attribute("style").split(":")[1].strip(" %;"))
                  for r in rows]
        assert widths == sorted(widths, reverse=True) and 55 < widths[0] < 70
        check_page_tools(driver, url, tmp_path / "downloads")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(30)


def check_page_tools(driver, url: str, downloads: Path) -> None:
    """The demo notice, no second card for the same file, CSV and JSON downloads of the labels
    shown, copying one image's tags, clearing everything."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    notice = driver.find_element(By.ID, "notice")
    assert notice.is_displayed() and "127 emoji categories" in notice.text and "--model" in notice.text
    assert driver.find_element(By.ID, "maps").is_enabled()  # a PyTorch model: heat maps available
    assert not driver.find_element(By.ID, "maps-note").text
    api = httpx.post(url + "/v1/tag?top_k=10", files={"files": ("scene.jpg", SCENE.read_bytes())}, timeout=60)
    want = api.json()["results"][0]["labels"]
    shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".result .label .name")]
    assert shown == [x["label"] for x in want]

    driver.find_element(By.ID, "files").send_keys(str(SCENE))  # the same file again
    WebDriverWait(driver, 10).until(lambda d: "already shown: scene.jpg" in d.find_element(By.ID, "status").text)
    assert len(driver.find_elements(By.CSS_SELECTOR, ".result")) == 1
    assert driver.find_element(By.ID, "count").text == "1 image, 1 tagged"

    driver.find_element(By.ID, "download-csv").click()
    rows = list(csv.DictReader(io.StringIO(downloaded(downloads / "nxtrec-results.csv"))))
    assert [(r["file"], r["width"], r["rank"], r["label"]) for r in rows] == [
        ("scene.jpg", "256", str(i + 1), x["label"]) for i, x in enumerate(want)]
    assert [float(r["prob"]) for r in rows] == [x["prob"] for x in want]
    driver.find_element(By.ID, "download-json").click()
    data = json.loads(downloaded(downloads / "nxtrec-results.json"))
    assert (data["model"], data["top_k"], data["threshold"]) == ("default-model", 10, 0)
    assert data["results"] == [{"file": "scene.jpg", "width": 256, "height": 256, "labels": want}]

    driver.execute_cdp_cmd("Browser.grantPermissions", {"origin": url, "permissions": ["clipboardReadWrite"]})
    driver.find_element(By.CSS_SELECTOR, ".result .copy").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.CSS_SELECTOR, ".result .copied").text)
    assert driver.find_element(By.CSS_SELECTOR, ".result .copied").text == "Copied 10 tags"
    pasted = driver.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], (e) => arguments[0]('cannot read: ' + e))")
    assert pasted == ", ".join(shown)

    driver.find_element(By.ID, "clear").click()
    assert not driver.find_elements(By.CSS_SELECTOR, ".result")
    assert not driver.find_element(By.ID, "toolbar").is_displayed()
    driver.find_element(By.ID, "files").send_keys(str(SCENE))  # cleared: the file is new again
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result .label .name"))
    assert len(driver.find_elements(By.CSS_SELECTOR, ".result")) == 1


@pytest.mark.slow
@pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                    reason=f"no browser: install Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
def test_page_switches_heat_maps_off_without_maps(tmp_path):
    pytest.importorskip("selenium", reason="selenium is not installed (pip install 'nxtrec[dev]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with server_in_thread(create_app(onnx_like_engine())) as url:
        driver = chrome(tmp_path)
        try:
            driver.get(url + "/")
            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "maps-note").text.startswith("Heat maps are off"))
            maps = driver.find_element(By.ID, "maps")
            assert not maps.is_enabled() and not maps.is_selected()
            assert "ONNX" in driver.find_element(By.ID, "maps-note").text
            assert not driver.find_element(By.ID, "notice").is_displayed()  # not the demo model
            driver.find_element(By.ID, "files").send_keys(str(SCENE))
            names = WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result .label .name"))
            assert [e.text for e in names] == ["cat", "dog"]
            assert not driver.find_element(By.CSS_SELECTOR, ".result .error").text
        finally:
            driver.quit()



def test_upload_bytes_in_flight_beyond_the_limit_get_503(scenes):
    """--max-inflight-mb bounds the bodies being received, decoded or waiting together: one
    more big body is refused with 503 + Retry-After (from Content-Length, or while a streamed
    body arrives), never queued; a small one still fits; a request alone always fits."""
    release = threading.Event()
    app = create_app(blocking_engine(release), ServeConfig(max_batch=1, max_wait_ms=0, max_inflight_mb=1.0, timeout_s=10))
    noise = np.random.default_rng(0).integers(0, 256, (400, 500, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG", compress_level=0)
    big = buf.getvalue()  # 0.6 MB: two do not fit in 1 MB
    assert 0.5e6 < len(big) < 0.9e6 and len(scenes[0]) < 0.3e6

    async def chunks():
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    async def main():
        async with serving(app) as client:
            first = asyncio.ensure_future(client.post("/v1/tag", content=big, headers={"Content-Type": "image/png"}))
            while "nxtrec_batch_size_count 1" not in (await client.get("/metrics")).text:
                await asyncio.sleep(0.01)  # its body is held while the model (blocked) works
            refused = await client.post("/v1/tag", content=big, headers={"Content-Type": "image/png"})
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            assert "--max-inflight-mb" in refused.json()["detail"]
            streamed = await client.post("/v1/tag", content=chunks(), headers={"Content-Type": "image/png"})
            assert "content-length" not in streamed.request.headers
            assert streamed.status_code == 503 and streamed.headers["Retry-After"] == "1"
            small = asyncio.ensure_future(client.post("/v1/tag", content=scenes[0], headers={"Content-Type": "image/jpeg"}))
            while "nxtrec_queue_depth 1" not in (await client.get("/metrics")).text:
                await asyncio.sleep(0.01)  # the small one fitted beside the first and waits its turn
            release.set()
            assert [(await t).status_code for t in (first, small)] == [200, 200]
            alone = await client.post("/v1/tag", content=big + big, headers={"Content-Type": "image/png"})
            assert alone.status_code == 200  # 1.2 MB over the 1 MB limit, but nothing else in flight

    run(main())


def test_decodes_together_stay_within_one_images_byte_budget(monkeypatch):
    """Two uploads whose headers each need more than half the byte budget are decoded one
    after the other (the second waits); two small ones at once."""
    from nxtrec.serving import uploads

    monkeypatch.setenv("NXTREC_MAX_IMAGE_BYTES", "100000")

    def tiff(mode, side):
        buf = io.BytesIO()
        Image.new(mode, (side, side)).save(buf, "TIFF")
        return buf.getvalue()

    running, most = 0, 0
    lock = threading.Lock()
    real_load = uploads.load_image

    def counting_load(data, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.15)
        with lock:
            running -= 1
        return real_load(data, **kwargs)

    monkeypatch.setattr(uploads, "load_image", counting_load)
    engine = onnx_like_engine()
    for data, expected in ((tiff("F", 100), 1), (tiff("L", 100), 2)):  # 80 kB each, then 50 kB each
        most = 0
        threads = [threading.Thread(target=uploads.decode, args=(uploads.Upload("x.tif", data), engine)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert most == expected and uploads.DECODE_BYTES.held == 0
    monkeypatch.setenv("NXTREC_MAX_IMAGE_BYTES", "abc")  # refused when the service starts, not per upload
    with pytest.raises(NxtrecError, match="NXTREC_MAX_IMAGE_BYTES='abc': expected a positive whole number"):
        create_app(engine)
