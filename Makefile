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

test: install
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

settings-docs: install
	$(BIN)/vigil settings env-example > .env.example
	$(BIN)/python -c "import pathlib; from service.settings_doc import with_table; p = pathlib.Path('README.md'); p.write_text(with_table(p.read_text()))"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
