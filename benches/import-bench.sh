#!/usr/bin/env bash
# `musicfs import` / `musicfs sync` beside `rsync -a` into a local directory
# and into the FUSE mount, on a real library made by ../shared/tools/mklib.sh:
#   1. first import; 2. a re-sync with no change; 3. a re-sync after
#   re-tagging 10% of the tracks (benches/retag.py, with mutagen), per format;
#   4. a tag scan of every track (first 256 KiB and last 128 bytes) through
#   the mount, cold, and on local disk.
# Usage: benches/import-bench.sh [ALBUMS] [TRACKS] [SECONDS]  (root; docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
ALBUMS=${1:-8}; TRACKS=${2:-8}; SECS=${3:-20}
. benches/lib/cluster.sh
start_cluster 16
start_mount
lib=$work/lib
bash ../shared/tools/mklib.sh "$lib" "$ALBUMS" "$TRACKS" "$SECS" >/dev/null 2>&1
rm -f "$lib"/cover*.jpg
timed() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); python3 -c "print(round($t1 - $t0, 2))"; }
import_json() { "$BIN/musicfs" "$1" --json --cluster "$seeds" "$2" "$3"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
mib() { python3 -c "print(round($1 / 1048576, 2))"; }
files=$(find "$lib" -type f | wc -l); bytes=$(du -sb "$lib" | cut -f1)
echo "library: $files tracks, $(mib "$bytes") MiB ($ALBUMS albums x $TRACKS tracks x 4 formats, ${SECS} s each)"
echo
echo "| step | musicfs import/sync: s | sent MiB | rsync -a to local dir: s | rsync -a to FUSE mount: s |"
echo "|---|---|---|---|---|"
step() { # $1 label, $2 import|sync
  local t0 t1 out
  t0=$(date +%s.%N); out=$(import_json "$2" "$lib" /music); t1=$(date +%s.%N)
  local rl rm
  rl=$(timed rsync -a --delete "$lib/" "$work/local/")
  rm=$(timed rsync -a --delete "$lib/" "$work/mnt/rsync/")
  echo "| $1 | $(python3 -c "print(round($t1 - $t0, 2))") | $(mib "$(echo "$out" | field bytes_sent)") | $rl | $rm |"
}
mkdir -p "$work/local" "$work/mnt/rsync"
step "first import" import
step "re-sync, nothing changed" sync
/usr/bin/python3 -I benches/retag.py "$lib" 10 > "$work/retagged"
step "re-sync after re-tagging $(wc -l < "$work/retagged") tracks (10%)" sync
echo
echo "Per format, after re-tagging every 10th track again (musicfs sync of that format's tree):"
echo
echo "| format | tracks re-tagged | their size MiB | new chunk data sent KiB | per track KiB |"
echo "|---|---|---|---|---|"
/usr/bin/python3 -I benches/retag.py "$lib" 10 > "$work/retagged2"
for f in flac mp3 ogg opus; do
  n=$(grep -c "/$f/" "$work/retagged2" || true)
  size=$(grep "/$f/" "$work/retagged2" | tr '\n' '\0' | du -cb --files0-from=- | tail -1 | cut -f1)
  sent=$(import_json sync "$lib/$f" "/music/$f" | field bytes_sent)
  echo "| $f | $n | $(mib "$size") | $(python3 -c "print(round($sent / 1024, 1))") | $(python3 -c "print(round($sent / 1024 / max($n, 1), 1))") |"
done
echo
# Tag scan: what a library scanner reads of every track.
scan='import os,sys,time
t=time.time(); n=0
for d,_,fs in os.walk(sys.argv[1]):
  for f in fs:
    with open(os.path.join(d,f),"rb") as h:
      h.read(262144); h.seek(-128, 2); h.read(128); n+=1
print(n, round(time.time()-t, 3))'
kill -TERM "$mount_pid"; wait "$mount_pid" || true; mount_pid=""; start_mount
sync; echo 3 > /proc/sys/vm/drop_caches
read -r n_m t_m < <(python3 -c "$scan" "$work/mnt/music")
sync; echo 3 > /proc/sys/vm/drop_caches
read -r n_l t_l < <(python3 -c "$scan" "$lib")
echo "| tag scan (256 KiB + last 128 B of each track), cold | tracks | s | tracks/s |"
echo "|---|---|---|---|"
echo "| MusicFS FUSE mount (fresh mount, caches dropped) | $n_m | $t_m | $(python3 -c "print(round($n_m / max($t_m, 0.001)))") |"
echo "| local disk (caches dropped) | $n_l | $t_l | $(python3 -c "print(round($n_l / max($t_l, 0.001)))") |"
