#!/usr/bin/env bash
# One directory of FILES entries: created through the bulk path
# (`musicfs-load create` with one album of FILES tracks), then listed whole
# through the FUSE mount (os.scandir, names only) and through `ls -l`-style
# readdirplus + stat of every entry. Reports creates/s, listing entries/s,
# and the mount's peak RSS, which shows whether a listing is streamed in
# pages or held whole. Usage: benches/big-dir.sh [FILES] (as root;
# docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${1:-1000000}
. benches/lib/cluster.sh
start_cluster 16

echo "== bulk create of $FILES entries in one directory"
"$BIN/musicfs-load" create --cluster "$seeds" --files "$FILES" --tracks "$FILES" --albums 1 --parallel 1

start_mount
echo "mount RSS before listing: $(rss "$mount_pid") MiB"
dir="$work/mnt/library/Artist 000000/Album 000"
python3 - "$dir" "$FILES" <<'PY'
import os, sys, time
d, want = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
n = sum(1 for _ in os.scandir(d))
s = time.perf_counter() - t
assert n == want, f"listed {n}, want {want}"
print(f"names only: {n} entries in {s:.1f} s, {n / s:.0f} entries/s")
PY
echo "mount RSS after listing names: $(rss "$mount_pid") MiB (peak $(hwm "$mount_pid") MiB)"
python3 - "$dir" "$FILES" <<'PY'
import os, sys, time
d, want = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
n = sum(1 for e in os.scandir(d) if e.stat(follow_symlinks=False).st_size == 0)
s = time.perf_counter() - t
assert n == want, f"listed {n}, want {want}"
print(f"names and attributes: {n} entries in {s:.1f} s, {n / s:.0f} entries/s")
PY
echo "mount RSS after listing with attributes: $(rss "$mount_pid") MiB (peak $(hwm "$mount_pid") MiB)"
for i in 1 2 3; do echo "node $i: RSS $(rss "${pid[$i]}") MiB (peak $(hwm "${pid[$i]}") MiB)"; done
