#!/usr/bin/env bash
# Storage background work: scrub throughput (every node re-reads and hashes
# all its chunks, page cache dropped first) and repair throughput (node 3
# is killed for good, a fresh node 4 is added, and repair copies a third
# replica of every chunk to it). Both run unthrottled. Usage:
# benches/storage-bench.sh [MIB] (MiB of track data, default 2048; as
# root; docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-2048}
NODE_FLAGS="--repair-after-secs 5 --repair-mib-per-sec 0 --scrub-mib-per-sec 0"
. benches/lib/cluster.sh
start_cluster 16
M="$BIN/musicfs"
now() { date +%s.%N; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# Status as JSON; it exits 2 while the cluster is degraded (node 3 down).
status() { "$M" status --cluster "$seeds" --json 2>/dev/null || true; }

echo "== writing $MIB MiB of tracks (replication 3)"
files=$(( (MIB + 255) / 256 ))
t0=$(now)
for i in $(seq 1 "$files"); do
  head -c 256M /dev/urandom > /dev/shm/musicfs-bench.bin
  "$M" put --cluster "$seeds" /dev/shm/musicfs-bench.bin "/track$i.flac"
done
t1=$(now)
python3 -c "print(f'written: {$files * 256} MiB in {$t1 - $t0:.1f} s')"

echo "== scrub (page cache dropped)"
sync; echo 3 > /proc/sys/vm/drop_caches
t0=$(now)
"$M" scrub start --cluster "$seeds" >/dev/null
until "$M" scrub status --cluster "$seeds" >/dev/null 2>&1; do sleep 0.5; done
t1=$(now)
"$M" scrub status --cluster "$seeds" --json > "$work/scrub.json"
python3 - "$work/scrub.json" "$t0" "$t1" <<'PY'
import json, sys
v = json.load(open(sys.argv[1])); s = float(sys.argv[3]) - float(sys.argv[2])
total = sum(n["status"]["verified_bytes"] for n in v)
for n in v:
    st = n["status"]
    print(f"node {n['node']}: {st['verified_chunks']} chunks, {st['verified_bytes'] / 2**20:.0f} MiB verified, {st['corrupt']} corrupt, {st['missing']} missing")
print(f"scrub: {total / 2**20:.0f} MiB over 3 nodes in {s:.1f} s: {total / 2**20 / s:.0f} MiB/s in all")
PY

echo "== repair: node 3 lost, node 4 added"
kill -KILL "${pid[3]}"; wait "${pid[3]}" 2>/dev/null || true; unset 'pid[3]'
# Until node 3 counts as lost (5 s) and repair has found its chunks.
until [ "$(status | json 'int(d["repair"]["waiting_for_nodes"] > 0)' 2>/dev/null)" = 1 ]; do sleep 0.5; done
start_node 4
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/${port[4]}") 2>/dev/null && break; sleep 0.1; done
t0=$(now)
for _ in $(seq 1 100); do "$M" node add --cluster "$seeds" 4 "127.0.0.1:${port[4]}" >/dev/null 2>&1 && break; sleep 0.2; done
want=$(status | json 'next(n["chunk_bytes"] for n in d["storage"] if n["id"] == 1)')
while :; do
  st=$(status)
  done_=$(echo "$st" | json 'int(d["repair"]["under_replicated"] == 0 and d["repair"]["waiting_for_nodes"] == 0 and next(n["chunk_bytes"] for n in d["storage"] if n["id"] == 4) >= '"$want"')' 2>/dev/null || echo 0)
  [ "$done_" = 1 ] && break
  sleep 0.5
done
t1=$(now)
echo "$st" | json 'd["repair"]'
python3 -c "print(f'repair: {$want / 2**20:.0f} MiB copied to node 4 in {$t1 - $t0:.1f} s (from node add, node 3 already lost): {$want / 2**20 / ($t1 - $t0):.0f} MiB/s')"
