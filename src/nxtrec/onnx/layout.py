"""Writing the files of an ONNX export (their names: nxtrec.onnx.format): graphs whose weights
live in external data files shared between graphs, and the checks of the output folder."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import logging
import warnings
from pathlib import Path

import torch

from nxtrec.errors import NxtrecError
from nxtrec.onnx.format import DECODER_DATA, ENCODER_DATA, FILES, MANIFEST, RELEASED_FILES

OPSET = 18

# Large external tensors are aligned so ONNX Runtime can memory-map them.
_ALIGN, _ALIGN_MIN = 65536, 1 << 20


class OnnxExportError(NxtrecError):
    pass


@contextlib.contextmanager
def quiet():
    """torch.export, onnxscript and the ONNX Runtime quantizer print progress, warnings and
    log records; keep the command's output ours."""
    buf = io.StringIO()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def imports_frozen():
    """Make the export's `gc.collect()` calls cheap: everything that exists on entry (chiefly
    the millions of objects made by importing torch, sympy, onnxscript and onnx_ir) is moved
    out of the collector's reach (`gc.freeze`) until exit, so a collection walks only what
    the export itself made. Measured: 8 collections cost 1.9 s of a 19 s export of the
    bundled model without it. Enter it before the model is loaded, so that the model's own
    objects stay collectable (the export frees it before validating)."""
    import onnx  # noqa: F401 - imported here, before the freeze, rather than by the first export
    import onnxscript  # noqa: F401
    import torch.onnx._internal.exporter._core  # noqa: F401

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def export_module(module, args, path: Path, input_names, output_names, dynamic_shapes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(
                module, tuple(args), dynamo=True, input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=dynamic_shapes, opset_version=OPSET, optimize=True, external_data=True,
            )
            program.save(str(path), external_data=True)
    except Exception as e:  # the exporter raises many types; show the root cause in one line
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        first = (str(root).strip().splitlines() or [""])[0]
        raise OnnxExportError(f"exporting {path.name} failed: {type(root).__name__}: {first}") from e
    finally:
        with contextlib.suppress(NameError):
            del program
        gc.collect()


def _external_tensors(model_proto):
    import onnx

    for init in model_proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            yield init


def _ext_info(tensor) -> dict:
    return {e.key: e.value for e in tensor.external_data}


def share_external_data(models: list[Path], out_dir: Path, data_name: str) -> None:
    """Rewrite ONNX files (each with its own external data) into `out_dir` so that all of
    them reference one data file `data_name`, each distinct tensor stored once (tensors are
    matched by content). The source files may be temporary; they are not modified."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    stored: dict[tuple, tuple[int, int]] = {}
    with open(out_dir / data_name, "wb") as data:
        for src in models:
            proto = onnx.load(str(src), load_external_data=False)
            for init in _external_tensors(proto):
                info = _ext_info(init)
                offset, length = int(info.get("offset", 0)), int(info["length"])
                with open(src.parent / info["location"], "rb") as f:
                    f.seek(offset)
                    raw = f.read(length)
                key = (init.data_type, tuple(init.dims), hashlib.blake2b(raw, digest_size=20).digest())
                if key not in stored:
                    pad = -data.tell() % (_ALIGN if length >= _ALIGN_MIN else 16)
                    data.write(b"\0" * pad)
                    stored[key] = (data.tell(), length)
                    data.write(raw)
                del raw
                off, ln = stored[key]
                del init.external_data[:]
                for k, v in (("location", data_name), ("offset", str(off)), ("length", str(ln))):
                    entry = init.external_data.add()
                    entry.key, entry.value = k, v
            onnx.save(proto, str(out_dir / src.name))
            del proto
            gc.collect()


def check_out_dir(out_dir: Path) -> None:
    """Refuse to write into a folder holding files that are not from an export."""
    ours = {*FILES.values(), ENCODER_DATA, DECODER_DATA, MANIFEST, *RELEASED_FILES, "config.json"}
    if out_dir.is_file():
        raise OnnxExportError(f"{out_dir}: is a file; --out takes a directory")
    if out_dir.is_dir():
        foreign = [p.name for p in out_dir.iterdir()
                   if p.name not in ours and not p.name.startswith((".decoder-", ".float-", ".quant-"))
                   and not p.name.endswith(".onnx.data")]
        if foreign:
            raise OnnxExportError(
                f"{out_dir}: holds files that are not from an ONNX export ({', '.join(sorted(foreign)[:3])}); "
                "choose a new or empty folder"
            )


def file_sizes(out_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(Path(out_dir).iterdir()) if p.is_file()}
