#!/usr/bin/env bash
# Metadata at scale: a three-node cluster with 16 groups receives a library
# of FILES empty tracks (artist/album/track, 12 tracks an album, 8 albums an
# artist) through the bulk path while node 3 is down; then node 3 comes back
# and the time it takes to catch up is measured. Reports creates/s (bulk),
# creates/s through the FUSE mount with 1 and 8 threads, lookup latency
# p50/p99 at that size, each node's RSS, and bytes on disk per file per
# replica. Usage: benches/meta-scale.sh [FILES] (as root; docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${1:-1000000}
. benches/lib/cluster.sh
start_cluster 16
seeds12="127.0.0.1:${port[1]},127.0.0.1:${port[2]}"

# Node 3 is down during the load.
sleep 3
kill -KILL "${pid[3]}"; wait "${pid[3]}" 2>/dev/null || true; unset 'pid[3]'
echo "== bulk create of $FILES tracks (node 3 down)"
"$BIN/musicfs-load" create --cluster "$seeds12" --files "$FILES" --parallel 4 | tee "$work/create.json"

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
  python3 - "$work/mnt/fuse-$threads" "$threads" 2000 <<'EOF'
import os, sys, threading, time
root, threads, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(root)
dirs = [os.path.join(root, f"album{t}") for t in range(threads)]
for d in dirs: os.mkdir(d)
def work(d):
    for i in range(per):
        os.close(os.open(os.path.join(d, f"{i:04d}.flac"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
ts = [threading.Thread(target=work, args=(d,)) for d in dirs]
t = time.perf_counter()
for x in ts: x.start()
for x in ts: x.join()
print(f"FUSE creates, {threads} thread(s): {threads * per / (time.perf_counter() - t):.0f}/s")
EOF
done

echo "== memory and disk"
for i in 1 2 3; do
  echo "node $i: RSS $(rss "${pid[$i]}") MiB (peak $(hwm "${pid[$i]}") MiB), metadata on disk $(du -sm "$work/node$i/meta" | cut -f1) MiB"
done
bytes=$(du -sb "$work/node1/meta" | cut -f1)
echo "bytes on disk per file per replica (node 1, log and snapshots included): $((bytes / FILES))"
