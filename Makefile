# Two entry points (see README): `make demo` and `make test`. Both build .venv first if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast bench dist clean gpu-wheels gpu-check-dry

# the lock, then glr itself (editable, its declared dependencies already pinned by the lock)
$(STAMP): requirements.txt pyproject.toml lib/glr/__init__.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

## synth → two staged experiments → ensemble CV on the embedded dataset; ends with submission/ and weights/
demo: $(STAMP)
	$(VENV)/bin/glr demo --out submission --work runs/demo --weights weights

## the whole test suite (CI runs this through .ci/run)
test: $(STAMP)
	$(PY) -m pytest

## everything but the end-to-end runs
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) bench/bench_startup.py
	$(PY) bench/bench_search.py
	$(PY) bench/bench_train_step.py
	$(PY) bench/bench_postprocess.py
	$(PY) bench/bench_kreciprocal.py

## the wheel a user installs (pip install dist/glr-*.whl[train,kaggle,report]); built from the working tree
dist: $(STAMP)
	rm -rf build dist
	$(PY) -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w dist .
	rm -rf build
	@ls dist/glr-*.whl

## the faiss GPU build the device check carries (.whl/, ~57 MiB; bench/gpu_wheels.py says which wheel and why)
gpu-wheels: $(STAMP)
	$(PY) bench/gpu_wheels.py --out .whl --cache build/gpu-wheels

## the device check at tiny sizes on this CPU (run before a device call: bash bench/gpu_check.sh)
gpu-check-dry: $(STAMP)
	bash bench/gpu_check.sh --dry-run

clean:
	rm -rf runs build dist submission/*.csv submission/*.json submission/*.png
