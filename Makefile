# `make demo` and `make test` each create (or reuse) .venv and install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# Every pip call is constrained: torch stays the CPU build, never a CUDA one.
PIPC   := $(PIP) install -c constraints.txt
STAMP  := $(VENV)/.installed
# The editable install maps the package's modules by name: a module added, moved or removed
# needs a reinstall, so the stamp depends on the list of files (not on their contents).
MODULES := $(VENV)/.modules
$(shell mkdir -p $(VENV) && find python -name '*.py' | sort > $(MODULES).new && \
	(cmp -s $(MODULES).new $(MODULES) || mv $(MODULES).new $(MODULES)); rm -f $(MODULES).new)

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt CMakeLists.txt $(wildcard csrc/*) $(MODULES)
	$(PIPC) --upgrade pip
	$(PIPC) torch==2.13.0
	$(PIPC) scikit-build-core pybind11 cmake ninja
	$(PIPC) --no-build-isolation -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m instructpack.demo --output demo-output

test: $(STAMP)
	$(PY) -m ruff check python tests benchmarks
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks preprocess

clean:
	rm -rf build demo-output bench-output
