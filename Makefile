# fewstep: two commands on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# One thread per process by default in tests: several processes share 2 cores there.
export OMP_NUM_THREADS ?= 2

.PHONY: install serve test test-fast train bench lint docs screenshots redis chromium prometheus clean

$(BIN)/fewstep: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned in the same command: the CPU wheel; unpinned it resolves a multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[dev]"
	touch $@

install: $(BIN)/fewstep

serve: $(BIN)/fewstep
	FEWSTEP_HOST=$(HOST) FEWSTEP_PORT=$(PORT) $(BIN)/fewstep serve

redis:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server missing: install it (apt-get install redis-server)"; exit 1; fi; }

# The playground's browser tests drive Debian's chromium through Playwright (no browser download).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: install it (apt-get install chromium)"; exit 1; fi; }

# promtool checks the alert rules; a real Prometheus scrapes the local stack in the deploy tests.
prometheus:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "prometheus missing: install it (apt-get install prometheus)"; exit 1; fi; }

# Two layers: the fast in-process one (edit loops: `make test-fast`, under 2 minutes), then the slow one
# (subprocess servers, redis-server, training, export). `make test` runs both, fast first.
PYTEST := $(BIN)/python -m pytest -q --durations=40

test: $(BIN)/fewstep redis chromium prometheus
	$(PYTEST) -m "not slow"
	$(PYTEST) -m slow

test-fast: $(BIN)/fewstep
	$(PYTEST) -m "not slow"

train: $(BIN)/fewstep
	$(BIN)/fewstep train image
	$(BIN)/fewstep train video

bench: $(BIN)/fewstep
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# docs/configuration.md is generated from the settings class (a test checks it is current).
docs: $(BIN)/fewstep
	$(BIN)/python -m fewstep.service.settings > docs/configuration.md

# The playground's screenshots in docs/img/, refreshed on purpose (a test run writes them to a temporary folder).
screenshots: $(BIN)/fewstep chromium
	FEWSTEP_SCREENSHOTS=docs/img $(PYTEST) tests/service/test_playground_browser.py

lint: $(BIN)/fewstep
	$(BIN)/ruff check fewstep tests bench
	$(BIN)/mypy fewstep

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
