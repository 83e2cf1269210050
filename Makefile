# The two commands of the README, and the set-up both share.
#   make run    set up, upgrade ./converge.db, serve API + dashboard + one worker on :8000 (demo study)
#   make test   set up and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel on the local disk here; on a GPU machine, override with e.g. TORCH_SPEC='torch>=2.2,<3'.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup run test lint lint-imports clean secrets

setup: $(VENV)/.installed

# Re-installs only when pyproject.toml changed: `make setup` is fast when nothing did.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: setup
	CONVERGE_DATABASE_URL=$${CONVERGE_DATABASE_URL:-sqlite:///./converge.db} $(BIN)/converge db upgrade
	CONVERGE_DATABASE_URL=$${CONVERGE_DATABASE_URL:-sqlite:///./converge.db} \
		$(BIN)/converge serve --host 127.0.0.1 --port 8000 --workers 1 --demo-spec examples/digits-demo.yaml

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check core trainers studies service migrations tests benchmarks examples

lint-imports: setup
	$(BIN)/lint-imports

# docker-compose.yml's PostgreSQL password, made on first use (kept when it exists; never committed).
secrets:
	scripts/make-secrets.sh

clean:
	rm -rf $(VENV) converge.db converge.db-wal converge.db-shm
