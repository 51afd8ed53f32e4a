# The two commands that matter: `make run` and `make test`. Everything installs itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

run: $(STAMP) system-deps
	$(BIN)/python -m gateway._dev

test: $(STAMP) system-deps
	$(BIN)/pytest --cov=gateway --cov-report=term:skip-covered  # coverage settings: pyproject.toml

lint: $(STAMP)
	$(BIN)/ruff check gateway tests scripts
	$(BIN)/ruff format --check gateway tests scripts
	$(BIN)/mypy

# One table of ratios measured side by side (docs/benchmarks.md); `make bench-extra` runs the older,
# narrower benchmarks (policy decisions, the rate limiter alone, a flood of bad keys, latency by tier).
bench: $(STAMP) system-deps
	$(BIN)/python scripts/bench.py

.PHONY: bench-extra
bench-extra: $(STAMP) system-deps
	$(BIN)/python scripts/bench_policy.py
	$(BIN)/python scripts/bench_ratelimit.py
	$(BIN)/python scripts/bench_flood.py
	$(BIN)/python scripts/bench_tiers.py
	$(BIN)/python scripts/bench_handler.py

clean:
	rm -rf $(VENV) .local .pytest_cache .mypy_cache .ruff_cache .coverage
