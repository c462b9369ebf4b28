"""Model directories whose Linear weights are stored int8 (`nxtrec quantize`, docs/int8.md).

An ordinary model directory (config.json, model.safetensors, tokenizer.model) whose config
says `"quantization": {"method": "dynamic-int8", "granularity": "per-channel"}` and whose
safetensors file holds, for every `nn.Linear` of the model (named PREFIX):

    PREFIX.weight             int8    [out, in]   the quantised weight
    PREFIX.weight_scale       float64 [out]       one scale per output channel
    PREFIX.weight_zero_point  int64   [out]       one zero point per output channel
    PREFIX.bias               float32 [out]       where the layer has a bias

so that row i of the weight is (weight[i] - zero_point[i]) * scale[i]. Every other tensor is
float32 under its usual name. The values are what `quantize_int8` (torch.ao dynamic
quantisation) computes from the float32 model, stored in torch's own dtypes, so loading
rebuilds exactly the modules it would have built, without ever holding the float32 weights:
the model is made on the meta device, the float tensors are read into place, and each Linear
becomes a dynamic quantised one from its int8 weight, one layer at a time.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import struct
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from nxtrec.model.config import QUANTIZATION, ModelConfig
from nxtrec.model.files import WEIGHTS_FILE, CheckpointError, check_state_dict
from nxtrec.model.network import NxtpModel

QUANTIZED_SUFFIXES = ("weight", "weight_scale", "weight_zero_point")
# safetensors' dtype names, as the header spells them
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def is_quantized(config: ModelConfig) -> bool:
    return config.quantization is not None


def describe(config: ModelConfig) -> str:
    q = config.quantization
    return f"{q['method']} {q['granularity']}"


def linear_names(model: nn.Module) -> list[str]:
    """The layers that dynamic quantisation replaces: exactly `nn.Linear` (quantize_dynamic
    matches the type, not subclasses)."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def _meta_model(config: ModelConfig) -> NxtpModel:
    with torch.device("meta"):
        return NxtpModel(config)


def expected_tensors(model: NxtpModel, names: list[str]) -> dict[str, torch.Tensor]:
    """Name -> meta tensor of the stored shape and dtype, for a (meta) float model."""
    out = {k: torch.empty(v.shape, dtype=torch.float32, device="meta") for k, v in model.state_dict().items()}
    for name in names:
        rows, cols = out[f"{name}.weight"].shape
        out[f"{name}.weight"] = torch.empty(rows, cols, dtype=torch.int8, device="meta")
        out[f"{name}.weight_scale"] = torch.empty(rows, dtype=torch.float64, device="meta")
        out[f"{name}.weight_zero_point"] = torch.empty(rows, dtype=torch.int64, device="meta")
    return out


def _quantized_keys(names: list[str]) -> set[str]:
    return {f"{n}.{s}" for n in names for s in QUANTIZED_SUFFIXES}


def _check_dtypes(expected: dict, got: dict, source: str) -> None:
    for key, ref in expected.items():
        if got[key] != ref.dtype:
            name = str(got[key]).removeprefix("torch.")
            raise CheckpointError(f"{source}: tensor {key!r} is {name}, the {QUANTIZATION['method']} format stores it as "
                                  f"{str(ref.dtype).removeprefix('torch.')}")


def _check_header(f, expected: dict, source: str) -> None:
    """Names, shapes and dtypes from the safetensors header (nothing read)."""
    shapes, dtypes = {}, {}
    for key in f.keys():  # noqa: SIM118 -- safe_open has no __iter__
        s = f.get_slice(key)
        shapes[key] = torch.empty(s.get_shape(), device="meta")
        dtypes[key] = _ST_DTYPES.get(s.get_dtype(), s.get_dtype())
    check_state_dict(expected, shapes, source)
    _check_dtypes(expected, dtypes, source)


