#!/usr/bin/env bash
# What a tag edit of one big track stores: a FLAC and an MP3 of SECONDS
# seconds with a cover (../shared/tools/mklib.sh) are imported, then their
# title is changed three ways: `musicfs tag set` (without a mount), mutagen
# editing the file in place through the FUSE mount (as a tag editor does),
# and mutagen editing a local copy followed by `musicfs sync`. For each:
# the chunk bytes node 1 holds more afterwards (one replica; nothing is
# collected in between) and, for `tag set` and `sync`, the bytes the client
# sent. The edited file is checked with `flac -t` / lofty.
# Usage: benches/tag-edit-bench.sh [SECONDS]  (root, python3-mutagen;
# docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-1200}
. benches/lib/cluster.sh
start_cluster 16
start_mount
lib=$work/lib
bash ../shared/tools/mklib.sh "$lib" 1 1 "$SECS" >/dev/null 2>&1
rm -f "$lib"/cover*.jpg "$lib"/ogg "$lib"/opus -r
"$BIN/musicfs" import --cluster "$seeds" "$lib" /music >/dev/null
stored() { "$BIN/musicfs" node list --json --cluster "$seeds" | python3 -c '
import json,sys
print([n["chunk_bytes"] for n in json.load(sys.stdin) if n["id"] == 1][0])'; }
kib() { python3 -c "print(round($1 / 1024, 1))"; }
retitle() { /usr/bin/python3 -I -c '
import sys, mutagen
f = mutagen.File(sys.argv[1], easy=True); f["title"] = [sys.argv[2]]; f.save()' "$1" "$2"; }
echo "| format | file size, MiB | how | stored by node 1, KiB | sent by the client, KiB |"
echo "|---|---|---|---|---|"
for fmt in flac mp3; do
  rel=$(cd "$lib" && find "$fmt" -type f | head -1)
  size=$(stat -c %s "$lib/$rel")
  mib=$(python3 -c "print(round($size / 1048576, 1))")
  b0=$(stored)
  sent=$("$BIN/musicfs" tag set --json --cluster "$seeds" "/music/$rel" "title=Set by musicfs" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_sent"])')
  b1=$(stored)
  echo "| $fmt | $mib | musicfs tag set | $(kib $((b1 - b0))) | $(kib "$sent") |"
  retitle "$work/mnt/music/$rel" "Edited through the mount"
  b2=$(stored)
  echo "| $fmt | $mib | mutagen in place through the FUSE mount | $(kib $((b2 - b1))) | |"
  retitle "$lib/$rel" "Edited locally, then synced"
  sent=$("$BIN/musicfs" sync --json --cluster "$seeds" "$lib/$fmt" "/music/$fmt" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_sent"])')
  b3=$(stored)
  echo "| $fmt | $mib | mutagen locally, then musicfs sync | $(kib $((b3 - b2))) | $(kib "$sent") |"
  if [ "$fmt" = flac ]; then flac -t -s "$work/mnt/music/$rel" && echo "(flac -t: the synced file decodes)"; fi
done
