# Two commands matter: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PACKAGES := skunkqueue-core skunkqueue-redis skunkqueue-mongo skunkqueue-fdb skunkqueue-postgres skunkqueue-web skunkqueue-otel
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-fdb-real lint docs bench bench-web bench-otel chaos servers clean

$(STAMP): requirements-dev.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(foreach p,$(PACKAGES),-e ./$(p)) -r requirements-dev.txt
	touch $(STAMP)

## Run the seed's demo end to end on the embedded backend (no server needed).
demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" scripts/demo.sh

# The suite runs in two passes (scripts/run-tests): TEST_WORKERS processes side by side
# (pytest-xdist; each starts its own servers on free ports), then the few `serial` tests, which
# bound a wall-clock time in milliseconds, alone. The tests mostly wait on the pools and servers
# they start, so three times the cores pays off (docs/development.md, "Running the tests", has the figures).
TEST_WORKERS ?= 6
RUN_TESTS := TEST_WORKERS=$(TEST_WORKERS) PYTHON=$(BIN)/python scripts/run-tests

## Run the whole test suite; the tests start their own redis-server, mongod and PostgreSQL.
test: $(STAMP) servers
	$(RUN_TESTS) $(PYTEST_ARGS)

## The inner loop: every test that needs no server or browser and is no benchmark -- the kit and the
## reliability suite on SQLite, the core, the backends' unit tests -- with 10 rounds of group
## signals instead of 50. `make test` runs everything.
test-fast: $(STAMP) servers
	SKUNQ_SIGNAL_ROUNDS=10 $(RUN_TESTS) -m "not slow" $(PYTEST_ARGS)

## The fdb tests against a real FoundationDB 7.3 cluster, step by step in skunkqueue-fdb/README.md:
## install libfdb_c 7.3.x (foundationdb-clients), then
## SKUNKQUEUE_FDB_CLUSTER_FILE=/etc/foundationdb/fdb.cluster make test-fdb-real.
## Without that variable the real-cluster tests are collected and skipped, each saying why.
test-fdb-real: $(STAMP)
	@test -n "$$SKUNKQUEUE_FDB_CLUSTER_FILE" || echo "SKUNKQUEUE_FDB_CLUSTER_FILE is not set: the real-cluster tests are skipped."
	$(BIN)/python -m pytest skunkqueue-fdb/tests -k RealCluster -rs $(PYTEST_ARGS)

## Make sure the server binaries the tests start are installed.
servers:
	scripts/ensure-servers

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --ignore-missing-imports skunkqueue-core/src/skunkqueue skunkqueue-redis/src/skunkqueue_redis \
		skunkqueue-mongo/src/skunkqueue_mongo skunkqueue-fdb/src/skunkqueue_fdb skunkqueue-postgres/src/skunkqueue_postgres \
		skunkqueue-web/src/skunkqueue_web skunkqueue-otel/src/skunkqueue_otel

## The documentation site (mkdocs.yml, pages in docs/) into site/. Strict: a broken link or anchor, a page
## left out of the nav or a docstring the API reference cannot read fails the build (CI runs it).
docs: $(STAMP)
	# The theme's notice about MkDocs 2 is moot here: requirements-dev.txt keeps MkDocs below 2.
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --clean

bench: $(STAMP) servers
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

## How fast skunq web answers with 100,000 jobs in SQLite and Redis.
bench-web: $(STAMP) servers
	$(BIN)/python -m benchmarks.web_overview $(BENCH_ARGS)

## What OpenTelemetry tracing (skunkqueue-otel) costs per fire and per worker job, off / on / unsampled.
bench-otel: $(STAMP)
	$(BIN)/python -m benchmarks.otel_cost $(BENCH_ARGS)

chaos: $(STAMP) servers
	SKUNQ_CHAOS=long $(BIN)/python -m pytest -m chaos $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
