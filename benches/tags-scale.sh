#!/usr/bin/env bash
# Tags at scale: a three-node cluster with 16 groups receives a library of
# FILES tagged tracks (artist/album/track, 12 tracks an album, 8 albums an
# artist; each artist one of 20 genres, each album one of 60 years) through
# the bulk paths (creates, then tags 1,024 to a command); then times
# beets-style searches and listings of the default tag views over it, and
# reads each node's RSS and metadata size. Usage: benches/tags-scale.sh
# [FILES] (as root; docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${1:-1000000}
. benches/lib/cluster.sh
start_cluster 16

echo "== bulk create of $FILES tagged tracks"
"$BIN/musicfs-load" create --tags --cluster "$seeds" --files "$FILES"

echo "== searches (median of 5 runs; at most 1,000 hits each)"
"$BIN/musicfs-load" search --cluster "$seeds" --files "$FILES"

echo "== tag views (client core, no FUSE): first page and whole listing"
"$BIN/musicfs-load" views --cluster "$seeds" --files "$FILES"

echo "== memory and disk"
for i in 1 2 3; do
  echo "node $i: RSS $(rss "${pid[$i]}") MiB (peak $(hwm "${pid[$i]}") MiB), metadata on disk $(du -sm "$work/node$i/meta" | cut -f1) MiB"
done
