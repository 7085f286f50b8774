# The two commands: `make test` and `make demo`. Both install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXT := extensions/crsqlite.so

.PHONY: test demo bench extension venv wheel typecheck nats-server clean

# engine/ and sync/ are kept clean under mypy --strict: `make test` checks them before the tests run.
test: extension venv nats-server
	$(PY) -m mypy --strict engine sync
	$(PY) -m pytest $(PYTEST_ARGS)

demo: extension venv
	$(PY) -m sync.demo

# make bench [BENCH=B1,B3] [BENCH_QUICK=1]: benchmarks vs baselines; not part of `make test`.
bench: extension venv nats-server
	$(PY) bench/run.py $(BENCH) $(if $(filter-out 0,$(BENCH_QUICK)),--quick)

# make wheel: dist/crdt_execution_store-*-py3-none-<platform>.whl, crsqlite.so and migrations inside.
# build/ is cleared first so that no file removed from the source lingers in the wheel.
wheel: extension venv
	rm -rf build
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .
	@ls dist/*.whl

# make typecheck: mypy --strict over both packages (what `make test` runs first).
typecheck: venv
	$(PY) -m mypy --strict engine sync

# build.sh decides itself whether anything changed (it keeps a stamp of its inputs).
extension:
	@bash extensions/build.sh

# The NATS tests and benchmark start a real `nats-server -js` (Debian package); installed if missing.
nats-server:
	@bash tools/install-nats-server.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) extensions/.build $(EXT) extensions/crsqlite.so.stamp build dist