class _TensorReader:
    """Reads tensors of a safetensors file into fresh memory with plain reads. safetensors
    maps the file, and every page of it that is read stays in the process's resident set
    until the file is closed: the int8 weights would be counted twice (file pages + packed
    copies) during the whole load."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.start = 8 + n

    def read(self, key: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `key`, into a new tensor or the contiguous tensor `into` of its size. Safe
        from several threads (a file object each). safe_open has checked the header already
        (names, dtypes, offsets that cover the file)."""
        info = self.header[key]
        begin, end = info["data_offsets"]
        t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]]) if into is None else into
        if t.nbytes != end - begin or not t.is_contiguous():
            raise OSError(f"{key}: {end - begin} bytes in the file, {t.nbytes} expected")
        buf = memoryview((ctypes.c_char * t.nbytes).from_address(t.data_ptr())).cast("B")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.start + begin)
            done = 0
            while done < len(buf):
                n = f.readinto(buf[done:])
                if not n:
                    raise OSError(f"{key}: file ends {len(buf) - done} bytes early")
                done += n
        return t


def _check_qparams(name: str, scale: torch.Tensor, zero_point: torch.Tensor, source: str) -> None:
    # garbage here would not fail anywhere, it would give wrong labels
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise CheckpointError(f"{source}: {name}.weight_scale holds values that are not finite and > 0 (a damaged file?)")
    if not ((zero_point >= -128) & (zero_point <= 127)).all():
        raise CheckpointError(f"{source}: {name}.weight_zero_point holds values outside [-128, 127] (a damaged file?)")


def _dynamic_linear(linear: nn.Linear, qweight: torch.Tensor) -> nn.Module:
    """The module `quantize_dynamic` makes of `linear` (DynamicLinear.from_float), from the
    quantised weight instead of the float one."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice (see quantize_int8)
        # Made 1x1, then given the real weight: made at full size it would pack a second,
        # empty weight of that size first.
        q = DynamicLinear(1, 1, bias_=False, dtype=torch.qint8)
    q.in_features, q.out_features = linear.in_features, linear.out_features
    q.set_weight_bias(qweight, linear.bias)
    return q


def _packed_layers(model: NxtpModel, names: list[str], reader: _TensorReader, source: str):
    """Yield (name, dynamic quantised Linear) for every layer in `names`. Packing the int8
    weights for the kernels is most of a load, and torch runs it without the GIL: layers are
    packed on `torch.get_num_threads()` threads (the same packing, whatever the order), with
    at most twice that many layers' int8 copies in memory."""

    def make(name: str, linear: nn.Linear) -> nn.Module:
        scale, zero_point = reader.read(f"{name}.weight_scale"), reader.read(f"{name}.weight_zero_point")
        _check_qparams(name, scale, zero_point, source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are marked deprecated (see quantize_int8)
            qweight = torch._empty_per_channel_affine_quantized(
                (linear.out_features, linear.in_features), scales=scale, zero_points=zero_point, axis=0,
                dtype=torch.qint8)
        reader.read(f"{name}.weight", into=qweight)  # the int8 values straight into place
        return _dynamic_linear(linear, qweight)

    workers = max(1, torch.get_num_threads())
    pending: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="nxtrec-pack") as pool:
        try:
            for name in names:
                pending.append((name, pool.submit(make, name, model.get_submodule(name))))
                if len(pending) >= 2 * workers:
                    name, job = pending.popleft()
                    yield name, job.result()
            while pending:
                name, job = pending.popleft()
                yield name, job.result()
        finally:
            for _, job in pending:  # an error: don't pack the rest
                job.cancel()


