# EfficientNet for IPUs, portable to CPUs and GPUs -- build / run / test entry points.
#
#   make help        list the targets
#   make test        venv + C helpers + data + pytest           (PYTEST_ARGS="-k foo -x" passes through)
#   make train       venv + C helpers + data + demo training run (TRAIN_ARGS="..." passes through)
#
# Virtual environments live OUTSIDE the clone, under $(VENV_ROOT), named after a hash
# of the Python version and the requirement/lock files, so every clone (and every CI
# run on the same machine) with the same requirements reuses one venv, and a change to
# any of those files gets a fresh one.  A venv counts as built only once its stamp file
# exists; the stamp is written after a successful install, so an interrupted install is
# redone from scratch next time.  `.venv` in the repo is a convenience symlink to it.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

# ---- interpreters & locations ---------------------------------------------------
PYTHON      ?= python3
PYTHON_SDK34 ?=
VENV_ROOT   ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/effnet-ipu

REQ_FILES   := requirements.txt requirements-bench.txt requirements-dev.txt constraints.txt
SDK34_FILES := requirements.txt constraints-sdk34.txt

# "<pyX.Y>-<first 12 hex of sha256(files)>"; no '#' may appear in a $(shell) line.
_venv_tag = $(shell $(1) -c 'import hashlib,sys; h=hashlib.sha256(); [h.update(open(f,"rb").read()) for f in sys.argv[1:]]; print("py%d.%d-%s" % (sys.version_info[0], sys.version_info[1], h.hexdigest()[:12]))' $(2))

VENV_TAG    := $(call _venv_tag,$(PYTHON),$(REQ_FILES))
ifeq ($(VENV_TAG),)
$(error could not run '$(PYTHON)' to hash the requirement files; set PYTHON=/path/to/python3)
endif
VENV        ?= $(VENV_ROOT)/venv-$(VENV_TAG)
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.effnet-installed

# The SDK 3.4-like venv is always Python 3.10; its name only hashes the files.
SDK34_HASH  := $(shell cat $(SDK34_FILES) | $(PYTHON) -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:12])')
SDK34_VENV  ?= $(VENV_ROOT)/venv-sdk34-py3.10-$(SDK34_HASH)
SDK34_PY    := $(SDK34_VENV)/bin/python
SDK34_STAMP := $(SDK34_VENV)/.effnet-installed

# ---- data -----------------------------------------------------------------------
FMNIST_DIR  := /usr/share/datasets/fashion-mnist
FMNIST_PKG  := dataset-fashion-mnist
# What the data path's C helpers (data/jpeg_region.c, data/resample.c, built by `make native`) compile with; optional.
JPEG_PKGS   := gcc libjpeg62-turbo-dev

# ---- pass-through arguments -----------------------------------------------------
PYTEST_ARGS ?=
TRAIN_ARGS  ?=
TRAIN_CONFIG ?= configs/demo-fashion-mnist.yml
BENCH_ARGS  ?=
GPU_CHECK_ARGS ?=

.PHONY: help venv venv-sdk34 data jpeg native train test test-fast test-sdk34 lint bench gpu-check lock lock-sdk34 \
        venv-path venv-prune clean

help: ## list the targets
	@echo "Targets:"
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(firstword $(MAKEFILE_LIST)) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'
	@echo
	@echo "Variables: PYTEST_ARGS, TRAIN_ARGS, TRAIN_CONFIG, BENCH_ARGS, GPU_CHECK_ARGS, OUT, PYTHON, PYTHON_SDK34, VENV_ROOT"
	@echo "venv:       $(VENV)"
	@echo "sdk34 venv: $(SDK34_VENV)"

# ---- venvs ----------------------------------------------------------------------
venv: $(STAMP) ## create (or reuse) the reference venv outside the clone; link it as .venv; build the C helpers
	@if [ -L .venv ] || [ ! -e .venv ]; then \
	  ln -sfn "$(VENV)" .venv; \
	else \
	  echo "note: .venv exists and is not a symlink; leaving it alone (the venv is $(VENV))"; \
	fi
	"$(PY)" -m data.build_helpers

