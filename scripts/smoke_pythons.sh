#!/usr/bin/env bash
# Smoke test of nxtrec on the other supported Pythons (`make test` runs the full suite on the
# default one, then this). For each Python of SMOKE_PYTHONS found on the machine (pyenv or
# pythonX.Y on PATH; an absent one is skipped with a message): a fresh venv, a built wheel,
# `--help`, `train --print-config`, recognition of a tiny model, and `pack folder`:
#   - where a CPU build of $TORCH_SPEC for that Python lies in a local pip find-links folder
#     (here: Python 3.11 only), the nxtrec wheel with PyTorch and [data]: `init-model` + `predict`;
#   - elsewhere (PyPI's torch for those Pythons is the CUDA build, several GB) the torch-free
#     nxtrec-runtime wheel (runtime/pyproject.toml), installed by one plain `pip install` under
#     a constraint that no torch meets, then `pip check`, `predict --onnx` and `tag --onnx` on a
#     tiny model that the default Python made and exported; then the [data] extra's packages
#     on top for `pack folder`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SMOKE_PYTHONS=${SMOKE_PYTHONS:-3.10 3.12 3.13}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nxtrec-smoke.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SECONDS=0

step() { echo "smoke: $*"; }

find_python() {  # $1 = 3.12 -> an interpreter path, or nothing
    local root found=""
    root=$(pyenv root 2>/dev/null || true)
    if [ -n "$root" ]; then
        found=$(ls -d "$root"/versions/"$1".*/bin/python 2>/dev/null | sort -V | tail -n 1)
    fi
    if [ -n "$found" ]; then echo "$found"; else command -v "python$1" || true; fi
}

local_cpu_torch() {  # $1 = 3.12 -> success when a CPU torch wheel for that Python is local
    local version=${TORCH_SPEC#torch==} tag=cp${1/./} dir
    for dir in $("$PY" -m pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-}; do
        ls "$dir"/torch-"$version"+cpu-"$tag"-"$tag"-*.whl >/dev/null 2>&1 && return 0
    done
    return 1
}

# The requirements of a wheel (argument 1) for the given extras (arguments 2...), without torch,
# with markers evaluated for this Python (read with the `packaging` that every pip vendors).
# (The default requirements are listed too: `pack` uses tqdm, which nxtrec-runtime lacks.)
REQUIREMENTS_WITHOUT_TORCH='
import email, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as wheel:
    metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    requirements = email.message_from_bytes(wheel.read(metadata)).get_all("Requires-Dist")
for r in map(Requirement, requirements):
    if r.name != "torch" and (r.marker is None or any(r.marker.evaluate({"extra": e}) for e in sys.argv[2:])):
        extras = "[" + ",".join(sorted(r.extras)) + "]" if r.extras else ""
        print(r.name + extras + str(r.specifier))
'

# ---- with the default Python: the wheels, a tiny model and its ONNX export, a folder to pack
mkdir -p "$WORK/source" "$WORK/photos"
cp -r pyproject.toml README.md src "$WORK/source/"
"$PY" -m pip wheel -qq --no-deps -w "$WORK/wheel" "$WORK/source" ./runtime >/dev/null
WHEEL=$(ls "$WORK"/wheel/nxtrec-*.whl)
RUNTIME_WHEEL=$(ls "$WORK"/wheel/nxtrec_runtime-*.whl)
echo "torch<0" >"$WORK/no-torch.txt"  # a constraint no torch meets: a torch requirement fails
"$PY" -m nxtrec init-model --preset tiny --out "$WORK/tiny" >/dev/null
"$PY" -m nxtrec export-onnx --model "$WORK/tiny" --out "$WORK/tiny-onnx" --no-validate >/dev/null
cp examples/scene.jpg "$WORK/photos/scene.jpg"
echo "A snake and a ring on a table." >"$WORK/photos/scene.txt"
step "wheels and tiny ONNX model ready (${SECONDS} s)"

for version in $SMOKE_PYTHONS; do
    python=$(find_python "$version")
    if [ -z "$python" ]; then
        step "Python $version: not found on this machine, skipped"
        continue
    fi
    start=$SECONDS
    venv="$WORK/venv-$version"
    "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install -qq)
    if local_cpu_torch "$version"; then
        with_torch=1
        "${pip[@]}" "$TORCH_SPEC"
        "${pip[@]}" "$WHEEL[data]"
    else
        with_torch=0
        "${pip[@]}" -c "$WORK/no-torch.txt" "$RUNTIME_WHEEL"
        "$venv/bin/python" -m pip check >/dev/null
    fi
    nxtrec="$venv/bin/nxtrec"
    "$nxtrec" --help >/dev/null
    "$nxtrec" train tiny-cpu --print-config | grep -q '^\[optim\]'
    if [ "$with_torch" = 1 ]; then
        "$nxtrec" init-model --preset tiny --out "$WORK/tiny-$version" >/dev/null
        "$nxtrec" predict examples/scene.jpg --model "$WORK/tiny-$version" --top-k 3 >"$WORK/predict-$version.txt"
        what="nxtrec: init-model + predict (PyTorch)"
    else
        "$nxtrec" predict examples/scene.jpg --onnx "$WORK/tiny-onnx" --top-k 3 >"$WORK/predict-$version.txt"
        "$nxtrec" tag examples/scene.jpg --onnx "$WORK/tiny-onnx" --top-k 3 --workers 1 \
            --out "$WORK/tagged-$version" 2>/dev/null
        ls "$WORK/tagged-$version"/part-*.jsonl >/dev/null
        "$venv/bin/python" -c "$REQUIREMENTS_WITHOUT_TORCH" "$WHEEL" data >"$WORK/requirements-$version.txt"
        "${pip[@]}" -c "$WORK/no-torch.txt" -r "$WORK/requirements-$version.txt"
        what="nxtrec-runtime: pip check, predict --onnx + tag --onnx (no torch)"
    fi
    "$nxtrec" pack folder "$WORK/photos" --out "$WORK/shards-$version" --workers 1 --no-progress >/dev/null
    test -s "$WORK/shards-$version/manifest.json"
    test "$(wc -l <"$WORK/predict-$version.txt")" -eq 4  # the image line and 3 labels
    step "Python $version ($("$python" -V 2>&1)): install, --help, train --print-config, $what, pack folder: ok ($((SECONDS - start)) s)"
done
step "done in ${SECONDS} s"
