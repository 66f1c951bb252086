# One command per chore; CI runs the same ones.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo cluster cluster-stop test lint wasm bench soak deb systemd-check screenshots clean

$(STAMP): pyproject.toml
	packaging/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(VENV)/bin/dcp-worker interpreters install
	touch $(STAMP)

## Run the whole pipeline locally: scheduler, worker (2 sandboxes), hash-puzzle job.
demo: $(STAMP)
	$(PY) examples/demo.py

## Several schedulers on PostgreSQL: a PostgreSQL cluster (in .cluster/), the schema upgraded,
## two scheduler replicas, two workers given both, the hash-puzzle job; stops it all at the
## end or on Ctrl-C (workers, then replicas, then PostgreSQL).
cluster: $(STAMP)
	$(PY) examples/cluster.py

## Stop what a killed `make cluster` left running (.cluster/running.json), in the same order.
cluster-stop:
	$(PY) examples/cluster.py --stop

## Install what the tests need and run them.
test: $(STAMP)
	$(PY) -m pytest -q

## The web consoles' screenshots in docs/img/, taken by their browser tests.
screenshots: $(STAMP)
	DCP_SCREENSHOTS=1 $(PY) -m pytest -q tests/web tests/test_dashboard.py

SOURCES := dcp_protocol dcp_keys dcp_worker evaluator scheduler tests examples benchmarks

lint: $(STAMP)
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(VENV)/bin/mypy

## Benchmarks against their peers (Dask, native C (a kernel table), msgspec, SQLite for PostgreSQL, the other drivers) and
## at scale; each prints one JSON line last. The PostgreSQL ones start a throwaway cluster
## (tests/postgres.py), or use DCP_TEST_POSTGRES's server.
bench: $(STAMP)
	$(PY) benchmarks/hashrate.py
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/codec.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/scale.py --backend postgres --replicas 2 --workers 1000,5000 --compute 0 --pace 500
	$(PY) benchmarks/wakeups.py
	$(PY) benchmarks/drivers.py
	$(PY) benchmarks/store_ops.py
	$(PY) benchmarks/sandbox_start.py
	$(PY) benchmarks/breakdown.py
	$(PY) benchmarks/plots.py
	$(PY) benchmarks/interpreters.py
	$(PY) benchmarks/cheaters.py

## Fault injection: kill workers, evaluators and the scheduler at random while jobs run, on
## SQLite, then on two PostgreSQL replicas (with the database's faults: killed backends, a
## restarted server, idle transactions); each prints one JSON line (lost and paid-twice
## slices must be 0; PostgreSQL's adds dead tuples). Bounded to 8 minutes each.
soak: $(STAMP)
	$(PY) tests/faults/soak.py --minutes 8 --faults 120
	$(PY) tests/faults/soak.py --backend postgres --minutes 8 --faults 120 --hold-minutes 3

## The Debian package: dist/dcp-worker_<version>_amd64.deb (wheels, units, /etc config).
deb: $(STAMP)
	PY=$(PY) packaging/deb/build.sh

## The .deb under a real systemd (PID 1 of a namespace over a debootstrap tree; root, ~3 min).
systemd-check: deb
	PY=$(PY) packaging/deb/systemd-check.sh

## Rebuild the example work functions from C (zig cc, wasm32-wasi).
wasm: $(STAMP)
	PYTHON=$(PY) examples/build.sh

clean:
	rm -rf $(VENV) build *.egg-info
