"""Dynamic int8 quantisation of an ONNX export."""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from pathlib import Path

from nxtrec.onnx.format import DECODER_DATA, ENCODER_DATA, FILES, MANIFEST
from nxtrec.onnx.layout import (
    OnnxExportError,
    file_sizes,
    quiet,
    share_external_data,
)


def quantize_dir(src: str | Path, dst: str | Path, log=print) -> dict:
    """int8 dynamic quantization (weights int8 per tensor, activations quantized at run time)
    of every MatMul with a constant weight in the encoder and both decoder graphs of an
    exported float32 directory `src`, written to `dst` (the decoder graphs again share one
    weights file). Returns `dst`'s manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    manifest = json.loads((src / MANIFEST).read_text())
    if manifest.get("dtype") != "float32" or manifest.get("quantization"):
        raise OnnxExportError(f"{src}: int8 quantization needs a float32 export (this one is {manifest.get('dtype')}"
                              f"{', ' + manifest['quantization'] if manifest.get('quantization') else ''})")
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=dst) as tmp:
        tmp = Path(tmp)
        for key in ("encoder", "prefill", "step"):
            log(f"quantizing {FILES[key]} (int8 MatMul weights) ...")
            out = tmp / key / FILES[key]
            out.parent.mkdir()
            with quiet():
                quantize_dynamic(
                    src / FILES[key], out, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                    use_external_data_format=True, extra_options={"MatMulConstBOnly": True},
                )
            gc.collect()
            if key == "encoder":
                share_external_data([out], dst, ENCODER_DATA)
        share_external_data([tmp / "prefill" / FILES["prefill"], tmp / "step" / FILES["step"]], dst, DECODER_DATA)
    for key in ("embeddings", "tokenizer"):
        if (src / FILES[key]).resolve() != (dst / FILES[key]).resolve():
            shutil.copyfile(src / FILES[key], dst / FILES[key])
    manifest["quantization"] = "int8-dynamic"
    manifest["sizes"] = file_sizes(dst)
    manifest.pop("validation", None)
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
