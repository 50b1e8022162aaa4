# outbox: the two commands a fresh machine needs are `make demo` and
# `make test`. Each installs what it needs first (scripts/setup.sh).
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(CURDIR)/target
PG_CONFIG := /usr/lib/postgresql/15/bin/pg_config
SUDO := $(if $(filter 0,$(shell id -u)),,--sudo)

.PHONY: soak setup test demo install install-release bench bench-enqueue bench-latency bench-throughput clean

setup:
	@scripts/setup.sh

## test: unit, #[pg_test] and end-to-end tests
test:
	scripts/test.sh

## demo: a throwaway cluster, a receiver, and records flowing
demo:
	scripts/demo.sh

install: setup
	cargo pgrx install $(SUDO) --pg-config $(PG_CONFIG)

install-release: setup
	cargo pgrx install --release $(SUDO) --pg-config $(PG_CONFIG)

## soak: the randomized convergence test, for SOAK_SECS (default 600)
soak: install
	OUTBOX_SOAK_SECS=$(or $(SOAK_SECS),600) cargo test --manifest-path pg_test/Cargo.toml --test convergence -- --nocapture

## bench: benchmarks, figures side by side (QUICK=1 for a short run)
bench: bench-throughput bench-latency bench-enqueue

bench-enqueue: install-release
	$(if $(QUICK),SECONDS_PER_RUN=5 ROUNDS=1,) scripts/bench-enqueue.sh

bench-throughput: install-release
	cargo build --release -q --manifest-path pg_test/Cargo.toml --bin bench-throughput
	mkdir -p target/bench
	$(CARGO_TARGET_DIR)/release/bench-throughput $(if $(QUICK),20000,100000) > target/bench/throughput.txt
	cat target/bench/throughput.txt; grep '^{' target/bench/throughput.txt >> target/bench/results.json

bench-latency: install-release
	cargo build --release -q --manifest-path pg_test/Cargo.toml --bin bench-latency
	mkdir -p target/bench
	$(CARGO_TARGET_DIR)/release/bench-latency $(if $(QUICK),500,2000) > target/bench/latency.txt
	cat target/bench/latency.txt; grep '^{' target/bench/latency.txt >> target/bench/results.json

clean:
	cargo clean
