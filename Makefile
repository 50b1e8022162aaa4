# outbox: the two commands a fresh machine needs are `make demo` and
# `make test`. Each installs what it needs first (scripts/setup.sh).
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(CURDIR)/target
# PG=18: install into PostgreSQL 18 (scripts/versions.sh) instead of 15.
PG ?= 15
PG_CONFIG := $(shell . scripts/versions.sh && pg_config_of $(PG))
SUDO := $(if $(filter 0,$(shell id -u)),,--sudo)

.PHONY: soak setup test demo install install-release package bench bench-enqueue bench-bulk-enqueue clean

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

## package: an installable archive per PostgreSQL version, in target/package/
package:
	scripts/package.sh

## soak: the randomized convergence test, for SOAK_SECS (default 600)
soak: install
	OUTBOX_SOAK_SECS=$(or $(SOAK_SECS),600) cargo test --manifest-path e2e/Cargo.toml --test convergence -- --nocapture

## bench: every benchmark figure side by side in one run (QUICK=1: smaller)
bench: install-release
	@scripts/setup.sh bench
	cargo build --release -q --manifest-path bench/Cargo.toml --bins
	QUICK=$(QUICK) scripts/bench.sh

## bench-enqueue: figure 3 alone (CALL=1: outbox.enqueue() called directly)
bench-enqueue: install-release
	$(if $(QUICK),SECONDS_PER_RUN=5 ROUNDS=1,) scripts/bench-enqueue.sh

## bench-bulk-enqueue: the bulk enqueue figure alone (QUICK=1: smaller)
bench-bulk-enqueue: install-release
	$(if $(QUICK),ROWS=200000 ROUNDS=1,) scripts/bench-bulk-enqueue.sh

clean:
	cargo clean
