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
. benches/lib/cluster.sh
start_cluster 16
mkdir -p "$work/local"
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
