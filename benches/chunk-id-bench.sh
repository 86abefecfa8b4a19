#!/usr/bin/env bash
# The chunk-id hash on the write and read paths: sequential write of
# SIZE_MIB through a mount (replication 3, fsync at the end) and a cold
# sequential read of it, ROUNDS times, alternating between two builds of
# the binaries (directories A and B, each holding musicfs and
# musicfs-node), one fresh cluster per build and round. Prints one row per
# run. docs/BENCHMARKS.md ("Chunk ids") has the runs and the command.
# Usage: benches/chunk-id-bench.sh DIR_A DIR_B [SIZE_MIB] [ROUNDS]   (root)
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1 B=$2 SIZE_MIB=${3:-1024} ROUNDS=${4:-3}
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); python3 -c "print($t1 - $t0)"; }
mibs() { python3 -c "print(round($1 / $2))"; }
head -c $((SIZE_MIB << 20)) /dev/urandom > /dev/shm/musicfs-idbench.bin
trap 'rm -f /dev/shm/musicfs-idbench.bin' EXIT
one() {
  # A subshell per run: cluster.sh's cleanup stops what it started.
  (
    BIN=$1
    . benches/lib/cluster.sh
    start_cluster 16
    start_mount
    w=$(secs dd if=/dev/shm/musicfs-idbench.bin of="$work/mnt/big.bin" bs=1M conv=fsync)
    kill -TERM "$mount_pid"; wait "$mount_pid" || true; mount_pid=""
    sync; echo 3 > /proc/sys/vm/drop_caches
    start_mount
    r=$(secs dd if="$work/mnt/big.bin" of=/dev/null bs=1M)
    cmp -s /dev/shm/musicfs-idbench.bin "$work/mnt/big.bin" || { echo "read back differs" >&2; exit 1; }
    echo "| $2 | $(mibs "$SIZE_MIB" "$w") | $(mibs "$SIZE_MIB" "$r") |"
  )
}
echo "| build | write MiB/s | cold read MiB/s |"
echo "|---|---|---|"
for _ in $(seq 1 "$ROUNDS"); do
  one "$A" "$(basename "$A")"
  one "$B" "$(basename "$B")"
done
