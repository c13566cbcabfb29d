# Vigil: `make run` serves the embedded default, `make test` runs the whole suite.
# Both install what they need into .venv first (Python 3.11+ and a compiler are enough).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test install lint typecheck bench clean settings-docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/vigil run

test: tools install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# Benchmarks print figures beside their peers; they are never part of `make test`.
bench: install
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/telemetry_overhead.py
	$(BIN)/python bench/breaker_overhead.py
	$(BIN)/python bench/cache_stampede.py
	$(BIN)/python bench/ratelimit_throughput.py
	$(BIN)/python bench/events_ingest.py

settings-docs: install
	$(BIN)/vigil settings env-example > .env.example
	$(BIN)/python -c "import pathlib; from service.settings_doc import with_table; p = pathlib.Path('README.md'); p.write_text(with_table(p.read_text()))"

# Dashboards are code: regenerate dashboards/generated/*.json from dashboards/*.py, then commit
# them (tests/ops/test_dashboards.py fails while they are stale).
.PHONY: dashboards
dashboards: install
	$(BIN)/python -m dashboards.build

# Alert rules are code: regenerate alerts/generated/*.yml from alerts/rules.py and
# alerts/slos.yaml, then commit them (tests/ops/test_alerts.py fails while they are stale).
.PHONY: alerts
alerts: install
	$(BIN)/python -m alerts.generate

# promtool, amtool and Alertmanager for tests/ops/test_alerts.py, from Debian's packages, only
# when one is missing (silent otherwise). The packages ship init scripts that apt would run: a
# policy-rc.d answering 101 ("action forbidden") keeps every daemon stopped, and is removed
# afterwards unless it was there before (Docker images ship one). Needs root, or sudo.
TOOLS_PACKAGES := prometheus prometheus-alertmanager
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: tools
tools:
	@if ! command -v promtool >/dev/null || ! command -v amtool >/dev/null \
	    || ! command -v prometheus-alertmanager >/dev/null; then \
	  echo "make tools: installing $(TOOLS_PACKAGES)"; \
	  $(SUDO) sh -ec ' \
	    guard=; \
	    if [ ! -e /usr/sbin/policy-rc.d ]; then \
	      printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; guard=1; \
	    fi; \
	    status=0; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $(TOOLS_PACKAGES) >/dev/null; } || status=$$?; \
	    if [ -n "$$guard" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	    exit $$status'; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
