# One Makefile for people and CI. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# Builds are portable (no -C target-cpu): `make bench` alone adds the machine's own CPU
# features. They add little to the crypto, which picks its fastest code at run time through
# `cpufeatures` in a portable build too: curve25519-dalek 4 compiles its AVX2 backend into
# every x86_64 build and selects it on a CPU with AVX2 (its AVX-512 IFMA backend needs a
# nightly compiler, native or not); sha2 selects SHA-NI and AVX2 the same way. What native
# adds: those checks become constants, and the compiler may use AVX2, BMI2 and ADX (mulx,
# adcx) in all the other code: curve25519's serial field arithmetic (point decompression,
# inversion; the AVX2 backend covers scalar multiplication), p256 (ES256 proofs), JSON and
# base64. `make bench-cpu` measures both builds side by side.
NATIVE_RUSTFLAGS := -C target-cpu=native

RUST_SOURCES := $(shell find rust -name '*.rs' -o -name Cargo.toml) Cargo.toml
BUILD_INPUTS := $(VENV)/.installed $(RUST_SOURCES) pyproject.toml
# The Python that ruff checks and formats (benches/ holds the tokenbroker_bench package too).
PY_PATHS := python tests benches examples scripts fuzz/python

# The venv holds one build of tokenbroker._core at a time, and each kind has a marker:
#   .built-release  portable release build (fat LTO)   make build: test, run, demo, test-mcp1
#   .built-dev      debug build, dependencies optimised make build-dev: lint's build on a fresh tree
#   .built-native   release, -C target-cpu=native       make bench
# A build first removes the other kinds' markers (and `.built`, older Makefiles' marker of a
# native build), so no marker vouches for a build that was replaced, nor for a failed one.
BUILT_RELEASE := $(VENV)/.built-release
BUILT_DEV := $(VENV)/.built-dev
BUILT_NATIVE := $(VENV)/.built-native
ALL_BUILT := $(BUILT_RELEASE) $(BUILT_DEV) $(BUILT_NATIVE) $(VENV)/.built

# Empty when redis-server and redis-cli are on PATH: `make redis` then runs no apt-get at all.
REDIS_MISSING := $(shell command -v redis-server >/dev/null && command -v redis-cli >/dev/null || echo yes)

# Empty when nginx and caddy are on PATH (or in /usr/sbin): `make gateways` then runs no apt-get.
GATEWAYS_MISSING := $(shell (command -v nginx >/dev/null || test -x /usr/sbin/nginx) && command -v caddy >/dev/null || echo yes)

# criterion's options for `make bench-cpu`; a bench name among them filters, e.g.
#   make bench-cpu CRITERION_ARGS='--warm-up-time 0.2 --measurement-time 0.5 validate_warm'
CRITERION_ARGS ?= --warm-up-time 1 --measurement-time 3
CORE_BENCH := cargo bench -p tokenbroker-core --bench core --


.PHONY: help venv build build-dev build-native build-any run demo bench bench-cpu test test-rust test-python gateways \
	test-mcp1 fuzz-http fuzz fuzz-tools chaos overload soak lint fmt redis clean proto

help: ## Show this help
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml benches/pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.5,<2" $$($(PY) scripts/deps.py dev mcp bench)
	$(PY) -m pip install -q -e benches --no-deps  # tokenbroker_bench: the load generator, not in the wheel
	@touch $@

venv: $(VENV)/.installed ## Create the virtualenv with every dependency

$(BUILT_RELEASE): $(BUILD_INPUTS)
	@rm -f $(filter-out $@,$(ALL_BUILT))
	$(VENV)/bin/maturin develop --release --quiet
	@touch $@

$(BUILT_DEV): $(BUILD_INPUTS)
	@rm -f $(filter-out $@,$(ALL_BUILT))
	$(VENV)/bin/maturin develop --quiet
	@touch $@

