# MusicFS build glue. `make dev` starts a local three-node cluster and mounts
# it; `make test` runs every test. Both install what a fresh Debian machine lacks.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/musicfs/target
CARGO ?= cargo
BIN := $(CARGO_TARGET_DIR)/release
APT_PKGS := clang libclang-dev pkg-config fuse3

.PHONY: deps build dev test lint unit integration pjdfstest bench clean-dev

deps:
	@scripts/install-deps.sh $(APT_PKGS)

build: deps
	$(CARGO) build --release --locked --workspace --bins

dev: build
	$(BIN)/musicfs dev --dir musicfs-dev

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings

unit: deps
	$(CARGO) test --release --locked --workspace

pjdfstest: build
	scripts/pjdfstest.sh

test: lint unit pjdfstest

bench: build
	benches/fs-bench.sh

clean-dev:
	rm -rf musicfs-dev
