# Everything a fresh clone needs: python3 (with venv), gcc, make.
# `make demo` runs the built-in default; `make test` runs the whole suite.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SOURCES_THAT_NEED_REBUILD := pyproject.toml setup.py $(wildcard vmm/_kvm_build.py vmm/guest/*.S vmm/guest/*.ld vmm/guest/Makefile)

.PHONY: all install demo test lint bench side-by-side clean

all: install

$(STAMP): $(SOURCES_THAT_NEED_REBUILD)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# An editable install has no bytecode; without it every worker compiles its
	# modules at start (~50 ms), which lengthens each upgrade's prepare phase.
	$(BIN)/python -m compileall -q baton broker vmm supervisor baton_lab
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m baton_lab.demo

lint: $(STAMP)
	$(BIN)/ruff check .

# Settings in pyproject.toml [tool.mypy]; a package not yet in the tree is skipped.
.PHONY: typecheck
typecheck: $(STAMP)
	$(BIN)/mypy $(wildcard baton broker supervisor vmm baton_lab)

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest

# Packaging: an sdist and a wheel, the wheel installed into a fresh virtualenv
# outside the clone, and the demo run from it (.ci/run runs this after `make test`).
.PHONY: wheel-check
wheel-check: $(STAMP)
	BATON_PYTHON=$(BIN)/python .ci/wheel-check

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.all

# baton-vmm, stock QEMU and the classic RAM copy at 256 MiB..16 GiB: measures,
# writes bench/out/side_by_side.json and draws docs/side_by_side.png from it.
side-by-side: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.side_by_side

clean:
	rm -rf $(VENV) build *.egg-info vmm/_kvm.*.so vmm/_kvm.c vmm/guest/guest.bin
