#!/usr/bin/env bash
# The client's read and write path beside the ceilings, in one run
# (docs/BENCHMARKS.md, "Client read path"):
#   - sequential write of SIZE_MIB (replication 3, fsync at the end)
#   - cold sequential read of it (fresh mount, kernel caches dropped)
#   - warm re-read (the kernel keeps its pages: the file did not change)
#   - the same two with --direct-io, and cold with the kernel's default
#     128 KiB read-ahead and with chunks over gRPC (--grpc-chunks), to
#     justify the defaults
#   - a cold read served by the on-disk cache (fresh mount, same cache)
#   - the FUSE ceiling: the same bytes from a memory-backed FUSE file
#     system (musicfs-memfs) with the same FUSE settings, cold and warm
#   - local tmpfs, the machine's ceiling
#   - throughput over time while a storage node and then the metadata
#     leader of the file's group are SIGKILLed mid-read (KILL_MIB file),
#     written as CSV to OUT (default docs/read-during-kill.csv) and drawn
#     into docs/read-during-kill.svg
# Usage: benches/read-bench.sh [SIZE_MIB] [KILL_MIB]   (root)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
# 2 GiB: the read fills the mount's page cache and the nodes' with the
# file, and past about 6.5 GiB of freshly touched memory this VM backs
# each new page slowly (docs/BENCHMARKS.md): a 4 GiB read measured that
# wall, not the kills.
KILL_MIB=${2:-2048}
OUT=${OUT:-docs/read-during-kill.csv}
. benches/lib/cluster.sh
start_cluster 16
start_mount_with() {
  mkdir -p "$work/mnt"
  "$BIN/musicfs" mount --cluster "$seeds" "$@" "$work/mnt" 2>>"$work/mount.log" &
  mount_pid=$!
  for _ in $(seq 1 200); do mountpoint -q "$work/mnt" && return; sleep 0.1; done
  echo "mount did not appear" >&2; exit 1
}
stop_mount() { kill -TERM "$mount_pid"; wait "$mount_pid" || true; mount_pid=""; }
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); python3 -c "print($t1 - $t0)"; }
mibs() { python3 -c "print(round($1 / $2))"; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
row() { echo "| $1 | $2 |"; }

head -c $((SIZE_MIB << 20)) /dev/urandom > /dev/shm/musicfs-bench.bin
echo "| measurement | MiB/s |"
echo "|---|---|"
start_mount_with
w=$(secs dd if=/dev/shm/musicfs-bench.bin of="$work/mnt/big.bin" bs=1M conv=fsync)
row "sequential write, replication 3" "$(mibs "$SIZE_MIB" "$w")"
stop_mount

cold; start_mount_with
r=$(secs dd if="$work/mnt/big.bin" of=/dev/null bs=1M)
row "cold sequential read (page cache, read-ahead 4 MiB)" "$(mibs "$SIZE_MIB" "$r")"
r=$(secs dd if="$work/mnt/big.bin" of=/dev/null bs=1M)
row "warm re-read (page cache kept)" "$(mibs "$SIZE_MIB" "$r")"
cmp -s /dev/shm/musicfs-bench.bin "$work/mnt/big.bin" || { echo "read back differs" >&2; exit 1; }
stop_mount

cold; start_mount_with --grpc-chunks
r=$(secs dd if="$work/mnt/big.bin" of=/dev/null bs=1M)
row "cold read, --grpc-chunks (chunks over gRPC, not the direct protocol)" "$(mibs "$SIZE_MIB" "$r")"
stop_mount

cold; start_mount_with --read-ahead-kib 128
r=$(secs dd if="$work/mnt/big.bin" of=/dev/null bs=1M)
row "cold read, kernel default read-ahead 128 KiB" "$(mibs "$SIZE_MIB" "$r")"
stop_mount

cold; start_mount_with --direct-io
r=$(secs dd if="$work/mnt/big.bin" of=/dev/null bs=1M)
row "cold read, --direct-io" "$(mibs "$SIZE_MIB" "$r")"
r=$(secs dd if="$work/mnt/big.bin" of=/dev/null bs=1M)
row "re-read, --direct-io (from the client's chunk cache)" "$(mibs "$SIZE_MIB" "$r")"
stop_mount

cold; start_mount_with --disk-cache-dir "$work/disk-cache" --cache-mib 64
secs dd if="$work/mnt/big.bin" of=/dev/null bs=1M >/dev/null
stop_mount
cold; start_mount_with --disk-cache-dir "$work/disk-cache" --cache-mib 64
r=$(secs dd if="$work/mnt/big.bin" of=/dev/null bs=1M)
row "cold read from the on-disk cache (remounted)" "$(mibs "$SIZE_MIB" "$r")"
cmp -s /dev/shm/musicfs-bench.bin "$work/mnt/big.bin" || { echo "disk-cache read differs" >&2; exit 1; }
stop_mount

mkdir -p "$work/memfs"
"$BIN/musicfs-memfs" "$work/memfs" --file /dev/shm/musicfs-bench.bin &
memfs_pid=$!
trap 'kill -TERM "$memfs_pid" 2>/dev/null; wait "$memfs_pid" 2>/dev/null; cleanup' EXIT
for _ in $(seq 1 100); do mountpoint -q "$work/memfs" && break; sleep 0.1; done
cold
r=$(secs dd if="$work/memfs/big.bin" of=/dev/null bs=1M)
row "FUSE ceiling: memory-backed FUSE, first read" "$(mibs "$SIZE_MIB" "$r")"
r=$(secs dd if="$work/memfs/big.bin" of=/dev/null bs=1M)
row "FUSE ceiling: memory-backed FUSE, re-read" "$(mibs "$SIZE_MIB" "$r")"
kill -TERM "$memfs_pid"; wait "$memfs_pid" || true
trap cleanup EXIT
r=$(secs dd if=/dev/shm/musicfs-bench.bin of=/dev/null bs=1M)
row "local tmpfs read" "$(mibs "$SIZE_MIB" "$r")"

# Throughput while nodes die: a fresh mount reads a KILL_MIB file; at a
# quarter of it node 1 (a storage node the reader uses) is SIGKILLed and
# at 45 % started again; at 65 % the leader of the file's metadata group
# is SIGKILLed (two of three nodes live throughout).
rm -f /dev/shm/musicfs-bench.bin
start_mount_with
head -c $((KILL_MIB << 20)) /dev/urandom | tee "$work/mnt/kill.bin" | md5sum | cut -d' ' -f1 > "$work/kill.md5"
stop_mount
cold; start_mount_with
group=$(( $(stat -c %i "$work/mnt/kill.bin") >> 48 ))
rc=0
python3 benches/read_series.py "$work/mnt/kill.bin" "$OUT" "$(cat "$work/kill.md5")" \
  --kill-node-at 0.25 --restart-at 0.45 --kill-leader-at 0.65 --group "$group" \
  --restart-cmd "$BIN/musicfs-node --id 1 --listen 127.0.0.1:${port[1]} --data $work/node1 --cluster-secret-file $work/cluster-secret 2>>$work/node1.log" \
  --pid-file "$work/node1.pid" \
  --seeds "$seeds" --musicfs "$BIN/musicfs" --pids "1=${pid[1]},2=${pid[2]},3=${pid[3]}" || rc=$?
# The restarted node is stopped on exit like the others.
[ -s "$work/node1.pid" ] && pid[1]=$(cat "$work/node1.pid")
[ "$rc" = 0 ] || exit "$rc"
stop_mount
python3 benches/plot_series.py "$OUT" "${OUT%.csv}.svg"
echo "time series: $OUT, plot: ${OUT%.csv}.svg"
