#!/usr/bin/env bash
# Benchmarks a three-node MusicFS cluster on this machine through its FUSE
# mount, and the same script on a local directory (the ceiling):
#   - sequential write of 1 GiB (incompressible data, fsync at the end)
#   - cold sequential read of it (fresh mount, kernel caches dropped)
#   - create / stat / unlink of 10,000 empty files in one directory, one thread
# Usage: benches/fs-bench.sh [SIZE_MIB] [FILES]   (run as root; see docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
FILES=${2:-10000}
BIN=${CARGO_TARGET_DIR:-$HOME/.cache/musicfs/target}/release
work=$(mktemp -d /var/tmp/musicfs-bench.XXXXXX)
pids=()
mount_pid=""
cleanup() {
  [ -n "$mount_pid" ] && kill -TERM "$mount_pid" 2>/dev/null && wait "$mount_pid" 2>/dev/null || true
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  mountpoint -q "$work/mnt" 2>/dev/null && umount -l "$work/mnt"
  rm -rf "$work" /dev/shm/musicfs-bench.bin
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
peers=""; seeds=""
for i in 1 2 3; do
  port=$(free_port)
  "$BIN/musicfs-node" --id $i --listen 127.0.0.1:$port --data "$work/node$i" 2>"$work/node$i.log" &
  pids+=($!)
  peers="$peers${peers:+,}$i=127.0.0.1:$port"; seeds="$seeds${seeds:+,}127.0.0.1:$port"
done
# Nodes take a moment to listen; init refuses until all answer.
for _ in $(seq 1 150); do "$BIN/musicfs" cluster init --peers "$peers" >/dev/null 2>&1 && break; sleep 0.2; done
"$BIN/musicfs" status --cluster "$seeds" >/dev/null
mkdir -p "$work/mnt" "$work/local"
start_mount() {
  "$BIN/musicfs" mount --cluster "$seeds" "$work/mnt" 2>>"$work/mount.log" &
  mount_pid=$!
  for _ in $(seq 1 200); do mountpoint -q "$work/mnt" && return; sleep 0.1; done
  echo "mount did not appear" >&2; exit 1
}
stop_mount() { kill -TERM "$mount_pid"; wait "$mount_pid" || true; mount_pid=""; }
mibs() { python3 -c "print(round($SIZE_MIB / $1))"; }
timed() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); python3 -c "print($t1 - $t0)"; }

head -c $((SIZE_MIB << 20)) /dev/urandom > /dev/shm/musicfs-bench.bin
run() { # $1 = label, $2 = directory, $3 = remount function or ""
  local dir=$2 w r meta
  w=$(timed dd if=/dev/shm/musicfs-bench.bin of="$dir/big.bin" bs=1M conv=fsync)
  [ -n "$3" ] && $3
  sync; echo 3 > /proc/sys/vm/drop_caches
  r=$(timed dd if="$dir/big.bin" of=/dev/null bs=1M)
  cmp -s /dev/shm/musicfs-bench.bin "$dir/big.bin" || { echo "$1: read back differs" >&2; exit 1; }
  meta=$(python3 benches/meta_ops.py "$dir" "$FILES")
  echo "| $1 | $(mibs "$w") | $(mibs "$r") | $(echo "$meta" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(" | ".join(str(d[k]) for k in ("create_per_s","stat_per_s","unlink_per_s")))') |"
}
remount() { stop_mount; start_mount; }
start_mount
echo "| target | write MiB/s | cold read MiB/s | create/s | stat/s | unlink/s |"
echo "|---|---|---|---|---|---|"
run "MusicFS, 3 nodes, FUSE" "$work/mnt" remount
run "local directory (ceiling)" "$work/local" ""
