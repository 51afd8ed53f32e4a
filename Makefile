# The two commands that matter: `make run` and `make test`. Everything installs itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test lint bench system-deps clean

# `make run` installs what running needs (the package and its dependencies; Redis and PostgreSQL);
# `make test` adds the test tools (the dev extra; nginx, Caddy, Chromium, wrk).
$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(DEV_STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

system-deps:
	@bash scripts/system-deps.sh test

run: $(RUN_STAMP)
	@bash scripts/system-deps.sh run
	$(BIN)/python -m gateway._dev

test: $(DEV_STAMP) system-deps
	$(BIN)/pytest --cov=gateway --cov-report=term:skip-covered  # coverage settings: pyproject.toml

# The tests that start their own Redis Cluster, Redis Sentinel and Postgres streaming-replica servers alone
# (they run in `make test` too).
.PHONY: test-topology
test-topology: $(DEV_STAMP) system-deps
	$(BIN)/pytest -m topology

lint: $(DEV_STAMP)
	$(BIN)/ruff check gateway tests scripts
	$(BIN)/ruff format --check gateway tests scripts
	$(BIN)/mypy

# One table of ratios measured side by side (docs/benchmarks.md); `make bench-extra` runs the older,
# narrower benchmarks (policy decisions, the rate limiter alone, a flood of bad keys, latency by tier).
bench: $(DEV_STAMP) system-deps
	$(BIN)/python scripts/bench.py

.PHONY: bench-extra
bench-extra: $(DEV_STAMP) system-deps
	$(BIN)/python scripts/bench_policy.py
	$(BIN)/python scripts/bench_ratelimit.py
	$(BIN)/python scripts/bench_flood.py
	$(BIN)/python scripts/bench_tiers.py
	$(BIN)/python scripts/bench_handler.py

clean:
	rm -rf $(VENV) .local .pytest_cache .mypy_cache .ruff_cache .coverage
