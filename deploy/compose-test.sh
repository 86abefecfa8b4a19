#!/usr/bin/env bash
# The deployment test: builds the image, brings up deploy/docker-compose.yml
# under its own project name, initialises the cluster, writes a file through
# the client container's FUSE mount, reads it back, stops one node container
# and reads it again (through the mount, with the page cache dropped, and
# with the CLI from another container). The cluster runs on TLS with
# certificates made by `musicfs certs init`; the client container, which
# has no admin token, is refused a drain. Everything is removed at the end.
#
#   deploy/compose-test.sh [BIN_DIR]
set -euo pipefail
cd "$(dirname "$0")"
export MUSICFS_IMAGE=${MUSICFS_IMAGE:-musicfs:local}
P=musicfs-composetest-$$
DC=(docker-compose -p "$P" -f docker-compose.yml)
TMP=$(mktemp -d)
cleanup() {
  "${DC[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$TMP"
}
trap cleanup EXIT
fail() {
  echo "$*" >&2
  "${DC[@]}" logs --tail 40 >&2 || true
  exit 1
}

# Waits (bounded) until a command succeeds.
until_ok() {
  local what=$1 limit=$2
  shift 2
  for _ in $(seq "$limit"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "timed out after ${limit}s waiting for $what" >&2
  "${DC[@]}" logs --tail 30 >&2 || true
  return 1
}

BIN=${1:-}
./build-image.sh "$BIN"
"${BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/musicfs/target}/release}/musicfs" certs init --out "$TMP/certs" --nodes 3 >/dev/null
# The containers read the keys as root; the directory must be reachable.
chmod 755 "$TMP"
export MUSICFS_CERTS=$TMP/certs
"${DC[@]}" up -d
PEERS=1=node1:7400,2=node2:7400,3=node3:7400
until_ok "cluster init" 60 "${DC[@]}" exec -T node1 musicfs cluster init --peers "$PEERS"
mounted() { "${DC[@]}" exec -T client cat /proc/mounts | grep -q ' /mnt/musicfs fuse'; }
until_ok "the client's mount" 120 mounted

# Destructive admin commands need the token, which the client container lacks.
rc=0
"${DC[@]}" exec -T client musicfs node drain 3 --cluster node1:7400 >/dev/null 2>&1 || rc=$?
[ "$rc" = 4 ] || fail "a drain without the admin token exited $rc, not 4"
echo "TLS cluster up; a drain without the admin token was refused"

head -c 5000000 /dev/urandom >"$TMP/track.flac"
want=$(sha256sum <"$TMP/track.flac" | cut -d' ' -f1)
"${DC[@]}" exec -T client sh -c 'mkdir -p /mnt/musicfs/Artist/Album && cat > /mnt/musicfs/Artist/Album/track.flac' <"$TMP/track.flac" ||
  fail "writing through the client container's mount failed"
sum_mount() { "${DC[@]}" exec -T client sha256sum /mnt/musicfs/Artist/Album/track.flac | cut -d' ' -f1; }
got=$(sum_mount)
[ "$got" = "$want" ] || { echo "read back $got, wrote $want" >&2; exit 1; }
echo "wrote and read back 5 MB through the client container's mount"

"${DC[@]}" stop -t 10 node1
# Read from the cluster again, not from the kernel's page cache.
sync
echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
got=$(sum_mount)
[ "$got" = "$want" ] || { echo "after stopping node1 the mount read $got, want $want" >&2; exit 1; }
got=$("${DC[@]}" exec -T node2 musicfs cat --cluster node2:7400,node3:7400 /Artist/Album/track.flac | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "after stopping node1 the CLI read $got, want $want" >&2; exit 1; }
echo "with node1 stopped: the same bytes through the mount and through the CLI"
# With a node down the cluster serves everything but says it is degraded
# (and exits non-zero, for scripts).
st=$("${DC[@]}" exec -T node2 musicfs status --cluster node2:7400,node3:7400 || true)
echo "$st"
grep -q DEGRADED <<<"$st" || { echo "status does not report the stopped node" >&2; exit 1; }
echo "compose test passed"