# No prerequisites on purpose: the hash in $(VENV) already tracks the file contents,
# and a fresh clone's files are always newer than an existing stamp.
$(STAMP):
	@echo "==> building venv $(VENV) with $(PYTHON) ($$($(PYTHON) -V 2>&1))"
	rm -rf "$(VENV)"
	mkdir -p "$(VENV_ROOT)"
	$(PYTHON) -m venv "$(VENV)"
	"$(VENV)/bin/python" -m pip install -r requirements.txt -r requirements-bench.txt -r requirements-dev.txt \
	  -c constraints.txt
	"$(VENV)/bin/python" -m pip freeze > "$(VENV)/.effnet-freeze.txt"
	touch "$@"
	@echo "==> venv ready: $(VENV)"

venv-sdk34: $(SDK34_STAMP) ## create (or reuse) the Python 3.10 / torch 2.0.1 (Poplar SDK 3.4-like) venv

$(SDK34_STAMP):
	@py="$(PYTHON_SDK34)"; \
	if [ -z "$$py" ]; then \
	  for c in python3.10 "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.10*/bin/python3.10 \
	           /usr/local/bin/python3.10 /usr/bin/python3.10; do \
	    if "$$c" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then py="$$c"; break; fi; \
	  done; \
	fi; \
	if [ -z "$$py" ]; then \
	  echo "error: no working Python 3.10 found (tried python3.10 and pyenv versions 3.10.*)." >&2; \
	  echo "       install one (e.g. 'pyenv install 3.10') or pass PYTHON_SDK34=/path/to/python3.10" >&2; \
	  exit 1; \
	fi; \
	echo "==> building sdk34 venv $(SDK34_VENV) with $$py ($$($$py -V 2>&1))"; \
	rm -rf "$(SDK34_VENV)"; \
	mkdir -p "$(VENV_ROOT)"; \
	"$$py" -m venv "$(SDK34_VENV)"
	"$(SDK34_PY)" -m pip install -r requirements.txt -c constraints-sdk34.txt
	"$(SDK34_PY)" -m pip freeze > "$(SDK34_VENV)/.effnet-freeze.txt"
	touch "$@"
	@echo "==> sdk34 venv ready: $(SDK34_VENV)"

venv-path: ## print the reference venv path (for scripts: make -s venv-path)
	@echo "$(VENV)"

venv-prune: ## delete venvs under VENV_ROOT other than the two this checkout uses
	@for d in "$(VENV_ROOT)"/venv-*; do \
	  [ -d "$$d" ] || continue; \
	  if [ "$$d" != "$(VENV)" ] && [ "$$d" != "$(SDK34_VENV)" ]; then echo "removing $$d"; rm -rf "$$d"; fi; \
	done

