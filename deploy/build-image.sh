#!/usr/bin/env bash
# Builds the `musicfs:local` Docker image from the release binaries, with
# no pulled base image: a root file system holding the two binaries, the
# shared libraries they load (found with ldd), fusermount3 for mounts, and
# a few tools the compose test uses, imported with `docker import`.
#
#   deploy/build-image.sh [BIN_DIR]    (default: $CARGO_TARGET_DIR/release)
set -euo pipefail
BIN=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/musicfs/target}/release}
TAG=${MUSICFS_IMAGE:-musicfs:local}
for b in musicfs-node musicfs; do
  [ -x "$BIN/$b" ] || { echo "$BIN/$b not found: run 'make build' first" >&2; exit 1; }
done
command -v docker >/dev/null || { echo "docker is not installed" >&2; exit 1; }

ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT

# Copies a program and every library it loads, at their own paths.
add() {
  local src=$1 dst=$2
  mkdir -p "$ROOT$(dirname "$dst")"
  cp -L "$src" "$ROOT$dst"
  ldd "$src" 2>/dev/null | grep -oE '/[^ ]+' | while read -r lib; do
    [ -e "$ROOT$lib" ] && continue
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
  done
}

add "$BIN/musicfs-node" /usr/local/bin/musicfs-node
add "$BIN/musicfs" /usr/local/bin/musicfs
# The release profile keeps line tables for backtraces; the image does not
# need them.
if command -v strip >/dev/null; then
  strip --strip-debug "$ROOT/usr/local/bin/musicfs-node" "$ROOT/usr/local/bin/musicfs"
fi
add "$(command -v fusermount3)" /usr/bin/fusermount3
# A shell and the tools the compose test runs inside the client container.
for t in sh cat cp ls mkdir sha256sum sleep head; do
  add "$(command -v $t)" "/bin/$t"
done
mkdir -p "$ROOT/etc" "$ROOT/tmp" "$ROOT/data" "$ROOT/mnt/musicfs" "$ROOT/dev" "$ROOT/proc" "$ROOT/sys"
chmod 1777 "$ROOT/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
printf 'hosts: files dns\n' >"$ROOT/etc/nsswitch.conf"
# fusermount3 reads it; allow_other needs user_allow_other.
printf 'user_allow_other\n' >"$ROOT/etc/fuse.conf"

old=$(docker image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)
tar -C "$ROOT" -c . | docker import \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
  --change 'ENV MUSICFS_LOG=info' \
  --change 'ENTRYPOINT ["/usr/local/bin/musicfs-node"]' \
  - "$TAG" >/dev/null
# The image this one replaces, unless a container still uses it.
new=$(docker image inspect -f '{{.Id}}' "$TAG")
if [ -n "$old" ] && [ "$old" != "$new" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
echo "built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MiB", $1/1048576}'))"