def load_quantized(path: Path, config: ModelConfig, device="cpu", dtype=torch.float32) -> NxtpModel:
    """The model of the quantised directory `path`, as `quantize_int8` makes it."""
    from safetensors import SafetensorError, safe_open

    if torch.device(device).type != "cpu":
        raise CheckpointError(f"{path}: an int8 model ({describe(config)}) runs on the CPU only, not {device}; "
                              "load the float model on a GPU")
    if dtype != torch.float32:
        raise CheckpointError(f"{path}: an int8 model ({describe(config)}) loads as int8 (or float32, the same), "
                              f"not {str(dtype).removeprefix('torch.')}; use the float model for other dtypes")
    weights = path / WEIGHTS_FILE
    model = _meta_model(config)
    names = linear_names(model)
    expected = expected_tensors(model, names)
    qkeys = _quantized_keys(names)
    try:
        with safe_open(str(weights), framework="pt") as f:
            _check_header(f, expected, str(weights))
            reader = _TensorReader(weights)
            # float tensors as the float path loads them (file-backed, read when used)
            floats = {k: f.get_tensor(k) for k in expected if k not in qkeys}
            model.load_state_dict(floats, strict=False, assign=True)
            del floats
            for name, q in _packed_layers(model, names, reader, str(weights)):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, q)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: cannot read safetensors file ({e})") from None
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:  # a tensor outside the state dict (a bug, not a file problem)
        raise CheckpointError(f"{weights}: {left[0]!r} was not loaded ({len(left)} in all)")
    return model.eval()


def verify_quantized(path: Path, config: ModelConfig) -> str:
    """Check a quantised directory's weights file: the header's names, shapes and dtypes,
    and every scale and zero point (small; the int8 weights are not read)."""
    from safetensors import SafetensorError, safe_open

    weights = path / WEIGHTS_FILE
    model = _meta_model(config)
    names = linear_names(model)
    expected = expected_tensors(model, names)
    try:
        with safe_open(str(weights), framework="pt") as f:
            _check_header(f, expected, str(weights))
            for name in names:
                _check_qparams(name, f.get_tensor(f"{name}.weight_scale"), f.get_tensor(f"{name}.weight_zero_point"),
                               str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: cannot read safetensors file ({e})") from None
    params = sum(t.numel() for k, t in expected.items() if not k.endswith((".weight_scale", ".weight_zero_point")))
    return (f"{len(expected)} tensors, {params / 1e6:.1f}M parameters, {len(names)} Linear layers int8 "
            f"({describe(config)})")


def quantized_state(model: NxtpModel) -> dict[str, torch.Tensor]:
    """The tensors of the format from a model that went through `quantize_int8`."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    ref = _meta_model(model.config)
    names = linear_names(ref)
    expected = expected_tensors(ref, names)
    own = dict(chain(model.named_parameters(), model.named_buffers()))
    state = {}
    for name in names:
        q = model.get_submodule(name)
        if not isinstance(q, DynamicLinear):
            raise CheckpointError(f"{name}: is {type(q).__name__}, not a dynamic int8 Linear; quantise the model first")
        w, bias = q._weight_bias()
        if w.qscheme() != torch.per_channel_affine or w.q_per_channel_axis() != 0:
            raise CheckpointError(f"{name}: weight quantised {w.qscheme()} on axis {w.q_per_channel_axis()}, "
                                  "the format stores per-channel on axis 0")
        state[f"{name}.weight"] = w.int_repr()
        state[f"{name}.weight_scale"] = w.q_per_channel_scales()
        state[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points()
        if bias is not None:
            own[f"{name}.bias"] = bias
    for key in expected:
        if key not in state and key in own:
            state[key] = own[key].detach().contiguous().cpu()
    check_state_dict(expected, state, "quantised model")
    _check_dtypes(expected, {k: v.dtype for k, v in state.items()}, "quantised model")
    return state


def quantize_int8(model: NxtpModel) -> NxtpModel:
    """Dynamic int8 quantisation of the Linear layers, in place; the config then says so
    (`nxtrec quantize` saves such a model). A model loaded quantised is
    returned as it is."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if model.config.quantization is not None:
        return model
    with warnings.catch_warnings():
        # torch.ao.quantization is marked deprecated in favour of torchao, whose CPU int8
        # path needs torch.compile; the eager fbgemm kernels used here are still shipped.
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    # a copy: the config object may be shared with another model
    model.config = dataclasses.replace(model.config, quantization=dict(QUANTIZATION))
    return model