# Its own target directory: the native flags would otherwise rebuild target/release each time.
$(BUILT_NATIVE): $(BUILD_INPUTS)
	@rm -f $(filter-out $@,$(ALL_BUILT))
	CARGO_TARGET_DIR=$(CURDIR)/target/native RUSTFLAGS="$(NATIVE_RUSTFLAGS)" $(VENV)/bin/maturin develop --release --quiet
	@touch $@

build: $(BUILT_RELEASE) ## Build the Rust extension (portable release) into the venv

build-dev: $(BUILT_DEV) ## Build the Rust extension (debug, quick to build) into the venv

build-native: $(BUILT_NATIVE) ## Build the Rust extension (release, this CPU's features) into the venv

# lint needs tokenbroker._core in the venv (mypy.stubtest imports it), not a fast one: it takes
# whichever build is current (release, native or dev) and builds the quick debug one only when
# none is. So CI's `make test` then `make lint` builds release once, while `make lint` on a
# fresh tree builds dev. `make -q` answers "up to date?" by its exit code, building nothing.
build-any:
	@if $(MAKE) -q $(BUILT_RELEASE) || $(MAKE) -q $(BUILT_NATIVE) || $(MAKE) -q $(BUILT_DEV); then \
		echo "lint: using the build already in $(VENV)"; \
	else \
		$(MAKE) --no-print-directory build-dev; \
	fi

run: build ## Build, then start the broker (embedded store, demo client and server registered)
	$(VENV)/bin/tokenbroker serve --demo

demo: build ## Run the embedded (in-process) walk: issue, validate, replay, revoke
	$(PY) -m tokenbroker.demo

proto: ## Regenerate python/tokenbroker/v1 from proto/tokenbroker/v1/broker.proto
	$(PY) -m grpc_tools.protoc -Iproto --python_out=python --pyi_out=python --grpc_python_out=python proto/tokenbroker/v1/broker.proto

redis: ## Install Debian's redis-server when missing (needs root)
ifneq ($(REDIS_MISSING),)
	@if [ "$$(id -u)" != 0 ]; then \
		echo "redis-server and redis-cli are missing: the tests start their own. Install Debian's" \
			"redis-server package (sudo apt-get install redis-server) or run 'make redis' as root." >&2; \
		exit 1; \
	fi
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
endif

