# Everything runs from a project virtualenv (.venv) that `make install` creates.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test lint proto proto-check unasync unasync-check bench bench-quick bench-peers bench-peers-quick chaos docker-build up down \
	logs lock lock-check

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# Two distributions, both editable: caas-crypto-client (client/pyproject.toml) and caas-crypto-server (here).
# The first line removes the single distribution this repository used to build, from an older .venv.
$(INSTALLED): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip uninstall --quiet --yes caas-crypto 2>/dev/null || true
	$(BIN)/pip install --quiet -e ./client -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED) ## Create .venv and install the client and the service (editable) with the development tools

run: $(INSTALLED) ## Run the server on the embedded store (./data), port 3009
	$(BIN)/python -m crypto_server

test: $(INSTALLED) ## Run the test suite
	$(BIN)/pytest

lint: $(INSTALLED) ## ruff, mypy, buf lint and hadolint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd protos && ../$(BIN)/buf lint
	$(BIN)/hadolint Dockerfile

proto: $(INSTALLED) ## Regenerate crypto_client/v1 from protos/
	$(BIN)/python protos/generate.py

proto-check: $(INSTALLED) ## Fail if crypto_client/v1 does not match protos/
	$(BIN)/python protos/generate.py --check

unasync: $(INSTALLED) ## Regenerate the blocking client and helpers (crypto_client/_sync) from crypto_client/_async
	$(BIN)/python scripts/unasync.py

unasync-check: $(INSTALLED) ## Fail if crypto_client/_sync does not match crypto_client/_async
	$(BIN)/python scripts/unasync.py --check

bench: $(INSTALLED) ## Run the benchmarks (needs h2load: apt-get install nghttp2-client); writes bench/results/latest.json
	$(BIN)/python -m bench

chaos: $(INSTALLED) ## Faults at random moments under load on two replicas (< 3 min); writes bench/results/chaos.json
	$(BIN)/python -m tests.reliability.chaos --seed $${SEED:-7} --duration $${DURATION:-120}

bench-quick: $(INSTALLED) ## The benchmarks with short phases (under a minute); writes bench/results/quick.json
	$(BIN)/python -m bench --quick

bench-peers: $(INSTALLED) ## Ours vs moto's AWS KMS emulation (Encrypt, Decrypt, GenerateDataKey); writes bench/results/peers.json
	$(BIN)/python -m bench.peers

bench-peers-quick: $(INSTALLED) ## bench-peers with short runs (about a minute); writes bench/results/peers-quick.json
	$(BIN)/python -m bench.peers --quick

# Private to the user the container runs as (deploy/compose/root_key_secret.py says why and how).
secrets/crypto_root_key:
	$(PYTHON) deploy/compose/root_key_secret.py create $@

docker-build: ## Build the container image caas/crypto-service:dev (needs a Docker engine)
	docker build -t caas/crypto-service:dev .

up: secrets/crypto_root_key ## Start crypto-service, MongoDB and Redis with docker compose, waiting until healthy
	user=$$($(PYTHON) deploy/compose/root_key_secret.py user secrets/crypto_root_key) && \
		CRYPTO_USER=$$user docker compose up --build --detach --wait

down: ## Stop the compose services (data volumes are kept)
	docker compose down

logs: ## Follow the compose services' logs
	docker compose logs --follow

# The image's runtime dependencies, pinned with hashes, resolved from the [project] dependencies of both
# distributions (pyproject.toml and client/pyproject.toml, not the dev extra) for Python 3.11 on every platform.
# Needs PyPI; `make lock-check` does not.
lock: $(INSTALLED) ## Regenerate requirements.lock (the container image's pinned, hashed dependencies)
	$(BIN)/python scripts/lock_inputs.py | $(BIN)/uv pip compile - --quiet --generate-hashes --universal \
		--python-version 3.11 --custom-compile-command "make lock" --output-file requirements.lock

lock-check: $(INSTALLED) ## Fail if requirements.lock does not satisfy pyproject.toml's dependencies (offline)
	$(BIN)/pytest -q tests/test_lock.py
