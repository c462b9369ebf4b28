"""`nxtrec info`: versions, the CPU and its instruction sets, threads, and the kernel each
dtype uses here. What a bug report needs; works without PyTorch (the ONNX Runtime install)."""

from __future__ import annotations

import json
import os
import platform
import sys


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, CPU features and the kernel each dtype uses (for bug reports)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=run)


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def collect() -> dict:
    import nxtrec
    from nxtrec.inference.isa import cpu_info

    cpu = cpu_info()
    info = {
        "nxtrec": nxtrec.__version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {platform.system()} {cpu.machine})",
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "cpu": {"model": cpu.model, "cores": cpu.cores, "flags": cpu.relevant_flags(),
                "ONEDNN_MAX_CPU_ISA": cpu.onednn_cap},  # fmt: skip
        "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
    }
    if info["torch"] is not None:
        import torch

        from nxtrec.inference.cpu import cpu_kernels, fastest_dtype

        info["threads"]["torch"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["kernels"] = cpu_kernels()
        info["fastest_dtype"] = fastest_dtype()
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return 0
    cpu = info["cpu"]
    lines = [
        f"nxtrec       {info['nxtrec']}",
        f"python       {info['python']}",
        f"torch        {info['torch'] or 'not installed'}"
        + (f" (ATen CPU capability {info['torch_cpu_capability']})" if info["torch"] else ""),
        f"onnxruntime  {info['onnxruntime'] or 'not installed'}",
        f"cpu          {cpu['model']}, {cpu['cores']} cores",
        f"cpu flags    {' '.join(cpu['flags']) or '(none read)'}"
        + (f"; ONEDNN_MAX_CPU_ISA={cpu['ONEDNN_MAX_CPU_ISA']}" if cpu["ONEDNN_MAX_CPU_ISA"] else ""),
        f"threads      torch {info['threads'].get('torch', '-')}, OMP_NUM_THREADS={info['threads']['OMP_NUM_THREADS'] or 'unset'}",
    ]
    for dtype, kernel in info.get("kernels", {}).items():
        lines.append(f"--dtype {dtype:<9} {kernel}")
    if "fastest_dtype" in info:
        lines.append(f"fastest dtype here: {info['fastest_dtype']}")
    print("\n".join(lines))
    sys.stdout.flush()
    return 0