# nginx runs the shipped contrib/gateways/nginx.conf in front of an MCP server in the tests,
# and `nginx -t` and `caddy validate` check the shipped configurations. Installed with no
# service started: a policy-rc.d of our own, when the machine has none, refuses the start.
gateways: ## Install Debian's nginx and caddy when missing (needs root)
ifneq ($(GATEWAYS_MISSING),)
	@if [ "$$(id -u)" != 0 ]; then \
		echo "nginx or caddy is missing: the gateway tests run them. Install Debian's nginx and caddy" \
			"packages (sudo apt-get install nginx caddy) or run 'make gateways' as root." >&2; \
		exit 1; \
	fi
	@ours=; if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; \
		chmod 755 /usr/sbin/policy-rc.d; ours=yes; fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx caddy >/dev/null; status=$$?; \
	if [ -n "$$ours" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$status
endif

test-rust: ## Rust tests
	cargo test --workspace --exclude tokenbroker-py

test-python: build redis gateways ## Python tests (starts its own redis-server and nginx processes)
	$(PY) -m pytest
	$(PY) -m pytest benches -q --benchmark-disable  # each benchmark body once: the bench code cannot rot

# mcp 1.x (FastMCP) is supported too: its own venv, the same built extension via PYTHONPATH
# (and tokenbroker_bench from benches/, which the tests' support code imports).
MCP1_VENV ?= .venv-mcp1
$(MCP1_VENV)/.installed: pyproject.toml
	@test -x $(MCP1_VENV)/bin/python || python3 -m venv $(MCP1_VENV)
	$(MCP1_VENV)/bin/python -m pip install -q --upgrade pip
	$(MCP1_VENV)/bin/python -m pip install -q "mcp>=1.30,<2" $$($(PY) scripts/deps.py dev)
	@touch $@

test-mcp1: build redis $(MCP1_VENV)/.installed ## The MCP integration suites under mcp 1.x
	PYTHONPATH=$(CURDIR)/python:$(CURDIR)/benches $(MCP1_VENV)/bin/python -m pytest tests/test_mcp_unit.py tests/test_mcp_e2e.py \
		tests/test_mcp_oauth_unit.py tests/test_oauth_sdk_e2e.py tests/test_oauth_own_client_e2e.py -q \
		--deselect tests/test_mcp_unit.py::test_broker_auth_plugs_into_httpx2_the_http_client_of_mcp_2  # mcp 2.x only

# The schemathesis run of the HTTP door against its OpenAPI description is part of test-python
# (tests/test_http_schemathesis.py: a fixed seed, 50 cases per operation); this runs it at length:
#   make fuzz-http HTTP_FUZZ_EXAMPLES=1000 HTTP_FUZZ_SEED=7
HTTP_FUZZ_EXAMPLES ?= 300
HTTP_FUZZ_SEED ?= 20261202
fuzz-http: build ## The HTTP door against its OpenAPI description at length (schemathesis)
	HTTP_FUZZ_EXAMPLES=$(HTTP_FUZZ_EXAMPLES) HTTP_FUZZ_SEED=$(HTTP_FUZZ_SEED) HTTP_FUZZ_TIMEOUT=3300 \
		$(PY) -m pytest tests/test_http_schemathesis.py -q --timeout=3600

# The fuzz targets (fuzz/: cargo fuzz on the token engine, atheris on the Python boundary),
# FUZZ_SECONDS each; `make test` runs them for 60 s. The long run the README records:
#   make fuzz FUZZ_SECONDS=3600 FUZZ_REPORT=benches/results/fuzz.md
# cargo fuzz needs the nightly toolchain (rustup toolchain list); cargo-fuzz is installed
# from crates.io when missing.
FUZZ_SECONDS ?= 60
FUZZ_REPORT ?=
fuzz-tools:
	@rustup toolchain list | grep -q '^nightly' || { echo "cargo fuzz needs the nightly toolchain:" \
		"rustup toolchain install nightly" >&2; exit 1; }
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

fuzz: build fuzz-tools ## Every fuzz target for FUZZ_SECONDS (60) each; fails on any finding
	$(PY) scripts/fuzz.py --seconds $(FUZZ_SECONDS) $(if $(FUZZ_REPORT),--markdown $(FUZZ_REPORT))

# The chaos suite (tests/test_chaos.py) runs in test-python with short phases; this runs
# each fault with phases CHAOS_SCALE times as long and writes the README's table.
CHAOS_SCALE ?= 4
chaos: build redis ## Faults under load (Redis, network, brokers, cluster failover), longer, with the table
	@mkdir -p benches/results && rm -f benches/results/chaos.md
	TOKENBROKER_CHAOS_SCALE=$(CHAOS_SCALE) TOKENBROKER_CHAOS_REPORT=$(CURDIR)/benches/results/chaos.md \
		$(PY) -m pytest tests/test_chaos.py -q
	@cat benches/results/chaos.md

# Exits 1 while a window sees errors other than shedding (today: gRPC on the memory store, defaults,
# at 2x, see README).
# The broker on CPU 0, the load generators on the others (as a client machine of its own
# would be), when there are two CPUs or more.
OVERLOAD_PIN ?= $(shell n=$$(nproc); [ $$n -ge 2 ] && echo "--server-cpus 0 --generator-cpus 1-$$((n - 1))")
# The third run: the memory store with grpc's own bound on every call at once, set to the
# callers' bound with the defaults on one CPU (4 workers + 256 queued).
OVERLOAD_BOUND ?= 260
overload: build redis ## Overload at 1x and 2x the saturation rate, gRPC and HTTP -> benches/results/overload*.md
	@status=0; \
	$(PY) benches/overload.py $(OVERLOAD_PIN) --json benches/results/overload.json \
		--markdown benches/results/overload.md || status=1; \
	$(PY) benches/overload.py $(OVERLOAD_PIN) --store redis --doors grpc \
		--json benches/results/overload-redis.json --markdown benches/results/overload-redis.md || status=1; \
	$(PY) benches/overload.py $(OVERLOAD_PIN) --doors grpc --broker-env TOKENBROKER_MAX_CONCURRENT_RPCS=$(OVERLOAD_BOUND) \
		--json benches/results/overload-bound.json --markdown benches/results/overload-bound.md || status=1; \
	exit $$status

SOAK_MINUTES ?= 10
soak: build redis ## 10 minutes of mixed load on two brokers and Redis: errors, RSS slope, p99 (not in CI)
	$(PY) benches/soak.py --minutes $(SOAK_MINUTES) --json benches/results/soak.json --markdown benches/results/soak.md

# redis first: a machine that cannot get redis-server fails at once, not after the Rust tests.
test: redis gateways test-rust test-python test-mcp1 fuzz ## Build, then run the Rust and Python suites (and mcp 1.x), and the fuzzers for 60 s each

# The core's benches built portable and native, each in its own target directory (so neither
# rebuilds the other), then one table. $(1): a Markdown file to write the table to, or nothing.
# The directories are absolute: criterion resolves a relative one from the crate's folder.
define bench_cpu
	@mkdir -p target && touch target/bench-cpu.started
	CARGO_TARGET_DIR=$(CURDIR)/target/portable $(CORE_BENCH) $(CRITERION_ARGS)
	CARGO_TARGET_DIR=$(CURDIR)/target/native RUSTFLAGS="$(NATIVE_RUSTFLAGS)" $(CORE_BENCH) $(CRITERION_ARGS)
	python3 scripts/bench_cpu_table.py target/portable/criterion target/native/criterion \
		--since target/bench-cpu.started $(if $(1),-o $(1))
endef

bench-cpu: ## The core's criterion benches, portable vs -C target-cpu=native, side by side
	$(call bench_cpu,)

# The embedded benches run on the native build; report.py compares them with the native core.
bench: build-native redis ## Benchmarks with same-run baselines -> benches/results/ (about 14 minutes)
	$(call bench_cpu,benches/results/core-cpu.md)
	$(PY) -m pytest benches -q --benchmark-enable --benchmark-only --benchmark-json=benches/results/embedded.json \
		--benchmark-min-rounds=5 --benchmark-max-time=0.5
	$(PY) benches/report.py benches/results/embedded.json --criterion target/native/criterion
	$(PY) benches/mcp_latency.py --json benches/results/mcp-latency.json | tee benches/results/mcp-latency.md
	$(VENV)/bin/tokenbroker bench --duration 3 --warmup 0.5 --soak 60 --soak-warmup 65 --out benches/results
	$(PY) benches/cpu_per_request.py --duration 5 --json benches/results/cpu-per-request.json | tee benches/results/cpu-per-request.md
	$(PY) benches/token_endpoint.py --json benches/results/token-endpoint.json | tee benches/results/token-endpoint.md
	$(PY) benches/cimd_latency.py --json benches/results/cimd-latency.json --markdown benches/results/cimd-latency.md

# mypy runs twice: benches/conftest.py and tests/conftest.py are both the top-level module
# `conftest` (see [tool.mypy] in pyproject.toml), which one run cannot hold.
lint: build-any ## ruff, mypy (package, tests, benches), stubtest, clippy, rustfmt (the fuzz crate too)
	$(VENV)/bin/ruff check $(PY_PATHS)
	$(VENV)/bin/ruff format --check $(PY_PATHS)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy benches
	$(PY) -m mypy.stubtest tokenbroker._core
	cargo clippy --workspace --all-targets -- -D warnings
	cargo fmt --all --check
	cd fuzz && cargo clippy --all-targets -- -D warnings && cargo fmt --check  # its own workspace

fmt: ## Format Rust and Python
	cargo fmt --all
	$(VENV)/bin/ruff format $(PY_PATHS)
	$(VENV)/bin/ruff check --fix $(PY_PATHS)

clean: ## Remove build output and the venv
	rm -rf target $(VENV) $(MCP1_VENV) .pytest_cache .mypy_cache .ruff_cache
