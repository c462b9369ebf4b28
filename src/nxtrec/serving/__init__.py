"""`nxtrec serve`: an HTTP tagging service (FastAPI + uvicorn, the `serve` extra).

engine.py   the model behind the service (PyTorch model directory or ONNX directory)
model_process.py  the engine in a child process of its own (no GIL shared with the server)
batcher.py  dynamic batching: a bounded queue and one inference worker thread
uploads.py  request bodies -> decoded, preprocessed images (limits, error statuses)
metrics.py  Prometheus text metrics
middleware.py  ASGI middleware: request metrics, API key (401), body size limit (413)
app.py      the FastAPI application: /v1/tag, /healthz, /readyz, /metrics, /docs, the page
static/     the web page and the offline API docs page (no CDN)
"""