lock: venv ## rewrite constraints.txt from the reference venv (pip freeze; header kept)
	{ grep '^#' constraints.txt; "$(PY)" -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	@echo "constraints.txt rewritten; the venv hash changes with it, so the next make builds a new venv"

lock-sdk34: venv-sdk34 ## rewrite constraints-sdk34.txt from the sdk34 venv
	{ grep '^#' constraints-sdk34.txt; "$(SDK34_PY)" -m pip freeze --exclude-editable; } > constraints-sdk34.txt.new
	mv constraints-sdk34.txt.new constraints-sdk34.txt

# ---- data -----------------------------------------------------------------------
data: ## make sure Fashion-MNIST is installed (Debian package dataset-fashion-mnist)
	@f="$(FMNIST_DIR)/train-images-idx3-ubyte.gz"; \
	if [ -f "$$f" ]; then echo "Fashion-MNIST: $(FMNIST_DIR)"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "error: Fashion-MNIST is missing ($$f)." >&2; \
	  echo "       Install it with:  sudo apt-get update && sudo apt-get install -y $(FMNIST_PKG)" >&2; \
	  exit 1; \
	fi; \
	command -v apt-get >/dev/null || { echo "error: $$f missing and no apt-get; install the Debian package $(FMNIST_PKG)" >&2; exit 1; }; \
	export DEBIAN_FRONTEND=noninteractive; \
	echo "==> apt-get install -y $(FMNIST_PKG)"; \
	apt-get install -y $(FMNIST_PKG) </dev/null || { apt-get update </dev/null && apt-get install -y $(FMNIST_PKG) </dev/null; }; \
	[ -f "$$f" ] || { echo "error: $(FMNIST_PKG) installed but $$f is still missing" >&2; exit 1; }

jpeg: ## make sure a C compiler and libjpeg's headers are there for the C helpers (region decoder, resize; optional)
	@cc="$${CC:-cc}"; \
	has() { printf '#include <stdio.h>\n#include <jpeglib.h>\n' | $$cc -E -x c - >/dev/null 2>&1; }; \
	if has; then echo "C helpers (JPEG region decoder, resize): $$cc and jpeglib.h found"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "note: without jpeglib.h JPEG crops decode in full, without a C compiler they also resize in Pillow" \
	       "(slower, same pixels);" \
	       "install with: sudo apt-get install -y $(JPEG_PKGS)" >&2; exit 0; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	echo "==> apt-get install -y $(JPEG_PKGS)"; \
	apt-get install -y $(JPEG_PKGS) </dev/null || { apt-get update </dev/null && apt-get install -y $(JPEG_PKGS) </dev/null; } \
	  || echo "note: could not install $(JPEG_PKGS); JPEG crops may decode in full or resize in Pillow (slower, same pixels)" >&2

# A run never compiles: it loads these builds ($$XDG_CACHE_HOME/effnet-ipu/<helper>/, keyed by source and machine)
# or says in one line what it falls back to. The helpers use no Python headers, so either venv's Python builds them.
native: jpeg venv ## build and check the data path's C helpers (JPEG region decoder, resize); also part of `make venv`

# ---- run ------------------------------------------------------------------------
train: native data ## demo training run on Fashion-MNIST (TRAIN_CONFIG, TRAIN_ARGS)
	"$(PY)" -m train --config $(TRAIN_CONFIG) $(TRAIN_ARGS)

test: native data ## run the test suite in the reference venv (PYTEST_ARGS)
	"$(PY)" -m pytest $(PYTEST_ARGS)

test-fast: native data ## the quick tier for the edit-test loop: every test not marked slow (PYTEST_ARGS)
	"$(PY)" -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv ## static checks: ruff (lint, import order) and mypy (models, data, ipu_options, train)
	"$(PY)" -m ruff check .
	"$(PY)" -m mypy

test-sdk34: venv-sdk34 data jpeg ## run the tests under Python 3.10 + torch 2.0.1, minus needs_new_torch
	"$(SDK34_PY)" -m data.build_helpers
	"$(SDK34_PY)" -m pytest -m "not needs_new_torch" $(PYTEST_ARGS)

bench: venv ## throughput benchmark: python -m bench.throughput $(BENCH_ARGS)
	"$(PY)" -m bench.throughput $(BENCH_ARGS)

# No venv prerequisite: on a lent GPU machine the venv comes with the clone (.venv) and nothing can be installed.
GPU_CHECK_PY = $(if $(wildcard .venv/bin/python),$(CURDIR)/.venv/bin/python,$(PY))
gpu-check: ## the GPU check in one command, results as JSON lines under OUT (GPU_CHECK_ARGS=--dry-run: on CPU)
	bash bench/gpu_check.sh PY="$(GPU_CHECK_PY)" $(if $(OUT),OUT="$(OUT)") $(GPU_CHECK_ARGS)

clean: ## remove caches and the .venv link from the clone (venvs in VENV_ROOT are kept)
	rm -rf .pytest_cache
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
	[ ! -L .venv ] || rm -f .venv
