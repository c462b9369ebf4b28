"""The FastAPI application of `nxtrec serve`.

    app = create_app(start_engine_process(), ServeConfig(max_batch=16))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/tag, GET /v1/info, /healthz, /readyz, /metrics, /openapi.json, /docs (an
offline page reading /openapi.json, with this server's address) and the web page at / with its
files under /static/.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from nxtrec.inference.calibration import confidence_settings
from nxtrec.inference.engine import DecodeOptions, Engine
from nxtrec.inference.ranking import keep_labels
from nxtrec.model.image import max_image_bytes, max_image_pixels
from nxtrec.serving.batcher import Batcher, Job, QueueFull
from nxtrec.serving.metrics import Metrics
from nxtrec.serving.middleware import ApiKey, BodyLimit, BodyTimeout, RequestMetrics, Shutdown
from nxtrec.serving.uploads import InflightBytes, RequestError, decode, read_uploads

STATIC = Path(__file__).parent / "static"
MAX_TOP_K = 100
KNOWN_PATHS = {"/", "/docs", "/openapi.json", "/healthz", "/readyz", "/metrics", "/v1/tag", "/v1/info"}
PUBLIC_PATHS = {"/", "/docs", "/healthz"}  # no data behind them (see middleware.ApiKey)
# nxtrec.model.directory.default_model_dir(), without importing torch into the server
# (tests/test_serve.py checks that both agree); an engine is named after its directory.
DEFAULT_MODEL_DIR = Path(__file__).parents[1] / "assets" / "default-model"
DEMO_NOTE = ("This server runs nxtrec's bundled demo model, trained on synthetic scenes of emoji: it knows only "
             "127 emoji categories, so real photos get emoji labels. For real photos, get the released weights "
             "(nxtrec download nxtp-1.78b-g70m --out DIR, see docs/models.md) and start nxtrec serve --model DIR.")
OPENAPI_BODY = {  # the body is read by hand (two forms), so it is described here for /docs
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "top_k": {"type": "integer"}, "min_prob": {"type": "number"}, "maps": {"type": "boolean"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


@dataclass
class ServeConfig:
    max_batch: int = 16
    max_wait_ms: float = 10.0
    queue: int = 256  # images waiting for the worker
    api_key: str | None = None
    max_upload_mb: float = 20.0  # per request
    max_inflight_mb: float = 128.0  # request bodies in flight at once, all requests together (503 beyond)
    max_images: int = 32  # per request
    timeout_s: float = 60.0  # per request, from arrival to the last result
    body_timeout_s: float = 30.0  # the whole request body, from the request head (408 beyond)
    ready_timeout_s: float = 2.0  # /readyz: each model process must answer a ping within this (503 beyond)
    max_pixels: int | None = None  # None: nxtrec.model.image's budget (as `nxtrec predict`)
    decode_threads: int = 2  # images decoded at once (bounds the memory of large uploads)
    default_top_k: int = 20  # as `nxtrec predict`


@dataclass
class RequestOptions:
    decode: DecodeOptions  # the service's options with this request's top_k and maps
    min_prob: float


def create_app(engine: Engine, config: ServeConfig | None = None, options: DecodeOptions | None = None) -> FastAPI:
    """`options`: the service's decoding options (a tag list); each request sets top_k and maps."""
    config = config or ServeConfig()
    # a bad $NXTREC_MAX_IMAGE_PIXELS or _BYTES is one usage error at start, not a 500 per upload
    max_image_pixels(), max_image_bytes()
    metrics = Metrics()
    batcher = Batcher(engine.predict_batch, config.max_batch, config.max_wait_ms / 1000, config.queue,
                      metrics.observe_batch)  # fmt: skip
    metrics.queue_depth = lambda: batcher.depth

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.decode_limiter = anyio.CapacityLimiter(config.decode_threads)
        batcher.start()
        yield
        # uvicorn has let in-flight requests finish before this point (graceful shutdown)
        await anyio.to_thread.run_sync(batcher.stop)

    app = FastAPI(title="nxtrec", summary="Open-vocabulary image tagging", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.engine, app.state.batcher, app.state.metrics, app.state.config = engine, batcher, metrics, config
    app.state.options = options or DecodeOptions()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_routes(app)
    # The last added is the outermost: metrics see every answer, 401 and 413 included.
    # InflightBytes is inside BodyLimit: a single body over --max-upload-mb is 413, not 503.
    app.add_middleware(InflightBytes, max_bytes=int(config.max_inflight_mb * 1024 * 1024))
    app.add_middleware(BodyLimit, max_bytes=int(config.max_upload_mb * 1024 * 1024))
    # app.state.shutdown.begin() (nxtrec serve's signal handler) cuts slow uploads short
    app.state.shutdown = Shutdown()
    app.add_middleware(BodyTimeout, timeout_s=config.body_timeout_s, shutdown=app.state.shutdown)
    if config.api_key:
        app.add_middleware(ApiKey, key=config.api_key, public_paths=PUBLIC_PATHS, public_prefixes=("/static/",))
    app.add_middleware(RequestMetrics, metrics=metrics, known_paths=KNOWN_PATHS)
    return app


def _add_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        return HTMLResponse(_docs_page(request))

    @app.get("/healthz", summary="The process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded, every model process answers a ping within 2 s, and the "
                                "inference worker runs")
    async def readyz(request: Request):
        state = request.app.state
        if not state.batcher.alive:
            problem = "the inference worker has stopped"
        else:
            problem = await anyio.to_thread.run_sync(_model_problem, state.engine, state.config)
        if problem:
            return JSONResponse({"status": "not ready", "reason": problem}, status_code=503)
        return {"status": "ready", "model": state.engine.name}

    @app.get("/v1/info", summary="The model served: its name, whether it is the bundled demo model, "
                                 "whether it gives maps (maps=true), and a note for people")
    async def info(request: Request):
        state = request.app.state  # with a calibration: its summary and the confidence threshold in use
        options = state.options
        calibration = confidence_settings(getattr(state.engine, "calibration", None), options.min_confidence, options.profile)
        return {**model_info(state.engine), **calibration}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics(request: Request):
        return PlainTextResponse(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/tag", summary="Labels for one or more images", openapi_extra={"requestBody": OPENAPI_BODY},
              responses={413: {"description": "body over the upload limit"}, 415: {"description": "not an image type"},
                         422: {"description": "undecodable image, over the pixel limit, or a bad option"},
                         503: {"description": "queue full or too many upload bytes in flight (see Retry-After)"}, 504: {"description": "timed out"}})
    async def tag(
        request: Request,
        top_k: int | None = Query(None, ge=1, le=MAX_TOP_K, description="labels per image (default 20, as `nxtrec predict`)"),
        min_prob: float | None = Query(None, ge=0.0, le=1.0, description="drop labels below this probability"),
        maps: bool | None = Query(None, description="add each label's map over the image patch grid (PyTorch models)"),
    ):
        try:
            return await _tag(request, {"top_k": top_k, "min_prob": min_prob, "maps": maps})
        except RequestError as e:
            headers = {"Retry-After": "1"} if e.status == 503 else None
            return JSONResponse({"detail": e.detail}, status_code=e.status, headers=headers)


async def _tag(request: Request, query: dict) -> dict:
    start = time.perf_counter()
    state = request.app.state
    config: ServeConfig = state.config
    engine: Engine = state.engine
    uploads, fields = await read_uploads(request, config.max_images)
    options = _options(query, fields, config, engine, state.options)
    decoded = [
        await anyio.to_thread.run_sync(decode, upload, engine, config.max_pixels, limiter=state.decode_limiter)
        for upload in uploads
    ]
    try:
        jobs = state.batcher.submit([d.pixels for d in decoded], options.decode)
    except QueueFull:
        raise RequestError(503, f"queue full ({config.queue} images waiting); retry shortly") from None
    try:
        results = await _wait_results(request, jobs, config.timeout_s - (time.perf_counter() - start))
    except RequestError:
        raise
    except Exception as e:  # noqa: BLE001 - the model failed on this batch: the reason, as JSON
        status = 500 if _alive(engine) else 503  # 503: the model process has ended (readyz says so too)
        raise RequestError(status, f"model failure: {e}") from None
    return {
        "model": engine.name,
        "results": [
            {"labels": [lab.to_dict() for lab in keep_labels(labels, options.min_prob)], "width": d.width, "height": d.height}
            for labels, d in zip(results, decoded)
        ],
        "time_ms": round((time.perf_counter() - start) * 1000, 3),
    }


def model_info(engine: Engine) -> dict:
    """What GET /v1/info answers: the page shows `note` and switches heat maps off without `maps`."""
    demo = engine.name == DEFAULT_MODEL_DIR.name
    return {"model": engine.name, "demo": demo, "maps": bool(engine.capabilities.maps),
            "note": DEMO_NOTE if demo else None}


def _docs_page(request: Request) -> str:
    """docs.html with the address the client reached this server at (escaped: it comes from the
    Host header) and example answers (with this model's name, unless an API key hides it)."""
    state = request.app.state
    info = model_info(state.engine) if not state.config.api_key else {"model": "MODEL", "demo": False, "maps": True,
                                                                        "note": None}
    tag = {"model": info["model"], "results": [{"labels": [{"label": "snake", "prob": 0.624538},
                                                           {"label": "star", "prob": 0.0535475}],
                                                "width": 256, "height": 256}], "time_ms": 41.9}
    values = {"{{base}}": str(request.base_url).rstrip("/"), "{{tag_example}}": json.dumps(tag),
              "{{info_example}}": json.dumps(info, indent=1)}
    page = (STATIC / "docs.html").read_text(encoding="utf-8")
    for placeholder, value in values.items():
        page = page.replace(placeholder, html.escape(value))
    return page


def _model_problem(engine: Engine, config: ServeConfig) -> str | None:
    """Why the model cannot serve now (a `ModelProcesses` engine is pinged), or None."""
    ping = getattr(engine, "ping", None)
    if ping is not None:
        return ping(config.ready_timeout_s, busy_limit=config.timeout_s)
    return None if _alive(engine) else "the model process has ended"


def _alive(engine: Engine) -> bool:
    """False once the model process of a `ModelProcesses` engine has ended."""
    alive = getattr(engine, "alive", None)
    return alive() if alive is not None else True


def _options(query: dict, fields: dict[str, str], config: ServeConfig, engine: Engine,
             base: DecodeOptions) -> RequestOptions:  # fmt: skip
    """Options from the query string, or from multipart form fields (same names and bounds)."""
    values = dict(query)
    for name, convert, low, high in (("top_k", int, 1, MAX_TOP_K), ("min_prob", float, 0.0, 1.0), ("maps", _boolean, None, None)):
        if values.get(name) is not None or name not in fields:
            continue
        try:
            values[name] = convert(fields[name])
        except ValueError:
            raise RequestError(422, f"form field {name}: invalid value {fields[name]!r}") from None
        if low is not None and not low <= values[name] <= high:
            raise RequestError(422, f"form field {name}: {values[name]} is outside [{low}, {high}]")
    maps = bool(values.get("maps"))
    if maps and not engine.capabilities.maps:
        raise RequestError(422, "maps=true needs a PyTorch model (serve --model); this service runs ONNX")
    decode = DecodeOptions.of(base, top_k=values.get("top_k") or config.default_top_k, maps=maps)
    return RequestOptions(decode, values.get("min_prob") or 0.0)


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ValueError(text)
    return lowered in ("true", "1", "yes", "on")


async def _wait_results(request: Request, jobs: list[Job], timeout: float):
    """The labels of every job; a client that disconnects or a timeout cancels its jobs."""
    loop = asyncio.get_running_loop()
    futures = [asyncio.wrap_future(job.future) for job in jobs]
    pending = set(futures)
    deadline = loop.time() + timeout
    client_gone = asyncio.ensure_future(_disconnected(request))
    try:
        while pending and not client_gone.done() and loop.time() < deadline:
            done, _ = await asyncio.wait(pending | {client_gone}, timeout=deadline - loop.time(),
                                         return_when=asyncio.FIRST_COMPLETED)
            pending -= done
    finally:
        gone = client_gone.done()
        client_gone.cancel()
    if not pending:
        return [future.result() for future in futures]
    request.app.state.batcher.cancel(jobs)
    if gone:
        raise RequestError(499, "client closed the request")  # nobody reads this answer
    raise RequestError(504, f"no result within {request.app.state.config.timeout_s:g} s (server busy); retry later")


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
