#!/usr/bin/env bash
# Metadata at scale: a three-node cluster with 16 groups receives a library
# of FILES empty tracks (artist/album/track, 12 tracks an album, 8 albums an
# artist) through the bulk path while node 3 is down; then node 3 comes back
# and the time it takes to catch up is measured. Reports creates/s (bulk),
# creates/s through the FUSE mount with 1 and 8 threads, lookup latency
# p50/p99 at that size, each node's RSS, and bytes on disk per file per
# replica; then stops MusicFS and runs the same FUSE create script on a
# GlusterFS replica-3 volume (installed from apt if missing), the peer the
# targets are set against. Usage: benches/meta-scale.sh [FILES] (as root;
# docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${1:-1000000}
. benches/lib/cluster.sh
. benches/lib/gluster.sh
start_cluster 16
seeds12="127.0.0.1:${port[1]},127.0.0.1:${port[2]}"

# Node 3 is down during the load.
sleep 3
kill -KILL "${pid[3]}"; wait "${pid[3]}" 2>/dev/null || true; unset 'pid[3]'
echo "== bulk create of $FILES tracks (node 3 down)"
"$BIN/musicfs-load" create --cluster "$seeds12" --files "$FILES" | tee "$work/create.json"

echo "== node 3 catches up"
t0=$(date +%s.%N)
start_node 3
# Caught up: node 3 has applied, in every group, what the leader had.
lag=-1
for _ in $(seq 1 36000); do
  lag=$("$BIN/musicfs" status --cluster "$seeds" --json 2>/dev/null | python3 -c '
import json,sys
v=json.load(sys.stdin)
print([n["lag"] for n in v["nodes"] if n["id"] == 3 and n["up"]][0])' 2>/dev/null || echo -1)
  [ "$lag" = 0 ] && break
  sleep 0.5
done
t1=$(date +%s.%N)
echo "catch-up seconds: $(python3 -c "print(round($t1 - $t0, 1))") (entries behind at the end: $lag)"

echo "== lookup latency at $FILES tracks"
"$BIN/musicfs-load" stat --cluster "$seeds" --files "$FILES" --samples 10000

echo "== creates through the FUSE mount"
start_mount
for threads in 1 8; do
  python3 benches/fuse_creates.py "$work/mnt/fuse-$threads" "$threads" 2000 MusicFS
done

echo "== memory and disk"
for i in 1 2 3; do
  echo "node $i: RSS $(rss "${pid[$i]}") MiB (peak $(hwm "${pid[$i]}") MiB), metadata on disk $(du -sm "$work/node$i/meta" | cut -f1) MiB"
done
bytes=$(du -sb "$work/node1/meta" | cut -f1)
echo "bytes on disk per file per replica (node 1, log and snapshots included): $((bytes / FILES))"

echo "== the peer, same machine, same run: GlusterFS replica 3, same FUSE create script"
kill -TERM "$mount_pid"; wait "$mount_pid" 2>/dev/null || true; mount_pid=""
for i in 1 2 3; do kill -TERM "${pid[$i]}"; wait "${pid[$i]}" 2>/dev/null || true; unset "pid[$i]"; done
start_gluster "$work/gluster-mnt"
for threads in 1 8; do
  python3 benches/fuse_creates.py "$work/gluster-mnt/fuse-$threads" "$threads" 2000 GlusterFS
done
stop_gluster
