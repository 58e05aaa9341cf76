# Two entry points for a fresh machine (Python 3.11, nothing else installed):
#   make demo   -> build the environment, run the bundled model, write outputs/demo/index.html
#   make test   -> build the environment, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test env lint clean browser web

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# The CPU wheel of torch lies on local disk; install it first so nothing pulls a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[all]"
	touch $@

env: $(VENV)/.installed

# Debian's Chromium for the browser end-to-end test of the web demo.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# onnxruntime-web (MIT) for the in-browser page (flowtok demo --static), from npm into build/web (git-ignored).
ORT_WEB_VERSION := 1.30.0
web: build/web/node_modules/onnxruntime-web/package.json
build/web/node_modules/onnxruntime-web/package.json:
	@command -v npm >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; }
	mkdir -p build/web
	npm install --prefix build/web --no-save --no-audit --no-fund --ignore-scripts onnxruntime-web@$(ORT_WEB_VERSION)

demo: env
	$(VENV)/bin/flowtok showcase --out outputs/demo

# Two workers (pytest-xdist), a test file per worker: the suite leaves a core idle when run alone
# (load average ~1.2 on 2 cores). 2026-12-03, this 2-core machine: 15.7 min serial, 13.6 min with -n 2.
test: env browser web
	$(PY) -m pytest -q -x -n 2 --dist loadfile --durations=15

lint: env
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) outputs runs
