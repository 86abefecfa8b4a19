#!/usr/bin/env bash
# What a library scanner sees through the mount, beside local disk: stat of
# every file of a tree twice in a row (first pass and rescan), and time to
# first byte of each track (open, read 4 KiB, close) from a fresh mount
# after dropping the kernel's caches; with the default 1 s attribute
# timeout and with 60 s. The tree: FILES empty tracks made
# through the bulk path (stat), and a real library of ALBUMS x TRACKS x 4
# formats with covers from ../shared/tools/mklib.sh (time to first byte).
# Usage: benches/client-bench.sh [FILES] [ALBUMS] [TRACKS]  (root;
# docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${1:-10000}; ALBUMS=${2:-8}; TRACKS=${3:-8}
. benches/lib/cluster.sh
start_cluster 16
lib=$work/lib
bash ../shared/tools/mklib.sh "$lib" "$ALBUMS" "$TRACKS" 10 >/dev/null 2>&1
"$BIN/musicfs-load" create --cluster "$seeds" --files "$FILES" --top stat >/dev/null
"$BIN/musicfs" import --cluster "$seeds" "$lib" /music >/dev/null
# Local copies on the same disk: the ceiling.
mkdir -p "$work/local"
cp -r "$lib" "$work/local/music"
python3 - "$work/local/stat" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"Artist {i // 96:06}", f"Album {i // 12 % 8:03}")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, f"{i % 12 + 1:02} Track {i}.flac"), "w").close()
PY
sync
for target in mount mount-ttl60 local; do
  case $target in
    mount) MOUNT_FLAGS=""; start_mount; root=$work/mnt ;;
    # What a library server's mount would use: names and attributes
    # cached for a minute (docs/OPERATIONS.md).
    mount-ttl60) MOUNT_FLAGS="--attr-timeout-ms 60000"; start_mount; root=$work/mnt ;;
    local) root=$work/local ;;
  esac
  echo 3 > /proc/sys/vm/drop_caches
  python3 benches/open_stat.py "$root/stat" "$target: $FILES empty tracks"
  echo 3 > /proc/sys/vm/drop_caches
  python3 benches/open_stat.py "$root/music" "$target: mklib library"
  if [ "$target" != local ]; then kill -TERM "$mount_pid"; wait "$mount_pid" || true; mount_pid=""; fi
done
