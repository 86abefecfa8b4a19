# MusicFS build glue. `make dev` starts a local three-node cluster and mounts
# it; `make test` runs every test. Both install what a fresh Debian machine lacks.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/musicfs/target
CARGO ?= cargo
BIN := $(CARGO_TARGET_DIR)/release
APT_PKGS := clang libclang-dev pkg-config fuse3 iproute2 iptables
# Only the tests need a browser (the status page's screenshot test) and
# the encoders that make a real music library (../shared/tools/mklib.sh).
TEST_APT_PKGS := chromium sox flac lame vorbis-tools opus-tools imagemagick

.PHONY: deps test-deps build dev test lint unit integration chaos pjdfstest image compose-test bench clean-dev

deps:
	@scripts/install-deps.sh $(APT_PKGS)

test-deps: deps
	@scripts/install-deps.sh $(TEST_APT_PKGS)

build: deps
	$(CARGO) build --release --locked --workspace --bins

dev: build
	$(BIN)/musicfs dev --dir musicfs-dev

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings
	@# Crate boundaries (docs/ARCHITECTURE.md): proto, client and the chaos harness never pull in rocksdb or openraft.
	@for c in musicfs-proto musicfs chaos-tests; do \
	  if $(CARGO) tree --locked -e normal -p $$c --prefix none | grep -Eq '^(rocksdb|librocksdb-sys|openraft) '; then \
	    echo "crate $$c depends on rocksdb or openraft"; exit 1; fi; done

# Tests run against nodes built with failure injection points (crash tests);
# `make build` builds them without, so they compile to nothing there.
unit: test-deps
	$(CARGO) test --release --locked --workspace --features musicfs-node/failpoints

pjdfstest: build
	scripts/pjdfstest.sh

# Fault injection against real nodes in network namespaces (needs root):
# the short set of scenarios, including one against a deliberately broken
# node that the checker must catch (docs/CHAOS.md). Nodes carry failure
# points for that run, so this builds them with the feature.
chaos: deps
	$(CARGO) build --release --locked --workspace --bins --features musicfs-node/failpoints
	$(BIN)/chaos-tests short $(CHAOS_ARGS)

# The deployment: a locally built image (no registry) and the compose test.
image: build
	deploy/build-image.sh $(BIN)

compose-test: build
	@if docker info >/dev/null 2>&1 && command -v docker-compose >/dev/null; then \
	  deploy/compose-test.sh $(BIN); \
	else echo "compose test skipped: no Docker engine or docker-compose here"; fi

test: lint unit chaos pjdfstest compose-test

bench: build
	benches/fs-bench.sh

clean-dev:
	rm -rf musicfs-dev
