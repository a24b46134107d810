# One Makefile for people and CI. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# The machine's own CPU features (AVX2/AVX-512 for curve25519-dalek's SIMD backend, SHA-NI).
export RUSTFLAGS ?= -C target-cpu=native

RUST_SOURCES := $(shell find rust -name '*.rs' -o -name Cargo.toml) Cargo.toml
PY_SOURCES := $(shell find python -name '*.py' -o -name '*.pyi' -o -name '*.lua')


.PHONY: help venv build run demo bench test test-rust test-python test-mcp1 lint fmt redis clean proto

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.5,<2" $$($(PY) scripts/deps.py dev mcp bench)
	@touch $@

venv: $(VENV)/.installed ## Create the virtualenv with every dependency

$(VENV)/.built: $(VENV)/.installed $(RUST_SOURCES) pyproject.toml
	$(VENV)/bin/maturin develop --release --quiet
	@touch $@

build: $(VENV)/.built ## Build the Rust extension (release) into the venv

run: build ## Build, then start the broker (embedded store, demo client and server registered)
	$(VENV)/bin/tokenbroker serve --demo

demo: build ## Run the embedded (in-process) walk: issue, validate, replay, revoke
	$(PY) -m tokenbroker.demo

proto: ## Regenerate python/tokenbroker/v1 from proto/tokenbroker/v1/broker.proto
	$(PY) -m grpc_tools.protoc -Iproto --python_out=python --pyi_out=python --grpc_python_out=python proto/tokenbroker/v1/broker.proto

redis: ## Install Debian's redis-server when missing (needs root)
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

test-rust: ## Rust tests
	cargo test --workspace --exclude tokenbroker-py

test-python: build redis ## Python tests (starts its own redis-server processes)
	$(PY) -m pytest
	$(PY) -m pytest benches -q --benchmark-disable  # each benchmark body once: the bench code cannot rot

# mcp 1.x (FastMCP) is supported too: its own venv, the same built extension via PYTHONPATH.
MCP1_VENV ?= .venv-mcp1
$(MCP1_VENV)/.installed: pyproject.toml
	@test -x $(MCP1_VENV)/bin/python || python3 -m venv $(MCP1_VENV)
	$(MCP1_VENV)/bin/python -m pip install -q --upgrade pip
	$(MCP1_VENV)/bin/python -m pip install -q "mcp>=1.30,<2" $$($(PY) scripts/deps.py dev)
	@touch $@

test-mcp1: build redis $(MCP1_VENV)/.installed ## The MCP integration suites under mcp 1.x
	PYTHONPATH=$(CURDIR)/python $(MCP1_VENV)/bin/python -m pytest tests/test_mcp_unit.py tests/test_mcp_e2e.py -q

test: test-rust test-python test-mcp1 ## Build, then run the Rust and Python suites (and mcp 1.x)

bench: build redis ## Benchmarks with same-run baselines -> benches/results/ (under 10 minutes)
	cargo bench -p tokenbroker-core --bench core -- --warm-up-time 1 --measurement-time 3
	$(PY) -m pytest benches -q --benchmark-enable --benchmark-only --benchmark-json=benches/results/embedded.json \
		--benchmark-min-rounds=5 --benchmark-max-time=0.5
	$(PY) benches/report.py benches/results/embedded.json
	$(PY) benches/mcp_latency.py --json benches/results/mcp-latency.json | tee benches/results/mcp-latency.md
	$(VENV)/bin/tokenbroker bench --duration 3 --warmup 0.5 --soak 60 --soak-warmup 65 --out benches/results

lint: build ## ruff, mypy, stubtest, clippy, rustfmt
	$(VENV)/bin/ruff check python tests benches examples
	$(VENV)/bin/ruff format --check python tests benches examples
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest tokenbroker._core
	cargo clippy --workspace --all-targets -- -D warnings
	cargo fmt --all --check

fmt: ## Format Rust and Python
	cargo fmt --all
	$(VENV)/bin/ruff format python tests
	$(VENV)/bin/ruff check --fix python tests

clean: ## Remove build output and the venv
	rm -rf target $(VENV) $(MCP1_VENV) .pytest_cache .mypy_cache .ruff_cache
