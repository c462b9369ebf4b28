# The two quick-start commands are `make demo` and `make test`; both set up .venv first.
# `make demo` installs only what the demo needs (the default install: torch + nxtrec's own
# dependencies); `make test` adds the rest (every extra, the dev tools, Chromium, the emoji font).
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch is installed only when the environment has no torch yet.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.demo-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.demo-installed
	@# The synthetic-scenes generator draws Noto Color Emoji glyphs (Debian package).
	test -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf || \
		{ apt-get update -qq && apt-get install -y -qq fonts-noto-color-emoji; } || \
		echo "warning: install fonts-noto-color-emoji for nxtrec synth"
	@# The web page test of `nxtrec serve` drives Debian's Chromium (skipped without it).
	test -x /usr/bin/chromedriver || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } || \
		echo "warning: install chromium and chromium-driver for the browser test of nxtrec serve"
	@# exiftool reads back and validates the XMP sidecars of `nxtrec tag --format xmp` in the tests.
	test -x /usr/bin/exiftool || \
		{ apt-get update -qq && apt-get install -y -qq libimage-exiftool-perl; } || \
		echo "warning: install libimage-exiftool-perl for the XMP sidecar tests"
	@# The PySpark test of nxtrec.integrations.spark runs Spark on Debian's OpenJDK (skipped without Java).
	command -v java >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq default-jre-headless; } || \
		echo "warning: install default-jre-headless for the PySpark test of nxtrec.integrations.spark"
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/nxtrec predict examples/scene.jpg --top-k 10

test: setup
	$(PY) -m pytest -q
	@# the wheels (nxtrec, nxtrec-runtime) on the other supported Pythons found here (3.10, 3.12, 3.13)
	PY=$(PY) TORCH_SPEC="$(TORCH_SPEC)" bash scripts/smoke_pythons.sh

bench: setup
	$(VENV)/bin/nxtrec bench infer --preset nxtp-1.78b --top-k 20 --steps 3 --baseline
