"""`nxtrec serve [--model DIR | --onnx DIR]`: the HTTP tagging service and its web page."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from nxtrec.cli.adapter_options import add_adapter_argument
from nxtrec.cli.confidence_options import add_confidence_arguments, check_engine_confidence, confidence_kwargs
from nxtrec.cli.notices import demo_notice, loading
from nxtrec.cli.options import (
    device,
    existing_dir,
    int_between,
    non_negative_float,
    positive_float,
    positive_int,
)
from nxtrec.cli.vocab_options import add_vocab_arguments, vocab_kwargs
from nxtrec.errors import NxtrecError

API_KEY_ENV = "NXTREC_API_KEY"


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP tagging service with dynamic batching and a web page (extra: serve)")
    p.add_argument("--model", type=existing_dir, help="model directory (default: the bundled default model)")
    p.add_argument("--onnx", metavar="DIR", type=existing_dir, help="serve an exported ONNX directory with ONNX Runtime instead")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_between(1, 65535), default=8000, help="TCP port to listen on")
    p.add_argument("--max-batch", type=positive_int, default=16, help="most images per model call")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=10.0, help="longest wait for a batch to fill")
    p.add_argument("--queue", type=positive_int, default=256, help="images waiting at most; beyond, 503 with Retry-After")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="largest request body (413 beyond)")
    p.add_argument("--max-inflight-mb", type=positive_float, default=128.0,
                   help="request bodies in flight at once, all requests together (503 with Retry-After beyond)")
    p.add_argument("--max-images", type=positive_int, default=32, help="most images in one request")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds per request (504 beyond)")
    p.add_argument("--body-timeout", type=positive_float, default=30.0,
                   help="seconds for a request's whole body to arrive, from its head (408 beyond)")
    p.add_argument("--keep-alive-timeout", type=positive_float, default=5.0,
                   help="seconds an idle connection (no request yet, or between requests) stays open")
    p.add_argument("--processes", type=positive_int, default=1,
                   help="model processes; each batch is split between them, each on cores/N threads or "
                        "$OMP_NUM_THREADS (CPU)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ... (--model only)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                   help="weights and activations; int8: dynamic int8 quantisation of the Linear layers (CPU only)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no note on stderr about the bundled demo model, no loading line")
    add_vocab_arguments(p, compat=False)
    add_confidence_arguments(p)
    add_adapter_argument(p)
    p.set_defaults(func=run)


def _config(args):
    from nxtrec.serving.app import ServeConfig

    if args.max_images > args.queue:
        raise NxtrecError(f"--max-images ({args.max_images}) cannot exceed --queue ({args.queue}): such a request could never fit")
    return ServeConfig(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue=args.queue,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, max_upload_mb=args.max_upload_mb,
        max_inflight_mb=args.max_inflight_mb,
        max_images=args.max_images, timeout_s=args.timeout, body_timeout_s=args.body_timeout,
    )


def run(args) -> int:
    from nxtrec.engines import capabilities_of
    from nxtrec.inference.engine import DecodeOptions
    from nxtrec.serving.app import create_app
    from nxtrec.serving.model_process import start_engine_process

    config = _config(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"nxtrec serve: warning: listening on {args.host} without an API key (--api-key or ${API_KEY_ENV})",
              file=sys.stderr)
    options = DecodeOptions(**vocab_kwargs(args), **confidence_kwargs(args))
    options.check(capabilities_of(onnx=bool(args.onnx)))
    demo_notice(args.model, args.onnx, quiet=args.quiet)  # GET /v1/info tells the web page ("demo")
    with loading("serve", args.model, args.onnx, quiet=args.quiet):
        engine = start_engine_process(args.model, args.onnx, device=args.device, dtype=args.dtype,
                                      processes=args.processes, calibration=args.calibration, adapter=args.adapter)  # fmt: skip
    try:
        check_engine_confidence(engine, options)
        print(f"nxtrec serve: model {engine.name}, http://{args.host}:{args.port}/ (API docs at /docs)", file=sys.stderr)
        app = create_app(engine, config, options)
        signalled = _serve(app, args)
    finally:
        engine.close()  # the model processes end last (after the app's shutdown drained the queue)
    if signalled == signal.SIGINT:
        return 130
    return 0


def _serve(app, args) -> int | None:
    """Run uvicorn until SIGTERM or SIGINT; returns the signal. The shutdown: stop accepting,
    close idle connections, give uploads still being received 1 s more (then 503), let
    requests whose images are queued or in the model finish (at most --timeout), then the
    app's shutdown (the inference worker drains its queue). uvicorn would re-raise the signal
    afterwards (exit -15, before the model processes are closed): here it does not."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Server(uvicorn.Server):
        signalled: int | None = None

        def handle_exit(self, sig, frame) -> None:
            self.signalled = self.signalled or sig
            app.state.shutdown.begin()  # a flag the body reads poll: safe in a signal handler
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's, without raising the signal again at the end
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", http=_IdleTimeoutH11(H11Protocol),
                            timeout_keep_alive=args.keep_alive_timeout,
                            timeout_graceful_shutdown=args.timeout + 5)  # fmt: skip
    server = Server(config)
    server.run()
    return server.signalled


def _IdleTimeoutH11(base):
    """uvicorn's HTTP/1.1 protocol, with its keep-alive timer also started when a connection
    opens: uvicorn starts it only after a response, so a connection that never sends a
    request would stay open for ever."""

    class Protocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    return Protocol
