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

.PHONY: install demo test bench gpu-wheels clean

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

# What the lent GPU machine's image lacks (Python 3.12, x86-64, no network), as wheels in
# gpu-wheels/ (git-ignored, carried to it; under 50 MiB): `python -m benchmarks gpu`
# installs from that folder only. DeepSpeed has no wheel on PyPI: it is built here, without ops.
GPU_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform any
gpu-wheels: $(STAMP)
	mkdir -p gpu-wheels
	$(PIP) download --no-deps $(GPU_PLATFORM) -d gpu-wheels msgspec==0.22.0 bitsandbytes==0.50.2 \
		cloudpickle==3.1.3 hjson py-cpuinfo msgpack einops pydantic pydantic-core annotated-types typing-inspection
	DS_BUILD_OPS=0 $(PIP) wheel --no-deps -w gpu-wheels deepspeed==0.19.8

clean:
	rm -rf build demo-output bench-output
