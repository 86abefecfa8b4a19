#!/usr/bin/env python3
"""Stat of every file under a tree, twice in a row (the second pass is what
a library scanner's rescan sees while the kernel's and the client's caches
hold the attributes), and time to first byte of every audio track (open,
read 4 KiB, close), as percentiles. Prints one JSON object.

Usage: open_stat.py ROOT LABEL"""
import json
import os
import sys
import time


def main():
    root, label = sys.argv[1], sys.argv[2]
    files = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
    )
    out = {"target": label, "files": len(files)}
    for name in ("stat_first_per_s", "stat_again_per_s"):
        t = time.perf_counter()
        for p in files:
            os.stat(p)
        out[name] = round(len(files) / (time.perf_counter() - t))
    tracks = [p for p in files if p.rsplit(".", 1)[-1] in ("flac", "mp3", "ogg", "opus")]
    lat = []
    for p in tracks:
        t = time.perf_counter()
        fd = os.open(p, os.O_RDONLY)
        os.read(fd, 4096)
        os.close(fd)
        lat.append((time.perf_counter() - t) * 1e3)
    if lat:
        lat.sort()
        pick = lambda q: round(lat[min(len(lat) - 1, int(len(lat) * q))], 2)
        out.update(tracks=len(lat), ttfb_p50_ms=pick(0.5), ttfb_p99_ms=pick(0.99))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
